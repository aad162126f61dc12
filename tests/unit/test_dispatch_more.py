"""The dispatcher's answers and retries, with fake workers held busy so that nothing runs unless a test
says so: timeouts, failures and what counts as ill health, retries of failed and lost batches, and
bulk batches lending their cores to queries only."""

from __future__ import annotations

import asyncio
import collections
import signal
from typing import Any

import numpy as np
import pytest

from config.model_config import HostConfig
from shm_model.errors import BadRequest, HostUnavailable, InternalError, ModelNotFound, Overloaded
from shm_model.host.dispatch import DEFAULT_MAX_SEQ_LENGTH, QUERY_WINDOW, Dispatcher
from shm_model.host.pool import WorkerState
from shm_model.protocol import vectors_reply
from shm_model.scheduling import BatchLimits, estimate_tokens
from tests.unit.host_fakes import META, FakeConnection, FakeSpawner
from tests.unit.test_pool import Host, run, until


async def held_host(size: int = 1, **cfg: Any) -> tuple[Host, Dispatcher]:
    """A started host whose workers are all busy (assigned an empty batch): requests stay queued."""
    host = Host(size=size, dispatcher=True, **cfg)
    await host.start()
    assert host.dispatcher is not None
    for w in host.pool.workers.values():
        w.assign([], 1, "interactive")
    return host, host.dispatcher


def submit(dispatcher: Dispatcher, conn: FakeConnection, rid: int, texts: list[str], **header: Any) -> None:
    dispatcher.submit(conn, rid, {"texts": texts, **header})  # type: ignore[arg-type]


def error(conn: FakeConnection, rid: int) -> dict[str, Any]:
    return dict(conn.replies[rid].header["error"])


def now() -> float:
    return asyncio.get_running_loop().time()


def test_an_expired_request_is_answered_once_with_its_timeout_and_counted_once() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        answers: list[bool] = []
        dispatcher.on_answer = lambda _now, ok, _seconds: answers.append(ok)
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["a"], timeout_ms=1500)
        submit(dispatcher, conn, 2, ["b"], timeout_ms=250)
        first, second = sorted(dispatcher.requests, key=lambda r: r.id)
        dispatcher.expire(first)
        assert error(conn, 1) == {
            "code": "timeout",
            "message": "the request timed out after 1.5s",
            "details": {"timeout": 1.5},
        }
        dispatcher.expire(first)  # answered already: not again
        assert host.counters["timeouts"] == 1
        dispatcher.expire(second)
        assert error(conn, 2)["message"] == "the request timed out after 0.25s"
        assert (host.counters["timeouts"], host.counters["errors_timeout"]) == (2, 2)
        assert answers == [False, False]
        assert not dispatcher.requests and not dispatcher.scheduler.pending()
        await host.close()

    run(body())


def test_a_queued_request_expires_at_its_deadline() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["a"], timeout_ms=20)
        await until(lambda: 1 in conn.replies, "the timeout")
        assert error(conn, 1)["message"] == "the request timed out after 0.02s"
        assert host.counters["timeouts"] == 1 and not dispatcher.requests
        await host.close()

    run(body())


def test_failures_are_counted_by_code_and_only_the_host_s_own_count_against_its_health() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        answers: list[bool] = []
        dispatcher.on_answer = lambda _now, ok, _seconds: answers.append(ok)
        conn = FakeConnection()
        for rid in (1, 2, 3):
            submit(dispatcher, conn, rid, [f"text {rid}"])
        (first,) = [r for r in dispatcher.requests if r.id == 1]
        dispatcher.fail(first, BadRequest("the caller's own mistake"))
        assert error(conn, 1)["code"] == "bad_request"
        assert answers == []  # no sign of the host's health
        dispatcher.fail_all(HostUnavailable("the host is stopping"))
        for rid in (2, 3):
            assert error(conn, rid) == {"code": "host_unavailable", "message": "the host is stopping", "details": {}}
        assert (host.counters["errors_bad_request"], host.counters["errors_host_unavailable"]) == (1, 2)
        assert answers == [False, False]
        assert not dispatcher.requests and not conn.requests
        await host.close()

    run(body())


