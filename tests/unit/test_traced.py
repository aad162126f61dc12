"""The traced forward pass (``workers.traced``): same vectors as the eager model, checked before
use, eager where a trace cannot serve (a pausable batch, a prompt length without a trace)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from config.model_config import HostConfig, ModelConfig
from shm_model.errors import ConfigError
from workers import backends, traced
from workers.backends import SentenceTransformerBackend, transformer_layers

# --- on a toy model -------------------------------------------------------------------------------


class Toy(torch.nn.Module):
    """A SentenceTransformer's surface: ``preprocess`` (one token per word, padded; a prompt
    adds ``prompt_length``) and a forward pass to ``sentence_embedding``. ``branches``: the
    forward pass takes another path when no text is padded, which a trace cannot follow."""

    max_seq_length = 16

    def __init__(self, branches: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 4)
        self.branches = branches

    def preprocess(self, texts: list[str], prompt: str | None = None) -> dict[str, Any]:
        words = [((prompt or "") + t).split()[: self.max_seq_length] for t in texts]
        width = max(len(w) for w in words)
        ids = torch.tensor([[len(x) for x in w] + [0] * (width - len(w)) for w in words], dtype=torch.float32)
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in words])
        features: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "modality": "text"}
        if prompt:
            features["prompt_length"] = len(prompt.split())
        return features

    def forward(self, features: dict[str, Any]) -> dict[str, Any]:
        tokens = self.linear(features["input_ids"].unsqueeze(-1))
        mask = features["attention_mask"].unsqueeze(-1)
        pooled = (tokens * mask).sum(1) / mask.sum(1)
        if self.branches and bool(features["attention_mask"].all()):
            pooled = pooled * 2
        return {"sentence_embedding": pooled + features.get("prompt_length", 0)}


def test_a_trace_gives_the_eager_vectors_for_other_shapes_than_its_example() -> None:
    model = Toy().eval()
    forward = traced.TracedForward.build(model, [None])
    for texts in (["a"], ["one two three", "x"], ["w " * 40] * 5):
        features = model.preprocess(texts)
        got = forward(features)
        assert got is not None
        torch.testing.assert_close(got, model(features)["sentence_embedding"])


def test_a_forward_pass_that_branches_on_its_inputs_fails_the_checks() -> None:
    # traced on a padded example, it keeps the padded path; a lone text takes the other
    with pytest.raises(traced.TraceMismatch, match="differ from the eager model's"):
        traced.TracedForward.build(Toy(branches=True).eval(), [None])


def test_one_trace_per_prompt_length_and_none_for_a_length_not_traced(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Toy().eval()
    forward = traced.TracedForward.build(model, [None, "ab", "ab", "cd ef", "gh ij", "k l m"])
    # no prompt, and prompts of 1, 2 and 3 words: the key is the non-tensor features
    assert sorted(dict(key).get("prompt_length", "-") for key in forward.traces) == ["-", "1", "2", "3"]
    with_prompt = model.preprocess(["some text"], prompt="cd ef")
    torch.testing.assert_close(forward(with_prompt), model(with_prompt)["sentence_embedding"])
    assert forward(model.preprocess(["some text"], prompt="a b c d")) is None  # 4 words: no trace
    assert forward({**model.preprocess(["x"]), "extra": torch.ones(1)}) is None  # other tensors
    monkeypatch.setattr(traced, "MAX_TRACES", 2)
    assert len(traced.TracedForward.build(model, [None, "ab", "cd ef", "k l m"]).traces) == 2


# --- on the bundled model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded() -> Iterator[SentenceTransformerBackend]:
    """The bundled model as the supervisor loads it (SHM_MODEL_FORWARD=auto), at one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield SentenceTransformerBackend(
            ModelConfig.load({"MODEL_NAME": "bundled", "MODEL_DEVICE": "cpu"}),
            # torch's kernel: auto packs the layers for oneDNN on a CPU where that measures faster
            HostConfig.load({"SHM_MODEL_LINEAR_KERNEL": "torch"}),
            place=False,
        )
    finally:
        torch.set_num_threads(threads)


