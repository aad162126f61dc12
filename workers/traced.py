"""A SentenceTransformer's forward pass as TorchScript traces (CPU).

Eager, every batch runs the model's modules in Python: sentence-transformers' dispatch, then
each attention and feed-forward module of the transformer. A trace records the tensor
operations once and replays them in TorchScript's interpreter, which leaves out that Python.
On a small model the Python is a visible part of a short batch. Measured in one process on
the bundled model (all-MiniLM-L6-v2), 370 one-text batches of 2-30 words, alternating blocks,
median of 6 (``torch.jit.optimized_execution(False)``):

======================  ===========  ===========  =====
                        eager        traced       ratio
======================  ===========  ===========  =====
float32, 1 thread       15.6 ms      14.6 ms      0.94
float32, 2 threads      10.5 ms      9.4 ms       0.90
int8, 1 thread          8.2 ms       7.0 ms       0.85
======================  ===========  ===========  =====

The traces are made where the model is loaded: in the supervisor before the fork, at its one
thread (which starts no thread pool), so that forked workers share them as they share the
weights; a trace holds references to the parameters, not copies. A graph runs without
TorchScript's profiling executor, so a new input shape never compiles anything (with it, the
first calls took 27-63 ms against 14) and the graph kept does not grow with the shapes seen.

A trace keeps what the Python computed from its example as constants: a model whose forward
branches on its inputs' values could give other inputs wrong vectors. So each trace is checked
against the eager model on batches unlike its example (one text, two texts of the same length,
a padded batch, and for the first trace a long text) and is used only if every vector agrees.
The non-tensor features a batch comes with (the modality, the prompt's length in tokens) are
part of what a trace assumes: there is one trace for each set of them, made at load for no
prompt and for each of the model's prompts, and a batch with another set runs eager. So do batches that may
pause between layers for a query (the pause is a hook of the eager layers), and models whose
Linear layers are packed for oneDNN (their row chunking is Python on the input's shape).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Largest difference a check batch's vectors may show against the eager model's, relative to
#: their largest component if that is over 1 (the same operations in the same order; seen: 0).
TOLERANCE = 1e-4
#: At most this many traces (sets of non-tensor features) per model.
MAX_TRACES = 8

_EXAMPLE = ["표에서 2023년 매출을 찾아 주세요", "a second text, longer than the first: the example batch is padded"]
_CHECKS = [
    ["짧은 질문"],
    ["같은 길이의 두 문장", "같은 길이의 두 문장"],  # several rows, none padded
    ["one", "a padded batch of three texts of different lengths, " * 3, "분기별 영업이익 표"],
]

Key = tuple[tuple[str, Any], ...]


class TraceMismatch(RuntimeError):
    """A trace's vectors differ from the eager model's."""


class _Sentence(torch.nn.Module):
    """The model from its feature tensors (positional, in ``keys``' order) to sentence embeddings."""

    def __init__(self, model: torch.nn.Module, keys: tuple[str, ...], extras: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys
        self.extras = extras

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model({**dict(zip(self.keys, tensors, strict=True)), **self.extras})["sentence_embedding"]


def _split(features: dict[str, Any]) -> tuple[Key, tuple[str, ...], tuple[torch.Tensor, ...]]:
    """A batch's non-tensor features (the key of its trace), its tensors' names and its tensors."""
    keys = tuple(k for k, v in features.items() if isinstance(v, torch.Tensor))
    extras = tuple(sorted((k, repr(v)) for k, v in features.items() if not isinstance(v, torch.Tensor)))
    return extras, keys, tuple(features[k] for k in keys)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Only errors from these loggers (tracing reads every attribute of the model, deprecated
    ones included, some of which log a warning)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class TracedForward:
    """Traces of ``model``'s forward pass, one per set of non-tensor features; ``None`` for a
    batch that has none (it runs eager)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.traces: dict[Key, tuple[tuple[str, ...], torch.jit.ScriptModule]] = {}

    @classmethod
    def build(cls, model: Any, prompts: Iterable[str | None], name: str = "the model") -> TracedForward:
        """Trace and check the forward pass for each of ``prompts`` (duplicates and prompts of
        the same token length share one); raises ``TraceMismatch`` if a check fails."""
        traced = cls(model)
        started = time.perf_counter()
        for prompt in dict.fromkeys(prompts):
            if len(traced.traces) >= MAX_TRACES:
                break
            traced.add(prompt)
        log.info(
            "forward pass of %s traced for %d prompt length(s) in %.1f s",
            name,
            len(traced.traces),
            time.perf_counter() - started,
        )
        return traced

    def add(self, prompt: str | None) -> None:
        example = self.model.preprocess(_EXAMPLE, prompt=prompt)
        key, keys, tensors = _split(example)
        if key in self.traces:
            return
        with torch.inference_mode(), warnings.catch_warnings(), _quiet("sentence_transformers", "transformers"):
            warnings.simplefilter("ignore")  # TracerWarning: the checks below decide
            extras = {k: v for k, v in example.items() if k not in keys}
            trace = torch.jit.trace(_Sentence(self.model, keys, extras), tensors, strict=False, check_trace=False)
        # a long text (truncated on a model that takes up to 256 tokens) for the first trace
        checks = _CHECKS if self.traces else [*_CHECKS, ["긴 문서 " * 128]]
        for texts in checks:
            features = self.model.preprocess(texts, prompt=prompt)
            with torch.inference_mode():
                expected = self.model(dict(features))["sentence_embedding"]
                got = self._run(trace, _split(features)[2])
            bound = TOLERANCE * max(1.0, float(expected.abs().max()))
            if got.shape != expected.shape or not bool((got - expected).abs().max() <= bound):
                raise TraceMismatch(f"a trace's vectors differ from the eager model's ({len(texts)} texts)")
        self.traces[key] = (keys, trace)

    def __call__(self, features: dict[str, Any]) -> torch.Tensor | None:
        key, keys, tensors = _split(features)
        entry = self.traces.get(key)
        if entry is None or entry[0] != keys:
            return None
        return self._run(entry[1], tensors)

    @staticmethod
    def _run(trace: torch.jit.ScriptModule, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.jit.optimized_execution(False):
            return trace(*tensors)
