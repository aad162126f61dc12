"""Encoder backends (one ABC): the SentenceTransformer one and a model-free dummy.

Where a model comes from is ``workers.model_source``; where its weights live, ``workers.placement``.

A backend is built in the supervisor before fork (or in a spawned worker), and
``encode`` runs in the workers. The supervisor only reads its metadata; it must never
start a thread pool.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from config.model_config import HostConfig, ModelConfig
from shm_model.errors import BadRequest, ConfigError, ModelLoadError
from shm_model.pressure import checkpoint_bytes
from shm_model.scheduling import estimate_tokens
from workers.model_source import resolve_device, resolve_model
from workers.placement import drop_pages, file_mapped, place_weights

if TYPE_CHECKING:
    from workers.traced import TracedForward

log = logging.getLogger(__name__)


def is_device_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is torch running out of device memory."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    while exc is not None:
        if isinstance(exc, oom) or "CUDA out of memory" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


# --- backends ---------------------------------------------------------------------------


class Backend(abc.ABC):
    """What every backend reports about itself, and how a worker encodes with it."""

    name = location = device = ""
    dtype = "float32"
    linear_kernel = "torch"  # float32 Linear layers: "onednn" (packed weights) or "torch"
    forward = "eager"  # a worker's forward pass: "traced" (TorchScript, ``workers.traced``) or "eager"
    dimension = max_seq_length = weight_bytes = 0
    #: Where a paused batch can stop during one encode (the model's layers): a query waits at
    #: most one of these steps for a running bulk batch's cores.
    pause_points = 1
    import_seconds = load_seconds = place_seconds = 0.0

    def __init__(self) -> None:
        self.prompts: dict[str, str] = {}
        self.placement: dict[str, int] = {}

    @abc.abstractmethod
    def prepare_worker(self, threads: int) -> None:
        """Set up a freshly started worker (its intra-op threads)."""

    def set_threads(self, threads: int) -> None:
        """Use this many intra-op threads from the next batch on (the supervisor decides per batch)."""
        return None

    def set_gate(self, gate: Callable[[], None]) -> None:
        """Call ``gate`` between the model's layers: it returns at once, or waits while the
        supervisor has paused this worker's batch (so that a query can use its cores)."""
        return None

    @abc.abstractmethod
    def encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        """float32 vectors, one row per text."""

    @abc.abstractmethod
    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        """Tokens of each text with its prompt and the special tokens, before any truncation
        (the model encodes at most ``max_seq_length`` of them)."""

    def encode_counted(
        self, texts: list[str], prompt: str | None, *, pausable: bool = False
    ) -> tuple[np.ndarray, list[int]]:
        """``encode`` and ``count_tokens`` of one batch (a backend may share their work).
        ``pausable``: the batch must stop at the gate between layers (``set_gate``)."""
        return self.encode(texts, prompt), self.count_tokens(texts, prompt)

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
            "dtype": self.dtype,
            "linear_kernel": self.linear_kernel,
            "forward": self.forward,
            "pause_points": self.pause_points,
            "import_seconds": round(self.import_seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
            "place_seconds": round(self.place_seconds, 3),
        }


