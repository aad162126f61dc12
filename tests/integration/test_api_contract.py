"""The embeddings API as existing clients use it: the OpenAI client (``dimensions``, unknown models,
token arrays, usage counted by the tokenizer), LangChain, a TEI client (``huggingface_hub``),
explicit truncation, and per-route HTTP metrics. One bundled host and one API server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from config.model_config import HostConfig, ManagerConfig, ModelConfig
from shm_model.client import HostClient
from shm_model.errors import BadRequest, PayloadTooLarge
from shm_model.manager import ModelManager
from tests.conftest import Host, api_server, base_env

SERVED = "bundled"  # MODEL_NAME of the host: the id the API reports
MAX_SEQ = 256  # the bundled model's max_seq_length
LONG = " ".join(f"word{i} is here" for i in range(200))  # about 1,000 tokens


@pytest.fixture(scope="module")
def server(bundled_host: Host, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("contract")
    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=bundled_host.socket, RAG_DB=str(folder / "rag.db"))
    with api_server(env, folder / "api.log") as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(bundled_host: Host) -> Any:
    """The bundled model's own tokenizer.json (the reference for token counts), without truncation."""
    from tokenizers import Tokenizer

    with bundled_host.client() as client:
        folder = client.info()["model_path"]
    loaded = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    loaded.no_truncation()
    loaded.no_padding()
    return loaded


def host_vectors(host: Host, texts: list[str], **kwargs: Any) -> np.ndarray:
    with HostClient(host.socket, timeout=60) as client:
        return client.encode(texts, normalize_embeddings=True, **kwargs)


def openai_client(server: str) -> Any:
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


# --- OpenAI ---------------------------------------------------------------------------------------


def test_dimensions_are_honoured_and_bounded(server: str, bundled_host: Host) -> None:
    import openai

    texts = ["도서관 대출 규정", "parking fees"]
    full = host_vectors(bundled_host, texts)
    result = openai_client(server).embeddings.create(model=SERVED, input=texts, dimensions=128)
    got = np.array([d.embedding for d in result.data])
    expected = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)  # truncate, renormalize
    assert got.shape == (2, 128) and np.abs(got - expected).max() < 1e-6
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        openai_client(server).embeddings.create(model=SERVED, input=texts, dimensions=1000)
    error = refused.value.response.json()["error"]
    assert "1000" in error["message"] and "384" in error["message"] and error["param"] == "dimensions"


def test_an_unknown_model_is_404_in_openais_shape(server: str) -> None:
    import openai

    with pytest.raises(openai.NotFoundError) as refused:
        openai_client(server).embeddings.create(model="other-model", input="hello")
    error = refused.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert error["param"] == "model" and "other-model" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    client = openai_client(server)
    assert client.models.retrieve(SERVED).id == SERVED
    assert client.models.retrieve("model").id == SERVED  # the folder's name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")


def test_token_arrays_are_ids_of_the_served_tokenizer(server: str, bundled_host: Host, tokenizer: Any) -> None:
    texts = ["the library lends books for two weeks", "hello world"]
    ids = [tokenizer.encode(t).ids for t in texts]
    expected = host_vectors(bundled_host, texts)
    client = openai_client(server)
    batch = client.embeddings.create(model=SERVED, input=ids)
    assert np.abs(np.array([d.embedding for d in batch.data]) - expected).max() < 1e-5
    assert batch.usage.prompt_tokens == sum(len(i) for i in ids)
    single = client.embeddings.create(model=SERVED, input=ids[1])
    assert np.abs(np.array(single.data[0].embedding) - expected[1]).max() < 1e-5
    vocabulary = tokenizer.get_vocab_size(with_added_tokens=True)
    for bad, words in (
        ({"input": [[101, vocabulary, 102]]}, f"token id {vocabulary}, outside"),
        ({"input": [[101, -1, 102]]}, "token id -1, outside"),
        ({"input": [[101, 2023], "text"]}, "input[1] is a str"),
        ({"input": [101, "x"]}, "input[1] is a str"),
        ({"input": [[101, 2.5]]}, "input[0] is a list that is not all integer"),
        ({"input": [1] * 8193}, "8193 token ids; at most 8192"),
        ({"input": [[1]] * 1025}, "1025 items; at most 1024"),
    ):
        response = httpx.post(server + "/v1/embeddings", json={"model": SERVED, **bad}, timeout=30)
        assert response.status_code == 422, (bad, response.text)
        assert words in response.json()["error"]["message"], response.text


