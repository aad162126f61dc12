"""ModelManager in process: routing by SHM_MODEL_MODE, fallback, the local path's encode, statuses,
metrics and starting a host on demand, against a scripted host and a small fake local backend."""

from __future__ import annotations

import logging
import os
import threading
import time as time_module
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from config.model_config import HostConfig, ManagerConfig, ModelConfig
from shm_model import manager as manager_module
from shm_model import metrics
from shm_model.errors import (
    BadRequest,
    HostUnavailable,
    ModelLoadError,
    ModelNotFound,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
)
from shm_model.manager import (
    HOST_PROBE_TIMEOUT,
    ManagedModel,
    ModelManager,
    ModelStatus,
    _is_cuda_oom,
    _open_private,
    get_model_with_fallback,
)
from shm_model.pressure import DEGRADED_KINDS
from shm_model.protocol import error_reply, result_reply
from tests.conftest import poll
from tests.unit.fakehost import OTHER_UID, FakeHost, default_respond

HOST_STATUS: dict[str, Any] = {
    "model": "dummy",
    "device": "cpu",
    "dimension": 3,
    "pid": 4242,
    "load_seconds": 1.5,
    "in_flight": 2,
    "memory": {"rss": 30 * 2**20, "pss": 20 * 2**20 + 5, "uss": 10 * 2**20},
    "workers": [{"pid": 1}, {"pid": 2}],
    "queue": {
        "interactive": {"requests": 3, "wait_ms": {"p50": 2.0, "p99": None}},
        "bulk": {"requests": 1},
    },
}


def host_respond(header: dict[str, Any]) -> bytes | None:
    if header["op"] == "status":
        return result_reply(header["id"], HOST_STATUS)
    if header["op"] == "reload":
        return result_reply(header["id"], {"model": "dummy", "generation": 2})
    return default_respond(header)


class LocalModel:
    """What the manager uses of a SentenceTransformer: encode, and any other attribute."""

    max_seq_length = 8
    calls: list[tuple[Any, dict[str, Any]]]

    def __init__(self) -> None:
        self.calls = []

    def encode(self, sentences: Any, **kwargs: Any) -> Any:
        self.calls.append((sentences, kwargs))
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        out = np.array([[len(t), 1.0, 2.0, 3.0] for t in texts], dtype=np.float32).reshape(len(texts), 4)
        if kwargs.get("truncate_dim"):
            out = out[:, : kwargs["truncate_dim"]]
        return out[0] if isinstance(sentences, str) else out


class LocalBackend:
    def __init__(self, device: str = "cpu") -> None:
        self.model = LocalModel()
        self.dimension = 4
        self.max_seq_length = 8
        self.prompts = {"query": "q "}
        self.load_seconds = 0.25
        self.device = device
        self.token_calls: list[tuple[list[str], str | None]] = []

    def describe(self) -> dict[str, Any]:
        return {"model": "local", "dimension": self.dimension}

    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        self.token_calls.append((texts, prompt))
        return [len((prompt or "") + t) for t in texts]


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
def make(run_dir: Path) -> Iterator[Callable[..., ModelManager]]:
    made: list[ModelManager] = []

    def build(
        mode: str = "auto", *, socket: str | None = None, autostart: bool = False, **backend: Any
    ) -> ModelManager:
        host_cfg = HostConfig.load(
            {"SHM_MODEL_SOCKET": socket or str(run_dir / "host.sock"), "SHM_MODEL_BACKEND": "dummy"}
        )
        m = ModelManager(
            ModelConfig(name="local-model"), ManagerConfig(mode=mode, autostart=autostart, load_timeout=5.0), host_cfg
        )
        m._make_backend = lambda cfg: LocalBackend(**backend)
        made.append(m)
        return m

    yield build
    for m in made:
        m.close()


@pytest.fixture
def host(start: Callable[..., FakeHost]) -> FakeHost:
    return start(host_respond)


# --- routing ------------------------------------------------------------------------------


def test_shared_mode_encodes_on_the_host(make: Callable[..., ModelManager], host: FakeHost) -> None:
    m = make("shared")
    before = sample("shm_model_requests_total", {"op": "encode", "path": "shared"})
    model = m.get_model()
    assert isinstance(model, ManagedModel) and model.path == "shared"
    assert model.encode(["ab", "c"]).shape == (2, 3)
    assert model.get_sentence_embedding_dimension() == 3
    assert model.get_embedding_dimension() == 3
    assert model.describe()["dimension"] == 3
    assert sample("shm_model_requests_total", {"op": "encode", "path": "shared"}) == before + 1
    assert sample("shm_model_request_seconds_count", {"op": "encode", "path": "shared"}) > 0
    assert m._local is None and m.is_model_loaded()
    assert host.headers[-1]["op"] == "ping" and host.headers[-1]["timeout_ms"] <= HOST_PROBE_TIMEOUT * 1000
    assert [h["op"] for h in host.headers][:2] == ["ping", "encode"]
    assert host.headers[0]["timeout_ms"] <= HOST_PROBE_TIMEOUT * 1000
    with pytest.raises(AttributeError) as info:
        model.tokenizer  # noqa: B018
    assert str(info.value) == "ManagedModel has no attribute 'tokenizer' (served: shared)"