class SentenceTransformerBackend(Backend):
    """A SentenceTransformer in eval mode whose weights are placed for sharing."""

    _traced: TracedForward | None = None

    def __init__(self, model_cfg: ModelConfig, host_cfg: HostConfig, *, place: bool = True) -> None:
        super().__init__()
        started = time.perf_counter()
        import torch
        from sentence_transformers import SentenceTransformer

        from workers.kernels import AUTO_MIN_BYTES, pack_linear_layers, resolve_linear_kernel

        self.import_seconds = time.perf_counter() - started
        started = time.perf_counter()
        source = resolve_model(model_cfg)
        self.device = resolve_device(model_cfg.device, sum(checkpoint_bytes(source.location).values()))

        def load(device: str) -> Any:
            return SentenceTransformer(
                source.location,
                device=device,
                cache_folder=os.path.abspath(model_cfg.cache_dir),
                trust_remote_code=model_cfg.trust_remote_code,
                local_files_only=source.kind != "hub",
            )

        try:
            try:
                model = load(self.device)
            except Exception as exc:
                if not (self.device.startswith("cuda") and model_cfg.device == "auto" and is_device_oom(exc)):
                    raise
                log.warning(
                    "out of memory on %s while loading the model; loading on cpu (MODEL_DEVICE=auto)", self.device
                )
                torch.cuda.empty_cache()
                self.device = "cpu"
                model = load(self.device)
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
        self.pause_points = max(1, len(transformer_layers(model)))
        self.load_seconds = time.perf_counter() - started
        self.dtype = host_cfg.dtype
        quantized = 0
        if self.dtype == "int8":
            if self.device != "cpu":
                raise ConfigError(f"SHM_MODEL_DTYPE=int8 runs on the CPU only; this model is on {self.device}")
            quantized = quantize_int8(model)
        placing = place and self.device == "cpu"
        started = time.perf_counter()
        if placing:
            # Placed before packing: the packed copies and a large tensor's two copies while it
            # moves to shared memory would otherwise be resident at once (KURE-shaped, shm: peak
            # RSS 3.6 GB against 2.6 GB). A packed layer's original is freed as it is replaced.
            place_weights(model, host_cfg.weights)
        packed = 0
        if resolve_linear_kernel(host_cfg.linear_kernel, self.device) == "onednn":
            # auto goes by the model's size: its Linear weights at float32, the int8 ones included
            # (KURE-shaped, int8: the 384 MB left in float32 packed, one text 1.16x faster at 2 threads),
            # and packs a smaller model where oneDNN measures faster, unless its forward pass must be traced
            auto = host_cfg.linear_kernel == "auto"
            least = max(0, AUTO_MIN_BYTES - 4 * quantized) if auto else 0
            measure = auto and host_cfg.forward != "traced"
            packed = pack_linear_layers(
                model, release=drop_file_pages, min_bytes=least, measure=measure, label=model_cfg.name
            )
        self.linear_kernel = "onednn" if packed else "torch"
        self.weight_bytes = quantized + packed + sum(t.numel() * t.element_size() for t in model.parameters())
        if placing:
            self.placement = place_weights(model, host_cfg.weights)  # counts where the rest lies; moves nothing
            # int8 and packed weights live in this process's memory: forked workers share it copy-on-write
            if quantized:
                self.placement["int8"] = quantized
            if packed:
                self.placement["packed"] = packed
            self.place_seconds = time.perf_counter() - started
        self._torch = torch
        self._device = torch.device(self.device)
        # ``preprocess`` is the input module's tokenization with the prompt; a release whose
        # model lacks it (older ones have ``tokenize``) goes through ``encode``.
        self._forward_directly = callable(getattr(model, "preprocess", None))
        self._traced = self._trace(host_cfg.forward)
        self.forward = "eager" if self._traced is None else "traced"

    def _why_eager(self) -> str:
        """Why this model's forward pass cannot be traced, or ''."""
        if self.device != "cpu":
            return f"traces run on the CPU only; this model is on {self.device}"
        if self.linear_kernel != "torch":
            return "the Linear layers packed for oneDNN cannot be traced; set SHM_MODEL_LINEAR_KERNEL=torch"
        if not self._forward_directly:
            return "this sentence-transformers release has no SentenceTransformer.preprocess"
        return ""

    def _trace(self, requested: str) -> TracedForward | None:
        """Traces of the forward pass (SHM_MODEL_FORWARD), made here, before the fork: forked
        workers share them as they share the weights (made in each worker, tracing, which reads
        every attribute of every module, left about 15 MB of private pages in each). In the
        supervisor their checks run at its one thread, which starts no thread pool."""
        if requested == "eager":
            return None
        why_eager = self._why_eager()
        if why_eager:
            if requested == "traced":
                raise ConfigError(f"SHM_MODEL_FORWARD=traced: {why_eager}")
            return None
        from workers.traced import TracedForward

        try:
            return TracedForward.build(self.model, [None, *self.prompts.values()], self.name)
        except Exception as exc:
            if requested == "traced":
                raise ConfigError(f"SHM_MODEL_FORWARD=traced: the model could not be traced: {exc}") from exc
            log.warning("the forward pass of %s stays eager: %s: %s", self.name, type(exc).__name__, exc)
            return None

    def prepare_worker(self, threads: int) -> None:
        self._torch.set_num_threads(threads)

    def set_threads(self, threads: int) -> None:
        self._torch.set_num_threads(threads)

    def set_gate(self, gate: Callable[[], None]) -> None:
        layers = transformer_layers(self.model)
        for layer in layers:
            layer.register_forward_pre_hook(lambda module, args: gate())
        log.debug("batches can pause between %d layers", len(layers))

    def encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        with self._torch.inference_mode():
            if self._forward_directly:
                if not texts:
                    return self._empty()
                return self._forward(self.model.preprocess(texts, prompt=prompt), len(texts))
            vectors = self.model.encode(
                texts,
                prompt=prompt,
                batch_size=max(1, len(texts)),
                convert_to_numpy=True,
                normalize_embeddings=False,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimension)

    def encode_counted(
        self, texts: list[str], prompt: str | None, *, pausable: bool = False
    ) -> tuple[np.ndarray, list[int]]:
        """One tokenization for both: a text's count is its row of the attention mask, unless
        the row is full (the text may have been cut), when it is counted again uncut. That
        saves the second tokenizer call, about 0.2-0.5 ms of a one-text batch on the bundled
        model."""
        if not (self._forward_directly and texts):
            return super().encode_counted(texts, prompt)
        with self._torch.inference_mode():
            features = self.model.preprocess(texts, prompt=prompt)
            counts = self._mask_counts(features, texts, prompt)
            return self._forward(features, len(texts), pausable=pausable), counts

    def _mask_counts(self, features: dict[str, Any], texts: list[str], prompt: str | None) -> list[int]:
        mask = features.get("attention_mask")
        limit = getattr(self.model, "max_seq_length", None)
        if not isinstance(mask, self._torch.Tensor) or mask.ndim != 2 or mask.shape[0] != len(texts) or not limit:
            return self.count_tokens(texts, prompt)
        counts = [int(n) for n in mask.sum(dim=1).tolist()]
        full = [i for i, n in enumerate(counts) if n >= limit]
        if full:
            for i, n in zip(full, self.count_tokens([texts[i] for i in full], prompt), strict=True):
                counts[i] = n
        return counts

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dimension), dtype=np.float32)

    def _forward(self, features: dict[str, Any], rows: int, *, pausable: bool = False) -> np.ndarray:
        """One batch through the model's modules, as ``SentenceTransformer.encode`` runs each of
        its batches, without what encode repeats on every call: ``eval()``, a walk over every
        parameter to find the device, sorting by length. That is about 1.2 ms of the 14 ms a
        one-text batch takes on the bundled model, for the same vectors. Through a trace where
        the worker has one for the batch's features, unless the batch may pause between layers."""
        features = {k: v.to(self._device) if isinstance(v, self._torch.Tensor) else v for k, v in features.items()}
        vectors = None if pausable or self._traced is None else self._traced(features)
        if vectors is None:
            vectors = self.model(features)["sentence_embedding"]
        truncate_dim = getattr(self.model, "truncate_dim", None)
        if truncate_dim:
            vectors = vectors[..., :truncate_dim]
        return vectors.float().cpu().numpy().reshape(rows, self.dimension)

    def count_tokens(self, texts: list[str], prompt: str | None) -> list[int]:
        if not texts:
            return []
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