def test_the_bundled_model_is_traced_and_its_vectors_are_the_eager_ones(
    loaded: SentenceTransformerBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (loaded.forward, loaded.describe()["forward"]) == ("traced", "traced")
    replays: list[int] = []
    run = traced.TracedForward._run
    monkeypatch.setattr(traced.TracedForward, "_run", staticmethod(lambda t, x: replays.append(1) or run(t, x)))
    long = "표가 있는 문서의 긴 문단 " * 100  # cut at the model's 256 tokens
    many = [f"text {i} " * i for i in range(1, 34)]
    for texts in (["a"], ["hello world", "표에서 2023년 매출"], [long, "short"], many):
        vectors, counts = loaded.encode_counted(texts, None)
        eager, eager_counts = loaded.encode_counted(texts, None, pausable=True)
        assert counts == eager_counts and vectors.dtype == np.float32
        np.testing.assert_allclose(vectors, eager, atol=1e-5)
    assert len(replays) == 4  # the pausable ones ran eager


def test_a_pausable_batch_passes_the_gate_at_each_layer_and_a_query_batch_does_not(
    loaded: SentenceTransformerBackend,
) -> None:
    passed: list[int] = []
    layers = transformer_layers(loaded.model)
    before = [set(layer._forward_pre_hooks) for layer in layers]
    try:
        loaded.set_gate(lambda: passed.append(1))
        loaded.encode_counted(["a query"], None)
        assert passed == []
        loaded.encode_counted(["a bulk text"], None, pausable=True)
        assert len(passed) == len(layers) == 6
    finally:
        for layer, keep in zip(layers, before, strict=True):
            for key in set(layer._forward_pre_hooks) - keep:
                del layer._forward_pre_hooks[key]


def test_a_prompt_without_a_trace_runs_eager(loaded: SentenceTransformerBackend) -> None:
    assert loaded._traced is not None and loaded._traced(loaded.model.preprocess(["x"], prompt="query: ")) is None
    vectors, _ = loaded.encode_counted(["x", "y z"], "query: ")
    eager, _ = loaded.encode_counted(["x", "y z"], "query: ", pausable=True)
    np.testing.assert_array_equal(vectors, eager)


def test_eager_asked_for_makes_no_trace(loaded: SentenceTransformerBackend) -> None:
    assert loaded._trace("eager") is None


def test_a_trace_that_fails_its_checks_leaves_auto_eager_and_stops_traced(
    loaded: SentenceTransformerBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(traced, "TOLERANCE", -1.0)  # no vector can agree
    with caplog.at_level(logging.WARNING, logger="workers.backends"):
        assert loaded._trace("auto") is None
    assert "the forward pass of bundled stays eager: TraceMismatch" in caplog.text
    with pytest.raises(ConfigError, match="SHM_MODEL_FORWARD=traced: the model could not be traced"):
        loaded._trace("traced")


def test_traced_is_refused_where_it_cannot_run() -> None:
    with pytest.raises(ConfigError, match="packed for oneDNN cannot be traced; set SHM_MODEL_LINEAR_KERNEL=torch"):
        SentenceTransformerBackend(
            ModelConfig.load({"MODEL_NAME": "bundled", "MODEL_DEVICE": "cpu"}),
            HostConfig.load({"SHM_MODEL_FORWARD": "traced", "SHM_MODEL_LINEAR_KERNEL": "onednn"}),
            place=False,
        )
    # a model on another device: the reason, without loading one there
    b = SentenceTransformerBackend.__new__(SentenceTransformerBackend)
    b.device, b.linear_kernel, b._forward_directly = "cuda:0", "torch", True
    assert b._why_eager() == "traces run on the CPU only; this model is on cuda:0"
    assert b._trace("auto") is None and b.forward == backends.Backend.forward == "eager"
    b.device, b._forward_directly = "cpu", False
    assert "no SentenceTransformer.preprocess" in b._why_eager()