def test_shared_mode_without_a_host_is_an_error(make: Callable[..., ModelManager]) -> None:
    m = make("shared")
    errors_before = sample("shm_model_errors_total", {"type": "host_unavailable"})
    with pytest.raises(HostUnavailable):
        m.get_model()
    with pytest.raises(HostUnavailable):
        m._model.encode(["a"])
    assert sample("shm_model_errors_total", {"type": "host_unavailable"}) == errors_before + 1
    assert not m.is_model_loaded()
    assert m._local is None


def test_local_mode_loads_once_and_encodes_in_process(make: Callable[..., ModelManager], host: FakeHost) -> None:
    m = make("local")
    model = m.get_model()
    assert model.path == "none"
    assert model.encode("abc").tolist() == [3.0, 1.0, 2.0, 3.0]
    assert model.path == "local"
    assert model.get_sentence_embedding_dimension() == 4
    assert model.describe() == {"model": "local", "dimension": 4}
    assert model.max_seq_length == 8  # other attributes come from the local SentenceTransformer
    assert m.local_model() is m._local.model
    assert m.is_model_loaded()
    assert host.headers == []  # local mode never asks the host


def test_auto_mode_falls_back_when_the_host_goes_away(
    make: Callable[..., ModelManager], host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    m = make("auto")
    assert m.get_model().encode(["a"]).shape == (1, 3)
    assert m._model.path == "shared"
    host.close()
    os.unlink(host.path)
    fallbacks = sample("shm_model_fallbacks_total")
    went_away = "the model host went away; serving from a model in this process"
    assert m._model.encode(["abcd"]).tolist() == [[4.0, 1.0, 2.0, 3.0]]
    assert caplog.messages.count(went_away) == 1  # said when it happens
    assert m._model.path == "local"
    assert sample("shm_model_fallbacks_total") == fallbacks + 1
    assert m.is_model_loaded()
    served = sample("shm_model_requests_total", {"op": "encode", "path": "local"})
    timed = sample("shm_model_request_seconds_count", {"op": "encode", "path": "local"})
    m._model.encode(["b"])  # still no host: served here again, without a second warning
    assert sample("shm_model_requests_total", {"op": "encode", "path": "local"}) == served + 1
    assert sample("shm_model_request_seconds_count", {"op": "encode", "path": "local"}) == timed + 1
    assert [r.levelname for r in caplog.records if r.getMessage() == went_away] == ["WARNING"]


def test_auto_mode_without_a_host_loads_locally(make: Callable[..., ModelManager]) -> None:
    m = make("auto")
    assert not m.is_model_loaded()
    m.get_model()
    assert m._local is not None and m.is_model_loaded()


def test_other_errors_of_the_host_are_not_a_fallback(
    make: Callable[..., ModelManager], start: Callable[..., FakeHost]
) -> None:
    def respond(header: dict[str, Any]) -> bytes:
        if header["op"] == "encode":
            return error_reply(header["id"], BadRequest("no"))
        return host_respond(header)  # type: ignore[return-value]

    start(respond)
    m = make("auto")
    with pytest.raises(BadRequest):
        m.get_model().encode(["a"])
    assert m._local is None


# --- the local path's encode ------------------------------------------------------------------


def test_local_encode_takes_the_host_s_arguments(make: Callable[..., ModelManager]) -> None:
    m = make("local")
    model = m.get_model()
    backend = m._local
    model.encode(["ab"], timeout=3, priority="bulk", normalize_embeddings=True)
    assert backend.model.calls[-1] == (["ab"], {"normalize_embeddings": True})
    model.encode(sentences=["ab"])
    assert backend.model.calls[-1] == (["ab"], {})
    assert backend.token_calls == []  # tokens are counted only when asked for
    vectors, tokens = model.encode(["abc", "x" * 20], return_usage=True)
    assert vectors.shape == (2, 4) and tokens == 3 + 8  # each text counts at most max_seq_length
    vectors, tokens = model.encode("abc", return_usage=True, prompt_name="query")
    assert vectors.shape == (4,) and tokens == 5
    assert backend.token_calls[-1] == (["abc"], "q ")
    _, tokens = model.encode(["abc"], return_usage=True, prompt="p: ", prompt_name="query")
    assert tokens == 6 and backend.token_calls[-1] == (["abc"], "p: ")
    _, tokens = model.encode(["abc"], return_usage=True, prompt_name="nope")
    assert backend.token_calls[-1] == (["abc"], None)
    assert model.encode(["12345678"], truncate=False).shape == (1, 4)  # exactly the limit is fine
    with pytest.raises(PayloadTooLarge) as info:
        model.encode(["ok", "123456789", "1234567890"], truncate=False)
    assert info.value.details == {"index": 1, "tokens": 9, "limit": 8}
    assert model.encode([], return_usage=True)[1] == 0
    assert backend.token_calls[-1] != ([], None)  # nothing to count for no text


def test_the_local_fallback_serves_only_the_first_model_by_its_alias_or_name(
    make: Callable[..., ModelManager],
) -> None:
    m = make("local")
    m.model_config = ModelConfig(name="small,large")
    model = m.get_model()
    backend = m._local
    backend.name = "org/small-model"
    for name in ("small", "org/small-model", None):
        assert model.encode(["ab"], model=name).shape == (1, 4)
        assert backend.model.calls[-1] == (["ab"], {})  # the model is chosen here, not passed on
    with pytest.raises(ModelNotFound) as info:
        model.encode(["ab"], model="large")
    assert str(info.value) == (
        "model 'large' is not loaded in this process (only org/small-model: the local fallback serves the "
        "first model of MODEL_NAME)"
    )
    assert info.value.details == {"model": "large"}


def test_local_encode_checks_truncate_dim_and_shapes_an_empty_input_like_the_host(
    make: Callable[..., ModelManager],
) -> None:
    m = make("local")
    model = m.get_model()
    for bad in (0, 5):
        with pytest.raises(BadRequest) as info:
            model.encode(["a"], truncate_dim=bad)
        assert str(info.value) == f"truncate_dim={bad} is not between 1 and the model's dimension 4"
        assert info.value.details == {"truncate_dim": bad, "dimension": 4}
    assert model.encode(["a"], truncate_dim=1).shape == (1, 1)
    assert model.encode(["a"], truncate_dim=4).shape == (1, 4)
    calls = len(m._local.model.calls)
    empty = model.encode([])
    assert empty.shape == (0, 4) and empty.dtype == np.float32
    assert model.encode((), truncate_dim=2).shape == (0, 2)
    assert model.encode([], convert_to_numpy=True).shape == (0, 4)
    assert len(m._local.model.calls) == calls  # shaped here: the model is not asked for no text
    model.encode([], convert_to_tensor=True)
    model.encode([], convert_to_numpy=False)
    assert len(m._local.model.calls) == calls + 2  # other empty outputs are the model's own


# --- loading -------------------------------------------------------------------------------------


def test_concurrent_callers_wait_for_one_load(make: Callable[..., ModelManager]) -> None:
    m = make("local")
    gate = threading.Event()
    loads: list[int] = []

    def slow(cfg: ModelConfig) -> LocalBackend:
        loads.append(1)
        gate.wait(10)
        return LocalBackend()

    m._make_backend = slow
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(m._ensure_local())) for _ in range(3)]
    for t in threads:
        t.start()
    poll(lambda: m._load is not None, 10, what="the load to start")
    gate.set()
    for t in threads:
        t.join(10)
    assert loads == [1]
    assert len(results) == 3 and all(r is results[0] for r in results)
    assert m._load is None


