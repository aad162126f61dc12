"""The host on the bundled model: same vectors as in-process, concurrency, shared weights."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.conftest import ROOT, Host, assert_workers_share_the_weights, base_env

TEXTS = [
    "서울특별시의 2023년 인구는 약 940만 명이다.",
    "The committee approved the budget for next year.",
    "표 2. 지역별 평균 기온 (단위: ℃)",
    "",
    "짧은 문장",
    "A much longer sentence that goes on " * 100,  # past max_seq_length: truncated as the model does
]


def test_host_matches_in_process_encode(bundled_host: Host, bundled_model) -> None:
    client = bundled_host.client()
    reference = bundled_model.encode(TEXTS)
    assert np.abs(client.encode(TEXTS) - reference).max() < 1e-5
    for text, ref in zip(TEXTS, reference, strict=True):
        single = client.encode(text)
        assert single.shape == ref.shape == (384,)
        assert np.abs(single - ref).max() < 1e-5
    normalized = bundled_model.encode(TEXTS, normalize_embeddings=True)
    assert np.abs(client.encode(TEXTS, normalize_embeddings=True) - normalized).max() < 1e-5
    # sentence-transformers returns shape (0,) for []; the host returns (0, dim).
    empty = client.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    assert client.get_sentence_embedding_dimension() == bundled_model.get_embedding_dimension()


def test_tensor_outputs_match(bundled_host: Host, bundled_model) -> None:
    import torch

    client = bundled_host.client()
    as_tensor = client.encode(TEXTS[:2], convert_to_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (2, 384)
    rows = client.encode(TEXTS[:2], convert_to_numpy=False)
    assert isinstance(rows, list) and all(isinstance(r, torch.Tensor) for r in rows)


def test_sixteen_threads_fifty_requests_each(bundled_host: Host, bundled_model) -> None:
    corpus = [f"{i}번 문서의 {i % 7}번째 표는 매출을 보여준다." for i in range(40)] + TEXTS[:3]
    reference = {t: v for t, v in zip(corpus, bundled_model.encode(corpus), strict=True)}
    client = bundled_host.client(pool_size=16)
    wrong: list[tuple[int, int]] = []

    def run(k: int) -> None:
        for i in range(50):
            texts = [corpus[(k * 50 + i + j) % len(corpus)] for j in range(1 + (k + i) % 3)]
            got = client.encode(texts)
            expected = np.stack([reference[t] for t in texts])
            if got.shape != expected.shape or np.abs(got - expected).max() >= 1e-5:
                wrong.append((k, i))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []


def test_workers_hold_no_private_copy_of_the_weights(bundled_host: Host) -> None:
    batch = [f"문장 {i}: 가나다라마바사 아자차카타파하" for i in range(64)] + TEXTS
    # On a CPU where oneDNN measures faster, auto packs the Linear layers (the forward pass then
    # runs eager) and a worker keeps oneDNN's kernels, up to about 27 MB (workers.kernels).
    packed = bundled_host.status()["models"][0]["linear_kernel"] == "onednn"
    status = assert_workers_share_the_weights(bundled_host, batch, rounds=3, allowance=(28 << 20) if packed else 0)
    assert status["weight_bytes"] > 80 * 2**20
    # traced, the traces are the supervisor's too, shared (the int8 host below pins torch's kernel and traces)
    assert status["models"][0]["forward"] == ("eager" if packed else "traced")


@pytest.mark.serial  # a client's start and first vector within 2 s
def test_client_imports_neither_torch_nor_sentence_transformers(bundled_host: Host) -> None:
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from shm_model import HostClient\n"
        "c = HostClient()\n"
        "v = c.encode(['안녕하세요'])\n"
        "print(v.shape, time.perf_counter() - t)\n"
        "bad = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=base_env(SHM_MODEL_SOCKET=bundled_host.socket),
    )
    assert proc.returncode == 0, proc.stderr
    shape, seconds = proc.stdout.rsplit(" ", 1)
    assert shape == "(1, 384)"
    assert float(seconds) < 2.0


@pytest.mark.parametrize("placement", ["shm"])
def test_shm_placement_leaves_no_checkpoint_mapping(host_factory, placement: str) -> None:
    host = host_factory(MODEL_NAME="bundled", SHM_MODEL_WEIGHTS=placement)
    status = host.status()
    in_memory = sum(v for k, v in status["weights"].items() if k != "file")  # shm, and packed for oneDNN
    assert status["weights"]["file"] == 0 and in_memory >= status["weight_bytes"]
    for pid in [status["pid"], *(w["pid"] for w in status["workers"])]:
        with open(f"/proc/{pid}/maps") as maps:
            assert "model.safetensors" not in maps.read()
    ref = host.client().encode(TEXTS)
    assert ref.shape == (len(TEXTS), 384)


def test_weights_packed_for_onednn_give_the_same_vectors_and_are_shared_by_the_workers(
    host_factory, bundled_model
) -> None:
    """SHM_MODEL_LINEAR_KERNEL=onednn: the Linear layers' weights packed in the supervisor, read by
    every forked worker from the same pages."""
    host = host_factory(MODEL_NAME="bundled", SHM_MODEL_LINEAR_KERNEL="onednn")
    texts = [t for t in TEXTS if t]
    got = host.client().encode(texts)
    assert np.abs(got - bundled_model.encode(texts)).max() < 1e-5
    batch = [f"문장 {i}: 가나다라마바사 아자차카타파하" for i in range(64)] + texts
    # A worker keeps oneDNN's kernels, up to about 27 MB (workers.kernels); a private copy of the
    # packed weights would add their 41 MB on top.
    status = assert_workers_share_the_weights(host, batch, rounds=3, allowance=28 << 20)
    assert status["models"][0]["linear_kernel"] == "onednn" and status["weights"]["packed"] > 40 * 2**20


def test_int8_weights_are_close_to_float32_and_shared_by_the_workers(host_factory, bundled_model) -> None:
    """SHM_MODEL_DTYPE=int8: the Linear layers quantized in the supervisor (the feed-forward output
    layers kept float32) and shared with the forked workers; vectors close to float32."""
    host = host_factory(MODEL_NAME="bundled", SHM_MODEL_DTYPE="int8", SHM_MODEL_LINEAR_KERNEL="torch")
    texts = [t for t in TEXTS if t]
    got = host.client().encode(texts, normalize_embeddings=True)
    reference = bundled_model.encode(texts, normalize_embeddings=True)
    cosine = (got * reference).sum(axis=1)
    assert cosine.mean() >= 0.97 and cosine.min() >= 0.94, cosine  # measured 0.983 / 0.961 on the sample questions
    info = host.client().info()
    assert [m["model"] for m in info["models"]] == ["bundled"]
    batch = [f"문장 {i}: 가나다라마바사 아자차카타파하" for i in range(64)] + texts
    status = assert_workers_share_the_weights(host, batch, rounds=3)
    assert status["weights"]["int8"] > 0 and status["models"][0]["dtype"] == "int8"
    assert status["models"][0]["forward"] == "traced"  # int8 layers trace too