def quantize_int8(model: Any) -> int:
    """Quantize the model's Linear layers to int8 in place (dynamic, per output channel), except
    those that narrow their input (a feed-forward block's output projection), which lose the most
    accuracy (multilingual-e5-small, cosine to float32: all layers 0.987, these kept 0.996).
    Returns the bytes of the int8 weights."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module.in_features <= module.out_features
    }
    weights = [model.get_submodule(name).weight for name in spec]
    size = sum(w.numel() for w in weights)
    mapped = file_mapped([(w.untyped_storage().data_ptr(), w.untyped_storage().nbytes()) for w in weights])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's notice that it moves to torchao
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    del weights
    for address, nbytes in mapped:  # the float32 pages read to quantize, from the checkpoint's mapping
        drop_pages(address, nbytes)
    log.info("int8: %d Linear layers quantized (%d MB)", len(spec), size >> 20)
    return size


def drop_file_pages(tensor: Any) -> None:
    """Drop the pages of a tensor that lies in the checkpoint's file mapping (it is no longer used)."""
    storage = tensor.untyped_storage()
    for address, nbytes in file_mapped([(storage.data_ptr(), storage.nbytes())]):
        drop_pages(address, nbytes)


def transformer_layers(model: Any) -> list[Any]:
    """The repeated blocks of a model (the longest ``ModuleList``: a BERT or XLM-RoBERTa
    encoder's layers), or none."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class DummyBackend(Backend):
    """Deterministic hash vectors with no model: fast tests and transport benchmarks.

    Texts that start with these markers inject faults, for the reliability tests:
    ``__sleep__:SECONDS`` sleeps (in 10 ms steps, passing the gate between steps as a model
    passes it between layers), ``__crash__`` kills the worker, ``__error__`` raises;
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
        self.gate: Callable[[], None] = lambda: None

    def prepare_worker(self, threads: int) -> None:
        self.threads = threads

    def set_gate(self, gate: Callable[[], None]) -> None:
        self.gate = gate

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
                end = time.monotonic() + float(text.split(":", 1)[1])
                while time.monotonic() < end:
                    self.gate()
                    time.sleep(min(0.01, max(0.0, end - time.monotonic())))
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