def test_a_failed_load_is_raised_and_remembered(make: Callable[..., ModelManager]) -> None:
    m = make("local")
    m._make_backend = lambda cfg: (_ for _ in ()).throw(ModelLoadError("model 'x' not found", tried=1))
    with pytest.raises(ModelLoadError):
        m._ensure_local()
    assert m.get_status().error_message == "model 'x' not found"
    assert m._load is None


def test_a_waiter_gets_the_error_of_the_load_it_waited_for(make: Callable[..., ModelManager]) -> None:
    m = make("local")
    load = manager_module._Load()
    load.error = ModelLoadError("model 'x' not found", tried=1)
    load.done.set()
    m._load = load  # another thread's load, finished with an error
    with pytest.raises(ModelLoadError) as info:
        m._ensure_local()
    assert info.value is not load.error  # a copy for this thread
    assert (str(info.value), info.value.details) == ("model 'x' not found", {"tried": 1})


def test_a_waiter_gives_up_at_the_load_timeout(make: Callable[..., ModelManager]) -> None:
    m = make("local")
    m.config = ManagerConfig(mode="local", load_timeout=0.1)
    m._load = manager_module._Load()  # another thread's load that never ends
    with pytest.raises(RequestTimeout) as info:
        m._ensure_local()
    assert str(info.value) == "waited 0.1s for the model load another thread started"
    assert info.value.details == {"timeout": 0.1}


def test_a_load_error_that_is_not_typed_becomes_model_load_error(make: Callable[..., ModelManager]) -> None:
    m = make("local")

    def broken(cfg: ModelConfig) -> LocalBackend:
        raise RuntimeError("bad weights")

    m._make_backend = broken
    with pytest.raises(ModelLoadError) as info:
        m._ensure_local()
    assert str(info.value) == "model 'local-model' failed to load: RuntimeError: bad weights"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_cuda_out_of_memory_loads_on_the_cpu_only_when_the_device_was_auto(
    make: Callable[..., ModelManager], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "shm_model.manager")
    m = make("local")
    devices: list[str] = []

    def oom_on_cuda(cfg: ModelConfig) -> LocalBackend:
        devices.append(cfg.device)
        if cfg.device != "cpu":
            raise ModelLoadError("failed") from RuntimeError("CUDA out of memory. Tried to allocate")
        return LocalBackend(device="cpu")

    m._make_backend = oom_on_cuda
    assert m._ensure_local().device == "cpu"
    assert devices == ["auto", "cpu"]
    assert caplog.messages == [
        "out of GPU memory loading local-model; loading it on the CPU instead",
        "loaded local-model in this process on cpu in 0.25s",
    ]
    assert sample("shm_model_load_seconds", {"path": "local"}) == 0.25
    m2 = make("local")
    m2.model_config = ModelConfig(name="x", device="cuda")
    m2._make_backend = oom_on_cuda
    with pytest.raises(ModelLoadError):
        m2._ensure_local()
    m3 = make("local")
    m3._make_backend = lambda cfg: (_ for _ in ()).throw(ModelLoadError("other"))
    with pytest.raises(ModelLoadError) as info:
        m3._ensure_local()
    assert str(info.value) == "other"


def test_cuda_oom_is_found_in_the_cause_chain() -> None:
    class OutOfMemoryError(Exception):
        pass

    assert _is_cuda_oom(OutOfMemoryError("x"))
    assert _is_cuda_oom(RuntimeError("CUDA out of memory."))
    wrapped = ModelLoadError("failed")
    wrapped.__cause__ = ValueError("y")
    wrapped.__cause__.__cause__ = OutOfMemoryError("z")
    assert _is_cuda_oom(wrapped)
    assert not _is_cuda_oom(ModelLoadError("failed"))
    assert not _is_cuda_oom(RuntimeError("out of memory"))