def test_a_failed_batch_retries_the_pieces_still_wanted_alone_and_before_the_rest_of_the_queue() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        gone, staying = FakeConnection(pid=1), FakeConnection(pid=2)
        submit(dispatcher, gone, 1, ["x"])
        submit(dispatcher, staying, 2, ["y"])
        pieces = dispatcher.scheduler.take(now())
        assert [p.request.id for p in pieces] == [1, 2]
        submit(dispatcher, staying, 3, ["z"])
        dispatcher.abandon(gone)  # type: ignore[arg-type]
        dispatcher.batch_failed(pieces, InternalError("refused"), crashed=False)
        queued = [(p.request.id, p.solo, p.failures) for p in dispatcher.scheduler.pieces()]
        assert queued == [(2, True, 1), (3, False, 0)]
        assert not staying.replies and not gone.replies
        await host.close()

    run(body())


def test_a_batch_of_one_piece_that_fails_fails_its_request_at_once() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["x", "y"])
        pieces = dispatcher.scheduler.take(now())
        assert len(pieces) == 1 and not pieces[0].solo
        dispatcher.batch_failed(pieces, BadRequest("the model refused a text"), crashed=False)
        assert error(conn, 1)["message"] == "the model refused a text"
        assert not dispatcher.scheduler.pending()
        await host.close()

    run(body())


def test_a_lost_batch_of_an_aborted_worker_times_out() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        (w,) = host.pool.workers.values()
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["x"])
        pieces = dispatcher.scheduler.take(now())
        w.aborted = True
        dispatcher.batch_lost(w, pieces)
        assert error(conn, 1) == {"code": "timeout", "message": "the request's deadline passed", "details": {}}
        assert not dispatcher.scheduler.pending()
        w.aborted = False
        await host.close()

    run(body())


def test_a_request_that_keeps_crashing_workers_is_retried_up_to_its_crash_retries() -> None:
    async def body() -> None:
        host, dispatcher = await held_host(crash_retries=2)
        (w,) = host.pool.workers.values()
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["x"])
        for _ in range(2):
            dispatcher.batch_lost(w, dispatcher.scheduler.take(now()))
            assert 1 not in conn.replies  # retried alone
        dispatcher.batch_lost(w, dispatcher.scheduler.take(now()))
        assert error(conn, 1) == {
            "code": "worker_crashed",
            "message": "the request crashed a worker 3 times; it was not retried again",
            "details": {"pid": w.pid},
        }
        await host.close()

    run(body())


def test_the_pieces_of_a_lost_batch_go_to_an_idle_worker_at_once() -> None:
    async def body() -> None:
        host, dispatcher = await held_host(size=2)
        crashed, other = sorted(host.pool.workers.values(), key=lambda w: w.pid)
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["x"])
        pieces = dispatcher.scheduler.take(now())
        host.pool.batch_done(other)  # idle, with nothing queued
        dispatcher.batch_lost(crashed, pieces)
        assert other.state is WorkerState.BUSY and not dispatcher.scheduler.pending()
        await until(lambda: 1 in conn.replies, "the answer of the retry")
        assert conn.error(1) is None
        await host.close()

    run(body())


def test_a_query_does_not_pause_an_interactive_batch_that_holds_the_cores() -> None:
    async def body() -> None:
        host = Host(size=2, dispatcher=True, dynamic=True, pause_bulk=True)
        await host.start()
        dispatcher = host.dispatcher
        assert dispatcher is not None
        first, second = FakeConnection(pid=1), FakeConnection(pid=2)
        submit(dispatcher, first, 1, ["__layers__:30"], priority="interactive")
        await until(lambda: bool(host.spawner.batches), "the first batch to start")
        submit(dispatcher, second, 2, ["query"], priority="interactive")
        await until(lambda: 1 in first.replies and 2 in second.replies, "both answers")
        assert host.counters["bulk_pauses"] == 0 and not host.spawner.paused_while
        await host.close()

    run(body())


