"""The supervisor: loads the model once, forks workers that share its weights, and
serves the request queue on a Unix socket.

Its life, in order: take the socket directory's lock and clean what a dead host left,
load the model and place its weights for sharing, freeze the heap, fork the workers,
then run one asyncio loop that

* accepts connections (peer uid checked) and admits requests into a bounded queue;
* cuts requests into pieces and hands batches of pieces to idle workers, capped by
  sentence count, estimated padded tokens and bytes (continuous, greedy batching);
* answers each request by its deadline, with vectors or a typed error;
* replaces workers that die (each piece of their batch is retried alone, SHM_MODEL_CRASH_RETRIES times) or that
  overrun a deadline (SIGABRT, then SIGKILL);
* reloads the model on SIGHUP without failing a request, and drains on SIGTERM/SIGINT.

The supervisor never runs the model itself and never starts a torch thread pool, so
that every fork is safe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import gc
import glob
import itertools
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config.model_config import HostConfig, ModelConfig
from shm_model.activation import inherited_socket
from shm_model.errors import (
    BadRequest,
    ConfigError,
    HostUnavailable,
    InternalError,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    ShmModelError,
    WorkerCrashed,
)
from shm_model.memory import process_memory
from shm_model.protocol import (
    PREFIX,
    ConnectionClosed,
    Frame,
    error_reply,
    optional_bool,
    optional_str,
    pack,
    read_body,
    read_frame,
    reply_id,
    request_id,
    request_op,
    request_priority,
    request_timeout,
    result_reply,
    token_counts,
    too_long,
    unpack_prefix,
    validate_texts,
    vectors_from_frame,
    vectors_reply,
)
from shm_model.scheduling import PRIORITIES, BatchLimits, CoreShare, Piece, Request, Scheduler, split
from workers.backends import Backend, load_backend
from workers.worker import WORKER_BOOT_ERROR, Worker, channel_frame_limit, run_forked

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 300.0  # a spawned worker may load a large model before it is ready
MAX_BOOT_FAILURES = 5
KILL_AFTER = 1.0  # seconds between SIGABRT and SIGKILL of a stuck worker
WORKER_STOP_TIMEOUT = 5.0
MAX_CONNECTION_BUFFER = 64 * 1024 * 1024  # a client that stops reading is disconnected
SMALL_FRAME_BYTES = 1 << 16  # request frames up to this size are read without a FrameBudget reservation


def single_threaded() -> None:
    """Keep this process from starting thread pools that would not survive a fork.

    Called before torch is imported where possible (the CLI does so first); workers set
    their own thread count after fork.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    # A worker's intra-op threads sleep at a barrier instead of spinning: with other processes
    # busy, a 2-thread encode of one sentence (bundled model) took p90 97-517 ms spinning and
    # 30 ms sleeping (25 ms on one thread).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@dataclass(eq=False)
