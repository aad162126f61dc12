"""float32 Linear layers on oneDNN with weights packed once (CPU).

torch runs an ``nn.Linear`` through MKL's sgemm on the plain weight at every call. oneDNN, given
the weight once in its own blocked layout (what IPEX and Inductor's CPU fusions do), ran faster
on an AMD EPYC with AVX2 for a large model. One forward pass in process, rows cut and padded as
``PackedLinear`` does, same vectors (largest difference 2e-7, cosine 1.0):

=====================  =======  ===============  ===============
model                  threads  one text         32 texts
=====================  =======  ===============  ===============
KURE-shaped            1        846 -> 707 ms    20.8 -> 20.2 s
KURE-shaped            2        636 -> 417 ms    13.4 -> 11.5 s
bundled (MiniLM-L6)    1        38.9 -> 40.7 ms  1000 -> 964 ms
bundled (MiniLM-L6)    2        34.4 -> 31.7 ms  556 -> 566 ms
=====================  =======  ===============  ===============

On an AMD EPYC with AVX-512 (VNNI, BF16), torch's kernel ran far slower than oneDNN's:

=====================  =======  ===============  ===============
model                  threads  one text         32 texts
=====================  =======  ===============  ===============
KURE-shaped            1        316 -> 157 ms    5.70 -> 2.98 s
KURE-shaped            2        200 -> 90 ms     3.01 -> 1.58 s
bundled (MiniLM-L6)    1        12.9 -> 8.3 ms   234 -> 145 ms
bundled (MiniLM-L6)    2        10.6 -> 6.7 ms   134 -> 94 ms
=====================  =======  ===============  ===============

So ``auto`` packs a model with ``AUTO_MIN_BYTES`` or more of Linear weights at float32 (layers
quantized to int8 counted at their float32 size; the layers such a model keeps in float32 are
packed), and a smaller one where oneDNN is measured clearly faster on this CPU: its largest layer
timed on both kernels as the model loads (``packed_time_ratio``, at most ``AUTO_RATIO``). The
supervisor packs them before it forks, so every worker reads the same packed copy (anonymous
memory shared copy-on-write; nothing writes to it). The float32 pages each packed weight was read
from are dropped from the checkpoint's file mapping as it goes, so the weights stay about one copy
in memory. Spawned workers pack their own copy, as they load their own model.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from shm_model.errors import ConfigError

log = logging.getLogger(__name__)


def onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def resolve_linear_kernel(requested: str, device: str) -> str:
    """The kernel float32 Linear layers run on: ``onednn`` or ``torch``."""
    if requested == "torch":
        return "torch"
    if device != "cpu":
        if requested == "onednn":
            raise ConfigError(f"SHM_MODEL_LINEAR_KERNEL=onednn runs on the CPU only; this model is on {device}")
        return "torch"
    if onednn_available():
        return "onednn"
    if requested == "onednn":
        raise ConfigError("SHM_MODEL_LINEAR_KERNEL=onednn: this torch build has no oneDNN (mkldnn) linear kernel")
    return "torch"


#: oneDNN keeps a compiled kernel of about 0.56 MB (measured) for each row count a layer shape
#: meets, so the rows of a call are cut into chunks of at most ROW_CHUNK, each padded to a
#: multiple of ROW_STEP: 16 row counts per layer shape, about 27 MB for a BERT-like encoder's three
#: shapes, however many lengths and batch sizes come. 256 rows run as fast per row as 512
#: (1024x4096, one thread: 0.128 and 0.132 ms a row).
ROW_STEP = 16
ROW_CHUNK = 256
#: ``auto`` packs a model whose float32 Linear weights are at least this large: there the kernels
#: kept (above) are a few percent of them, and one text gains the most (the KURE-shaped model).
AUTO_MIN_BYTES = 512 << 20
#: ``auto`` packs a smaller model where oneDNN took at most this fraction of torch's time on the
#: model's largest layer (0.45 for the bundled model on the AVX-512 CPU above). Packed layers cannot
#: be traced (``workers.traced``: 0.90-0.94x the eager time), so the bar is set where oneDNN's gain
#: on the Linear layers, most of an encoder's time, should exceed the trace's.
AUTO_RATIO = 0.8


def _linear_pointwise(*args: Any) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(*args)


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is held in oneDNN's packed layout (inference only)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The packed weight is an opaque oneDNN tensor, a plain attribute that placement leaves
        # alone; the bias stays a parameter, placed (and counted) like the model's others.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        parts = [self._rows(rows[start : start + ROW_CHUNK]) for start in range(0, rows.shape[0], ROW_CHUNK)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else rows.new_empty(0, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """At most ROW_CHUNK rows, padded with zeros to a multiple of ROW_STEP."""
        count = rows.shape[0]
        padded = -(-count // ROW_STEP) * ROW_STEP
        if padded != count:
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padded - count))
        out = _linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out[:count] if padded != count else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linear_layers(
    model: torch.nn.Module,
    release: Callable[[torch.Tensor], None] = lambda w: None,
    *,
    min_bytes: int = 0,
    measure: bool = False,
    label: str = "the model",
) -> int:
    """Replace every float32 ``nn.Linear`` of ``model`` by a ``PackedLinear``; returns the bytes of
    the weights packed, as float32 (the biases stay parameters). ``release(weight)`` runs on each
    replaced weight (to drop its pages). Nothing is packed when the first layer's result differs
    from torch's, or when the weights are under ``min_bytes`` unless ``measure`` and oneDNN runs
    the largest layer in at most ``AUTO_RATIO`` of torch's time. Log lines begin with ``label`` (the model's name)."""
    # (parent, name) only: an original layer is freed as soon as it is replaced (a checkpoint
    # loaded into private memory would otherwise be held twice until the last layer is packed).
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
    ]
    total = sum(_weight_bytes(getattr(parent, name)) for parent, name in targets)
    under = "%d MB of weights, under the %d MB that SHM_MODEL_LINEAR_KERNEL=auto packs"
    if total < min_bytes and not measure:
        log.info(
            "%s: float32 Linear layers stay on torch's kernel: " + under + " (onednn packs any)",
            label,
            total >> 20,
            min_bytes >> 20,
        )
        return 0
    if not targets or not _agrees(getattr(*targets[0]), label):
        return 0
    if total < min_bytes:
        ratio = packed_time_ratio(max((getattr(parent, name) for parent, name in targets), key=_weight_bytes))
        if ratio > AUTO_RATIO:
            log.info(
                "%s: float32 Linear layers stay on torch's kernel: " + under + ", and oneDNN took %.2fx torch's "
                "time on the largest layer here (onednn packs any)",
                label,
                total >> 20,
                min_bytes >> 20,
                ratio,
            )
            return 0
        log.info("%s: oneDNN took %.2fx torch's time on the largest Linear layer here: packing", label, ratio)
    for parent, name in targets:
        linear = getattr(parent, name)
        setattr(parent, name, PackedLinear(linear))
        release(linear.weight)
        del linear
    log.info("%s: float32 Linear layers on oneDNN: %d packed (%d MB)", label, len(targets), total >> 20)
    return total


def packed_time_ratio(linear: torch.nn.Linear, rows: int = ROW_STEP, rounds: int = 7, calls: int = 20) -> float:
    """oneDNN's packed kernel's time on ``linear`` over torch's, for ``rows`` rows at this process's
    thread count: the median of ``rounds`` alternating rounds' ratios of ``calls`` calls each."""
    packed = PackedLinear(linear)
    x = torch.randn(rows, linear.in_features, generator=torch.Generator().manual_seed(0))
    ratios = []
    with torch.inference_mode():
        linear(x), packed(x)  # warm-up: oneDNN compiles its kernel for this row count
        for _ in range(rounds):
            times = []
            for layer in (linear, packed):
                started = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                times.append(time.perf_counter() - started)
            ratios.append(times[1] / max(times[0], 1e-9))
    return statistics.median(ratios)


def _weight_bytes(linear: torch.nn.Linear) -> int:
    return linear.weight.numel() * linear.weight.element_size()


def _agrees(linear: torch.nn.Linear, label: str) -> bool:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, linear.in_features, generator=generator)
    with torch.inference_mode():
        expected = linear(x)
        try:
            got = PackedLinear(linear)(x)
        except RuntimeError as exc:
            log.warning(
                "%s: oneDNN's packed Linear failed (%s); float32 Linear layers stay on torch's kernel", label, exc
            )
            return False
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        log.warning(
            "%s: oneDNN's packed Linear does not match torch's here; float32 Linear layers stay on torch's kernel",
            label,
        )
        return False
    return True
