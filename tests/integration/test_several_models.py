"""Several models from one host (``MODEL_NAME=a,b``): each request's ``model`` picks one, the
first is the default, batches never mix models, an unknown name is ``ModelNotFound``."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shm_model.errors import ModelNotFound
from tests.conftest import Host, api_server, base_env, poll
from workers.backends import DummyBackend


def expected(texts: list[str], model: str = "dummy") -> np.ndarray:
    suffix = model.removeprefix("dummy").lstrip("-")
    dimension = int(suffix) if suffix else 32
    return np.stack([DummyBackend.vector(suffix + t, dimension) for t in texts])


@pytest.fixture
def two_models(host_factory) -> Host:
    return host_factory(SHM_MODEL_BACKEND="dummy", MODEL_NAME="dummy,dummy-64", SHM_MODEL_WORKERS="1")


def test_each_request_gets_the_model_it_names(two_models: Host) -> None:
    client = two_models.client()
    info = client.info()
    assert [(m["model"], m["dimension"]) for m in info["models"]] == [("dummy", 32), ("dummy-64", 64)]
    assert info["model"] == "dummy" and info["dimension"] == 32  # the first is the default
    texts = ["서울특별시 인구", "부산"]
    assert np.array_equal(client.encode(texts), expected(texts))
    assert np.array_equal(client.encode(texts, model="dummy"), expected(texts))
    assert np.array_equal(client.encode(texts, model="dummy-64"), expected(texts, "dummy-64"))
    assert client.encode([], model="dummy-64").shape == (0, 64)
    with pytest.raises(ModelNotFound, match="'other' is not served here; served: dummy, dummy-64"):
        client.encode(texts, model="other")
    assert client.encode("still serving").shape == (32,)


def test_batches_never_mix_models(two_models: Host) -> None:
    """Requests for both models queued behind a busy worker come back each from its own model."""
    client = two_models.client(pool_size=8)
    blocker = threading.Thread(target=client.encode, args=(["__sleep__:0.5"],))
    blocker.start()
    poll(lambda: two_models.status()["in_flight"] == 1, 5, what="the worker to be busy")
    results: dict[int, np.ndarray] = {}

    def send(i: int) -> None:
        results[i] = client.encode([f"text {i}"], model="dummy-64" if i % 2 else "dummy")

    senders = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in senders:
        t.start()
    poll(lambda: two_models.status()["in_flight"] >= 8, 5, what="eight queued requests")
    for t in [blocker, *senders]:
        t.join(10)
    for i in range(8):
        assert np.array_equal(results[i], expected([f"text {i}"], "dummy-64" if i % 2 else "dummy"))
    assert two_models.status()["counters"]["requests"] == 9


def test_a_repeated_model_name_is_refused_in_one_line(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", MODEL_NAME="dummy,dummy", ready=False)
    assert host.proc.wait(30) == 2
    err = host.log()
    assert "MODEL_NAME='dummy,dummy' lists an empty or repeated model name" in err and "Traceback" not in err


def test_the_api_lists_both_models_and_the_request_picks_one(two_models: Host, tmp_path) -> None:
    import openai

    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=two_models.socket, RAG_DB=str(tmp_path / "rag.db"))
    with api_server(env, tmp_path / "api.log") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["dummy", "dummy-64"]
        assert client.models.retrieve("dummy-64").id == "dummy-64"
        for model, dimension in (("dummy", 32), ("dummy-64", 64)):
            got = client.embeddings.create(model=model, input=["부산", "서울"])
            want = expected(["부산", "서울"], model)
            want /= np.linalg.norm(want, axis=1, keepdims=True)
            assert got.model == model and len(got.data[0].embedding) == dimension
            assert np.allclose([d.embedding for d in got.data], want, atol=1e-6)
        with pytest.raises(openai.NotFoundError, match="this server serves 'dummy', 'dummy-64'"):
            client.embeddings.create(model="other", input="x")