def test_local_model_loads_on_first_use(make: Callable[..., ModelManager]) -> None:
    m = make("shared")
    assert m.local_model() is m._local.model
    assert sample("shm_model_load_seconds", {"path": "local"}) == 0.25


# --- reload and status ---------------------------------------------------------------------------


def test_reload_goes_to_the_host_or_reloads_locally(make: Callable[..., ModelManager], host: FakeHost) -> None:
    m = make("auto")
    assert m.reload_model() is True
    assert host.headers[-1]["op"] == "reload"
    assert 590_000 < host.headers[-1]["timeout_ms"] <= 600_000
    local = make("local")
    assert local.reload_model() is True
    first = local._local
    assert local.reload_model() is True and local._local is not first
    assert local.get_status().error_message is None


def test_a_failed_reload_keeps_the_model_and_says_why(
    make: Callable[..., ModelManager], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "shm_model.manager")
    m = make("shared")
    before = sample("shm_model_errors_total", {"type": "host_unavailable"})
    assert m.reload_model() is False
    assert m.get_status().error_message == f"no model host answers on {m._client.socket_path}"
    assert sample("shm_model_errors_total", {"type": "host_unavailable"}) == before + 1
    local = make("local")
    local.get_model()
    kept = local._local
    local._make_backend = lambda cfg: (_ for _ in ()).throw(ModelLoadError("gone"))
    assert local.reload_model() is False
    assert local._local is kept
    assert caplog.messages[-1] == "model reload failed: gone"
    status = local.get_status()
    assert status.is_loaded and status.error_message == "gone"
    local._make_backend = lambda cfg: LocalBackend()
    assert local.reload_model() is True and local.get_status().error_message is None
    assert caplog.messages[-1] == "model reloaded"


def test_the_host_s_status_and_its_gauges(make: Callable[..., ModelManager], host: FakeHost) -> None:
    m = make("shared")
    status = m.get_status()
    assert status == ModelStatus(
        is_loaded=True,
        model_name="dummy",
        load_time=1.5,
        memory_usage=20,
        device="cpu",
        error_message=None,
        mode="shared",
        worker_count=2,
        host_pid=4242,
        dimension=3,
    )
    assert status.to_dict()["host_pid"] == 4242
    assert sample("shm_model_memory_bytes", {"scope": "host", "kind": "pss"}) == 20 * 2**20 + 5
    assert sample("shm_model_memory_bytes", {"scope": "host", "kind": "uss"}) == 10 * 2**20
    assert sample("shm_model_host_workers") == 2
    assert sample("shm_model_host_queue_depth") == 2
    assert sample("shm_model_host_queue_waiting", {"priority": "interactive"}) == 3
    assert sample("shm_model_host_queue_wait_seconds", {"priority": "interactive", "quantile": "0.5"}) == 0.002
    assert sample("shm_model_load_seconds", {"path": "shared"}) == 1.5
    assert host.headers[-1]["op"] == "status" and host.headers[-1]["timeout_ms"] <= 2000
    assert m.host_status() == HOST_STATUS
    assert make("local").host_status() is None


def test_the_host_s_health_memory_and_restarts_become_gauges(
    make: Callable[..., ModelManager], start: Callable[..., FakeHost]
) -> None:
    degraded = {
        **HOST_STATUS,
        "queue": {"bulk": {"requests": 4, "wait_ms": {"p50": None, "p99": 1500.0}}},
        "health": {"status": "degraded", "reasons": {"memory_pressure": "little headroom", "latency": "slow"}},
        "memory_pressure": {"headroom": 3 * 2**30, "ceiling": 8 * 2**30, "psi_some_avg10": 12.5},
        "restarts": {"oom_kill": 2, "crash": 1},
    }
    host = start(lambda h: result_reply(h["id"], degraded))
    m = make("shared", socket=host.path)
    assert m.get_status().is_loaded
    assert sample("shm_model_host_up") == 1
    assert sample("shm_model_host_queue_waiting", {"priority": "bulk"}) == 4
    assert sample("shm_model_host_queue_wait_seconds", {"priority": "bulk", "quantile": "0.99"}) == 1.5
    degraded_by = {kind: sample("shm_model_host_degraded", {"reason": kind}) for kind in DEGRADED_KINDS}
    assert degraded_by == {"memory_pressure": 1, "workers_below_target": 0, "error_rate": 0, "latency": 1}
    assert sample("shm_model_host_memory_headroom_bytes") == 3 * 2**30
    assert sample("shm_model_host_memory_ceiling_bytes") == 8 * 2**30
    assert sample("shm_model_host_memory_psi") == 12.5
    assert sample("shm_model_host_worker_restarts_total", {"cause": "oom_kill"}) == 2
    assert sample("shm_model_host_worker_restarts_total", {"cause": "crash"}) == 1
    host.close()
    assert m.host_status() is None
    assert sample("shm_model_host_up") == 0
    healthy = start(lambda h: result_reply(h["id"], {**HOST_STATUS, "health": {"status": "ok"}}), name="ok.sock")
    make("shared", socket=healthy.path).get_status()
    assert [sample("shm_model_host_degraded", {"reason": kind}) for kind in DEGRADED_KINDS] == [0, 0, 0, 0]
    assert sample("shm_model_host_memory_headroom_bytes") == 0 and sample("shm_model_host_memory_psi") == 0
    assert sample("shm_model_host_memory_ceiling_bytes") == 0
    assert metrics.REGISTRY.get_sample_value("shm_model_host_worker_restarts_total", {"cause": "oom_kill"}) is None


