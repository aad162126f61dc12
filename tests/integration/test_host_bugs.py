"""Host and client behaviour that a plausible change could break without any other test noticing:
the padded-token cap of a batch, one prompt per batch, no second answer to a request that timed
out, and no pooled connection after a client-side timeout. End to end (a dummy-backend host, one
worker, through HostClient), so that they hold for any correct batching code."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from shm_model.client import HostClient
from shm_model.errors import RequestTimeout
from tests.conftest import Host, poll
from workers.backends import DummyBackend

HOLD = 4.0  # seconds the only worker sleeps while requests queue up behind it


@pytest.fixture
def one_worker_host(host_factory: Callable[..., Host]) -> Callable[..., Host]:
    def start(**env: str) -> Host:
        return host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1", **env)

    return start


def counters(host: Host) -> tuple[int, int]:
    """The only worker's (batches, texts)."""
    (worker,) = host.status()["workers"]
    return worker["batches"], worker["texts"]


def behind_a_busy_worker(host: Host, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` concurrently once the only worker is busy for HOLD seconds with another request,
    checking that all of them were queued before it finished; return their results in order."""
    client = host.client(timeout=60)
    with ThreadPoolExecutor(len(calls) + 1) as pool:
        sleeper = pool.submit(client.encode, [f"__sleep__:{HOLD}"])
        poll(lambda: host.status()["in_flight"] == 1, HOLD, what="the worker to take the sleeping request")
        futures = [pool.submit(call) for call in calls]
        # The sleeping request is still in flight, so the worker is busy and every call waits in the queue.
        poll(lambda: host.status()["in_flight"] == 1 + len(calls), HOLD, what="the requests to queue up")
        results = [f.result(60) for f in futures]
        sleeper.result(60)
    return results


def test_queued_requests_are_batched_within_the_token_cap(one_worker_host) -> None:
    # 128 tokens a text (the dummy's max_seq_length; 2 + 400 // 3 is more): two texts fill a batch.
    host = one_worker_host(SHM_MODEL_MAX_BATCH_TOKENS="256")
    texts = [f"{i}" + "t" * 400 for i in range(8)]
    client = host.client(timeout=60, pool_size=8)
    batches, sent = counters(host)
    vectors = behind_a_busy_worker(host, [lambda t=t: client.encode([t]) for t in texts])
    assert all(np.array_equal(v[0], DummyBackend.vector(t)) for v, t in zip(vectors, texts, strict=True))
    poll(lambda: counters(host)[1] == sent + 1 + 8, 10, what="the worker's text count")
    assert counters(host)[0] - batches - 1 >= 4, "8 texts of 128 tokens went in batches of more than 256 tokens"

    # One request of the same texts is cut to the same cap.
    batches, sent = counters(host)
    assert np.array_equal(client.encode(texts), np.stack([DummyBackend.vector(t) for t in texts]))
    poll(lambda: counters(host)[1] == sent + 8, 10, what="the worker's text count")
    assert counters(host)[0] - batches >= 4, "a request of 8 texts of 128 tokens went in batches over 256 tokens"


def test_requests_with_different_prompts_are_not_batched_together(one_worker_host) -> None:
    host = one_worker_host()
    client = host.client(timeout=60, pool_size=8)
    requests: list[tuple[str, dict[str, str]]] = [
        ("alpha", {}),
        ("beta", {"prompt": "custom: "}),
        ("gamma", {"prompt_name": "query"}),
        ("delta", {"prompt_name": "passage"}),
        ("alpha", {"prompt": "query: "}),
        ("epsilon", {}),
    ]
    together = behind_a_busy_worker(host, [lambda t=t, kw=kw: client.encode([t], **kw) for t, kw in requests])
    alone = [client.encode([t], **kw) for t, kw in requests]
    prompts = {"query": "query: ", "passage": "passage: "}
    for (text, kwargs), mixed, single in zip(requests, together, alone, strict=True):
        prompt = kwargs.get("prompt") or prompts.get(kwargs.get("prompt_name", ""), "")
        assert np.array_equal(single[0], DummyBackend.vector(prompt + text))
        assert np.array_equal(mixed, single), f"{text!r} with {kwargs} was encoded with another request's prompt"


def test_a_request_that_timed_out_in_a_worker_is_not_answered_again(one_worker_host) -> None:
    host = one_worker_host()
    client = host.client(timeout=30, pool_size=1)
    client.ping()  # the one pooled connection
    # The host times the request out after 0.5 s while its batch sleeps 2 s in the worker; the client
    # waits longer than that, so the timeout it hears is the host's and the connection goes back to the pool.
    with pytest.raises(RequestTimeout) as timed_out:
        client.request("encode", timeout=30, texts=["__sleep__:2"], timeout_ms=500)
    assert "no reply from the host" not in str(timed_out.value)
    # The next request on that connection waits behind the sleeping batch and must get its own reply.
    assert np.array_equal(client.encode("after the timeout"), DummyBackend.vector("after the timeout"))
    assert np.array_equal(client.encode("and the next"), DummyBackend.vector("and the next"))


def test_a_connection_that_timed_out_is_not_reused(one_worker_host) -> None:
    host = one_worker_host()
    client = host.client(timeout=30, pool_size=1)
    client.ping()  # the one pooled connection
    os.kill(host.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RequestTimeout, match="no reply from the host"):
            client.encode(["sent to a stalled host"], timeout=0.5)
    finally:
        os.kill(host.proc.pid, signal.SIGCONT)
    # The host now reads the request the client gave up on and answers it, on that connection.
    for text in ("after the stall", "and the next"):
        assert np.array_equal(client.encode(text), DummyBackend.vector(text))
    with HostClient(host.socket, timeout=10) as other:
        assert other.status()["counters"]["requests"] >= 3
