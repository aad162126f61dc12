"""The worker pool and the dispatcher in process, with fake workers (asyncio tasks on socket
pairs speaking the worker protocol): states, losses, replacements, retirement, the watchdog,
and what happens to requests when a worker crashes, hangs or refuses a batch."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from config.model_config import HostConfig
from shm_model.errors import InternalError
from shm_model.host import pool as pool_module
from shm_model.host.dispatch import Dispatcher
from shm_model.host.pool import (
    MAX_BOOT_FAILURES,
    ProcessSpawner,
    WorkerHandle,
    WorkerPool,
    WorkerState,
    describe_exit,
)
from shm_model.protocol import pack
from tests.unit.host_fakes import META, Events, FakeConnection, FakeSpawner

DEADLINE = 5.0  # seconds any in-process test may wait for a state


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, DEADLINE * 2))


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until ``condition`` holds (the fakes answer within a few loop turns)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class Host:
    """A pool of fake workers, and optionally a dispatcher on it, wired as the supervisor does."""

    def __init__(
        self,
        *,
        size: int = 2,
        dispatcher: bool = False,
        dynamic: bool = False,
        spawner: FakeSpawner | None = None,
        exit_cause: Callable[[int, bool], str] | None = None,
        **cfg: Any,
    ) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.spawner = spawner or FakeSpawner()
        self.events = Events()
        self.counters: collections.Counter[str] = collections.Counter()
        self.pool = WorkerPool(
            self.spawner,
            self.events,
            size=size,
            frame_limit=1 << 24,
            worker_grace=cfg.pop("worker_grace", 0.05),
            background=self.background,
            counters=self.counters,
            boot_timeout=cfg.pop("boot_timeout", DEADLINE),
            kill_after=0.05,
            exit_cause=exit_cause,
        )
        self.spawner.pool = self.pool
        self.dispatcher = None
        if dispatcher:
            self.dispatcher = Dispatcher(
                HostConfig(**cfg), self.pool, cores=2, background=self.background, changed=lambda: None,
                counters=self.counters,
            )  # fmt: skip
            self.dispatcher.set_models(META)
            self.dispatcher.configure(workers=size, threads=1, dynamic=dynamic)
            self.events.dispatcher = self.dispatcher

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def states(self) -> list[str]:
        return sorted(w.state.value for w in self.pool.workers.values())

    async def start(self) -> None:
        await self.pool.start_generation(0, None)

    async def close(self) -> None:
        self.pool.stopping = True
        await self.pool.stop(timeout=1.0)
        for task in list(self.tasks):
            task.cancel()


def test_a_worker_moves_only_along_its_transitions() -> None:
    async def body() -> None:
        host = Host(size=1)
        await host.start()
        (w,) = host.pool.workers.values()
        assert w.state is WorkerState.IDLE
        with pytest.raises(InternalError, match="cannot go from idle to idle"):
            w.move(WorkerState.IDLE)
        w.assign([], 2, "bulk")
        assert (w.state, w.threads, w.priority) == (WorkerState.BUSY, 2, "bulk")
        with pytest.raises(InternalError, match="busy to retiring"):
            w.move(WorkerState.RETIRING)
        host.pool.batch_done(w)
        assert (w.state, w.threads) == (WorkerState.IDLE, 0)
        await host.close()
        assert w.state is WorkerState.DEAD
        with pytest.raises(InternalError):
            w.move(WorkerState.IDLE)

    run(body())


def test_the_pool_starts_its_size_and_replaces_a_worker_that_exits() -> None:
    async def body() -> None:
        host = Host(size=2)
        await host.start()
        assert host.states() == ["idle", "idle"]
        first = min(host.pool.workers)
        host.spawner.exit(first, -signal.SIGKILL)
        await until(lambda: first not in host.pool.workers and host.states() == ["idle", "idle"], "a replacement")
        assert host.counters["respawns"] == 1 and host.spawner.started == 3
        assert not host.events.lost  # it had no batch
        await host.close()

    run(body())


def test_workers_that_keep_failing_to_boot_stop_the_host() -> None:
    async def body() -> None:
        host = Host(size=1)
        host.spawner.boot = False
        with pytest.raises(InternalError, match="ready"):
            await host.start()
        # Exit status 3 (the model failed to load) is fatal at once; other boot failures are
        # retried with a backoff up to MAX_BOOT_FAILURES.
        assert host.events.fatal_reasons == ["boot failure"]
        assert host.pool.boot_failures == 1 < MAX_BOOT_FAILURES
        await host.close()

    run(body())


def test_a_reload_retires_idle_old_workers_at_once_and_busy_ones_after_their_batch() -> None:
    async def body() -> None:
        host = Host(size=2)
        await host.start()
        busy, idle = sorted(host.pool.workers.values(), key=lambda w: w.pid)
        busy.assign([], 1, "interactive")
        await host.pool.start_generation(1, None)
        host.pool.adopt(1, None)
        assert idle.state is WorkerState.RETIRING and idle.pid in host.spawner.sent(signal.SIGTERM)
        assert busy.state is WorkerState.BUSY and busy.pid not in host.spawner.sent(signal.SIGTERM)
        assert [w.generation for w in host.pool.idle()] == [1, 1]  # only the new generation takes batches
        host.pool.batch_done(busy)
        assert busy.state is WorkerState.RETIRING and busy.pid in host.spawner.sent(signal.SIGTERM)
        await until(lambda: sorted(host.pool.workers) == sorted(w.pid for w in host.pool.live(1)), "old ones gone")
        assert host.counters["respawns"] == 0  # retired workers are not replaced
        await host.close()

    run(body())


def test_replacements_wait_while_a_model_loads() -> None:
    async def body() -> None:
        host = Host(size=1)
        await host.start()
        host.pool.loading_model = True
        (pid,) = host.pool.workers
        host.spawner.exit(pid, -signal.SIGKILL)
        await until(lambda: pid not in host.pool.workers, "the loss")
        await asyncio.sleep(0.02)
        assert host.spawner.started == 1  # no fork while the model is half built
        host.pool.loading_model = False
        host.pool.respawn_deferred()
        await until(lambda: host.states() == ["idle"], "the deferred replacement")
        await host.close()

    run(body())


def test_requests_are_batched_and_answered_through_fake_workers() -> None:
    async def body() -> None:
        host = Host(size=2, dispatcher=True, max_batch_size=4)
        await host.start()
        assert host.dispatcher is not None
        conn = FakeConnection()
        host.dispatcher.submit(conn, 1, {"texts": ["a", "bb", "ccc", "dddd", "eeeee", "f"]})  # type: ignore[arg-type]
        await until(lambda: 1 in conn.replies, "the answer")
        vectors = conn.vectors(1)
        assert vectors[:, 0].tolist() == [1, 2, 3, 4, 5, 1]  # each text's vector in its place
        assert max(len(texts) for _, texts, _ in host.spawner.batches) <= 4
        assert conn.replies[1].header["tokens"] == 16
        assert not host.dispatcher.requests and not conn.requests
        await host.close()

    run(body())


@pytest.mark.parametrize("dynamic", [False, True])
def test_waiting_texts_are_shared_evenly_by_the_workers_that_can_run_side_by_side(dynamic: bool) -> None:
    async def body() -> None:
        host = Host(size=2, dispatcher=True, dynamic=dynamic)
        await host.start()
        assert host.dispatcher is not None
        conn = FakeConnection()
        host.dispatcher.submit(conn, 1, {"texts": [f"t{i}" for i in range(8)]})  # type: ignore[arg-type]
        await until(lambda: 1 in conn.replies, "the answer")
        sizes = [(len(texts), threads) for _, texts, threads in host.spawner.batches]
        if dynamic:  # a lone batch on a quiet host takes both cores: nothing runs beside it
            assert sizes == [(8, 2)]
        else:  # one thread each: the first batch takes half, the rest is shared as workers free up
            assert sizes[0] == (4, 1) and sum(n for n, _ in sizes) == 8
            assert max(n for n, _ in sizes[1:]) <= 2  # half of what waited when the second worker took it
            assert len({pid for pid, _, _ in host.spawner.batches}) == 2
        await host.close()

    run(body())


def test_a_crashing_request_fails_alone_after_its_retries_and_the_others_are_answered() -> None:
    async def body() -> None:
        host = Host(size=1, dispatcher=True, crash_retries=1)
        await host.start()
        assert host.dispatcher is not None
        w = next(iter(host.pool.workers.values()))
        w.assign([], 1, "interactive")  # hold the worker so that both requests share the first batch
        conn = FakeConnection()
        host.dispatcher.submit(conn, 1, {"texts": ["__crash__"]})  # type: ignore[arg-type]
        host.dispatcher.submit(conn, 2, {"texts": ["ok", "fine"]})  # type: ignore[arg-type]
        host.pool.batch_done(w)
        host.dispatcher.dispatch()
        await until(lambda: {1, 2} <= set(conn.replies), "both answers")
        assert conn.error(1) == "worker_crashed" and conn.error(2) is None
        batches = sorted(sorted(texts) for _, texts, _ in host.spawner.batches)
        # together once, then each piece alone: the crashing one twice (SHM_MODEL_CRASH_RETRIES=1)
        assert batches == [["__crash__"], ["__crash__", "fine", "ok"], ["fine", "ok"]]
        assert host.counters["worker_crashes"] == 2
        await until(lambda: host.states() == ["idle"], "the replacement")
        await host.close()

    run(body())


def test_a_batch_past_its_deadline_aborts_the_worker_and_times_out_without_a_retry() -> None:
    async def body() -> None:
        host = Host(size=1, dispatcher=True, worker_grace=0.01)
        await host.start()
        assert host.dispatcher is not None
        conn = FakeConnection()
        host.dispatcher.submit(conn, 1, {"texts": ["__hang__"], "timeout_ms": 50})  # type: ignore[arg-type]
        await until(lambda: 1 in conn.replies, "the timeout")
        assert conn.error(1) == "timeout"
        await until(lambda: bool(host.events.lost), "the aborted worker to be lost")
        (pid, _, aborted), *_ = host.events.lost
        assert aborted and pid in host.spawner.sent(signal.SIGABRT) and host.counters["worker_aborts"] == 1
        assert host.counters["worker_crashes"] == 0  # a timeout, not a crash
        assert sum("__hang__" in texts for _, texts, _ in host.spawner.batches) == 1
        await until(lambda: host.states() == ["idle"], "the replacement")
        await host.close()

    run(body())


def test_a_refused_batch_is_retried_piece_by_piece_so_only_the_bad_request_fails() -> None:
    async def body() -> None:
        host = Host(size=1, dispatcher=True)
        await host.start()
        assert host.dispatcher is not None
        conn = FakeConnection()
        host.pool.workers[min(host.pool.workers)].assign([], 1, "interactive")  # hold the worker
        host.dispatcher.submit(conn, 1, {"texts": ["__error__"]})  # type: ignore[arg-type]
        host.dispatcher.submit(conn, 2, {"texts": ["good"]})  # type: ignore[arg-type]
        w = next(iter(host.pool.workers.values()))
        host.pool.batch_done(w)
        host.dispatcher.dispatch()
        await until(lambda: {1, 2} <= set(conn.replies), "both answers")
        assert conn.error(1) == "bad_request" and conn.error(2) is None
        assert [texts for _, texts, _ in host.spawner.batches] == [["__error__", "good"], ["__error__"], ["good"]]
        await host.close()

    run(body())


def test_the_work_of_a_client_that_went_away_is_not_encoded() -> None:
    async def body() -> None:
        host = Host(size=1, dispatcher=True)
        await host.start()
        assert host.dispatcher is not None
        w = next(iter(host.pool.workers.values()))
        w.assign([], 1, "interactive")  # the only worker is busy: requests queue
        gone, staying = FakeConnection(pid=1), FakeConnection(pid=2)
        host.dispatcher.submit(gone, 1, {"texts": ["x"] * 3})  # type: ignore[arg-type]
        host.dispatcher.submit(staying, 2, {"texts": ["y"]})  # type: ignore[arg-type]
        host.dispatcher.abandon(gone)  # type: ignore[arg-type]
        assert host.counters["abandoned"] == 1 and len(host.dispatcher.requests) == 1
        host.pool.batch_done(w)
        host.dispatcher.dispatch()
        await until(lambda: 2 in staying.replies, "the other client's answer")
        assert [texts for _, texts, _ in host.spawner.batches] == [["y"]] and not gone.replies
        await host.close()

    run(body())


def test_a_full_queue_refuses_with_overloaded() -> None:
    async def body() -> None:
        host = Host(size=1, dispatcher=True, queue_size=2)
        await host.start()
        assert host.dispatcher is not None
        next(iter(host.pool.workers.values())).assign([], 1, "interactive")
        conn = FakeConnection()
        host.dispatcher.submit(conn, 1, {"texts": ["a"]})  # type: ignore[arg-type]
        host.dispatcher.submit(conn, 2, {"texts": ["b"]})  # type: ignore[arg-type]
        with pytest.raises(Exception, match="2 requests in flight") as refused:
            host.dispatcher.submit(conn, 3, {"texts": ["c"]})  # type: ignore[arg-type]
        assert refused.value.code == "overloaded"  # type: ignore[attr-defined]
        await host.close()

    run(body())


@pytest.mark.parametrize("pause_bulk", [True, False])
def test_a_query_borrows_the_cores_of_a_running_bulk_batch_which_waits_between_layers(pause_bulk: bool) -> None:
    async def body() -> None:
        host = Host(size=2, dispatcher=True, dynamic=True, pause_bulk=pause_bulk)
        await host.start()
        assert host.dispatcher is not None
        ingest, chat = FakeConnection(pid=1), FakeConnection(pid=2)
        host.dispatcher.submit(ingest, 1, {"texts": ["__layers__:300"], "priority": "bulk"})  # type: ignore[arg-type]
        await until(lambda: host.spawner.batches, "the bulk batch to start")
        assert host.spawner.batches[0][2] == 2  # a lone batch on a quiet host takes both cores
        host.dispatcher.submit(chat, 2, {"texts": ["query"], "priority": "interactive"})  # type: ignore[arg-type]
        await until(lambda: 2 in chat.replies and 1 in ingest.replies, "both answers")
        query_threads = next(threads for _, texts, threads in host.spawner.batches if texts == ["query"])
        # only a batch that may pause runs the layers that have the gate (a worker's eager ones)
        assert host.spawner.gated == [pause_bulk, False]
        if pause_bulk:
            # Answered while the bulk batch waited, on the cores it lent; then the bulk batch went on.
            assert host.counters["bulk_pauses"] == 1 and host.spawner.paused_while
            assert query_threads == 2 and chat.error(2) is None and ingest.error(1) is None
            assert not any(flag[0] for flag in host.spawner.pauses.values())
            assert chat.at[2] < ingest.at[1]
        else:  # the query waits for the bulk batch's cores
            assert host.counters["bulk_pauses"] == 0 and not host.spawner.paused_while
            assert chat.at[2] > ingest.at[1]
        await host.close()

    run(body())


class StuckSpawner(FakeSpawner):
    """Workers stuck in native code: SIGABRT does not end them, only SIGTERM and SIGKILL do."""

    def signal(self, pid: int, sig: signal.Signals) -> None:
        self.signals.append((pid, sig))
        if sig in (signal.SIGTERM, signal.SIGKILL):
            self.exit(pid, -sig)


def test_a_worker_past_its_deadline_is_aborted_then_killed_if_the_abort_does_not_end_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        host = Host(size=1, spawner=StuckSpawner(), worker_grace=0.2)
        await host.start()
        (w,) = host.pool.workers.values()
        host.pool.abort(w)  # an idle worker has no batch to be late with
        assert not host.spawner.signals and not w.aborted and host.counters["worker_aborts"] == 0
        w.assign([], 1, "bulk")
        loop = asyncio.get_running_loop()
        start = loop.time()
        host.pool.watch(w, start)
        await until(lambda: w.pid in host.spawner.sent(signal.SIGKILL), "the kill")
        assert loop.time() - start >= 0.2 + 0.05  # the grace, then kill_after
        assert host.spawner.signals == [(w.pid, signal.SIGABRT), (w.pid, signal.SIGKILL)]
        assert w.aborted and host.counters["worker_aborts"] == 1
        assert f"worker {w.pid} is past its batch deadline + 0.2s grace; aborting it" in caplog.messages
        await until(lambda: host.states() == ["idle"], "the replacement")
        (second,) = host.pool.workers.values()
        second.assign([], 1, "bulk")
        host.pool.abort(second)
        assert host.counters["worker_aborts"] == 2
        await until(lambda: second.pid not in host.pool.workers, "the second worker to be reaped")
        host.pool.kill(second.pid)  # gone already: not signalled again
        assert host.spawner.sent(signal.SIGKILL).count(second.pid) == 1
        await host.close()

    run(body())


def test_a_paused_batch_adds_up_the_time_it_waited_and_is_let_go_when_taken() -> None:
    async def body() -> None:
        w = WorkerHandle(7, 0, None, None, 0.0, state=WorkerState.IDLE, pause=bytearray(1))  # type: ignore[arg-type]
        w.assign([], 2, "bulk")
        w.set_paused(False, 5.0)  # not paused: nothing to end
        assert (w.pause[0], w.paused_since, w.paused_seconds) == (0, None, 0.0)
        w.set_paused(True, 10.0)
        w.set_paused(True, 11.0)  # already paused since 10
        assert (w.pause, w.paused_since) == (bytearray(b"\x01"), 10.0)
        w.set_paused(False, 12.5)
        assert (w.pause[0], w.paused_since, w.paused_seconds) == (0, None, 2.5)
        w.set_paused(True, 20.0)
        w.set_paused(False, 21.0)
        assert w.paused_seconds == 3.5
        w.set_paused(True, 30.0)
        assert w.take_batch() == []
        assert (w.pause[0], w.paused_since, w.paused_seconds, w.batch) == (0, None, 0.0, None)

    run(body())


def test_release_retires_every_worker_after_its_batch_and_replaces_none() -> None:
    async def body() -> None:
        host = Host(size=2)
        await host.start()
        host.pool.adopt(0, "model")
        busy, idle = sorted(host.pool.workers.values(), key=lambda w: w.pid)
        busy.assign([], 1, "bulk")
        release = asyncio.get_running_loop().create_task(host.pool.release())
        await until(lambda: idle.pid not in host.pool.workers, "the idle worker to go")
        assert not release.done() and busy.state is WorkerState.BUSY and host.pool.backend == "model"
        loop = asyncio.get_running_loop()
        start = loop.time()
        host.pool.batch_done(busy)  # released: it retires instead of taking another batch
        assert busy.state is WorkerState.RETIRING
        await asyncio.wait_for(release, 1.0)
        assert loop.time() - start < 1.0  # it looks for the exits every few milliseconds
        assert host.pool.workers == {} and host.pool.backend is None
        await asyncio.sleep(0.02)
        assert host.spawner.started == 2 and host.counters["respawns"] == 0
        host.pool.adopt(1, "next")
        assert not host.pool.releasing
        await host.close()

    run(body())


@pytest.mark.parametrize(
    ("cause", "level", "line"),
    [
        (None, "WARNING", "worker {pid} exited with signal SIGKILL (crash)"),
        ("oom_kill", "ERROR", "worker {pid} was killed by the OOM killer (signal SIGKILL)"),
        ("watchdog", "WARNING", "worker {pid} exited with signal SIGKILL (watchdog)"),
    ],
)
def test_a_worker_that_exits_unasked_is_logged_with_its_cause(
    caplog: pytest.LogCaptureFixture, cause: str | None, level: str, line: str
) -> None:
    asked: list[tuple[int, bool]] = []

    def exit_cause(code: int, aborted: bool) -> str:
        asked.append((code, aborted))
        return str(cause)

    async def body() -> None:
        host = Host(size=1, exit_cause=exit_cause if cause else None)
        await host.start()
        (pid,) = host.pool.workers
        host.spawner.exit(pid, -signal.SIGKILL)
        await until(lambda: pid not in host.pool.workers, "the loss")
        records = [r for r in caplog.records if r.name == "shm_model.host.pool" and str(pid) in r.getMessage()]
        assert [(r.levelname, r.getMessage()) for r in records[1:]] == [(level, line.format(pid=pid))]
        assert asked == ([(-signal.SIGKILL, False)] if cause else [])
        await host.close()

    caplog.set_level(logging.INFO, "shm_model.host.pool")
    run(body())


def test_exits_are_described_by_signal_name_or_code() -> None:
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
    assert describe_exit(-200) == "signal 200"
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(3) == "exit code 3"


def test_replacements_back_off_while_workers_keep_failing_to_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    async def body() -> None:
        host = Host(size=1)
        delays: list[float] = []
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "call_later", lambda delay, *args: delays.append(delay))
        for failures in (0, 1, 2, 5, 6, 9):
            host.pool.boot_failures = failures
            host.pool.schedule_respawn()
        assert delays == [0.0, 0.2, 0.4, 3.2, 5.0, 5.0]

    run(body())


def test_the_process_spawner_waits_for_and_reaps_its_children() -> None:
    spawner = ProcessSpawner(start_method="spawn", threads=1, max_frame_bytes=1000)
    assert list(spawner.reap()) == []  # no child at all
    pid = os.fork()
    if pid == 0:
        time.sleep(0.05)
        os._exit(7)
    spawner._popen[pid] = None  # type: ignore[assignment]
    spawner.wait(pid)
    assert pid not in spawner._popen
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped by wait
    spawner.wait(pid)  # gone already: no error
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    spawner._popen[pid] = None  # type: ignore[assignment]
    deadline = time.monotonic() + DEADLINE
    reaped: list[tuple[int, int]] = []
    while not reaped and time.monotonic() < deadline:
        reaped = list(spawner.reap())
        time.sleep(0.005)
    assert reaped == [(pid, 7)] and pid not in spawner._popen
    spawner.signal(pid, signal.SIGTERM)  # a pid that is gone is no error


def test_a_forked_worker_shares_its_pause_flag_with_the_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[dict[str, Any]] = []

    class Recorded:
        def __init__(self, fd: int, backend: Any, **kwargs: Any) -> None:
            made.append({"backend": backend, **kwargs})

    monkeypatch.setattr(pool_module, "Worker", Recorded)
    monkeypatch.setattr(pool_module.os, "fork", lambda: 4321)  # the parent's side of the fork

    async def body() -> None:
        spawner = ProcessSpawner(start_method="fork", threads=3, max_frame_bytes=1000, spin_seconds=0.003)
        started = await spawner.start(2, "model")
        assert started.pid == 4321 and spawner._popen == {}
        assert started.pause is not None and len(started.pause) == 1 and started.pause[0] == 0
        (kwargs,) = made
        assert kwargs["pause"] is started.pause  # what the supervisor sets, the worker sees
        assert kwargs == {
            "backend": "model",
            "threads": 3,
            "generation": 2,
            "parent_pid": os.getpid(),
            "max_frame_bytes": 1000,
            "forked": True,
            "pause": started.pause,
            "spin_seconds": 0.003,
        }
        started.writer.close()

    run(body())


def test_a_spawned_worker_is_a_fresh_interpreter_given_its_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], tuple[int, ...]]] = []

    class Popen:
        pid = 5678

        def __init__(self, command: list[str], pass_fds: tuple[int, ...]) -> None:
            calls.append((command, pass_fds))

    monkeypatch.setattr(pool_module.subprocess, "Popen", Popen)

    async def body() -> None:
        spawner = ProcessSpawner(start_method="spawn", threads=3, max_frame_bytes=1000)
        started = await spawner.start(2, None)
        assert started.pid == 5678 and started.pause is None  # its batches cannot be paused
        assert isinstance(spawner._popen[5678], Popen)
        ((command, pass_fds),) = calls
        fd = int(command[4])
        assert command == [
            sys.executable, "-m", "workers.worker", "--fd", str(fd),
            "--generation", "2", "--parent", str(os.getpid()), "--threads", "3",
        ]  # fmt: skip
        assert pass_fds == (fd,)
        with pytest.raises(OSError):
            os.fstat(fd)  # the child's end is closed in the supervisor once passed on
        assert await started.reader.read() == b""  # its other end is the child's alone
        started.writer.close()

    run(body())


def test_adopting_a_generation_ends_a_release_and_respawns_are_counted() -> None:
    async def body() -> None:
        host = Host(size=1)
        await host.start()
        await host.pool.start_generation(1, "next")
        host.pool.releasing = True
        host.pool.adopt(1, "next")
        assert host.pool.releasing is False and host.pool.backend == "next"
        await until(lambda: host.states() == ["idle"], "the old generation to go")
        for expected in (1, 2):
            (pid,) = host.pool.workers
            host.spawner.exit(pid, -signal.SIGKILL)
            await until(lambda gone=pid: host.states() == ["idle"] and gone not in host.pool.workers, "a replacement")
            assert host.counters["respawns"] == expected
        await host.close()

    run(body())


def test_deferred_replacements_are_started_once_each() -> None:
    async def body() -> None:
        host = Host(size=2)
        await host.start()
        host.pool.loading_model = True
        lost = list(host.pool.workers)
        for pid in lost:
            host.spawner.exit(pid, -signal.SIGKILL)
        await until(lambda: not host.pool.workers, "the losses")
        await asyncio.sleep(0.02)
        assert host.spawner.started == 2
        host.pool.loading_model = False
        host.pool.respawn_deferred()
        await until(lambda: host.states() == ["idle", "idle"], "both deferred replacements")
        host.pool.respawn_deferred()  # none is left to start
        await asyncio.sleep(0.02)
        assert host.spawner.started == 4
        await host.close()

    run(body())


class SilentSpawner(FakeSpawner):
    """Workers that start but never say ready (a model load that hangs)."""

    async def _run(self, pid: int, child: Any, boot: bool) -> None:
        await asyncio.Event().wait()


def test_a_worker_that_never_says_ready_is_given_up_after_the_boot_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        host = Host(size=1, spawner=SilentSpawner(), boot_timeout=0.05)
        with pytest.raises(InternalError, match="did not become ready"):
            await host.start()
        (pid,) = [p for p, _ in host.spawner.exited] or list(host.pool.workers)
        await until(lambda: pid in host.spawner.sent(signal.SIGKILL), "the silent worker to be killed")
        assert host.pool.boot_failures >= 1
        assert f"worker {pid} failed to boot: TimeoutError" in caplog.messages
        await host.close()

    run(body())


def test_a_smaller_pool_retires_only_the_idle_workers_beyond_its_size() -> None:
    async def body() -> None:
        host = Host(size=3)
        await host.start()
        busy, *idle = sorted(host.pool.workers.values(), key=lambda w: w.pid)
        busy.assign([], 1, "bulk")
        host.pool.resize(2)
        assert busy.state is WorkerState.BUSY
        assert sorted(w.state.value for w in idle) == ["idle", "retiring"]
        await until(lambda: len(host.pool.workers) == 2, "the retired worker to go")
        (kept,) = [w for w in idle if w.state is WorkerState.IDLE]
        host.pool.loading_model = True  # a worker lost now is not replaced yet
        host.spawner.exit(busy.pid, -signal.SIGKILL)
        await until(lambda: busy.pid not in host.pool.workers, "the loss")
        host.pool.resize(1)  # one serves already: none retires
        assert kept.state is WorkerState.IDLE and host.pool.serving() == [kept]
        host.pool.loading_model = False
        host.pool.respawn_deferred()  # the pool is full at its new size: nothing starts
        await asyncio.sleep(0.02)
        assert host.spawner.started == 3 and host.states() == ["idle"]
        await host.close()

    run(body())


class RecordingSpawner(FakeSpawner):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[int, Any]] = []

    async def start(self, generation: int, backend: Any) -> Any:
        self.asked.append((generation, backend))
        return await super().start(generation, backend)


def test_a_new_generation_s_workers_are_started_as_that_generation_and_counted_apart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "shm_model.host.pool")

    async def body() -> None:
        spawner = RecordingSpawner()
        host = Host(size=1, spawner=spawner)
        await host.start()
        (old,) = host.pool.workers.values()
        old.assign([], 1, "bulk")
        (meta,) = await host.pool.start_generation(1, "model-1")
        assert meta == META
        (new,) = [w for w in host.pool.workers.values() if w is not old]
        host.pool.adopt(1, "model-1")
        assert spawner.asked == [(0, None), (1, "model-1")]
        assert f"started worker {new.pid} (generation 1)" in caplog.messages
        assert host.pool.live() == [new] and host.pool.live(1) == [new]
        assert host.pool.live(0) == [old]  # busy: retired after its batch
        host.pool.batch_done(old)
        await until(lambda: old.pid not in host.pool.workers, "the old worker to go")
        assert host.pool.live(0) == [] and host.pool.live(1) == [new]
        await host.close()

    run(body())


class WrongHelloSpawner(FakeSpawner):
    """Workers whose first frame is not a proper ``ready``."""

    def __init__(self, hello: dict[str, Any]) -> None:
        super().__init__()
        self.hello = hello

    async def _run(self, pid: int, child: Any, boot: bool) -> None:
        _, writer = await asyncio.open_unix_connection(sock=child)
        writer.write(pack(self.hello))
        await asyncio.Event().wait()


@pytest.mark.parametrize("hello", [{"op": "ready"}, {"op": "hello", "backend": META}, {"backend": META}])
def test_a_worker_whose_first_frame_is_not_ready_with_its_model_fails_to_boot(
    caplog: pytest.LogCaptureFixture, hello: dict[str, Any]
) -> None:
    async def body() -> None:
        host = Host(size=1, spawner=WrongHelloSpawner(hello))
        with pytest.raises(InternalError):
            await host.start()
        first = 1000
        assert host.pool.boot_failures >= 1 and first in host.spawner.sent(signal.SIGKILL)
        assert f"worker {first} failed to boot: worker {first} sent {hello!r} instead of ready" in caplog.messages
        await host.close()

    run(body())