def test_a_bare_host_status(make: Callable[..., ModelManager], start: Callable[..., FakeHost]) -> None:
    start(lambda h: result_reply(h["id"], {}))
    status = make("shared").get_status()
    assert (status.is_loaded, status.model_name, status.load_time, status.memory_usage) == (True, "None", 0.0, 0)
    assert (status.device, status.worker_count, status.host_pid, status.dimension) == ("None", 0, None, None)
    assert sample("shm_model_memory_bytes", {"scope": "host", "kind": "rss"}) == 0
    assert sample("shm_model_load_seconds", {"path": "shared"}) == 0.0
    assert sample("shm_model_host_queue_depth") == 0


def test_statuses_without_a_host(make: Callable[..., ModelManager], monkeypatch: pytest.MonkeyPatch) -> None:
    shared = make("shared")
    status = shared.get_status()
    assert status == ModelStatus(
        is_loaded=False,
        model_name="local-model",
        load_time=0.0,
        memory_usage=0,
        device="auto",
        error_message=status.error_message,
    )
    assert status.error_message.startswith("no host is serving")
    assert shared.host_status() is None
    auto = make("auto")
    assert auto.get_status().error_message.startswith("no host is serving")
    auto.get_model()
    monkeypatch.setattr(manager_module, "process_memory", lambda pid: {"rss": 3 * 2**20, "pss": 2**21, "uss": 2**20})
    local = auto.get_status()
    assert local == ModelStatus(
        is_loaded=True,
        model_name="local-model",
        load_time=0.25,
        memory_usage=2,
        device="cpu",
        error_message=None,
        mode="local",
        dimension=4,
    )
    assert sample("shm_model_memory_bytes", {"scope": "process", "kind": "rss"}) == 3 * 2**20
    monkeypatch.setattr(manager_module, "process_memory", lambda pid: None)
    assert auto.get_status().memory_usage == 0
    for kind in ("rss", "pss", "uss"):
        assert sample("shm_model_memory_bytes", {"scope": "process", "kind": kind}) == 0
    never = make("local")
    assert never.get_status() == ModelStatus(False, "local-model", 0.0, 0, "auto", None)


# --- the singleton ------------------------------------------------------------------------------------


def test_the_singleton_and_the_seed_helpers(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SHM_MODEL_SOCKET", str(run_dir / "none.sock"))
    monkeypatch.setenv("SHM_MODEL_MODE", "shared")
    ModelManager.reset_instance()
    try:
        first = ModelManager.get_instance()
        assert ModelManager.get_instance() is first
        assert first.config.mode == "shared"
        first._make_backend = lambda cfg: LocalBackend()
        with pytest.raises(HostUnavailable):
            ModelManager.get_model()  # on the class: the singleton's
        fallbacks = sample("shm_model_fallbacks_total")
        assert get_model_with_fallback() is first._local.model
        (warning,) = [r for r in caplog.records if r.name == "shm_model.manager" and r.levelname == "WARNING"]
        assert warning.getMessage().startswith("shared model failed: no host is serving")
        assert warning.getMessage().endswith("; falling back to a model in this process")
        assert sample("shm_model_fallbacks_total") == fallbacks + 1
        closed: list[int] = []
        monkeypatch.setattr(first._client, "close", lambda: closed.append(1))
        ModelManager.reset_instance()
        assert closed == [1]
        assert ModelManager._instance is None
        ModelManager.reset_instance()  # none to forget: nothing happens
        assert ModelManager.get_instance() is not first
    finally:
        ModelManager.reset_instance()


# --- starting a host ------------------------------------------------------------------------------------


class FakePopen:
    """Stands for ``shm-model serve``: starts a scripted host on the socket, or exits."""

    started: ClassVar[list[FakePopen]] = []

    def __init__(self, argv: list[str], **kwargs: Any) -> None:
        self.argv, self.kwargs = argv, kwargs
        self.returncode: int | None = None
        socket_path = kwargs["env"]["SHM_MODEL_SOCKET"]
        os.write(kwargs["stdout"].fileno(), b"host output\n")  # what the host prints goes to host.log
        self.host = FakeHost(Path(socket_path), host_respond) if not os.environ.get("FAKE_HOST_EXITS") else None
        FakePopen.started.append(self)

    def poll(self) -> int | None:
        if self.host is None:
            self.returncode = 3
        return self.returncode


@pytest.fixture
def popen(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakePopen]]:
    FakePopen.started = []
    monkeypatch.setattr(manager_module.subprocess, "Popen", FakePopen)
    yield FakePopen
    for proc in FakePopen.started:
        if proc.host is not None:
            proc.host.close()


