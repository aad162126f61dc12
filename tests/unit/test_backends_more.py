"""The backends' edges, in process: device OOM detection, the CPU fallback and load arguments (a fake
SentenceTransformer), int8 quantization of a small model, the gate between layers, the dummy
backend's sleep steps (a fake clock) and a model set's unknown-model error."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentence_transformers
import torch

from config.model_config import HostConfig, ModelConfig
from shm_model.errors import ConfigError, ModelLoadError, ModelNotFound
from tests.unit.test_backends import Minimal
from workers import backends, kernels
from workers.backends import DummyBackend, is_device_oom, quantize_int8, transformer_layers
from workers.model_source import ModelSource
from workers.models import ModelSet

HOST = HostConfig.load({})

# --- is_device_oom --------------------------------------------------------------------------


def chained(outer: BaseException, *, cause: BaseException | None = None, context: BaseException | None = None) -> Any:
    outer.__cause__ = cause
    outer.__context__ = context
    return outer


def test_device_oom_is_told_by_type_by_message_and_through_the_chain() -> None:
    assert is_device_oom(torch.OutOfMemoryError("no room"))
    assert is_device_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_device_oom(chained(RuntimeError("load failed"), cause=torch.OutOfMemoryError("x")))
    assert is_device_oom(chained(RuntimeError("load failed"), context=torch.OutOfMemoryError("x")))
    assert is_device_oom(chained(ValueError("a"), cause=torch.OutOfMemoryError("x"), context=ValueError("b")))
    assert not is_device_oom(RuntimeError("out of memory"))  # the allocator's own words only
    assert not is_device_oom(RuntimeError("cuda out of memory"))
    assert not is_device_oom(ValueError("bad checkpoint"))
    assert not is_device_oom(chained(RuntimeError("a"), cause=ValueError("b"), context=KeyError("c")))


def test_device_oom_uses_torchs_generic_type_and_falls_back_to_the_cuda_one(monkeypatch: pytest.MonkeyPatch) -> None:
    class GenericOom(RuntimeError):  # a torch whose generic OutOfMemoryError is not the CUDA one
        pass

    monkeypatch.setattr(torch, "OutOfMemoryError", GenericOom, raising=False)
    assert is_device_oom(GenericOom("device ran out"))
    monkeypatch.delattr(torch, "OutOfMemoryError")  # an older torch: only torch.cuda's
    assert is_device_oom(torch.cuda.OutOfMemoryError("device ran out"))
    assert not is_device_oom(ValueError("x"))


# --- SentenceTransformerBackend with a fake SentenceTransformer ------------------------------


class FakeModel(torch.nn.Module):
    """What the backend uses of a SentenceTransformer: a widening and a narrowing Linear layer."""

    max_seq_length: int | None = 64

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)])
        self.prompts = {"query": "q: "}

    def get_embedding_dimension(self) -> int:
        return 8


class Loader:
    """Stands in for ``sentence_transformers.SentenceTransformer``: records each call and raises
    what ``failures`` gives for its device."""

    def __init__(self, make: Callable[[], Any] = FakeModel, failures: dict[str, BaseException] | None = None) -> None:
        self.make = make
        self.failures = failures or {}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, location: str, **kwargs: Any) -> Any:
        self.calls.append((location, kwargs))
        if kwargs.get("device") in self.failures:
            raise self.failures[kwargs["device"]]
        return self.make()


def fake_load(
    monkeypatch: pytest.MonkeyPatch, *, device: str = "cpu", kind: str = "local", loader: Loader | None = None
) -> tuple[Loader, list[tuple[str, int]]]:
    """Patch model lookup, device choice and SentenceTransformer; return the loader and the
    ``resolve_device`` calls."""
    loader = loader or Loader()
    devices: list[tuple[str, int]] = []

    def resolve_device(requested: str, needed: int = 0) -> str:
        devices.append((requested, needed))
        return device

    monkeypatch.setattr(backends, "resolve_model", lambda cfg: ModelSource("/models/m", kind))
    monkeypatch.setattr(backends, "checkpoint_bytes", lambda location: {"a.safetensors": 1000, "b.safetensors": 24})
    monkeypatch.setattr(backends, "resolve_device", resolve_device)
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", loader)
    return loader, devices


def st(env: dict[str, str], host: HostConfig = HOST, *, place: bool = True) -> backends.SentenceTransformerBackend:
    return backends.SentenceTransformerBackend(ModelConfig.load({"MODEL_NAME": "m", **env}), host, place=place)


def test_the_model_is_loaded_with_the_configured_options_on_the_device_its_weights_fit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loader, devices = fake_load(monkeypatch)
    cache = tmp_path / "cache"
    b = st({"MODEL_DEVICE": "auto", "MODEL_CACHE_DIR": str(cache), "MODEL_TRUST_REMOTE_CODE": "1"}, place=False)
    assert devices == [("auto", 1024)]  # the checkpoint's bytes
    assert loader.calls == [
        (
            "/models/m",
            {"device": "cpu", "cache_folder": str(cache), "trust_remote_code": True, "local_files_only": True},
        )
    ]
    assert (b.name, b.location, b.device, b.dimension, b.max_seq_length) == ("m", "/models/m", "cpu", 8, 64)
    assert b.prompts == {"query": "q: "}
    assert b.dtype == "float32"
    assert b.weight_bytes == (8 * 16 + 16 + 16 * 8 + 8) * 4
    assert b.placement == {} and b.place_seconds == 0.0  # not placed
    assert not b.model.training and not any(p.requires_grad for p in b.model.parameters())


def test_only_a_model_from_the_hub_may_be_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    loader, _ = fake_load(monkeypatch, kind="hub")
    st({"MODEL_DEVICE": "cpu", "MODEL_CACHE_DIR": "rel/cache"})
    assert loader.calls[0][1]["local_files_only"] is False
    assert loader.calls[0][1]["cache_folder"] == str(Path("rel/cache").absolute())
    assert loader.calls[0][1]["trust_remote_code"] is False
    for kind in ("bundled", "hub-cache"):
        loader, _ = fake_load(monkeypatch, kind=kind)
        st({"MODEL_DEVICE": "cpu"})
        assert loader.calls[0][1]["local_files_only"] is True


def test_timings_are_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_load(monkeypatch)
    clock = itertools.count(10_000.0, 0.5)  # a clock far from zero: a sum instead of a difference shows
    monkeypatch.setattr(backends.time, "perf_counter", lambda: next(clock))
    b = st({"MODEL_DEVICE": "cpu"})
    assert 0 < b.import_seconds < 100 and 0 < b.load_seconds < 100 and 0 < b.place_seconds < 100


def test_a_model_without_prompts_or_a_length_gets_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    class Bare(FakeModel):
        max_seq_length = None

        def __init__(self) -> None:
            super().__init__()
            del self.prompts

    fake_load(monkeypatch, loader=Loader(Bare))
    b = st({"MODEL_DEVICE": "cpu"})
    assert (b.prompts, b.max_seq_length) == ({}, 512)


def test_out_of_memory_on_cuda_under_auto_loads_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    loader, _ = fake_load(
        monkeypatch, device="cuda", loader=Loader(failures={"cuda": RuntimeError("CUDA out of memory. Tried 2 GiB")})
    )
    with caplog.at_level(logging.WARNING, logger="workers.backends"):
        b = st({"MODEL_DEVICE": "auto"})
    assert [kwargs["device"] for _, kwargs in loader.calls] == ["cuda", "cpu"]
    assert b.device == "cpu" and emptied == [True]
    assert b.placement["file"] + b.placement["shm"] + b.placement["anon"] > 0  # placed: it is on the cpu now
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "out of memory on cuda while loading the model; loading on cpu (MODEL_DEVICE=auto)")
    ]


@pytest.mark.parametrize(
    ("requested", "resolved", "error", "message"),
    [
        ("cuda", "cuda", torch.OutOfMemoryError("no room"), "OutOfMemoryError: no room"),  # cuda was asked for
        ("auto", "cuda", ValueError("bad weights"), "ValueError: bad weights"),  # no OOM
        ("auto", "cpu", torch.OutOfMemoryError("no room"), "OutOfMemoryError: no room"),  # already on the cpu
    ],
)
def test_other_load_failures_say_where_the_model_was_found(
    monkeypatch: pytest.MonkeyPatch, requested: str, resolved: str, error: BaseException, message: str
) -> None:
    loader, _ = fake_load(monkeypatch, device=resolved, loader=Loader(failures={resolved: error}))
    with pytest.raises(ModelLoadError) as info:
        st({"MODEL_DEVICE": requested})
    assert str(info.value) == f"model 'm' found at /models/m but failed to load: {message}"
    assert info.value.__cause__ is error
    assert len(loader.calls) == 1


def test_int8_quantizes_the_widening_layers_and_counts_them_as_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_load(monkeypatch)
    b = st({"MODEL_DEVICE": "cpu"}, HostConfig.load({"SHM_MODEL_DTYPE": "int8", "SHM_MODEL_LINEAR_KERNEL": "torch"}))
    assert b.dtype == "int8"
    assert isinstance(b.model.layers[0], torch.ao.nn.quantized.dynamic.Linear)
    assert type(b.model.layers[1]) is torch.nn.Linear  # narrows its input: kept in float32
    quantized = 8 * 16  # one byte per weight
    assert b.weight_bytes == quantized + (16 * 8 + 8) * 4
    assert b.placement["int8"] == quantized
    assert b.describe()["dtype"] == "int8"


@pytest.mark.parametrize(("least", "kernel"), [(1024, "onednn"), (1025, "torch")])
def test_auto_packs_by_the_models_float32_size_with_its_int8_layers_counted(
    monkeypatch: pytest.MonkeyPatch, least: int, kernel: str
) -> None:
    """The fake model's Linear weights: 128 quantized to int8 (512 bytes in float32) and 512 bytes
    left in float32. ``auto`` counts both against ``AUTO_MIN_BYTES``; ``torch`` never packs."""
    fake_load(monkeypatch)
    monkeypatch.setattr(kernels, "AUTO_MIN_BYTES", least)
    monkeypatch.setattr(kernels, "packed_time_ratio", lambda linear: 1.0)  # oneDNN no faster here
    b = st({"MODEL_DEVICE": "cpu"}, HostConfig.load({"SHM_MODEL_DTYPE": "int8"}))
    assert b.linear_kernel == kernel
    assert isinstance(b.model.layers[1], kernels.PackedLinear) == (kernel == "onednn")
    assert b.placement.get("packed", 0) == (16 * 8 * 4 if kernel == "onednn" else 0)
    assert isinstance(b.model.layers[0], torch.ao.nn.quantized.dynamic.Linear)
    monkeypatch.setattr(kernels, "AUTO_MIN_BYTES", 0)
    b = st({"MODEL_DEVICE": "cpu"}, HostConfig.load({"SHM_MODEL_DTYPE": "int8", "SHM_MODEL_LINEAR_KERNEL": "torch"}))
    assert b.linear_kernel == "torch" and type(b.model.layers[1]) is torch.nn.Linear


@pytest.mark.parametrize(("ratio", "forward", "kernel"), [(0.5, "auto", "onednn"), (0.9, "auto", "torch")])
def test_auto_packs_a_smaller_model_where_onednn_measures_faster(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, ratio: float, forward: str, kernel: str
) -> None:
    fake_load(monkeypatch)
    measured: list[tuple[int, int]] = []

    def time_ratio(linear: torch.nn.Linear) -> float:
        measured.append(tuple(linear.weight.shape))
        return ratio

    monkeypatch.setattr(kernels, "packed_time_ratio", time_ratio)
    with caplog.at_level(logging.INFO, logger="workers.kernels"):
        b = st({"MODEL_DEVICE": "cpu"}, HostConfig.load({"SHM_MODEL_FORWARD": forward}))
    assert measured == [(16, 8)]  # the largest layer, once
    assert f"m: oneDNN took {ratio:.2f}x" in caplog.text or f"and oneDNN took {ratio:.2f}x" in caplog.text
    assert all(r.getMessage().startswith("m: ") for r in caplog.records)  # the model's name
    assert b.linear_kernel == kernel and b.describe()["linear_kernel"] == kernel
    assert all(isinstance(layer, kernels.PackedLinear) == (kernel == "onednn") for layer in b.model.layers)


def test_auto_measures_nothing_when_the_forward_pass_must_be_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_load(monkeypatch)
    monkeypatch.setattr(kernels, "packed_time_ratio", lambda linear: pytest.fail("measured"))
    with pytest.raises(ConfigError) as info:  # the fake model cannot be traced, for its own reason
        st({"MODEL_DEVICE": "cpu"}, HostConfig.load({"SHM_MODEL_FORWARD": "traced"}))
    assert "packed for oneDNN" not in str(info.value)


def test_int8_without_placement_and_float32_report_no_int8_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_load(monkeypatch)
    assert st({"MODEL_DEVICE": "cpu"}, HostConfig.load({"SHM_MODEL_DTYPE": "int8"}), place=False).placement == {}
    assert "int8" not in st({"MODEL_DEVICE": "cpu"}).placement


def test_int8_on_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_load(monkeypatch, device="cuda")
    with pytest.raises(ConfigError) as info:
        st({"MODEL_DEVICE": "cuda"}, HostConfig.load({"SHM_MODEL_DTYPE": "int8"}))
    assert str(info.value) == "SHM_MODEL_DTYPE=int8 runs on the CPU only; this model is on cuda"
    b = st({"MODEL_DEVICE": "cuda"})  # float32 on cuda: loaded, not placed (workers are spawned)
    assert (b.device, b.placement) == ("cuda", {})


# --- quantize_int8 and transformer_layers ------------------------------------------------------


def test_quantize_int8_on_a_small_model(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512), torch.nn.Linear(512, 512)
    )
    x = torch.randn(4, 512)
    with torch.inference_mode():
        expected = model(x)
    widening = [model[0].weight, model[3].weight]
    ranges = [(w.untyped_storage().data_ptr(), w.untyped_storage().nbytes()) for w in widening]
    asked: list[list[tuple[int, int]]] = []
    dropped: list[tuple[int, int]] = []

    def file_mapped(given: list[tuple[int, int]]) -> list[tuple[int, int]]:
        asked.append(list(given))
        return given[:1]  # as if only the first came from a checkpoint's file mapping

    monkeypatch.setattr(backends, "file_mapped", file_mapped)
    monkeypatch.setattr(backends, "drop_pages", lambda address, nbytes: dropped.append((address, nbytes)))
    with caplog.at_level(logging.INFO, logger="workers.backends"):
        size = quantize_int8(model)
    assert size == 512 * 2048 + 512 * 512  # int8: a byte per weight
    assert asked == [ranges] and dropped == ranges[:1]
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert [type(m) for m in model] == [dynamic, torch.nn.ReLU, torch.nn.Linear, dynamic]
    assert model[0].weight().dtype == torch.qint8
    assert model[0].weight().qscheme() == torch.per_channel_affine
    with torch.inference_mode():
        got = model(x)
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.99
    assert [r.getMessage() for r in caplog.records] == ["int8: 2 Linear layers quantized (1 MB)"]


def test_transformer_layers_are_the_longest_module_list() -> None:
    blocks = [torch.nn.Linear(2, 2) for _ in range(3)]
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.ReLU()]), torch.nn.ModuleList(blocks))
    assert transformer_layers(model) == blocks
    assert transformer_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_the_gate_is_passed_before_each_layer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_load(monkeypatch)
    b = st({"MODEL_DEVICE": "cpu"}, place=False)
    passed: list[int] = []
    with caplog.at_level(logging.DEBUG, logger="workers.backends"):
        b.set_gate(lambda: passed.append(1))
    assert [r.getMessage() for r in caplog.records] == ["batches can pause between 2 layers"]
    assert b.pause_points == 2
    x = torch.ones(1, 8)
    for layer in b.model.layers:
        x = layer(x)
    assert passed == [1, 1]


# --- SentenceTransformerBackend on the bundled model --------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> backends.SentenceTransformerBackend:
    return backends.SentenceTransformerBackend(
        ModelConfig.load({"MODEL_NAME": "bundled", "MODEL_DEVICE": "cpu"}),
        HostConfig.load({"SHM_MODEL_LINEAR_KERNEL": "torch"}),  # auto's choice depends on the CPU
        place=True,
    )


def test_the_bundled_checkpoint_stays_file_mapped_under_auto(bundled: Any) -> None:
    assert bundled.linear_kernel == "torch"
    assert bundled.placement["file"] > 0.9 * bundled.weight_bytes


def test_a_batch_runs_through_the_model_once(bundled: Any) -> None:
    passed: list[int] = []
    layers = transformer_layers(bundled.model)
    before = [set(layer._forward_pre_hooks) for layer in layers]
    try:
        bundled.set_gate(lambda: passed.append(1))
        # more than sentence-transformers' default batch of 32; pausable: the eager layers, with the gate
        bundled.encode_counted(["a"] * 40, None, pausable=True)
    finally:
        for layer, keep in zip(layers, before, strict=True):
            for key in set(layer._forward_pre_hooks) - keep:
                del layer._forward_pre_hooks[key]
    assert len(passed) == len(layers) == 6
    assert bundled.pause_points == 6 and bundled.describe()["pause_points"] == 6


def test_vectors_are_the_models_own_not_normalized_again(bundled: Any) -> None:
    unnormalized = sentence_transformers.SentenceTransformer(modules=[bundled.model[0], bundled.model[1]], device="cpu")
    raw = backends.SentenceTransformerBackend.__new__(backends.SentenceTransformerBackend)
    raw.model, raw._torch, raw.dimension, raw._device = unnormalized, torch, bundled.dimension, torch.device("cpu")
    for directly in (True, False):
        raw._forward_directly = directly
        vectors = raw.encode(["hello world", "bonjour"], None)
        assert np.allclose(vectors, unnormalized.encode(["hello world", "bonjour"]), atol=1e-5)
        assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_no_progress_bar_even_at_info_level(
    bundled: Any, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sentence_transformers")
    bundled.encode(["hello"], None)
    err = capfd.readouterr().err
    assert "Batches" not in err and "it/s" not in err  # tqdm's bar


def test_vectors_are_float32_whatever_the_model_returns(bundled: Any) -> None:
    class Half:  # a half-precision model: sentence-transformers hands back float16 arrays
        def encode(self, texts: list[str], **kwargs: Any) -> Any:
            out = bundled.model.encode(texts, **kwargs)
            return out.astype(np.float16) if kwargs.get("convert_to_numpy") else out

    class HalfModules:  # the same through the model's modules: a float16 sentence_embedding tensor
        def preprocess(self, texts: list[str], prompt: str | None = None) -> dict[str, Any]:
            return bundled.model.preprocess(texts, prompt=prompt)

        def __call__(self, features: dict[str, Any]) -> dict[str, Any]:
            out = bundled.model(features)
            return {"sentence_embedding": out["sentence_embedding"].half()}

    for model, directly in ((Half(), False), (HalfModules(), True)):
        half = backends.SentenceTransformerBackend.__new__(backends.SentenceTransformerBackend)
        half.model, half._torch, half.dimension = model, torch, bundled.dimension
        half._forward_directly, half._device = directly, torch.device("cpu")
        vectors = half.encode(["hello"], None)
        assert vectors.dtype == np.float32 and vectors.shape == (1, 384)
        assert np.allclose(vectors, bundled.model.encode(["hello"]), atol=1e-2)


def test_counting_long_texts_logs_no_sequence_length_warning(
    bundled: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = bundled.model.tokenizer
    monkeypatch.setattr(tokenizer, "deprecation_warnings", {})  # transformers warns once per tokenizer
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        assert bundled.count_tokens(["word " * 300], None) == [302]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("transformers")] == []


# --- DummyBackend -------------------------------------------------------------------------------


class FakeClock:
    """time.monotonic that moves only when time.sleep is called."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) > 20:
            raise AssertionError("the sleep does not end")
        self.now += seconds