def test_each_query_pauses_a_running_bulk_batch_again() -> None:
    async def body() -> None:
        host = Host(size=2, dispatcher=True, dynamic=True, pause_bulk=True)
        await host.start()
        dispatcher = host.dispatcher
        assert dispatcher is not None
        ingest, chat = FakeConnection(pid=1), FakeConnection(pid=2)
        submit(dispatcher, ingest, 1, ["__layers__:1000000"], priority="bulk")  # runs past the test
        await until(lambda: bool(host.spawner.batches), "the bulk batch to start")
        for rid in (2, 3):
            submit(dispatcher, chat, rid, ["query"], priority="interactive")
            await until(lambda rid=rid: rid in chat.replies, "the query's answer")  # type: ignore[misc]
            assert not any(flag[0] for flag in host.spawner.pauses.values())  # the bulk batch went on
        assert host.counters["bulk_pauses"] == 2 and 1 not in ingest.replies
        await host.close()

    run(body())


# --- the served models, prompts and admission ------------------------------------------------------


def bare_dispatcher(**cfg: Any) -> Dispatcher:
    """A dispatcher on no pool: enough for what it knows of models and prompts."""
    return Dispatcher(
        HostConfig(socket_path="/nonexistent/s", **cfg), None, cores=2, background=lambda coro: coro.close(),  # type: ignore[arg-type]
        changed=lambda: None, counters=collections.Counter(),
    )  # fmt: skip


TWO_MODELS = {
    "model": "big",
    "dimension": 4,
    "max_seq_length": 256,
    "models": [
        {"model": "big", "alias": "b", "dimension": 4, "max_seq_length": 256, "prompts": {"query": "q: "}},
        {"model": "small", "alias": "", "dimension": 2, "max_seq_length": None},
        {"model": "other", "alias": "big", "dimension": 3, "max_seq_length": 64},  # an alias never hides a name
    ],
}


def test_models_are_found_by_name_or_alias_and_an_unknown_one_names_those_served() -> None:
    dispatcher = bare_dispatcher()
    dispatcher.set_models(TWO_MODELS)
    big, small, other = TWO_MODELS["models"]  # type: ignore[misc]
    assert dispatcher.models == {"big": big, "b": big, "small": small, "other": other}
    assert dispatcher.model(None) is big and dispatcher.model("b") is big and dispatcher.model("other") is other
    with pytest.raises(ModelNotFound) as info:
        dispatcher.model("nope")
    assert str(info.value) == "model 'nope' is not served here; served: big, small, other"
    assert info.value.details == {"model": "nope"}
    assert dispatcher.max_seq_length() == 256
    assert dispatcher.max_seq_length("other") == 64
    assert dispatcher.max_seq_length("small") == DEFAULT_MAX_SEQ_LENGTH  # none given
    assert dispatcher.max_seq_length("nope") == 256  # the default model's


def test_a_host_of_one_model_serves_it_by_name_alias_or_none() -> None:
    dispatcher = bare_dispatcher()
    only = {"model": "only", "alias": "o", "dimension": 2}
    dispatcher.set_models(only)
    assert dispatcher.model(None) is only and dispatcher.model("o") is only and dispatcher.model("only") is only
    with pytest.raises(ModelNotFound, match=r"^model 'x' is not served here; served: only$"):
        dispatcher.model("x")
    assert dispatcher.max_seq_length() == DEFAULT_MAX_SEQ_LENGTH


def test_a_prompt_is_given_or_named_and_an_unknown_name_lists_the_model_s_prompts() -> None:
    model = {"prompts": {"query": "query: ", "passage": "passage: "}}
    resolve = Dispatcher.resolve_prompt
    assert resolve({}, model) is None
    assert resolve({"prompt": "p: ", "prompt_name": "query"}, model) == "p: "  # the text wins
    assert resolve({"prompt_name": "passage"}, model) == "passage: "
    with pytest.raises(BadRequest) as info:
        resolve({"prompt_name": "doc"}, model)
    assert str(info.value) == "unknown prompt_name 'doc'; this model has: query, passage"
    with pytest.raises(BadRequest, match=r"^unknown prompt_name 'query'; this model has: none$"):
        resolve({"prompt_name": "query"}, {"prompts": None})