def test_usage_is_the_tokenizers_count(server: str, tokenizer: Any) -> None:
    texts = ["서울특별시 인구", "hello world", LONG]
    counts = [len(tokenizer.encode(t).ids) for t in texts]
    assert counts[2] > MAX_SEQ  # the model reads its first 256 tokens: that is what is counted
    result = openai_client(server).embeddings.create(model=SERVED, input=texts)
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(min(n, MAX_SEQ) for n in counts)


def test_langchain_openai_embeddings(server: str, bundled_host: Host) -> None:
    from langchain_openai import OpenAIEmbeddings

    texts = ["도서관 대출 규정", "parking fees"]
    embeddings = OpenAIEmbeddings(
        model=SERVED, base_url=server + "/v1", api_key="unused", check_embedding_ctx_length=False, max_retries=0
    )
    got = np.array(embeddings.embed_documents(texts))
    assert np.abs(got - host_vectors(bundled_host, texts)).max() < 1e-5
    assert np.abs(np.array(embeddings.embed_query(texts[0])) - got[0]).max() < 1e-6


# --- TEI ------------------------------------------------------------------------------------------


def test_a_tei_client_embeds(server: str, bundled_host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode blocks every URL, this one too

    texts = ["도서관 대출 규정", "parking fees"]
    expected = host_vectors(bundled_host, texts)
    for client in (InferenceClient(server + "/embed"), InferenceClient(base_url=server)):
        got = client.feature_extraction(texts[0])
        assert got.shape == (1, 384) and np.abs(got[0] - expected[0]).max() < 1e-5
    client = InferenceClient(server + "/embed")
    small = client.feature_extraction(texts[1], dimensions=64, normalize=True)
    tail = expected[1][:64] / np.linalg.norm(expected[1][:64])
    assert small.shape == (1, 64) and np.abs(small[0] - tail).max() < 1e-5
    raw = client.feature_extraction(texts[1], dimensions=64, normalize=False)
    assert np.abs(raw[0] - expected[1][:64]).max() < 1e-5  # cut, not renormalized
    with pytest.raises(HfHubHTTPError) as refused:
        client.feature_extraction(LONG)  # TEI's default: an input over the length is refused
    assert refused.value.response.status_code == 413
    assert refused.value.response.json()["error_type"] == "Validation"
    cut = client.feature_extraction(LONG, truncate=True)
    assert np.abs(cut[0] - host_vectors(bundled_host, [LONG])[0]).max() < 1e-5


def test_tei_batch_truncation_and_errors(server: str, bundled_host: Host, tokenizer: Any) -> None:
    count = len(tokenizer.encode(LONG).ids)
    refused = httpx.post(server + "/embed", json={"inputs": ["short", LONG], "truncate": False}, timeout=60)
    assert refused.status_code == 413, refused.text
    assert refused.json() == {
        "error": f"item 1 has {count} tokens; the model takes at most {MAX_SEQ} (truncation was refused)",
        "error_type": "Validation",
    }
    right = httpx.post(server + "/embed", json={"inputs": [LONG], "truncate": True}, timeout=60).json()
    left = httpx.post(
        server + "/embed", json={"inputs": [LONG], "truncate": True, "truncation_direction": "Left"}, timeout=60
    ).json()
    ids = tokenizer.encode(LONG).ids
    kept = tokenizer.decode(ids[-MAX_SEQ + 1 : -1]).removeprefix("##")  # its last 254 tokens, as a text
    tail = host_vectors(bundled_host, [kept])[0]
    assert float(np.dot(left[0], tail)) > 0.999 and float(np.dot(right[0], tail)) < 0.95
    bad = httpx.post(server + "/embed", json={"inputs": "x", "dimensions": 385}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error_type"] == "Validation" and "385" in bad.json()["error"]
    invalid = httpx.post(server + "/embed", json={"inputs": 5}, timeout=30)
    assert invalid.status_code == 422 and set(invalid.json()) == {"error", "error_type"}


def test_tei_tokenize_info_and_health(server: str, tokenizer: Any) -> None:
    tokens = httpx.post(server + "/tokenize", json={"inputs": "hello world"}, timeout=30).json()
    assert [t["id"] for t in tokens[0]] == tokenizer.encode("hello world").ids
    assert tokens[0][0]["special"] and tokens[0][0]["start"] is None
    assert tokens[0][1] == {"id": tokens[0][1]["id"], "text": "hello", "special": False, "start": 0, "stop": 5}
    plain = httpx.post(server + "/tokenize", json={"inputs": ["a b"], "add_special_tokens": False}, timeout=30)
    assert [t["text"] for t in plain.json()[0]] == ["a", "b"]
    info = httpx.get(server + "/info", timeout=30).json()
    assert info["model_id"] == SERVED and info["max_input_length"] == MAX_SEQ
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_client_batch_size"] == 1024
    health = httpx.get(server + "/health", timeout=30)
    assert health.status_code == 200 and health.content == b""


# --- the Python client and the model manager -----------------------------------------------------


def test_the_python_client_refuses_truncation_when_asked(bundled_host: Host, tokenizer: Any) -> None:
    count = len(tokenizer.encode(LONG).ids)
    texts = ["short"] * 300 + [LONG]  # two requests of the client: the index is the input's
    with HostClient(bundled_host.socket, timeout=60) as client:
        with pytest.raises(PayloadTooLarge, match=rf"item 300 has {count} tokens; the model takes at most 256"):
            client.encode(texts, truncate=False)
        vectors, used = client.encode(["hello world", "short"], return_usage=True, truncate_dim=32)
        assert vectors.shape == (2, 32)
        assert used == len(tokenizer.encode("hello world").ids) + len(tokenizer.encode("short").ids)
        with pytest.raises(BadRequest, match="truncate_dim=385 is more than the model's dimension 384"):
            client.encode("x", truncate_dim=385)


def test_the_local_path_honours_the_same_options(bundled_host: Host, tokenizer: Any, tmp_path: Path) -> None:
    from workers.backends import SentenceTransformerBackend

    mgr = ModelManager(
        ModelConfig(name="bundled", device="cpu"),
        ManagerConfig(mode="local"),
        HostConfig(socket_path=str(tmp_path / "none.sock")),
    )
    mgr._make_backend = lambda cfg: SentenceTransformerBackend(cfg, HostConfig(), place=False)
    model = mgr.get_model()
    texts = ["hello world", LONG]
    vectors, used = model.encode(texts, normalize_embeddings=True, truncate_dim=128, return_usage=True)
    shared = host_vectors(bundled_host, texts, truncate_dim=128)
    assert vectors.shape == (2, 128) and np.abs(vectors - shared).max() < 1e-5
    assert used == len(tokenizer.encode("hello world").ids) + MAX_SEQ
    with pytest.raises(PayloadTooLarge, match=r"item 1 has \d+ tokens"):
        model.encode(texts, truncate=False)
    with pytest.raises(BadRequest, match="truncate_dim=400"):
        model.encode(texts, truncate_dim=400)


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_and_status(server: str) -> None:
    httpx.post(server + "/v1/embeddings", json={"input": "count me", "model": SERVED}, timeout=30)
    httpx.post(server + "/v1/embeddings", json={"input": "x", "model": "other-model"}, timeout=30)
    httpx.get(server + "/documents/jobs/nothing", timeout=30)
    text = httpx.get(server + "/metrics", timeout=30).text
    assert 'http_requests_total{handler="/v1/embeddings",method="POST",status="200"}' in text
    assert 'http_requests_total{handler="/v1/embeddings",method="POST",status="404"}' in text
    assert 'http_requests_total{handler="/documents/jobs/{job_id}",method="GET",status="404"}' in text
    assert 'http_request_duration_seconds_bucket{handler="/v1/embeddings",le="0.005",method="POST"}' in text
    assert "shm_model_host_workers 2.0" in text  # beside the model's metrics