class WorkerHandle:
    pid: int
    generation: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float
    state: str = "starting"  # starting | idle | busy | retiring | dead
    batch: list[Piece] | None = None
    threads: int = 0  # intra-op threads of the batch it runs
    priority: str = ""  # class of the batch it runs
    watchdog: asyncio.TimerHandle | None = None
    aborted: bool = False
    requests_served: int = 0
    batches: int = 0
    texts: int = 0
    ready: asyncio.Future[dict[str, Any]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(eq=False)
class Connection:
    writer: asyncio.StreamWriter
    uid: int
    pid: int = 0
    closed: bool = False
    requests: set[Request] = field(default_factory=set)  # admitted and not yet answered

    def send(self, data: bytes) -> None:
        if self.closed or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_CONNECTION_BUFFER:
            log.warning("client (uid %d) stopped reading replies; disconnecting it", self.uid)
            self.close()
            return
        self.writer.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    def drop(self, error: ShmModelError) -> None:
        """Send a connection-level error and close, without waiting for a client that does not read."""
        self.send(error_reply(None, error))
        if not self.closed and self.writer.transport.get_write_buffer_size():
            self.closed = True
            self.writer.transport.abort()
        self.close()


class FrameBudget:
    """Bytes of large request frames being read at once, across all connections.

    A frame's prefix announces its size; a frame over SMALL_FRAME_BYTES reserves that size
    before its body is read, and a frame that does not fit is refused with ``Overloaded``.
    So clients that announce large frames and send them slowly, or never finish them, cannot
    make the supervisor buffer more than ``limit`` bytes (plus SMALL_FRAME_BYTES per connection).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> int:
        """Reserve room for a frame of ``size`` bytes; returns the bytes to ``release`` after it."""
        if size <= SMALL_FRAME_BYTES:
            return 0
        if self.used + size > self.limit:
            raise Overloaded(
                f"the host is reading {self.used} bytes of other large requests (limit "
                f"{self.limit}, SHM_MODEL_MAX_BUFFERED_BYTES); retry later",
                limit=self.limit,
            )
        self.used += size
        return size

    def release(self, reserved: int) -> None:
        self.used -= reserved


class Supervisor:
    def __init__(self, model_cfg: ModelConfig, host_cfg: HostConfig) -> None:
        self.model_cfg = model_cfg
        self.cfg = host_cfg
        self.socket_path = host_cfg.socket_path
        self.lock_path = host_cfg.socket_path + ".lock"
        self.started = time.time()
        self.exit_code = 0
        self._lock_fd: int | None = None
        self._made_dir = False
        self._backend: Backend | None = None
        self._meta: dict[str, Any] = {}
        self._device = "cpu"
        self._start_method = "fork"
        self._worker_count = 1
        self._threads = 1
        self._generation = 0
        self._workers: dict[int, WorkerHandle] = {}
        self._cores = _cores()
        self._core_share = CoreShare(self._cores, 1)
        self._scheduler = Scheduler(
            BatchLimits(
                max_texts=host_cfg.max_batch_size,
                max_tokens=host_cfg.max_batch_tokens,
                max_bytes=host_cfg.max_frame_bytes,
            ),
            bulk_share=host_cfg.bulk_share,
            bulk_batch_seconds=host_cfg.bulk_batch_ms / 1000.0,
            on_expired=self._expire,
        )
        self._requests: set[Request] = set()
        self._connections: set[Connection] = set()
        self._batch_ids = itertools.count(1)
        self._boot_failures = 0
        self._loading = False
        self._respawns_deferred = 0
        self._stopping = False
        self._server: asyncio.base_events.Server | None = None
        self._listen: socket.socket | None = None
        self._changed: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._popen: dict[int, subprocess.Popen[bytes]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self.workers_ready_seconds = 0.0
        self._frame_budget = FrameBudget(host_cfg.buffered_bytes_limit())

    # --- life ------------------------------------------------------------------------

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine as a task that is kept alive until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        single_threaded()
        self._take_lock()
        try:
            self._device = self._resolve_device()
            self._start_method = self.cfg.resolved_start_method(self._device)
            self._worker_count = self.cfg.worker_count(self._device)
            self._threads = self.cfg.threads_for(self._worker_count, self._cores)
            self._core_share = CoreShare(self._cores, self._worker_count)
            if self._worker_count * self._threads > self._cores:
                log.warning(
                    "%d workers x %d threads exceeds %d cores; expect contention",
                    self._worker_count,
                    self._threads,
                    self._cores,
                )
            if self._start_method == "fork":
                self._backend = self._load()
                self._meta = self._backend.describe()
            return asyncio.run(self._serve())
        finally:
            self._cleanup_files()

    def _resolve_device(self) -> str:
        if self.cfg.backend == "dummy":
            return "cpu"
        from workers.backends import resolve_device

        return resolve_device(self.model_cfg.device)

    def _load(self) -> Backend:
        self._loading = True
        try:
            started = time.perf_counter()
            backend = load_backend(self.model_cfg, self.cfg)
            log.info(
                "loaded %s (%s, dim %d) in %.2fs; weights %s",
                backend.name,
                self._device,
                backend.dimension,
                time.perf_counter() - started,
                backend.placement,
            )
            return backend
        finally:
            self._loading = False

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._begin_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._background(self._reload_logged()))
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        gc.freeze()
        try:
            await self._start_generation(self._generation, self._backend)
        except ShmModelError as exc:
            log.error("%s", exc)
            await self._stop_workers(list(self._workers.values()))
            return WORKER_BOOT_ERROR
        self._listen = self._bind()
        self._server = await asyncio.start_unix_server(self._handle_connection, sock=self._listen, limit=1 << 16)
        log.info(
            "serving %s on %s: %d %s workers, %s",
            self._meta.get("model"),
            self.socket_path,
            self._worker_count,
            self._start_method,
            f"up to {self._cores} threads per batch from {self._cores} cores"
            if self._dynamic_threads()
            else f"{self._threads} threads each",
        )
        await self._done.wait()
        return self.exit_code

    # --- socket directory, lock, stale files ---------------------------------------------

    def _take_lock(self) -> None:
        directory = os.path.dirname(self.socket_path)
        mode = 0o711 if self.cfg.allowed_uids else 0o700
        try:
            os.makedirs(directory, mode=mode)
            self._made_dir = True
        except FileExistsError:
            pass
        st = os.stat(directory)
        if st.st_uid != os.getuid():
            raise ConfigError(
                f"socket directory {directory} belongs to uid {st.st_uid}, not to this user "
                f"({os.getuid()}); choose another SHM_MODEL_SOCKET"
            )
        if st.st_mode & 0o777 & ~mode:
            raise ConfigError(
                f"socket directory {directory} has mode {st.st_mode & 0o777:04o}; the host needs a "
                f"private directory (mode {mode:04o}): run 'chmod {mode:o} {directory}' or choose "
                "another SHM_MODEL_SOCKET"
            )
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"another host (pid {holder}) is already serving {self.socket_path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        if os.path.lexists(self.socket_path):
            if not stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.close(fd)
                self._lock_fd = None
                raise ConfigError(f"{self.socket_path} exists and is not a socket; choose another SHM_MODEL_SOCKET")
            log.info("removing stale socket %s left by a host that died", self.socket_path)
            os.unlink(self.socket_path)
        self._remove_stale_segments()

    @staticmethod
    def _remove_stale_segments() -> None:
        """Remove torch shared-memory files of processes that no longer exist."""
        for path in glob.glob("/dev/shm/torch_*"):
            try:
                pid = int(os.path.basename(path).split("_")[1])
                if os.stat(path).st_uid != os.getuid():
                    continue
                os.kill(pid, 0)
            except (ValueError, IndexError, PermissionError, FileNotFoundError):
                continue
            except ProcessLookupError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    log.info("removed stale shared-memory file %s", path)

    def _bind(self) -> socket.socket:
        if (inherited := inherited_socket()) is not None:
            return inherited
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177 if not self.cfg.allowed_uids else 0o111)
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o666 if self.cfg.allowed_uids else 0o600)
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    def _cleanup_files(self) -> None:
        if self._listen is not None:
            self._listen.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None
            if self._made_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self.socket_path))

    # --- workers ------------------------------------------------------------------------

    async def _start_generation(self, generation: int, backend: Backend | None) -> None:
        """Start a full set of workers and wait until every one is ready."""
        started = time.perf_counter()
        handles = [await self._spawn(generation, backend) for _ in range(self._worker_count)]
        for handle in handles:
            try:
                meta = await asyncio.wait_for(asyncio.shield(handle.ready), BOOT_TIMEOUT)
            except (TimeoutError, asyncio.CancelledError):
                raise InternalError(f"worker {handle.pid} did not become ready") from None
            if self._start_method == "spawn":
                self._meta = meta
        self.workers_ready_seconds = time.perf_counter() - started

    async def _spawn(self, generation: int, backend: Backend | None) -> WorkerHandle:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if self._start_method == "fork":
            assert backend is not None
            worker = Worker(
                child_end.fileno(),
                backend,
                threads=self._threads,
                generation=generation,
                parent_pid=os.getpid(),
                max_frame_bytes=self.cfg.max_frame_bytes,
                forked=True,
            )
            pid = os.fork()
            if pid == 0:  # child
                run_forked(worker)
        else:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers.worker",
                    "--fd",
                    str(child_end.fileno()),
                    "--generation",
                    str(generation),
                    "--parent",
                    str(os.getpid()),
                    "--threads",
                    str(self._threads),
                ],
                pass_fds=(child_end.fileno(),),
            )
            pid = proc.pid
            self._popen[pid] = proc
        child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end, limit=1 << 16)
        handle = WorkerHandle(pid, generation, reader, writer, time.time())
        self._workers[pid] = handle
        log.info("started worker %d (generation %d, %s)", pid, generation, self._start_method)
        self._background(self._boot(handle))
        return handle

    async def _boot(self, w: WorkerHandle) -> None:
        try:
            frame = await asyncio.wait_for(
                read_frame(w.reader, channel_frame_limit(self.cfg.max_frame_bytes)), BOOT_TIMEOUT
            )
            if frame.header.get("op") != "ready" or not isinstance(frame.header.get("backend"), dict):
                raise ProtocolError(f"worker {w.pid} sent {frame.header!r:.200} instead of ready")
        except (TimeoutError, ConnectionClosed, ShmModelError, OSError) as exc:
            log.error("worker %d failed to boot: %s", w.pid, exc or type(exc).__name__)
            self._worker_lost(w)
            return
        if w.state != "starting":
            return
        self._boot_failures = 0
        w.state = "idle"
        if not w.ready.done():
            w.ready.set_result(frame.header["backend"])
        if w.generation < self._generation:
            self._retire(w)
        self._dispatch()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._popen.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            w = self._workers.get(pid)
            if w is not None:
                if w.state not in ("retiring", "dead") and not self._stopping:
                    log.warning("worker %d exited with %s", pid, _describe_exit(code))
                self._worker_lost(w, code)
            if self._changed:
                self._changed.set()

    def _worker_lost(self, w: WorkerHandle, exit_code: int | None = None) -> None:
        if w.state == "dead":
            if exit_code is not None:
                self._workers.pop(w.pid, None)
            return
        booting = w.state == "starting"
        w.state = "dead"
        if w.watchdog:
            w.watchdog.cancel()
        w.writer.close()
        if exit_code is None:
            # Its channel broke but it has not been reaped (so its pid is still its own): make sure
            # it does not linger, hung or out of step.
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGKILL)
        else:
            self._workers.pop(w.pid, None)
        if not w.ready.done():
            w.ready.set_exception(InternalError(f"worker {w.pid} exited before it was ready"))
            w.ready.exception()  # mark retrieved: the error is reported by whoever waits
        pieces, w.batch = w.batch, None
        if pieces:
            if w.aborted:
                for piece in pieces:
                    self._fail(piece.request, RequestTimeout("the request's deadline passed"))
            else:
                self.counters["worker_crashes"] += 1
                self._batch_failed(
                    pieces,
                    WorkerCrashed(
                        f"the request crashed a worker {self.cfg.crash_retries + 1} times; it was not retried again",
                        pid=w.pid,
                    ),
                    crashed=True,
                )
            if not self._stopping:
                self._dispatch()
        if self._stopping or w.generation != self._generation:
            self._notify()
            return
        if booting:
            self._boot_failures += 1
            if exit_code == WORKER_BOOT_ERROR or self._boot_failures >= MAX_BOOT_FAILURES:
                log.error("workers keep failing to boot (%d times); stopping", self._boot_failures)
                self.exit_code = WORKER_BOOT_ERROR
                self._begin_stop("boot failure")
                return
        self._schedule_respawn()

    def _schedule_respawn(self) -> None:
        if self._loading:
            self._respawns_deferred += 1
            return
        delay = 0.0 if not self._boot_failures else min(5.0, 0.1 * 2**self._boot_failures)
        loop = asyncio.get_running_loop()
        loop.call_later(delay, lambda: self._background(self._respawn()))

    async def _respawn(self) -> None:
        live = [w for w in self._workers.values() if w.generation == self._generation and w.state != "dead"]
        if self._stopping or len(live) >= self._worker_count:
            return
        self.counters["respawns"] += 1
        await self._spawn(self._generation, self._backend)

    def _retire(self, w: WorkerHandle) -> None:
        """Stop a worker of an older generation once it has no batch."""
        if w.state == "busy":
            return  # retired when its batch finishes
        if w.state != "dead":
            w.state = "retiring"
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)

    def _abort(self, w: WorkerHandle) -> None:
        if w.state != "busy":
            return
        log.error(
            "worker %d is past its batch deadline + %.1fs grace; aborting it",
            w.pid,
            self.cfg.worker_grace,
        )
        self.counters["worker_aborts"] += 1
        w.aborted = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGABRT)
        asyncio.get_running_loop().call_later(KILL_AFTER, self._kill, w.pid)

    def _kill(self, pid: int) -> None:
        if pid in self._workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # --- connections and requests --------------------------------------------------------

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid, uid, _ = struct.unpack("3i", creds)
        conn = Connection(writer, uid, peer_pid)
        if uid != os.getuid() and uid not in self.cfg.allowed_uids:
            log.warning("refused a connection from uid %d (pid %d)", uid, peer_pid)
            self.counters["refused"] += 1
            conn.send(error_reply(None, PermissionDenied(f"uid {uid} may not use this host")))
            conn.close()
            return
        if len(self._connections) >= self.cfg.max_connections:
            log.warning("refused a connection from uid %d (pid %d): %d open", uid, peer_pid, len(self._connections))
            self.counters["errors_overloaded"] += 1
            error = Overloaded(
                f"the host has {len(self._connections)} connections open (limit {self.cfg.max_connections}, "
                "SHM_MODEL_MAX_CONNECTIONS); retry later",
                limit=self.cfg.max_connections,
            )
            conn.drop(error)
            return
        self._connections.add(conn)
        loop = asyncio.get_running_loop()
        limit = self.cfg.max_frame_bytes

        def frame_expired() -> None:
            log.warning("client (uid %d) did not finish a frame in %gs; disconnecting it", uid, self.cfg.frame_timeout)
            self.counters["frame_timeouts"] += 1
            conn.drop(RequestTimeout(f"the frame was not completed within {self.cfg.frame_timeout:g}s"))

        try:
            while not conn.closed:
                # Idle between frames costs one connection slot; once a frame starts, it must be
                # complete within SHM_MODEL_FRAME_TIMEOUT, and a large one must fit the FrameBudget.
                first = await reader.read(1)
                if not first:
                    break
                timer = loop.call_later(self.cfg.frame_timeout, frame_expired)
                reserved = 0
                try:
                    prefix = first + await reader.readexactly(PREFIX.size - 1)
                    header_len, payload_len = unpack_prefix(prefix, limit)
                    reserved = self._frame_budget.reserve(PREFIX.size + header_len + payload_len)
                    frame = await read_body(reader, header_len, payload_len)
                except (ConnectionClosed, asyncio.IncompleteReadError):
                    break
                except (ProtocolError, PayloadTooLarge, Overloaded) as exc:  # the stream is out of step
                    self.counters[f"errors_{exc.code}"] += 1
                    conn.send(error_reply(None, exc))
                    break
                except BadRequest as exc:  # frame consumed, connection still in step
                    self.counters[f"errors_{exc.code}"] += 1
                    conn.send(error_reply(None, exc))
                    continue
                finally:
                    timer.cancel()
                    self._frame_budget.release(reserved)
                self._handle_request(conn, frame)
                if conn.writer.transport.get_write_buffer_size() > 1 << 20:
                    await conn.writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("handling a connection of uid %d failed; this is a bug", uid)
            conn.drop(InternalError("the host failed to handle this connection"))
        finally:
            conn.close()
            self._connections.discard(conn)
            self._abandon(conn)

    def _handle_request(self, conn: Connection, frame: Frame) -> None:
        header = frame.header
        rid = reply_id(header)
        try:
            rid = request_id(header)
            op = request_op(header)
            if op in ("stop", "reload") and conn.uid != os.getuid():
                raise PermissionDenied(
                    f"only the host's own user (uid {os.getuid()}) may {op} it, not uid {conn.uid}", op=op
                )
            if self._stopping and op not in ("ping", "status", "info", "stop"):
                raise HostUnavailable("the host is shutting down")
            if op == "encode":
                self._submit(conn, rid, header)
            elif op == "ping":
                conn.send(result_reply(rid, {"pid": os.getpid(), "generation": self._generation}))
            elif op == "info":
                conn.send(result_reply(rid, self.info()))
            elif op == "status":
                conn.send(result_reply(rid, self.status()))
            elif op == "reload":
                self._background(self._reload_for(conn, rid))
            elif op == "stop":
                conn.send(result_reply(rid, {"stopping": True, "pid": os.getpid()}))
                self._begin_stop("stop request")
        except ShmModelError as exc:
            self.counters[f"errors_{exc.code}"] += 1
            conn.send(error_reply(rid, exc))
        except Exception:
            log.exception("request %r of uid %d failed; this is a bug", rid, conn.uid)
            self.counters["errors_internal_error"] += 1
            conn.send(error_reply(rid, InternalError("the host failed to handle this request")))

    def _resolve_prompt(self, header: dict[str, Any]) -> str | None:
        prompt = optional_str(header, "prompt")
        name = optional_str(header, "prompt_name")
        if prompt is not None or name is None:
            return prompt
        prompts = self._meta.get("prompts") or {}
        if name not in prompts:
            raise BadRequest(f"unknown prompt_name {name!r}; this model has: {', '.join(prompts) or 'none'}")
        return prompts[name]

    def _submit(self, conn: Connection, rid: Any, header: dict[str, Any]) -> None:
        texts = validate_texts(header.get("texts"))
        prompt = self._resolve_prompt(header)
        truncate = optional_bool(header, "truncate", True)
        priority = request_priority(header, len(texts))
        timeout = min(request_timeout(header) or self.cfg.request_timeout, self.cfg.max_request_timeout)
        dim = int(self._meta["dimension"])
        self.counters["requests"] += 1
        self.counters["texts"] += len(texts)
        if not texts:
            conn.send(vectors_reply(rid, np.empty((0, dim), dtype=np.float32), tokens=0))
            return
        if len(self._requests) >= self.cfg.queue_size:
            raise Overloaded(
                f"the host has {len(self._requests)} requests in flight (limit {self.cfg.queue_size}); retry later",
                limit=self.cfg.queue_size,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        req = Request(
            rid,
            conn,
            texts,
            prompt,
            priority,
            conn.pid,
            timeout,
            now,
            now + timeout,
            np.empty((len(texts), dim), dtype=np.float32),
            truncate=truncate,
        )
        req.prepare(int(self._meta.get("max_seq_length") or 512))
        pieces = split(req, self._scheduler.limits)
        req.timer = loop.call_at(req.deadline, self._expire, req)
        self._requests.add(req)
        conn.requests.add(req)
        self._scheduler.push(pieces)
        self._dispatch()

    def _abandon(self, conn: Connection) -> None:
        """Drop the queued work of a client that went away: nobody would read its vectors."""
        for req in list(conn.requests):
            if self._close(req):
                self.counters["abandoned"] += 1

    def _expire(self, req: Request) -> None:
        if req.done:
            return
        self.counters["timeouts"] += 1
        self._fail(req, RequestTimeout(f"the request timed out after {req.timeout:.3g}s", timeout=req.timeout))

    def _close(self, req: Request) -> bool:
        """Mark a request answered; False if it already was."""
        if req.done:
            return False
        req.done = True
        if req.timer:
            req.timer.cancel()
        self._requests.discard(req)
        req.conn.requests.discard(req)
        self._scheduler.drop(req)
        self._notify()
        return True

    def _finish(self, req: Request) -> None:
        if self._close(req):
            req.conn.send(vectors_reply(req.id, req.result, tokens=req.used_tokens))

    def _fail(self, req: Request, error: ShmModelError) -> None:
        if self._close(req):
            self.counters[f"errors_{error.code}"] += 1
            req.conn.send(error_reply(req.id, error))

    def _notify(self) -> None:
        if self._changed:
            self._changed.set()

    # --- batching --------------------------------------------------------------------

    def _dynamic_threads(self) -> bool:
        """Whether each batch gets the cores that busy workers do not hold (CPU, threads on auto)."""
        return self._device == "cpu" and self.cfg.threads_per_worker is None

    def _dispatch(self) -> None:
        """Hand batches to idle workers of the serving generation, while there are cores for them.

        With threads on auto, a batch gets the cores no busy worker holds (``CoreShare``): all of
        them for a lone batch on a quiet host, a fair share on a busy one. A batch never starts
        on cores another batch holds, so threads never outnumber cores.
        """
        loop = asyncio.get_running_loop()
        while self._scheduler.pending():
            idle = [w for w in self._workers.values() if w.state == "idle" and w.generation == self._generation]
            if not idle:
                return
            busy = [w for w in self._workers.values() if w.state == "busy"]
            held = sum(w.threads for w in busy)
            priority = self._scheduler.next_priority()
            threads = self._threads
            if self._dynamic_threads():
                if priority == "bulk" and self._scheduler.bulk_text_over_budget():
                    threads = self._core_share.bulk(held, any(w.priority == "bulk" for w in busy))
                else:
                    interactive = sum(1 for w in busy if w.priority != "bulk")
                    threads = self._core_share.threads(
                        loop.time(), held, interactive, len(idle), self._scheduler.queued_pieces()
                    )
                if threads < 1:
                    return  # the cores are held: the next batch starts when one is released
            pieces = self._scheduler.take(loop.time(), threads)
            if not pieces:
                return
            batch_priority = pieces[0].request.priority
            if self._dynamic_threads() and batch_priority != "bulk" and not self._scheduler.pending(batch_priority):
                threads = self._core_share.last(loop.time(), held)
            worker = idle[0]
            worker.state, worker.batch, worker.threads, worker.priority = "busy", pieces, threads, batch_priority
            self._background(self._run_batch(worker, pieces))

    async def _run_batch(self, w: WorkerHandle, pieces: list[Piece]) -> None:
        """Send one batch to a worker marked busy with it, and deliver what comes back."""
        try:
            await self._exchange(w, pieces)
        except Exception:
            log.exception("batch handling failed on worker %d; this is a bug", w.pid)
            for piece in pieces:
                self._fail(piece.request, InternalError("the host failed to handle this request"))
            self._kill(w.pid)

    async def _exchange(self, w: WorkerHandle, pieces: list[Piece]) -> None:
        loop = asyncio.get_running_loop()
        batch_id = next(self._batch_ids)
        texts = [t for p in pieces for t in p.texts]
        padded = len(texts) * max(p.longest for p in pieces)
        deadline = max(p.request.deadline for p in pieces)
        w.watchdog = loop.call_at(deadline + self.cfg.worker_grace, self._abort, w)
        started = loop.time()
        try:
            w.writer.write(
                pack(
                    {
                        "op": "encode",
                        "id": batch_id,
                        "texts": texts,
                        "prompt": pieces[0].request.prompt,
                        "threads": w.threads,
                    }
                )
            )
            await w.writer.drain()
            frame = await read_frame(w.reader, channel_frame_limit(self.cfg.max_frame_bytes))
        except (ConnectionClosed, ConnectionError, OSError, ShmModelError):
            self._worker_lost(w)
            return
        if w.batch is not pieces:  # lost meanwhile: its pieces were already requeued
            return
        w.watchdog.cancel()
        w.batch = None
        if frame.header.get("id") != batch_id:
            log.error("worker %d answered batch %r for %d; this is a bug", w.pid, frame.header.get("id"), batch_id)
            self._batch_failed(pieces, InternalError("worker reply out of step"), crashed=True)
            self._kill(w.pid)
            return
        w.batches += 1
        w.texts += len(texts)
        if frame.header.get("ok") is True:
            try:
                vectors = vectors_from_frame(frame)
                if vectors.shape[0] != len(texts):
                    raise ProtocolError(f"worker returned shape {vectors.shape} for {len(texts)} texts")
                tokens = token_counts(frame.header, len(texts))
            except ProtocolError as exc:
                self._batch_failed(pieces, InternalError(str(exc)), crashed=False)
            else:
                self._scheduler.observe(w.threads, padded, loop.time() - started, pieces[0].request.priority)
                self._deliver(w, pieces, vectors, tokens)
        else:
            self._batch_failed(pieces, ShmModelError.from_dict(frame.header.get("error")), crashed=False)
        if w.state == "busy":
            w.state = "idle"
            if w.generation != self._generation:
                self._retire(w)
        w.threads = 0
        self._dispatch()

    def _deliver(self, w: WorkerHandle, pieces: list[Piece], vectors: np.ndarray, tokens: list[int]) -> None:
        """Put each piece's vectors in place; a request is answered when its last piece arrives.
        ``tokens`` (one count per text, before truncation) sum into the request's usage, or
        fail a request that refused truncation when one of its texts is over the length."""
        limit = int(self._meta.get("max_seq_length") or 512)
        offset = 0
        for piece in pieces:
            req = piece.request
            rows = vectors[offset : offset + piece.count]
            counts = tokens[offset : offset + piece.count]
            offset += piece.count
            if req.done:
                continue
            if rows.shape[1] != req.result.shape[1]:
                self._fail(req, HostUnavailable("the model changed while the request waited; retry it"))
                continue
            over = [(int(i), n) for i, n in zip(piece.indices, counts, strict=True) if n > limit]
            if over and not req.truncate:
                self._fail(req, too_long(*min(over), limit))
                continue
            req.used_tokens += sum(min(n, limit) for n in counts)
            req.result[piece.indices] = rows
            req.remaining -= 1
            if req.remaining == 0:
                w.requests_served += 1
                self._finish(req)

    def _batch_failed(self, pieces: list[Piece], error: ShmModelError, *, crashed: bool) -> None:
        """Retry each piece of a failed batch alone (after a crash up to SHM_MODEL_CRASH_RETRIES
        times); a piece that fails alone beyond that fails its request."""
        retry: list[Piece] = []
        for piece in pieces:
            if piece.request.done:
                continue
            piece.failures += 1
            isolated = piece.solo or len(pieces) == 1
            if (crashed and piece.failures > self.cfg.crash_retries) or (not crashed and isolated):
                self._fail(piece.request, error)
            else:
                piece.solo = True
                retry.append(piece)
        self._scheduler.push([p for p in retry if not p.request.done], front=True)

    # --- reload and stop --------------------------------------------------------------

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ShmModelError as exc:
            log.error("reload failed, still serving the previous model: %s", exc)

    async def _reload_for(self, conn: Connection, rid: Any) -> None:
        try:
            conn.send(result_reply(rid, await self.reload()))
        except ShmModelError as exc:
            conn.send(error_reply(rid, exc))

    async def reload(self) -> dict[str, Any]:
        """Load the model again, start new workers on it, then retire the old ones."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            if self._stopping:
                raise HostUnavailable("the host is shutting down")
            generation = self._generation + 1
            log.info("reloading the model (generation %d)", generation)
            backend = None
            if self._start_method == "fork":
                loop = asyncio.get_running_loop()
                try:
                    backend = await loop.run_in_executor(None, self._load)
                except ShmModelError:
                    raise
                except Exception as exc:
                    raise InternalError(f"reload failed: {type(exc).__name__}: {exc}") from exc
                finally:
                    deferred, self._respawns_deferred = self._respawns_deferred, 0
                    for _ in range(deferred):
                        self._schedule_respawn()
                gc.freeze()
            try:
                await self._start_generation(generation, backend)
            except ShmModelError:
                for w in [w for w in self._workers.values() if w.generation == generation]:
                    self._retire(w)
                raise
            old_backend = self._backend
            self._generation, self._backend = generation, backend
            if backend is not None:
                self._meta = backend.describe()
            for w in list(self._workers.values()):
                if w.generation < generation:
                    self._retire(w)
            self._dispatch()
            del old_backend
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.counters["reloads"] += 1
            log.info("reloaded: generation %d serving", generation)
            return self.info()

    def _begin_stop(self, reason: str) -> None:
        if self._stopping:
            return
        log.info("stopping (%s): draining %d requests", reason, len(self._requests))
        self._stopping = True
        self._background(self._stop())

    async def _stop(self) -> None:
        assert self._changed is not None and self._done is not None
        loop = asyncio.get_running_loop()
        if self._server is not None:
            self._server.close()
        deadline = loop.time() + self.cfg.graceful_timeout
        while self._requests and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        for req in list(self._requests):
            self._fail(req, HostUnavailable("the host stopped before the request finished"))
        await self._stop_workers(list(self._workers.values()))
        for conn in list(self._connections):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.writer.drain(), 1.0)
            conn.close()
        log.info("stopped")
        self._done.set()

    async def _stop_workers(self, handles: list[WorkerHandle]) -> None:
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        for w in handles:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGTERM)
        deadline = loop.time() + WORKER_STOP_TIMEOUT
        while any(w.pid in self._workers for w in handles) and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.1)
            self._reap()
        for w in handles:
            if w.pid in self._workers:
                log.warning("worker %d ignored SIGTERM; killing it", w.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(w.pid, 0)
                self._worker_lost(w, -signal.SIGKILL)

    # --- reports -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "model": self._meta.get("model"),
            "model_path": self._meta.get("model_path"),
            "dimension": self._meta.get("dimension"),
            "max_seq_length": self._meta.get("max_seq_length"),
            "device": self._meta.get("device"),
            "prompts": self._meta.get("prompts", {}),
            "generation": self._generation,
            "pid": os.getpid(),
        }

    def status(self) -> dict[str, Any]:
        workers = []
        pids = [os.getpid()]
        for w in sorted(self._workers.values(), key=lambda w: w.pid):
            figures = process_memory(w.pid) or {}
            pids.append(w.pid)
            workers.append(
                {
                    "pid": w.pid,
                    "generation": w.generation,
                    "state": w.state,
                    "requests_served": w.requests_served,
                    "batches": w.batches,
                    "texts": w.texts,
                    "threads": w.threads,
                    "uptime_s": round(time.time() - w.started, 3),
                    **figures,
                }
            )
        own = process_memory(os.getpid()) or {"rss": 0, "pss": 0, "uss": 0}
        total = {key: own[key] + sum(w.get(key, 0) for w in workers) for key in ("rss", "pss", "uss")}
        return {
            **self.info(),
            "load_seconds": self._meta.get("load_seconds"),
            "boot_seconds": {
                "import": self._meta.get("import_seconds"),
                "load": self._meta.get("load_seconds"),
                "place": self._meta.get("place_seconds"),
                "fork_until_ready": round(self.workers_ready_seconds, 3),
            },
            "place_seconds": self._meta.get("place_seconds"),
            "weight_bytes": self._meta.get("weight_bytes"),
            "weight_placement": self.cfg.weights,
            "weights": self._meta.get("weights"),
            "start_method": self._start_method,
            "threads_per_worker": "auto" if self._dynamic_threads() else self._threads,
            "cores": self._cores,
            "socket": self.socket_path,
            "uptime_s": round(time.time() - self.started, 3),
            "queue_depth": self._scheduler.queued_pieces(),
            "queue": self._queue_report(),
            "in_flight": len(self._requests),
            "queue_size": self.cfg.queue_size,
            "stopping": self._stopping,
            "supervisor": {"pid": os.getpid(), **own},
            "workers": workers,
            "memory": total,
            "counters": dict(self.counters),
        }

    def _queue_report(self) -> dict[str, Any]:
        """Per priority class: what waits now, and how long admitted requests waited for a worker."""
        scheduler = self._scheduler
        depth = scheduler.depth()
        report: dict[str, Any] = {}
        for priority in PRIORITIES:
            stats = scheduler.stats[priority]
            waits = np.asarray(stats.waits, dtype=np.float64) * 1000.0
            batch_ms = np.asarray(stats.batch_seconds, dtype=np.float64) * 1000.0
            report[priority] = {
                **depth[priority],
                "served_requests": stats.requests,
                "batches": stats.batches,
                "texts_served": stats.texts,
                "tokens_served": stats.tokens,
                "wait_ms": {
                    "p50": round(float(np.percentile(waits, 50)), 3) if waits.size else None,
                    "p99": round(float(np.percentile(waits, 99)), 3) if waits.size else None,
                    "max": round(float(waits.max()), 3) if waits.size else None,
                    "samples": int(waits.size),
                },
                "batch_ms": {
                    "p50": round(float(np.percentile(batch_ms, 50)), 3) if batch_ms.size else None,
                    "p99": round(float(np.percentile(batch_ms, 99)), 3) if batch_ms.size else None,
                    "max": round(float(batch_ms.max()), 3) if batch_ms.size else None,
                    "samples": int(batch_ms.size),
                },
            }
        report["bulk_batch_ms"] = self.cfg.bulk_batch_ms
        report["ms_per_1k_padded_tokens"] = {
            str(threads): round(rate * 1e6, 3) for threads, rate in sorted(scheduler.rates.items())
        }
        return report


def _cores() -> int:
    """Cores this process may run on (its CPU affinity), not every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"