def test_an_admitted_request_carries_what_its_header_asked_for() -> None:
    async def body() -> None:
        host, dispatcher = await held_host(request_timeout=7.0, max_request_timeout=60.0)
        conn = FakeConnection(pid=42)
        submit(dispatcher, conn, 1, ["one", "three"], prompt_name="query", truncate=False, priority="bulk")
        submit(dispatcher, conn, 2, ["x"], timeout_ms=120_000, model="fake")
        first, second = sorted(dispatcher.requests, key=lambda r: r.id)
        assert (first.prompt, first.truncate, first.priority, first.client, first.model) == (
            "query: ", False, "bulk", 42, "fake",
        )  # fmt: skip
        assert first.timeout == 7.0 and first.deadline == first.arrived + 7.0
        assert first.result.shape == (2, 2) and first.remaining == 1 and first.timer is not None
        assert (second.prompt, second.truncate, second.priority, second.timeout) == (None, True, "interactive", 60.0)
        assert conn.requests == {first, second}
        assert (host.counters["requests"], host.counters["texts"]) == (2, 3)
        await host.close()

    run(body())


def test_an_empty_request_is_answered_at_once_with_no_vectors() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        conn = FakeConnection()
        submit(dispatcher, conn, 1, [])
        assert conn.vectors(1).shape == (0, 2) and conn.replies[1].header["tokens"] == 0
        assert not dispatcher.requests and (host.counters["requests"], host.counters["texts"]) == (1, 0)
        await host.close()

    run(body())


def test_a_full_queue_names_its_limit() -> None:
    async def body() -> None:
        host, dispatcher = await held_host(queue_size=1)
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["a"])
        with pytest.raises(Overloaded) as info:
            submit(dispatcher, conn, 2, ["b"])
        assert str(info.value) == "the host has 1 requests in flight (limit 1); retry later"
        assert info.value.details == {"limit": 1}
        await host.close()

    run(body())


# --- delivery ------------------------------------------------------------------------------------------


def test_delivered_vectors_go_in_place_and_tokens_count_up_to_the_model_s_length() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        (w,) = host.pool.workers.values()
        gone, conn = FakeConnection(pid=1), FakeConnection(pid=2)
        submit(dispatcher, gone, 1, ["zz"])
        submit(dispatcher, conn, 2, ["a", "ccc"])  # longest first: "ccc", then "a"
        pieces = dispatcher.scheduler.take(now())
        assert [p.count for p in pieces] == [1, 2]
        dispatcher.abandon(gone)  # type: ignore[arg-type]
        vectors = np.array([[9, 9], [3, 0], [1, 0]], dtype=np.float32)
        dispatcher.deliver(w, pieces, vectors, [1000, 200, 5])  # META: 128 tokens at most
        assert conn.vectors(2)[:, 0].tolist() == [1, 3]
        assert conn.replies[2].header["tokens"] == 128 + 5
        assert w.requests_served == 1 and not gone.replies
        await host.close()

    run(body())


def test_a_text_over_the_length_fails_a_request_that_refused_truncation() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        (w,) = host.pool.workers.values()
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["a", "ccc"], truncate=False)
        pieces = dispatcher.scheduler.take(now())
        dispatcher.deliver(w, pieces, np.zeros((2, 2), dtype=np.float32), [300, 129])
        assert error(conn, 1) == {
            "code": "payload_too_large",
            "message": "item 0 has 129 tokens; the model takes at most 128 (truncation was refused)",
            "details": {"index": 0, "tokens": 129, "limit": 128},
        }
        assert w.requests_served == 0
        await host.close()

    run(body())


def test_vectors_of_another_dimension_fail_the_request_with_a_retry_hint() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        (w,) = host.pool.workers.values()
        conn = FakeConnection()
        submit(dispatcher, conn, 1, ["a"])
        pieces = dispatcher.scheduler.take(now())
        dispatcher.deliver(w, pieces, np.zeros((1, 3), dtype=np.float32), [1])
        assert error(conn, 1) == {
            "code": "host_unavailable",
            "message": "the model changed while the request waited; retry it",
            "details": {},
        }
        await host.close()

    run(body())