def test_the_dummy_sleep_passes_the_gate_every_10_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(5.0)
    monkeypatch.setattr(backends.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(backends.time, "sleep", clock.sleep)
    d = DummyBackend(ModelConfig.load({}), HOST)
    passed: list[float] = []
    d.set_gate(lambda: passed.append(clock.now))
    d.encode(["__sleep__:0.025"], None)
    assert clock.sleeps == pytest.approx([0.01, 0.01, 0.005])
    assert passed == pytest.approx([5.0, 5.01, 5.02])
    assert clock.now == pytest.approx(5.025)
    clock.sleeps.clear()
    passed.clear()
    d.encode(["__sleep__:0"], None)
    assert clock.sleeps == [] and passed == []


def test_a_malformed_dummy_sleep_is_an_error() -> None:
    d = DummyBackend(ModelConfig.load({}), HOST)
    with pytest.raises(ValueError):
        d.encode(["__sleep__:0.01:0"], None)


def test_dummy_vectors_past_64_dimensions_hash_with_a_little_endian_block_number() -> None:
    blocks = b"".join(hashlib.blake2b(b"a", digest_size=64, salt=i.to_bytes(16, "little")).digest() for i in range(2))
    expected = (np.frombuffer(blocks[:100], dtype=np.uint8).astype(np.float32) - 127.5) / 127.5
    assert np.array_equal(DummyBackend.vector("a", 100), expected)


# --- ModelSet ---------------------------------------------------------------------------------


def test_an_unknown_model_names_the_served_ones() -> None:
    first = DummyBackend(ModelConfig.load({"MODEL_NAME": "dummy"}), HOST)
    second = DummyBackend(ModelConfig.load({"MODEL_NAME": "dummy-64"}), HOST)
    models = ModelSet([("dummy", first), ("small", second)])
    assert models.get("small") is second and models.get(None) is first
    with pytest.raises(ModelNotFound) as info:
        models.get("other")
    assert str(info.value) == "model 'other' is not served here; served: dummy, dummy-64"
    assert info.value.details == {"model": "other"}
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_model_set_describes_every_model_with_its_alias() -> None:
    first = DummyBackend(ModelConfig.load({"MODEL_NAME": "dummy"}), HOST)
    second = DummyBackend(ModelConfig.load({"MODEL_NAME": "dummy-64"}), HOST)
    first.weight_bytes, second.weight_bytes = 10, 5
    described = ModelSet([("dummy", first), ("small", second)]).describe()
    assert described == {
        **first.describe(),
        "alias": "dummy",
        "weight_bytes": 15,
        "models": [{**first.describe(), "alias": "dummy"}, {**second.describe(), "alias": "small"}],
    }
    with pytest.raises(ValueError, match=r"^a model set needs at least one model$"):
        ModelSet([])
    broken = ModelSet([("dummy", first)])
    broken.aliases.append("extra")  # aliases and backends out of step: an error, not a shorter list
    with pytest.raises(ValueError):
        broken.describe()


def test_load_models_loads_each_listed_name_placed(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import models

    calls: list[tuple[str, bool]] = []

    def load_backend(cfg: ModelConfig, host: HostConfig, *, place: bool) -> DummyBackend:
        calls.append((cfg.name, place))
        return DummyBackend(cfg, host)

    monkeypatch.setattr(models, "load_backend", load_backend)
    loaded = models.load_models(ModelConfig.load({"MODEL_NAME": "dummy,dummy-64"}), HOST)
    assert calls == [("dummy", True), ("dummy-64", True)]
    assert [b.name for b in loaded] == ["dummy", "dummy-64"] and loaded.aliases == ["dummy", "dummy-64"]
    models.load_models(ModelConfig.load({"MODEL_NAME": "dummy"}), HOST, place=False)
    assert calls[-1] == ("dummy", False)


def test_the_sentence_transformer_backend_is_placed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_load(monkeypatch)
    b = backends.SentenceTransformerBackend(ModelConfig.load({"MODEL_NAME": "m", "MODEL_DEVICE": "cpu"}), HOST)
    assert b.placement["shm"] > 0


@pytest.mark.parametrize(
    ("name", "dimension"),
    [("dummy-64", 64), ("dummy64", 64), ("dummy-1", 1), ("dummy-4096", 4096), ("dummy-0", 32), ("dummy-4097", 32)],
)
def test_a_dummy_names_its_dimension(name: str, dimension: int) -> None:
    d = DummyBackend(ModelConfig.load({"MODEL_NAME": name}), HOST)
    assert (d.name, d.dimension) == (name, dimension)


def test_a_dummy_suffix_that_is_no_number_only_salts_the_vectors() -> None:
    d = DummyBackend(ModelConfig.load({"MODEL_NAME": "dummyX5"}), HOST)
    assert (d.dimension, d.salt) == (32, "X5")
    assert np.array_equal(d.encode(["a"], None)[0], DummyBackend.vector("X5a"))


def test_a_bare_backend_describes_empty_prompts_and_rounds_times() -> None:
    b = Minimal()
    b.place_seconds = 2.71828
    described = b.describe()
    assert (described["prompts"], described["weights"], described["place_seconds"]) == ({}, {}, 2.718)
