"""One worker process: receives batches from the supervisor over its channel, encodes, replies.

``Worker.__init__`` runs before fork (or in a freshly spawned interpreter) and changes
nothing in the process; ``init_process()`` runs in the new process and sets up
everything that must not cross a fork: signals, parent-death watch, descriptors,
torch threads. The worker exits when its channel closes or its parent dies.

Spawned workers (CUDA, or SHM_MODEL_START_METHOD=spawn) start as
``python -m workers.worker --fd N ...`` and load the model themselves.
"""

from __future__ import annotations

import argparse
import ctypes
import faulthandler
import logging
import mmap
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from shm_model import logs
from shm_model.errors import InternalError, ShmModelError
from shm_model.protocol import ConnectionClosed, error_reply, pack, recv_frame, vectors_reply
from workers.models import ModelSet

log = logging.getLogger(__name__)

#: Exit code of a worker that could not boot; the supervisor stops instead of respawning.
WORKER_BOOT_ERROR = 3
_PR_SET_PDEATHSIG = 1


def channel_frame_limit(max_frame_bytes: int) -> int:
    """Bound on frames between supervisor and worker: a batch re-packs up to one request's texts."""
    return 8 * max_frame_bytes + (1 << 20)


def _malloc_trim() -> Callable[[], object]:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    return lambda: trim(0)


_release_free_memory = _malloc_trim()

#: A worker gives its freed activations back to the OS once no batch came for this long.
TRIM_AFTER_IDLE_SECONDS = 0.05