# --- what comes back from a worker ------------------------------------------------------------------


class MisbehavingSpawner(FakeSpawner):
    """Fake workers whose replies go wrong as their texts say: ``__wrong_id__`` answers another batch,
    ``__short__`` returns one vector too few, ``__no_tokens__`` leaves out the token counts."""

    def reply(self, batch_id: int, texts: list[str]) -> bytes:
        rid = batch_id + (1000 if "__wrong_id__" in texts else 0)
        rows = len(texts) - (1 if "__short__" in texts else 0)
        vectors = np.ones((rows, 2), dtype=np.float32)
        tokens = {} if "__no_tokens__" in texts else {"tokens": [1] * len(texts)}
        return vectors_reply(rid, vectors, **tokens)


def test_a_reply_for_another_batch_kills_the_worker_and_the_batch_is_retried_as_after_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        host = Host(size=1, dispatcher=True, spawner=MisbehavingSpawner(), crash_retries=1)
        await host.start()
        assert host.dispatcher is not None
        (first,) = host.pool.workers
        conn = FakeConnection()
        submit(host.dispatcher, conn, 1, ["__wrong_id__"])
        await until(lambda: 1 in conn.replies, "the answer")
        assert error(conn, 1) == {"code": "internal_error", "message": "worker reply out of step", "details": {}}
        assert len(host.spawner.batches) == 2  # tried twice: SHM_MODEL_CRASH_RETRIES=1
        assert first in host.spawner.sent(signal.SIGKILL)
        assert f"worker {first} answered batch 1001 for 1; this is a bug" in caplog.messages
        await host.close()

    run(body())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__short__", "worker returned shape (0, 2) for 1 texts"),
        ("__no_tokens__", "vectors reply needs 'tokens', one count per text (1), got None"),
    ],
)
def test_a_malformed_reply_fails_its_batch_without_killing_the_worker(text: str, message: str) -> None:
    async def body() -> None:
        host = Host(size=1, dispatcher=True, spawner=MisbehavingSpawner())
        await host.start()
        assert host.dispatcher is not None
        (w,) = host.pool.workers.values()
        conn = FakeConnection()
        submit(host.dispatcher, conn, 1, [text])
        await until(lambda: 1 in conn.replies, "the answer")
        assert error(conn, 1) == {"code": "internal_error", "message": message, "details": {}}
        assert not host.spawner.signals and w.state is WorkerState.IDLE
        assert (w.batches, w.texts) == (1, 1)
        assert not host.dispatcher.scheduler.rates  # no batch time learned from it
        await host.close()

    run(body())


def test_an_answered_batch_is_counted_and_its_time_learned() -> None:
    async def body() -> None:
        host = Host(size=1, dispatcher=True, spawner=MisbehavingSpawner())
        await host.start()
        assert host.dispatcher is not None
        (w,) = host.pool.workers.values()
        conn = FakeConnection()
        submit(host.dispatcher, conn, 1, ["a", "b", "c"], priority="bulk")
        await until(lambda: 1 in conn.replies, "the answer")
        assert conn.error(1) is None and conn.replies[1].header["tokens"] == 3
        assert (w.batches, w.texts, w.requests_served, w.state) == (1, 3, 1, WorkerState.IDLE)
        stats = host.dispatcher.scheduler.stats
        assert len(stats["bulk"].batch_seconds) == 1 and not stats["interactive"].batch_seconds
        assert list(host.dispatcher.scheduler.rates) == [1]  # learned at its one thread
        await host.close()

    run(body())


# --- settings -----------------------------------------------------------------------------------------


