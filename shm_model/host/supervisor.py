"""The supervisor: loads the model once, forks workers that share its weights, and serves
the request queue on a Unix socket. It wires the host's parts and runs its life:

* ``RunDirectory`` (rundir.py): the socket's directory, lock, stale files, listening socket;
* ``WorkerPool`` (pool.py): worker processes, their states, losses and replacements;
* ``Connections`` (connections.py): who may connect, frames and their memory budget;
* ``Dispatcher`` (dispatch.py): requests, the queue (``shm_model.scheduling``), batches;
* reports.py: ``info`` and ``status``;
* ``MemoryWatch`` (shm_model/pressure.py): memory before a load or reload and while serving.

Its life, in order: take the run directory, load the model and place its weights for
sharing, freeze the heap, fork the workers, then serve on one asyncio loop until SIGTERM or
SIGINT (drain, then exit 0), reloading the model on SIGHUP without failing a request (beside
the serving generation when both fit, else after releasing it: SHM_MODEL_RELOAD), and running
with fewer workers, smaller batches and a shorter queue while memory is short. The
supervisor never runs the model itself and never starts a torch thread pool, so that every
fork is safe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import replace
from typing import Any

from config.model_config import HostConfig, ModelConfig
from shm_model.errors import HostUnavailable, InternalError, PermissionDenied, ShmModelError
from shm_model.host import reports
from shm_model.host.connections import Connection, Connections
from shm_model.host.cpuload import INTERVAL, OutsideLoad
from shm_model.host.dispatch import Dispatcher
from shm_model.host.pool import ProcessSpawner, WorkerHandle, WorkerPool, WorkerState
from shm_model.host.rundir import RunDirectory
from shm_model.pressure import (
    RUNTIME_BYTES,
    Capacity,
    GenerationNeeds,
    MemoryWatch,
    check_fits,
    checkpoint_bytes,
    mib,
    reload_mode,
)
from shm_model.protocol import Frame, error_reply, reply_id, request_id, request_op, result_reply
from shm_model.scheduling import Piece
from workers.models import ModelSet, load_models
from workers.worker import WORKER_BOOT_ERROR, channel_frame_limit

log = logging.getLogger(__name__)


#: Spins of an OpenMP thread waiting at a barrier before it sleeps (GOMP_SPINCOUNT).
OMP_SPIN_COUNT = 30_000


def single_threaded() -> None:
    """Keep this process from starting thread pools that would not survive a fork.

    Called before torch is imported where possible (the CLI does so first); workers set
    their own thread count after fork.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    # A worker's intra-op threads spin briefly at a barrier, then sleep (GNU OpenMP). Spinning
    # without end (OMP_WAIT_POLICY=ACTIVE, or libgomp's default 300,000 spins) made a 2-thread
    # encode of one sentence (bundled model) take p90 97-517 ms with other processes busy and
    # cost 30% of the throughput at 4-16 clients; sleeping at once (PASSIVE) cost a lone
    # request 15% (54-59 against 65-66 req/s at one client). 30,000 spins keep both: one client
    # 65-66 req/s, 4 and 16 clients as with PASSIVE, and with two busy processes beside it a
    # p90 of 42 ms against PASSIVE's 50-54 ms. Set either variable to choose otherwise.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(OMP_SPIN_COUNT)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def available_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity); None where that is not known (not Linux)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:
        return None


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not every core of the machine."""
    cpus = available_cpus()
    return max(1, len(cpus)) if cpus is not None else os.cpu_count() or 1


class Supervisor:
    def __init__(self, model_cfg: ModelConfig, host_cfg: HostConfig) -> None:
        self.model_cfg = model_cfg
        self.cfg = host_cfg
        self.socket_path = host_cfg.socket_path
        self.started = time.time()
        self.exit_code = 0
        self.counters: collections.Counter[str] = collections.Counter()
        self.workers_ready_seconds = 0.0
        self.rundir = RunDirectory(host_cfg.socket_path, host_cfg.allowed_uids)
        self._cores = available_cores()
        self._device = "cpu"
        self._start_method = "fork"
        self._threads = 1
        self._meta: dict[str, Any] = {}
        self._stopping = False
        self.outside: OutsideLoad | None = None  # other processes' load on our cores (threads on auto)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._changed: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._reload_lock: asyncio.Lock | None = None
        self.watch = MemoryWatch(
            host_cfg, Capacity(workers=1, max_batch_tokens=host_cfg.max_batch_tokens, queue_size=host_cfg.queue_size)
        )
        self.pool = WorkerPool(
            ProcessSpawner(start_method="fork", threads=1, max_frame_bytes=host_cfg.max_frame_bytes),
            self,
            size=1,
            frame_limit=channel_frame_limit(host_cfg.max_frame_bytes),
            worker_grace=host_cfg.worker_grace,
            background=self._background,
            counters=self.counters,
            exit_cause=lambda code, aborted: self.watch.worker_died(code, aborted=aborted),
        )
        self.dispatcher = Dispatcher(
            host_cfg,
            self.pool,
            cores=self._cores,
            background=self._background,
            changed=self.changed,
            counters=self.counters,
        )
        self.dispatcher.on_answer = self.watch.record
        self.connections = Connections(
            on_frame=self._handle_request,
            on_closed=self.dispatcher.abandon,
            allowed_uids=host_cfg.allowed_uids,
            max_connections=host_cfg.max_connections,
            max_frame_bytes=host_cfg.max_frame_bytes,
            frame_timeout=host_cfg.frame_timeout,
            buffered_bytes=host_cfg.buffered_bytes_limit(),
            counters=self.counters,
        )

    # --- PoolEvents -----------------------------------------------------------------------

    def worker_idle(self) -> None:
        self.dispatcher.dispatch()

    def batch_lost(self, worker: WorkerHandle, pieces: list[Piece]) -> None:
        self.dispatcher.batch_lost(worker, pieces)

    def changed(self) -> None:
        if self._changed:
            self._changed.set()

    def fatal(self, reason: str) -> None:
        self.exit_code = WORKER_BOOT_ERROR
        self._begin_stop(reason)

    # --- life -------------------------------------------------------------------------------

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a coroutine as a task that is kept alive until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        single_threaded()
        self.rundir.take()
        try:
            self._configure()
            self._check_load()
            if self._start_method == "fork":
                self.pool.backend = self._load()
                self._set_meta(self.pool.backend.describe())
            return asyncio.run(self._serve())
        finally:
            self.rundir.cleanup()

    def _configure(self) -> None:
        self._device = self._resolve_device()
        self._start_method = self.cfg.resolved_start_method(self._device)
        workers = self.cfg.worker_count(self._device)
        self._threads = self.cfg.threads_for(workers, self._cores)
        self.pool.size = workers
        self.pool.spawner = ProcessSpawner(
            start_method=self._start_method,
            threads=self._threads,
            max_frame_bytes=self.cfg.max_frame_bytes,
            spin_seconds=self.cfg.worker_spin_ms / 1000.0,
        )
        self.dispatcher.configure(
            workers=workers,
            threads=self._threads,
            dynamic=self._dynamic_threads(),
            pausable=self._start_method == "fork",
        )
        self.watch.policy.full = replace(self.watch.policy.full, workers=workers)
        if workers * self._threads > self._cores:
            log.warning("%d workers x %d threads > %d cores; expect contention", workers, self._threads, self._cores)

    def _dynamic_threads(self) -> bool:
        """Whether each batch gets the cores that busy workers do not hold (CPU, threads on auto)."""
        return self._device == "cpu" and self.cfg.threads_per_worker is None

    def _resolve_device(self) -> str:
        if self.cfg.backend == "dummy":
            return "cpu"
        from workers.model_source import resolve_device

        return resolve_device(self.model_cfg.device)

    def _check_load(self) -> None:
        """Refuse to start, before loading anything, when the model cannot fit: its weights by placement and
        dtype (from the checkpoint), the model runtime and the workers, against RAM available, the cgroup's
        room and SHM_MODEL_MEMORY_LIMIT."""
        by_dtype: collections.Counter[str] = collections.Counter()
        if self.cfg.backend != "dummy":
            from workers.model_source import resolve_model

            for name in self.model_cfg.names:
                by_dtype.update(checkpoint_bytes(resolve_model(replace(self.model_cfg, name=name)).location))
        needs = GenerationNeeds.from_checkpoint(
            by_dtype,
            placement=self.cfg.weights,
            workers=self.pool.size,
            runtime=0 if "torch" in sys.modules else RUNTIME_BYTES[self.cfg.backend],  # once imported, it is measured
        )
        check_fits(
            needs.total(),
            self.watch.headroom([os.getpid()]),
            hint=f"estimated {needs.describe()}; fewer SHM_MODEL_WORKERS, a smaller model, or more room "
            "(SHM_MODEL_MEMORY_LIMIT, the cgroup's limit) would fit",
        )

    def _load(self) -> ModelSet:
        self.pool.loading_model = True
        try:
            started = time.perf_counter()
            models = load_models(self.model_cfg, self.cfg)
            for backend in models:
                log.info(
                    "loaded %s (%s, dim %d) in %.2fs; weights %s",
                    backend.name,
                    self._device,
                    backend.dimension,
                    backend.load_seconds,
                    backend.placement,
                )
            if len(models) > 1:
                log.info("loaded %d models in %.2fs", len(models), time.perf_counter() - started)
            return models
        finally:
            self.pool.loading_model = False

    def _set_meta(self, meta: dict[str, Any]) -> None:
        self._meta = meta
        self.dispatcher.set_models(meta)

    async def _start_generation(self, generation: int, backend: ModelSet | None) -> None:
        started = time.perf_counter()
        metas = await self.pool.start_generation(generation, backend)
        if self._start_method == "spawn" and metas:
            self._set_meta(metas[-1])
        self.workers_ready_seconds = time.perf_counter() - started

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._begin_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._background(self._reload_logged()))
        loop.add_signal_handler(signal.SIGCHLD, self.pool.reap)
        gc.freeze()
        try:
            await self._start_generation(self.pool.generation, self.pool.backend)
        except ShmModelError as exc:
            log.error("%s", exc)
            await self.pool.stop()
            return WORKER_BOOT_ERROR
        self._background(self._watch_memory())
        if self._dynamic_threads() and self.cfg.outside_load:
            self._background(self._watch_cpu())
        listen = self.rundir.bind()
        self._server = await asyncio.start_unix_server(self.connections.handle, sock=listen, limit=1 << 16)
        log.info(
            "serving %s on %s: %d %s workers, %s",
            self._meta.get("model"),
            self.socket_path,
            self.pool.size,
            self._start_method,
            f"up to {self._cores} threads per batch from {self._cores} cores"
            if self._dynamic_threads()
            else f"{self._threads} threads each",
        )
        await self._done.wait()
        return self.exit_code

    # --- memory -----------------------------------------------------------------------------

    def _pids(self) -> list[int]:
        return [os.getpid(), *self.pool.workers]

    async def _watch_cpu(self) -> None:
        """Read the other processes' load on the host's cores every INTERVAL; batches get no
        thread on a core they keep busy (``cpuload``)."""
        loop = asyncio.get_running_loop()
        cpus = available_cpus()
        if cpus is None:
            return
        self.outside = OutsideLoad(cpus)
        while not self._stopping:
            try:
                self.outside.sample(loop.time(), self._pids())
            except (OSError, ValueError, IndexError) as exc:  # no /proc: batches get every free core
                log.warning("cannot read the CPU load of other processes (%s); not taking it into account", exc)
                return
            self.dispatcher.core_share.outside = self.outside.cores()
            await asyncio.sleep(INTERVAL)

    async def _watch_memory(self) -> None:
        """Look at memory every SHM_MODEL_PRESSURE_INTERVAL (off the loop) and run with the capacity it allows."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            running = [w.pid for w in self.pool.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY)]
            reading = await loop.run_in_executor(None, self.watch.sample, self._pids(), running)
            capacity = self.watch.check(loop.time(), reading)
            self.dispatcher.set_capacity(max_batch_tokens=capacity.max_batch_tokens, queue_size=capacity.queue_size)
            self.pool.resize(capacity.workers)
            await asyncio.sleep(self.cfg.pressure_interval)

    def _generation_needs(self) -> GenerationNeeds:
        """What one more generation of the serving model needs: its copied weights and its workers."""
        weights: collections.Counter[str] = collections.Counter()
        for backend in self.pool.backend or ():
            weights.update(backend.placement)
        return self.watch.needs(weights, self.watch.policy.full.workers)

    def _health(self) -> dict[str, Any]:
        """Degraded or not and why, memory figures and the capacity they allow, worker restarts by cause."""
        report = self.watch.report(
            asyncio.get_running_loop().time(), workers=len(self.pool.serving()), target=self.watch.policy.full.workers
        )
        report["memory_pressure"]["second_generation"] = self._generation_needs().second()
        return report

    # --- requests ---------------------------------------------------------------------------

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
                self.dispatcher.submit(conn, rid, header)
            elif op == "ping":
                conn.send(result_reply(rid, {"pid": os.getpid(), "generation": self.pool.generation}))
            elif op == "info":
                conn.send(result_reply(rid, self.info()))
            elif op == "status":
                self._background(self._answer(conn, rid, self.status()))
            elif op == "reload":
                self._background(self._answer(conn, rid, self.reload()))
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

    async def _answer(self, conn: Connection, rid: Any, result: Awaitable[dict[str, Any]]) -> None:
        try:
            conn.send(result_reply(rid, await result))
        except ShmModelError as exc:
            conn.send(error_reply(rid, exc))

    # --- reports ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return reports.info(self._meta, self.pool.generation)

    async def status(self) -> dict[str, Any]:
        snapshot = self._status_snapshot()
        return await asyncio.get_running_loop().run_in_executor(None, reports.add_memory, snapshot)

    def _status_snapshot(self) -> dict[str, Any]:
        meta = self._meta
        return {
            **self.info(),
            "load_seconds": meta.get("load_seconds"),
            "boot_seconds": {
                "import": meta.get("import_seconds"),
                "load": meta.get("load_seconds"),
                "place": meta.get("place_seconds"),
                "fork_until_ready": round(self.workers_ready_seconds, 3),
            },
            "place_seconds": meta.get("place_seconds"),
            "weight_bytes": meta.get("weight_bytes"),
            "weight_placement": self.cfg.weights,
            "weights": meta.get("weights"),
            "start_method": self._start_method,
            "threads_per_worker": "auto" if self._dynamic_threads() else self._threads,
            "cores": self._cores,
            "outside_busy_cores": round(self.outside.busy, 2) if self.outside else None,
            "socket": self.socket_path,
            "uptime_s": round(time.time() - self.started, 3),
            "queue_depth": self.dispatcher.scheduler.queued_pieces(),
            "queue": reports.queue_report(self.dispatcher.scheduler, self.cfg.bulk_batch_ms),
            "in_flight": len(self.dispatcher.requests),
            "queue_size": self.dispatcher.queue_size,
            "stopping": self._stopping,
            "workers": reports.worker_rows(self.pool.workers.values()),
            "counters": dict(self.counters),
            **self._health(),
        }

    # --- reload and stop ------------------------------------------------------------------------

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ShmModelError as exc:
            log.error("reload failed, still serving the previous model: %s", exc)

    async def reload(self) -> dict[str, Any]:
        """Load the model again, start new workers on it, then retire the old ones."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            if self._stopping:
                raise HostUnavailable("the host is shutting down")
            generation = self.pool.generation + 1
            needs = self._generation_needs()
            headroom = await asyncio.get_running_loop().run_in_executor(None, self.watch.headroom, self._pids())
            mode = reload_mode(self.cfg.reload, needs, headroom)
            log.info(
                "reloading by %s (generation %d): a second generation needs %s (%s), %s available",
                mode, generation, mib(needs.second()), needs.describe(), mib(headroom),
            )  # fmt: skip
            if mode == "swap":
                await self.pool.release()
                gc.unfreeze()
                gc.collect()
            try:
                backend = await self._load_generation(generation)
            except ShmModelError as exc:
                if self.pool.releasing:  # nothing is left to serve with
                    log.error("reload failed after the old generation was released; stopping: %s", exc)
                    self.fatal("reload failed")
                raise
            old_backend = self.pool.backend
            self.pool.adopt(generation, backend)
            if backend is not None:
                self._set_meta(backend.describe())
            self.dispatcher.dispatch()
            del old_backend
            if mode == "overlap":  # a swap freed the old model before the fork; collecting now would touch
                gc.unfreeze()  # every object and unshare the supervisor's pages from the new workers
                gc.collect()
                gc.freeze()
            self.counters["reloads"] += 1
            self.counters[f"reloads_{mode}"] += 1
            log.info("reloaded: generation %d serving", generation)
            return {**self.info(), "reload_mode": mode}

    async def _load_generation(self, generation: int) -> ModelSet | None:
        """Load the model again (fork) and start a full set of workers on it; workers of a failed start retire."""
        backend = None
        if self._start_method == "fork":
            try:
                backend = await asyncio.get_running_loop().run_in_executor(None, self._load)
            except ShmModelError:
                raise
            except Exception as exc:
                raise InternalError(f"reload failed: {type(exc).__name__}: {exc}") from exc
            finally:
                self.pool.respawn_deferred()
            gc.freeze()
        try:
            await self._start_generation(generation, backend)
        except ShmModelError:
            for w in self.pool.live(generation):
                self.pool.retire(w)
            raise
        return backend

    def _begin_stop(self, reason: str) -> None:
        if self._stopping:
            return
        log.info("stopping (%s): draining %d requests", reason, len(self.dispatcher.requests))
        self._stopping = True
        self.pool.stopping = True
        self._background(self._stop())

    async def _stop(self) -> None:
        assert self._changed is not None and self._done is not None
        loop = asyncio.get_running_loop()
        if self._server is not None:
            self._server.close()
        deadline = loop.time() + self.cfg.graceful_timeout
        while self.dispatcher.requests and loop.time() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
        self.dispatcher.fail_all(HostUnavailable("the host stopped before the request finished"))
        await self.pool.stop()
        await self.connections.drain_and_close()
        log.info("stopped")
        self._done.set()
