"""The worker pool: worker processes, their states, and what happens when one is lost.

A worker is always in one ``WorkerState``; ``WorkerHandle.move`` is the only place that
changes it and refuses a transition that is not in ``TRANSITIONS``::

    starting -> idle <-> busy            (booted; takes a batch; returns it)
    starting | idle -> retiring          (an older generation after a reload, a smaller pool, a swap)
    any -> dead                          (exited, channel broken, or stopped)

The pool starts workers through a ``Spawner`` (fork or a fresh interpreter in production, a
fake in unit tests), waits for each one's ``ready`` frame, reaps exits, replaces lost workers
of the serving generation (with a backoff while they keep failing to boot, and a fatal stop
after ``MAX_BOOT_FAILURES``), retires older generations after a reload, and aborts a worker
whose batch outlives its deadline (SIGABRT, then SIGKILL). What was running on a lost worker
goes back to the host through ``PoolEvents.batch_lost``. ``resize`` changes how many workers
run (memory pressure); ``release`` retires every worker and drops the model before a reload
that has no room for two generations. Why a worker died (OOM kill, watchdog, crash) is told
by ``exit_cause`` when one is given.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from shm_model.errors import InternalError, ProtocolError, ShmModelError
from shm_model.protocol import ConnectionClosed, read_frame
from shm_model.scheduling import Piece
from workers.worker import WORKER_BOOT_ERROR, Worker, run_forked

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 300.0  # a spawned worker may load a large model before it is ready
MAX_BOOT_FAILURES = 5
KILL_AFTER = 1.0  # seconds between SIGABRT and SIGKILL of a stuck worker
WORKER_STOP_TIMEOUT = 5.0


class WorkerState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"
    DEAD = "dead"


S = WorkerState
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.STARTING: frozenset({S.IDLE, S.RETIRING, S.DEAD}),
    S.IDLE: frozenset({S.BUSY, S.RETIRING, S.DEAD}),
    S.BUSY: frozenset({S.IDLE, S.DEAD}),
    S.RETIRING: frozenset({S.DEAD}),
    S.DEAD: frozenset(),
}


@dataclass(eq=False)
class WorkerHandle:
    pid: int
    generation: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float
    state: WorkerState = WorkerState.STARTING
    batch: list[Piece] | None = None
    threads: int = 0  # intra-op threads of the batch it runs
    priority: str = ""  # class of the batch it runs
    watchdog: asyncio.TimerHandle | None = None
    aborted: bool = False  # killed by the watchdog: its batch timed out, it did not crash
    pause: PauseFlag | None = None  # a byte shared with the worker: set, its batch waits between layers
    paused_since: float | None = None  # loop time its batch was paused, while it is
    paused_seconds: float = 0.0  # time its current batch spent paused
    requests_served: int = 0
    batches: int = 0
    texts: int = 0
    ready: asyncio.Future[dict[str, Any]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def move(self, state: WorkerState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise InternalError(f"worker {self.pid} cannot go from {self.state.value} to {state.value}")
        self.state = state

    def assign(self, pieces: list[Piece], threads: int, priority: str) -> None:
        self.move(WorkerState.BUSY)
        self.batch, self.threads, self.priority = pieces, threads, priority

    def set_paused(self, paused: bool, now: float) -> None:
        """Pause its batch between two layers (its cores are lent to a query), or let it go on."""
        assert self.pause is not None
        if paused and self.paused_since is None:
            self.paused_since = now
        elif not paused and self.paused_since is not None:
            self.paused_seconds += now - self.paused_since
            self.paused_since = None
        self.pause[0] = 1 if paused else 0

    def take_batch(self) -> list[Piece] | None:
        """The batch it was running (now no longer its own), with its watchdog cancelled."""
        if self.watchdog:
            self.watchdog.cancel()
        if self.paused_since is not None:
            self.set_paused(False, self.paused_since)
        self.paused_seconds = 0.0
        pieces, self.batch = self.batch, None
        return pieces


#: A byte shared by the supervisor and one worker (an anonymous shared mapping made before fork).
PauseFlag = mmap.mmap | bytearray


@dataclass
class Started:
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pause: PauseFlag | None = None  # None: its batches cannot be paused (spawned workers)


class Spawner(Protocol):
    """Starts worker processes and signals and reaps them."""

    async def start(self, generation: int, backend: Any) -> Started:
        """Start a worker; returns its pid, its channel and its pause flag."""
        ...

    def signal(self, pid: int, sig: signal.Signals) -> None: ...

    def reap(self) -> Iterator[tuple[int, int]]:
        """(pid, exit code) of each worker that exited since the last call."""
        ...

    def wait(self, pid: int) -> None:
        """Block until a killed worker is gone."""
        ...


class PoolEvents(Protocol):
    def worker_idle(self) -> None:
        """A worker can take a batch."""

    def batch_lost(self, worker: WorkerHandle, pieces: list[Piece]) -> None:
        """A worker was lost with this batch on it (``worker.aborted``: by the watchdog)."""

    def changed(self) -> None:
        """Workers exited or requests finished (someone may be waiting for it)."""

    def fatal(self, reason: str) -> None:
        """The pool cannot keep workers alive: stop the host with WORKER_BOOT_ERROR."""


class ProcessSpawner:
    """Workers as forked children (sharing the loaded model) or fresh interpreters."""

    def __init__(self, *, start_method: str, threads: int, max_frame_bytes: int, spin_seconds: float = 0.0) -> None:
        self.start_method = start_method
        self.threads = threads
        self.max_frame_bytes = max_frame_bytes
        self.spin_seconds = spin_seconds
        self._popen: dict[int, subprocess.Popen[bytes]] = {}

    async def start(self, generation: int, backend: Any) -> Started:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pause = None
        if self.start_method == "fork":
            assert backend is not None
            pause = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: the child sees what the parent sets
            worker = Worker(
                child_end.fileno(),
                backend,
                threads=self.threads,
                generation=generation,
                parent_pid=os.getpid(),
                max_frame_bytes=self.max_frame_bytes,
                forked=True,
                pause=pause,
                spin_seconds=self.spin_seconds,
            )
            pid = os.fork()
            if pid == 0:  # child
                run_forked(worker)
        else:
            command = [sys.executable, "-m", "workers.worker", "--fd", str(child_end.fileno())]
            command += ["--generation", str(generation), "--parent", str(os.getpid()), "--threads", str(self.threads)]
            proc = subprocess.Popen(command, pass_fds=(child_end.fileno(),))
            pid = proc.pid
            self._popen[pid] = proc
        child_end.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end, limit=1 << 16)
        return Started(pid, reader, writer, pause)

    def signal(self, pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def reap(self) -> Iterator[tuple[int, int]]:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._popen.pop(pid, None)
            yield pid, os.waitstatus_to_exitcode(status)

    def wait(self, pid: int) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        self._popen.pop(pid, None)


class WorkerPool:
    def __init__(
        self,
        spawner: Spawner,
        events: PoolEvents,
        *,
        size: int,
        frame_limit: int,
        worker_grace: float,
        background: Callable[[Coroutine[Any, Any, Any]], None],
        counters: collections.Counter[str] | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        kill_after: float = KILL_AFTER,
        exit_cause: Callable[[int, bool], str] | None = None,
    ) -> None:
        self.spawner = spawner
        self.events = events
        self.size = size  # workers of the serving generation
        self.frame_limit = frame_limit  # largest frame read from a worker
        self.worker_grace = worker_grace
        self.boot_timeout = boot_timeout
        self.kill_after = kill_after
        self.background = background
        self.counters = counters if counters is not None else collections.Counter()
        self.workers: dict[int, WorkerHandle] = {}
        self.generation = 0
        self.backend: Any = None
        self.stopping = False
        self.boot_failures = 0
        # While a model loads in this process (a reload runs it in a thread), replacements wait:
        # a fork then would copy a half-built model. ``respawn_deferred`` starts them after.
        self.loading_model = False
        self._respawns_deferred = 0
        self.exit_cause = exit_cause  # (exit code, aborted by the watchdog) -> oom_kill | watchdog | crash
        self.releasing = False  # ``release`` retired every worker: none is replaced until ``adopt``

    # --- views ----------------------------------------------------------------------------

    def idle(self) -> list[WorkerHandle]:
        """Idle workers of the serving generation, the only ones that take batches."""
        return [w for w in self.workers.values() if w.state is S.IDLE and w.generation == self.generation]

    def busy(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state is S.BUSY]

    def live(self, generation: int | None = None) -> list[WorkerHandle]:
        gen = self.generation if generation is None else generation
        return [w for w in self.workers.values() if w.generation == gen and w.state is not S.DEAD]

    def serving(self) -> list[WorkerHandle]:
        """Workers of the serving generation that serve or will (not retiring)."""
        return [w for w in self.live() if w.state is not S.RETIRING]

    # --- starting ---------------------------------------------------------------------------

    async def start_generation(self, generation: int, backend: Any) -> list[dict[str, Any]]:
        """Start a full set of workers and wait until every one is ready; returns what each
        said of its model."""
        handles = [await self.spawn(generation, backend) for _ in range(self.size)]
        metas = []
        for handle in handles:
            try:
                metas.append(await asyncio.wait_for(asyncio.shield(handle.ready), self.boot_timeout))
            except (TimeoutError, asyncio.CancelledError):
                raise InternalError(f"worker {handle.pid} did not become ready") from None
        return metas

    async def spawn(self, generation: int, backend: Any) -> WorkerHandle:
        started = await self.spawner.start(generation, backend)
        pid = started.pid
        handle = WorkerHandle(pid, generation, started.reader, started.writer, time.time(), pause=started.pause)
        self.workers[pid] = handle
        log.info("started worker %d (generation %d)", pid, generation)
        self.background(self._boot(handle))
        return handle

    async def _boot(self, w: WorkerHandle) -> None:
        try:
            frame = await asyncio.wait_for(read_frame(w.reader, self.frame_limit), self.boot_timeout)
            if frame.header.get("op") != "ready" or not isinstance(frame.header.get("backend"), dict):
                raise ProtocolError(f"worker {w.pid} sent {frame.header!r:.200} instead of ready")
        except (TimeoutError, ConnectionClosed, ShmModelError, OSError) as exc:
            log.error("worker %d failed to boot: %s", w.pid, str(exc) or type(exc).__name__)
            self.lost(w)
            return
        if w.state is not S.STARTING:
            return
        self.boot_failures = 0
        w.move(S.IDLE)
        if not w.ready.done():
            w.ready.set_result(frame.header["backend"])
        if w.generation < self.generation:
            self.retire(w)
        self.events.worker_idle()

    def respawn_deferred(self) -> None:
        """Start the replacements that waited while a model loaded (see ``loading_model``)."""
        deferred, self._respawns_deferred = self._respawns_deferred, 0
        for _ in range(deferred):
            self.schedule_respawn()

    def schedule_respawn(self) -> None:
        if self.loading_model:
            self._respawns_deferred += 1
            return
        delay = 0.0 if not self.boot_failures else min(5.0, 0.1 * 2**self.boot_failures)
        asyncio.get_running_loop().call_later(delay, lambda: self.background(self._respawn()))

    async def _respawn(self) -> None:
        if self.stopping or self.releasing or len(self.serving()) >= self.size:
            return
        self.counters["respawns"] += 1
        await self.spawn(self.generation, self.backend)

    def adopt(self, generation: int, backend: Any) -> None:
        """Serve ``generation`` from now on; older workers retire once they have no batch."""
        self.generation, self.backend = generation, backend
        self.releasing = False
        for w in list(self.workers.values()):
            if w.generation < generation:
                self.retire(w)

    def resize(self, size: int) -> None:
        """Run ``size`` workers: idle ones beyond it retire now, busy ones after their batch; missing
        ones start."""
        if size == self.size:
            return
        grow = size > self.size
        self.size = size
        serving = self.serving()
        if grow:
            for _ in range(size - len(serving)):
                self.schedule_respawn()
        else:
            for w in [w for w in serving if w.state is not S.BUSY][: max(0, len(serving) - size)]:
                self.retire(w)

    async def release(self) -> None:
        """Retire every worker (each after its batch), wait until they are gone and drop the model,
        so that the next generation loads into the memory they held. Until ``adopt``, no worker is
        replaced and batches wait in the queue."""
        self.releasing = True
        old = list(self.workers.values())
        for w in old:
            self.retire(w)
        while any(w.pid in self.workers for w in old) and not self.stopping:
            await asyncio.sleep(0.02)  # SIGCHLD reaps them; this catches a signal lost to a race
            self.reap()
        self.backend = None

    # --- losing -----------------------------------------------------------------------------

    def reap(self) -> None:
        for pid, code in self.spawner.reap():
            w = self.workers.get(pid)
            if w is not None:
                if not self.stopping and not (w.state is S.RETIRING and code in (0, -signal.SIGTERM)):
                    self._report_exit(w, code)
                self.lost(w, code)
        self.events.changed()

    def _report_exit(self, w: WorkerHandle, code: int) -> None:
        """Log why a worker that was not retired ended (its channel may have broken first)."""
        cause = self.exit_cause(code, w.aborted) if self.exit_cause else "crash"
        if cause == "oom_kill":
            log.error("worker %d was killed by the OOM killer (%s)", w.pid, describe_exit(code))
        else:
            log.warning("worker %d exited with %s (%s)", w.pid, describe_exit(code), cause)

    def lost(self, w: WorkerHandle, exit_code: int | None = None) -> None:
        """A worker exited (``exit_code``) or its channel broke (None): settle its batch and
        replace it if it belongs to the serving generation."""
        if w.state is S.DEAD:
            if exit_code is not None:
                self.workers.pop(w.pid, None)
            return
        booting = w.state is S.STARTING
        w.move(S.DEAD)
        w.writer.close()
        if exit_code is None:
            # Its channel broke but it has not been reaped (so its pid is still its own): make sure
            # it does not linger, hung or out of step.
            self.spawner.signal(w.pid, signal.SIGKILL)
        else:
            self.workers.pop(w.pid, None)
        if not w.ready.done():
            w.ready.set_exception(InternalError(f"worker {w.pid} exited before it was ready"))
            w.ready.exception()  # mark retrieved: the error is reported by whoever waits
        pieces = w.take_batch()
        if pieces:
            if not w.aborted:
                self.counters["worker_crashes"] += 1
            self.events.batch_lost(w, pieces)
        if self.stopping or w.generation != self.generation:
            self.events.changed()
            return
        if booting:
            self.boot_failures += 1
            if exit_code == WORKER_BOOT_ERROR or self.boot_failures >= MAX_BOOT_FAILURES:
                log.error("workers keep failing to boot (%d times); stopping", self.boot_failures)
                self.events.fatal("boot failure")
                return
        self.schedule_respawn()

    def retire(self, w: WorkerHandle) -> None:
        """Stop a worker of an older generation once it has no batch."""
        if w.state in (S.BUSY, S.DEAD, S.RETIRING):
            return  # a busy one is retired when its batch finishes
        w.move(S.RETIRING)
        self.spawner.signal(w.pid, signal.SIGTERM)

    def batch_done(self, w: WorkerHandle) -> None:
        """Its batch was answered: it takes another, or retires if a reload replaced it, the pool is
        smaller now or is being released."""
        if w.state is S.BUSY:
            w.move(S.IDLE)
            if w.generation != self.generation or self.releasing or len(self.serving()) > self.size:
                self.retire(w)
        w.threads = 0

    def watch(self, w: WorkerHandle, deadline: float) -> None:
        """Abort ``w`` if its batch is still running ``worker_grace`` after ``deadline`` (loop time)."""
        w.watchdog = asyncio.get_running_loop().call_at(deadline + self.worker_grace, self.abort, w)

    def abort(self, w: WorkerHandle) -> None:
        if w.state is not S.BUSY:
            return
        log.error("worker %d is past its batch deadline + %.1fs grace; aborting it", w.pid, self.worker_grace)
        self.counters["worker_aborts"] += 1
        w.aborted = True
        self.spawner.signal(w.pid, signal.SIGABRT)
        asyncio.get_running_loop().call_later(self.kill_after, self.kill, w.pid)

    def kill(self, pid: int) -> None:
        if pid in self.workers:
            self.spawner.signal(pid, signal.SIGKILL)

    async def stop(self, handles: list[WorkerHandle] | None = None, timeout: float = WORKER_STOP_TIMEOUT) -> None:
        """SIGTERM, wait up to ``timeout`` for them to exit, then SIGKILL the rest."""
        handles = list(self.workers.values()) if handles is None else handles
        loop = asyncio.get_running_loop()
        for w in handles:
            self.spawner.signal(w.pid, signal.SIGTERM)
        deadline = loop.time() + timeout
        while any(w.pid in self.workers for w in handles) and loop.time() < deadline:
            await asyncio.sleep(0.02)  # SIGCHLD also reaps; this catches a signal lost to a race
            self.reap()
        for w in handles:
            if w.pid in self.workers:
                log.warning("worker %d ignored SIGTERM; killing it", w.pid)
                self.spawner.signal(w.pid, signal.SIGKILL)
                self.spawner.wait(w.pid)
                self.lost(w, -signal.SIGKILL)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"