def test_the_dispatcher_starts_from_its_settings_and_changes_capacity_and_threads_when_told() -> None:
    dispatcher = bare_dispatcher(
        max_batch_size=7, max_batch_tokens=900, max_frame_bytes=1 << 20, bulk_share=0.3, bulk_batch_ms=150,
        queue_size=5,
    )  # fmt: skip
    scheduler = dispatcher.scheduler
    assert scheduler.limits == BatchLimits(max_texts=7, max_tokens=900, max_bytes=1 << 20)
    assert scheduler.weights == {"interactive": 0.7, "bulk": 0.3} and scheduler.bulk_batch_seconds == 0.15
    assert scheduler.on_expired == dispatcher.expire
    assert (dispatcher.queue_size, dispatcher.threads, dispatcher.dynamic_threads) == (5, 1, False)
    assert (dispatcher.meta, dispatcher.models, dispatcher.requests, dispatcher.on_answer) == ({}, {}, set(), None)
    assert (dispatcher.core_share.cores, dispatcher.core_share.fair) == (2, 2)
    limits = scheduler.limits
    dispatcher.set_capacity(max_batch_tokens=900, queue_size=2)
    assert scheduler.limits is limits and dispatcher.queue_size == 2
    dispatcher.set_capacity(max_batch_tokens=300, queue_size=5)
    assert scheduler.limits == BatchLimits(max_texts=7, max_tokens=300, max_bytes=1 << 20)
    dispatcher.configure(workers=2, threads=3, dynamic=True)
    assert (dispatcher.threads, dispatcher.dynamic_threads) == (3, True)
    assert (dispatcher.core_share.cores, dispatcher.core_share.fair) == (2, 1)


def test_a_request_for_another_model_is_estimated_delivered_and_capped_at_that_model_s_length() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        dispatcher.set_models(TWO_MODELS)
        (w,) = host.pool.workers.values()
        strict, conn = FakeConnection(pid=1), FakeConnection(pid=2)
        submit(dispatcher, strict, 1, ["x" * 600], model="other", truncate=False)
        submit(dispatcher, conn, 2, ["x" * 600], model="other")
        submit(dispatcher, conn, 3, ["y" * 600, "z"], model="other")
        first = min(dispatcher.requests, key=lambda r: r.id)
        assert (first.model, first.tokens, first.result.shape, first.result.dtype) == (
            "other",
            [64],
            (1, 3),
            np.float32,
        )
        pieces = dispatcher.scheduler.take(now())
        assert [p.request.id for p in pieces] == [1, 2, 3]
        vectors = np.array([[1, 0, 0], [2, 0, 0], [3, 0, 0], [4, 0, 0]], dtype=np.float32)
        dispatcher.deliver(w, pieces, vectors, [65, 100, 70, 1])  # "other" takes 64 tokens
        assert error(strict, 1)["details"] == {"index": 0, "tokens": 65, "limit": 64}
        assert conn.vectors(2)[:, 0].tolist() == [2] and conn.replies[2].header["tokens"] == 64
        assert conn.vectors(3)[:, 0].tolist() == [3, 4] and conn.replies[3].header["tokens"] == 65
        await host.close()

    run(body())


def test_each_abandoned_request_is_counted() -> None:
    async def body() -> None:
        host, dispatcher = await held_host()
        gone = FakeConnection()
        submit(dispatcher, gone, 1, ["a"])
        submit(dispatcher, gone, 2, ["b"])
        dispatcher.abandon(gone)  # type: ignore[arg-type]
        dispatcher.abandon(gone)  # type: ignore[arg-type]
        assert host.counters["abandoned"] == 2 and not dispatcher.requests and not gone.replies
        await host.close()

    run(body())


# --- the bulk batch budget ----------------------------------------------------------------------


def two_models(first: int, second: int | None) -> dict[str, Any]:
    models = [{"model": "a", "alias": "a", "pause_points": first}, {"model": "b", "alias": "b"}]
    if second is not None:
        models[1]["pause_points"] = second
    return {**models[0], "models": models}