def test_autostart_starts_one_host_on_the_socket(
    make: Callable[..., ModelManager], popen: type[FakePopen], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import subprocess

    caplog.set_level(logging.INFO, "shm_model.manager")
    socket_path = str(tmp_path / "new" / "host.sock")
    m = make("shared", socket=socket_path, autostart=True)
    assert m._started_host is None  # nothing started yet (the stress tests kill what was)
    assert m.get_model().encode(["a"]).shape == (1, 3)
    assert len(popen.started) == 1
    proc = popen.started[0]
    assert proc.argv[1:] == ["-m", "shm_model", "serve"]
    assert proc.kwargs["start_new_session"] is True
    assert proc.kwargs["env"]["SHM_MODEL_SOCKET"] == socket_path
    assert proc.kwargs["env"]["PATH"] == os.environ["PATH"]  # the rest of this process's environment
    assert proc.kwargs["stdin"] is subprocess.DEVNULL and proc.kwargs["stderr"] is subprocess.STDOUT
    log_path = tmp_path / "new" / "host.log"
    assert f"starting a model host on {socket_path} (log: {log_path})" in caplog.messages
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o700
    for name in ("host.sock.start", "host.log"):
        st = os.stat(tmp_path / "new" / name)
        assert st.st_mode & 0o777 == 0o600
    assert log_path.read_bytes() == b"host output\n"
    assert m._started_host is proc
    m._start_host()  # a host answers now: nothing more is started
    assert len(popen.started) == 1
    assert make("shared", socket=socket_path, autostart=True).get_model() is not None
    assert len(popen.started) == 1


def test_autostart_reports_a_host_that_exits(
    make: Callable[..., ModelManager], popen: type[FakePopen], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HOST_EXITS", "1")
    socket_path = str(tmp_path / "run2" / "host.sock")
    m = make("shared", socket=socket_path, autostart=True)
    with pytest.raises(HostUnavailable) as info:
        m.get_model()
    assert str(info.value) == (
        f"the host started on {socket_path} exited with 3 before it answered; see {tmp_path / 'run2' / 'host.log'}"
    )
    assert not make("shared", socket=socket_path).config.autostart
    with pytest.raises(HostUnavailable):
        make("shared", socket=socket_path).get_model()  # no autostart: no host is an error
    assert len(popen.started) == 1


def test_autostart_waits_for_another_process_that_holds_the_start_lock(
    make: Callable[..., ModelManager], popen: type[FakePopen], tmp_path: Path
) -> None:
    import fcntl

    directory = tmp_path / "run3"
    directory.mkdir(mode=0o700)
    socket_path = str(directory / "host.sock")
    fd = os.open(socket_path + ".start", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    m = make("shared", socket=socket_path, autostart=True)
    m.config = ManagerConfig(mode="shared", autostart=True, load_timeout=0.2)
    try:
        with pytest.raises(HostUnavailable) as info:
            m.get_model()
        assert str(info.value) == "timed out waiting for another process to start the host"
        assert popen.started == []
    finally:
        os.close(fd)


def test_autostart_refuses_a_shared_directory(make: Callable[..., ModelManager], tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    os.chmod(directory, 0o777)
    socket_path = str(directory / "host.sock")
    m = make("shared", socket=socket_path, autostart=True)
    with pytest.raises(PermissionDenied) as info:
        m.get_model()
    assert f"other users may write to it; refusing to use {socket_path} (" in str(info.value)
    assert info.value.details["socket"] == socket_path


def test_starting_a_host_checks_the_directory_again(make: Callable[..., ModelManager], tmp_path: Path) -> None:
    directory = tmp_path / "opened"
    directory.mkdir()
    os.chmod(directory, 0o777)  # opened to others after the probe found no host
    socket_path = str(directory / "host.sock")
    with pytest.raises(PermissionDenied) as info:
        make("shared", socket=socket_path, autostart=True)._start_host()
    assert f"other users may write to it; refusing to use {socket_path} (" in str(info.value)
    assert info.value.details["socket"] == socket_path
    assert not os.path.exists(socket_path + ".start")


def test_private_files_refuse_symlinks_and_other_owners(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    fd = _open_private(path, os.O_RDWR)
    os.close(fd)
    assert os.stat(path).st_mode & 0o777 == 0o600
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(PermissionDenied) as info:
        _open_private(str(link), os.O_RDWR)
    assert str(info.value) == f"{link} is a symlink; refusing to open it (remove it)"
    assert info.value.details == {"path": str(link)}
    with pytest.raises(HostUnavailable) as missing:
        _open_private(str(tmp_path / "no" / "f"), os.O_RDWR)
    assert str(missing.value) == f"cannot open {tmp_path / 'no' / 'f'}: No such file or directory"
    assert missing.value.details == {"path": str(tmp_path / "no" / "f")}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PermissionDenied) as not_regular:
        _open_private(str(fifo), os.O_RDWR)
    assert str(not_regular.value) == (
        f"{fifo} is not a regular file of this user (uid {os.geteuid()}); refusing to write to it"
    )
    assert not_regular.value.details == {"path": str(fifo)}
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.write_text("")
        os.chown(theirs, 54321, -1)
        with pytest.raises(PermissionDenied):
            _open_private(str(theirs), os.O_RDWR)
    fd = _open_private(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert os.get_blocking(fd)
        assert not os.get_inheritable(fd)  # a host started later does not inherit it
    finally:
        os.close(fd)


def test_metrics_name_each_op_and_private_names_stay_private(
    make: Callable[..., ModelManager], host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    m = make("shared")
    model = m.get_model()
    before = sample("shm_model_requests_total", {"op": "dimension", "path": "shared"})
    model.get_sentence_embedding_dimension()
    assert sample("shm_model_requests_total", {"op": "dimension", "path": "shared"}) == before + 1
    m.get_status()
    assert sample("shm_model_memory_bytes", {"scope": "host", "kind": "rss"}) == 30 * 2**20
    m.host_status()
    assert host.headers[-1]["op"] == "status" and host.headers[-1]["timeout_ms"] <= 2000
    local = make("local")
    local.get_model()
    local._local.model._secret = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError) as info:
        local._model._secret  # noqa: B018
    assert str(info.value) == "ManagedModel has no attribute '_secret' (served: none)"


# --- more: arguments, statuses and concurrency ----------------------------------------------------------


def test_shared_encode_passes_its_arguments_to_the_host_and_times_the_call(
    make: Callable[..., ModelManager], host: FakeHost
) -> None:
    import time

    m = make("shared")
    model = m.get_model()
    labels = {"op": "encode", "path": "shared"}
    before = sample("shm_model_request_seconds_sum", labels)
    started = time.perf_counter()
    vectors, tokens = model.encode(["ab", "c"], priority="bulk", prompt_name="query", return_usage=True)
    elapsed = time.perf_counter() - started
    assert vectors.shape == (2, 3) and tokens == 3
    header = host.headers[-1]
    assert (header["op"], header["priority"], header["prompt_name"]) == ("encode", "bulk", "query")
    assert 0 <= sample("shm_model_request_seconds_sum", labels) - before <= elapsed


def test_the_host_s_status_says_why_the_last_reload_failed(
    make: Callable[..., ModelManager], start: Callable[..., FakeHost]
) -> None:
    failing = [True]

    def respond(header: dict[str, Any]) -> bytes | None:
        if header["op"] == "reload" and failing:
            return error_reply(header["id"], ModelLoadError("weights missing"))
        return host_respond(header)

    start(respond)
    m = make("shared")
    assert m.reload_model() is False
    status = m.get_status()
    assert (status.is_loaded, status.mode, status.error_message) == (True, "shared", "weights missing")
    failing.clear()
    assert m.reload_model() is True
    assert m.get_status().error_message is None


def test_shared_mode_does_not_count_a_model_loaded_in_this_process(make: Callable[..., ModelManager]) -> None:
    shared = make("shared")
    shared.local_model()  # e.g. get_model_with_fallback's last resort
    assert not shared.is_model_loaded()
    status = shared.get_status()
    assert not status.is_loaded and status.error_message.startswith("no host is serving")
    auto = make("auto")
    auto.local_model()
    assert auto.is_model_loaded()
    assert auto.get_status().mode == "local"


def test_the_default_local_backend_is_the_first_model_unplaced(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.backends

    made: list[tuple[ModelConfig, HostConfig, bool]] = []

    class Backend:
        device, load_seconds = "cpu", 0.5

        def __init__(self, model_cfg: ModelConfig, host_cfg: HostConfig, *, place: bool = True) -> None:
            made.append((model_cfg, host_cfg, place))

    monkeypatch.setattr(workers.backends, "SentenceTransformerBackend", Backend)
    models = ModelConfig(name="small,large")
    m = ModelManager(models, ManagerConfig(mode="local"), HostConfig.load({"SHM_MODEL_SOCKET": str(run_dir / "h")}))
    try:
        assert isinstance(m._ensure_local(), Backend)
    finally:
        m.close()
    # the host's weight placement is for workers that share pages, not for a model in this process
    assert made == [(models.first(), HostConfig(), False)]


def test_a_loaded_model_serves_without_waiting_for_the_manager_s_lock(make: Callable[..., ModelManager]) -> None:
    m = make("local")
    model = m.get_model()
    model.encode(["a"])
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(model.encode(["ab"])))
    with m._lock:  # held, e.g., by a reload swapping in its model
        thread.start()
        thread.join(5)
        served_while_held = not thread.is_alive()
    thread.join(5)
    assert served_while_held and results[0].shape == (1, 4)


def test_the_singleton_is_returned_without_waiting_for_its_lock(
    make: Callable[..., ModelManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = make("local")
    monkeypatch.setattr(ModelManager, "_instance", m)
    got: list[ModelManager] = []
    thread = threading.Thread(target=lambda: got.append(ModelManager.get_instance()))
    with ModelManager._instance_lock:
        thread.start()
        thread.join(5)
        returned_while_held = not thread.is_alive()
    thread.join(5)
    assert returned_while_held and got == [m]


class WatchedEvent(threading.Event):
    """An Event that tells when a thread starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def test_a_thread_waiting_for_a_failed_load_gets_its_error(make: Callable[..., ModelManager]) -> None:
    m = make("local")
    gate = threading.Event()

    def failing(cfg: ModelConfig) -> LocalBackend:
        gate.wait(10)
        raise ModelLoadError("model 'x' not found", tried=1)

    m._make_backend = failing
    errors: dict[str, BaseException] = {}

    def call(name: str) -> None:
        try:
            m._ensure_local()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test thread
            errors[name] = exc

    owner = threading.Thread(target=call, args=("owner",))
    owner.start()
    load = poll(lambda: m._load, 10, what="the load to start")
    assert isinstance(load, manager_module._Load)
    load.done = WatchedEvent()
    waiter = threading.Thread(target=call, args=("waiter",))
    waiter.start()
    try:
        assert load.done.waiting.wait(10)
    finally:
        gate.set()
        owner.join(10)
        waiter.join(10)
    assert type(errors["owner"]) is ModelLoadError and type(errors["waiter"]) is ModelLoadError
    assert errors["waiter"] is not errors["owner"]
    assert (str(errors["waiter"]), errors["waiter"].details) == ("model 'x' not found", {"tried": 1})


class SteppedTime:
    """The manager's ``time``: real clocks; ``sleep`` records its duration and runs a step instead."""

    def __init__(self, step: Callable[[], None]) -> None:
        self.step = step
        self.sleeps: list[float] = []
        self.monotonic = time_module.monotonic
        self.perf_counter = time_module.perf_counter

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.step()


def test_autostart_starts_the_host_once_the_other_process_lets_go_of_the_lock(
    make: Callable[..., ModelManager], popen: type[FakePopen], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    directory = tmp_path / "run4"
    directory.mkdir(mode=0o700)
    (directory / "host.log").write_bytes(b"earlier\n")
    os.chmod(directory / "host.log", 0o600)
    socket_path = str(directory / "host.sock")
    fd = os.open(socket_path + ".start", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        clock = SteppedTime(lambda: fcntl.flock(fd, fcntl.LOCK_UN))  # the other process is done
        monkeypatch.setattr(manager_module, "time", clock)
        m = make("shared", socket=socket_path, autostart=True)
        assert m.get_model().encode(["a"]).shape == (1, 3)
    finally:
        os.close(fd)
    assert clock.sleeps == [0.05]  # the lock is tried again every 50 ms
    assert len(popen.started) == 1
    assert (directory / "host.log").read_bytes() == b"earlier\nhost output\n"  # appended


def test_autostart_waits_for_the_started_host_until_the_load_timeout(
    make: Callable[..., ModelManager], popen: type[FakePopen], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[tuple[float, Any]] = []

    def no_answer(socket_path: str, timeout: float, process: Any) -> None:
        waits.append((timeout, process))
        raise HostUnavailable(f"no host answered on {socket_path}")

    monkeypatch.setattr(manager_module, "wait_for_host", no_answer)
    directory = tmp_path / "run5"
    m = make("shared", socket=str(directory / "host.sock"), autostart=True)
    with pytest.raises(HostUnavailable) as info:
        m.get_model()
    assert str(info.value) == f"no host answered on {directory / 'host.sock'}; see {directory / 'host.log'}"
    [(timeout, process)] = waits
    assert process is popen.started[0]  # an exit of the started host ends the wait at once
    assert 0 < timeout <= m.config.load_timeout

    class Late:
        """The manager's ``time``, 10 s later at each reading: the start lock took the whole timeout."""

        def __init__(self) -> None:
            self.now = time_module.monotonic()
            self.perf_counter, self.sleep = time_module.perf_counter, time_module.sleep

        def monotonic(self) -> float:
            self.now += 10.0
            return self.now

    monkeypatch.setattr(manager_module, "time", Late())
    waits.clear()
    with pytest.raises(HostUnavailable):
        make("shared", socket=str(tmp_path / "run6" / "host.sock"), autostart=True).get_model()
    assert [timeout for timeout, _ in waits] == [1.0]  # still one ping's wait, never a timeout of 0


def test_a_fifo_in_place_of_the_host_log_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "host.log"
    os.mkfifo(fifo, 0o600)
    errors: list[BaseException] = []

    def open_log() -> None:
        try:
            os.close(_open_private(str(fifo), os.O_WRONLY | os.O_APPEND))
        except HostUnavailable as exc:
            errors.append(exc)

    thread = threading.Thread(target=open_log)
    thread.start()
    thread.join(5)
    blocked = thread.is_alive()
    if blocked:  # a writer's open of a FIFO waits for a reader: be one, so that the thread ends
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        thread.join(5)
    assert not blocked
    assert [str(e) for e in errors] == [f"cannot open {fifo}: No such device or address"]


def test_the_client_gets_the_host_config_s_timeout_and_trusted_uids(
    run_dir: Path, start: Callable[..., FakeHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving the socket directory to another uid needs root")
    for name in ("SHM_MODEL_REQUEST_TIMEOUT", "SHM_MODEL_TRUSTED_UIDS"):
        monkeypatch.delenv(name, raising=False)
    host = start(host_respond)
    os.chown(run_dir, OTHER_UID, -1)  # a host run by a service account this deployment trusts
    host_cfg = HostConfig.load(
        {"SHM_MODEL_SOCKET": host.path, "SHM_MODEL_REQUEST_TIMEOUT": "7", "SHM_MODEL_TRUSTED_UIDS": str(OTHER_UID)}
    )
    m = ModelManager(ModelConfig(name="local-model"), ManagerConfig(mode="shared"), host_cfg)
    try:
        assert m.get_model().encode(["a"]).shape == (1, 3)
    finally:
        m.close()
    assert 6000 < host.headers[-1]["timeout_ms"] <= 7000


def test_hybridmethod_runs_on_the_instance_or_else_the_singleton() -> None:
    class Service:
        singleton: ClassVar[Service | None] = None

        def __init__(self, name: str) -> None:
            self.name = name

        @classmethod
        def get_instance(cls) -> Service:
            assert cls.singleton is not None
            return cls.singleton

        @manager_module._hybridmethod
        def who(self, suffix: str = "") -> str:
            """Who runs it."""
            return self.name + suffix

    Service.singleton = Service("the one")
    assert Service.who() == "the one"
    assert Service("other").who("!") == "other!"
    method = vars(Service)["who"]
    assert (method.__name__, method.__doc__) == ("who", "Who runs it.")
    assert method.__wrapped__ is method.func
