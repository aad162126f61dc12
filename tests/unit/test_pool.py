"""The worker pool and the dispatcher in process, with fake workers (asyncio tasks on socket
pairs speaking the worker protocol): states, losses, replacements, retirement, the watchdog,
and what happens to requests when a worker crashes, hangs or refuses a batch."""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from config.model_config import HostConfig
from shm_model.errors import InternalError
from shm_model.host.dispatch import Dispatcher
from shm_model.host.pool import MAX_BOOT_FAILURES, WorkerPool, WorkerState
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

    def __init__(self, *, size: int = 2, dispatcher: bool = False, dynamic: bool = False, **cfg: Any) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.spawner = FakeSpawner()
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
            boot_timeout=DEADLINE,
            kill_after=0.05,
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