@pytest.mark.parametrize(
    ("dynamic", "pausable", "cfg", "seconds"),
    [
        (True, True, {}, 0.25 * 6),  # a query waits for one of the 6 layers, not the batch
        (True, False, {}, 0.25),  # spawned workers cannot pause
        (False, True, {}, 0.25),  # fixed threads: bulk batches never pause
        (True, True, {"pause_bulk": False}, 0.25),
    ],
)
def test_a_bulk_batch_may_take_the_budget_once_per_layer_only_when_it_pauses(
    dynamic: bool, pausable: bool, cfg: dict[str, Any], seconds: float
) -> None:
    d = bare_dispatcher(bulk_batch_ms=250, **cfg)
    assert d.scheduler.bulk_batch_seconds == 0.25
    d.configure(workers=2, threads=1, dynamic=dynamic, pausable=pausable)
    d.set_models(two_models(6, 24))  # the model with the fewest layers sets the budget
    assert d.bulk_alone_seconds == pytest.approx(seconds)
    assert d.scheduler.bulk_batch_seconds == 0.25  # side by side: unscaled
    assert d.pause_points == 6
    d.configure(workers=1, threads=1, dynamic=dynamic, pausable=pausable)  # a paused batch holds the only worker
    assert d.bulk_alone_seconds == pytest.approx(0.25)


def test_the_interactive_batch_budget_comes_from_the_setting_and_zero_turns_it_off() -> None:
    assert bare_dispatcher().scheduler.query_batch_seconds == pytest.approx(0.25)
    assert bare_dispatcher(query_batch_ms=40).scheduler.query_batch_seconds == pytest.approx(0.04)
    assert bare_dispatcher(query_batch_ms=0).scheduler.query_batch_seconds is None


def test_models_that_do_not_say_their_layers_count_as_one() -> None:
    d = bare_dispatcher()
    d.configure(workers=2, threads=1, dynamic=True, pausable=True)
    d.set_models(two_models(24, None))
    assert d.pause_points == 1 and d.bulk_alone_seconds == pytest.approx(0.25)
    d.set_models({"model": "one", "pause_points": 12})  # one model, no "models" list
    assert d.pause_points == 12 and d.bulk_alone_seconds == pytest.approx(3.0)
    d.set_models({"model": "bad", "pause_points": 0})
    assert d.pause_points == 1


@pytest.mark.parametrize(
    ("seconds_per_text", "query_age", "batches", "budget"),
    [
        (0.5, None, 1, 6.0),  # a large model: one at a time, the budget once per layer
        (0.05, None, 2, 0.25),  # a small one with no query about: side by side, unscaled
        (0.05, 1.0, 1, 6.0),  # a query came 1 s ago: a worker stays free for the next
        (0.05, QUERY_WINDOW + 0.5, 2, 0.25),  # long ago
    ],
)
def test_bulk_batches_run_one_at_a_time_and_per_layer_only_while_that_leaves_a_worker_for_queries(
    seconds_per_text: float, query_age: float | None, batches: int, budget: float
) -> None:
    """Paused for a query, a bulk batch keeps its worker: where one text takes longer than a
    query should wait (250 ms), or while queries come, a second bulk batch beside it would
    leave no worker free, and the query would wait for a whole batch."""

    async def body() -> None:
        host = Host(size=2, dispatcher=True, dynamic=True, bulk_batch_ms=250)
        await host.start()
        d = host.dispatcher
        assert d is not None
        d.configure(workers=2, threads=1, dynamic=True, pausable=True)
        d.set_models({**META, "pause_points": 24})
        assert d.bulk_alone_seconds == pytest.approx(6.0)
        if query_age is not None:
            d.last_query = now() - query_age
        text = "가" * 30
        d.scheduler.observe(1, 1000, seconds_per_text * 1000 / estimate_tokens(text, 512))
        submit(d, FakeConnection(), 1, [text] * 64, priority="bulk")  # dispatched at once
        busy = host.pool.busy()
        assert len(busy) == batches
        assert sorted(w.threads for w in busy) == ([2] if batches == 1 else [1, 1])
        assert d.scheduler.bulk_batch_seconds == pytest.approx(budget)
        await host.close()

    run(body())


def test_an_interactive_request_marks_the_time_of_the_last_query_and_a_bulk_one_does_not() -> None:
    async def body() -> None:
        host, d = await held_host(size=1)
        submit(d, FakeConnection(), 1, ["a"] * 64, priority="bulk")
        assert d.last_query == float("-inf")
        before = now()
        submit(d, FakeConnection(), 2, ["a"])  # interactive by default (one text)
        assert before <= d.last_query <= now()
        await host.close()

    run(body())