def _channel_poller(sock: socket.socket) -> select.poll:
    """A poller that tells when ``sock`` has something to read (a frame, or the end). poll, not
    select: a forked worker's channel may have a descriptor number above select's 1024."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return poller


def poll_briefly(poller: select.poll, seconds: float) -> bool:
    """Whether the polled channel becomes readable within ``seconds``, polling without sleeping
    and yielding the core between polls to any thread waiting for it.

    A worker does this after each answer: a client that waits on each answer sends its next
    request a millisecond or two later, which then needs no wake-up of this process, and the
    core does not go idle in between (on a virtual machine, an idle virtual CPU is slow to wake,
    and each hop between processes on the way back pays for it)."""
    deadline = time.perf_counter() + seconds
    while True:
        if poller.poll(0):
            return True
        if time.perf_counter() >= deadline:
            return False
        os.sched_yield()


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), then re-check."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the channel EOF still ends the worker
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def own_progress_lock() -> None:
    """Give this process a progress-bar lock of its own.

    tqdm guards its bars with a multiprocessing lock (a semaphore shared by every process
    forked after it was made: the supervisor made it while loading the model), and
    sentence-transformers takes it for every batch even with the bar off. A worker killed
    while holding it (SIGKILL by the OOM killer or the watchdog) would leave it held for
    every worker forked after, each then blocked forever on its first batch."""
    try:
        from tqdm import std
    except ImportError:  # no tqdm: nothing shared
        return
    std.TqdmDefaultWriteLock.mp_lock = None  # locks made from now on are this process's only
    lock = threading.RLock()
    classes = [std.tqdm]
    while classes:
        cls = classes.pop()
        if cls is std.tqdm or "_lock" in vars(cls):
            cls.set_lock(lock)
        classes.extend(cls.__subclasses__())


class Worker:
    def __init__(
        self,
        channel_fd: int,
        backend: ModelSet | None,
        *,
        threads: int,
        generation: int,
        parent_pid: int,
        max_frame_bytes: int,
        forked: bool,
        pause: mmap.mmap | None = None,
        spin_seconds: float = 0.0,
    ) -> None:
        self.channel_fd = channel_fd
        self.backend = backend
        self.threads = threads
        self.generation = generation
        self.parent_pid = parent_pid
        self.frame_limit = channel_frame_limit(max_frame_bytes)
        self.forked = forked
        self.pause = pause  # one shared byte: nonzero while the supervisor pauses this worker's batch
        self.spin_seconds = spin_seconds  # polling for the next batch after an answer (SHM_MODEL_WORKER_SPIN_MS)
        self.channel: socket.socket | None = None

    def init_process(self) -> None:
        die_with_parent(self.parent_pid)
        logs.set_role(f"worker g{self.generation}")
        if self.forked:
            # The parent's asyncio loop owns the wakeup fd and no-op handlers: undo both.
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGABRT):
                signal.signal(sig, signal.SIG_DFL)
            # Client connections, the listening socket and other workers' channels must not
            # stay open here, or a client would not see the host go away.
            os.closerange(3, self.channel_fd)
            os.closerange(self.channel_fd + 1, 1 << 16)
            own_progress_lock()
        # Ctrl-C reaches the whole process group; the supervisor decides when workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        faulthandler.enable()  # SIGABRT from the supervisor's watchdog dumps the stack
        self.channel = socket.socket(fileno=self.channel_fd)
        self.channel.setblocking(True)

    def run(self) -> int:
        assert self.backend is not None and self.channel is not None
        self.backend.prepare_worker(self.threads)
        if self.pause is not None:
            self.backend.set_gate(pause_gate(self.pause))
        self.channel.sendall(pack({"op": "ready", "pid": os.getpid(), "backend": self.backend.describe()}))
        log.info("ready (%d torch threads)", self.threads)
        trimmed = True
        poller = _channel_poller(self.channel)
        while True:
            # Give the batches' freed activations back to the OS once the worker is idle (about
            # 2 ms after a 32 x 256-token batch). Not after every batch: the next batch would
            # fault the same pages in again, which cost a batch of one short text on the bundled
            # model about 0.5-0.8 ms of its 17 ms.
            if not trimmed and not poller.poll(TRIM_AFTER_IDLE_SECONDS * 1000.0):
                _release_free_memory()
                trimmed = True
            try:
                frame = recv_frame(self.channel, self.frame_limit)
            except (ConnectionClosed, ConnectionError):
                log.info("channel closed; exiting")
                return 0
            self.channel.sendall(self.handle(frame.header))
            trimmed = False
            if self.spin_seconds:
                poll_briefly(poller, self.spin_seconds)

    def handle(self, header: dict[str, Any]) -> bytes:
        batch_id = header.get("id")
        try:
            if header.get("op") != "encode":
                raise InternalError(f"worker got unknown op {header.get('op')!r}; this is a bug")
            texts = header["texts"]
            threads = header.get("threads")
            if isinstance(threads, int) and threads > 0 and threads != self.threads:
                self.backend.set_threads(threads)  # type: ignore[union-attr]
                self.threads = threads
            model = self.backend.get(header.get("model"))  # type: ignore[union-attr]
            vectors, tokens = model.encode_counted(texts, header.get("prompt"))
            return vectors_reply(batch_id, vectors, tokens=tokens)
        except ShmModelError as exc:
            return error_reply(batch_id, exc)
        except Exception as exc:
            log.exception("encode failed")
            return error_reply(batch_id, InternalError(f"encode failed: {type(exc).__name__}: {exc}"))


#: How often a paused batch looks whether it may go on.
PAUSE_POLL_SECONDS = 0.001


def pause_gate(flag: mmap.mmap) -> Callable[[], None]:
    """A gate that waits while ``flag``'s byte is set (the supervisor sets it to lend this
    worker's cores to a query, and clears it when the query is done)."""

    def gate() -> None:
        while flag[0]:
            time.sleep(PAUSE_POLL_SECONDS)

    return gate


def run_forked(worker: Worker) -> None:
    """Body of a forked child: never returns into the parent's code."""
    code = 1
    try:
        worker.init_process()
        code = worker.run()
    except BaseException:
        log.exception("worker failed")
    finally:
        logging.shutdown()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a spawned worker: loads its own model from the environment's config."""
    parser = argparse.ArgumentParser(prog="python -m workers.worker", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited channel descriptor")
    parser.add_argument("--generation", type=int, default=0)
    parser.add_argument("--parent", type=int, required=True, help="supervisor pid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from config.model_config import HostConfig, ModelConfig

    host_cfg = HostConfig.load()
    logs.setup(host_cfg.log_level, role=f"worker g{args.generation}")
    worker = Worker(
        args.fd,
        None,
        threads=args.threads,
        generation=args.generation,
        parent_pid=args.parent,
        max_frame_bytes=host_cfg.max_frame_bytes,
        forked=False,
        spin_seconds=host_cfg.worker_spin_ms / 1000.0,
    )
    worker.init_process()
    try:
        from workers.models import load_models

        worker.backend = load_models(ModelConfig.load(), host_cfg, place=False)
    except Exception as exc:  # noqa: BLE001
        log.error("worker could not load the model: %s", exc)
        return WORKER_BOOT_ERROR
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
