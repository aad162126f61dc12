"""float32 Linear layers on oneDNN with packed weights (workers.kernels)."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from shm_model.errors import ConfigError
from workers import kernels
from workers.kernels import PackedLinear, pack_linear_layers, resolve_linear_kernel

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no oneDNN linear")


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.up = torch.nn.Linear(64, 256)
        self.down = torch.nn.Linear(256, 64, bias=False)
        self.inner = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
        self.wide = torch.nn.Linear(64, 64).double()  # not float32: left alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.down(torch.relu(self.up(x)))) + self.wide(x.double()).float()


def test_packed_layers_give_torchs_results_for_any_input_layout(caplog: pytest.LogCaptureFixture) -> None:
    model = Block().eval()
    inputs = [torch.randn(5, 64), torch.randn(2, 7, 64), torch.randn(7, 2, 64).transpose(0, 1)]  # last: not contiguous
    with torch.inference_mode():
        expected = [model(x) for x in inputs]
    released: list[torch.Tensor] = []
    with caplog.at_level(logging.INFO, logger="workers.kernels"):
        size = pack_linear_layers(model, release=released.append)
    assert size == (64 * 256 + 256 * 64 + 64 * 64) * 4  # float32 weights, biases not included
    assert [type(m) for m in (model.up, model.down, model.inner[0], model.wide)] == [
        PackedLinear,
        PackedLinear,
        PackedLinear,
        torch.nn.Linear,
    ]
    assert [tuple(w.shape) for w in released] == [(256, 64), (64, 256), (64, 64)]
    names = {name for name, _ in model.named_parameters()}
    assert names == {"up.bias", "inner.0.bias", "wide.weight", "wide.bias"}  # biases stay parameters
    assert model.down.bias is None
    with torch.inference_mode():
        for x, want in zip(inputs, expected, strict=True):
            got = model(x)
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert [r.getMessage() for r in caplog.records] == ["the model: float32 Linear layers on oneDNN: 3 packed (0 MB)"]


def test_nothing_is_packed_when_onednn_disagrees_with_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = PackedLinear.forward
    monkeypatch.setattr(PackedLinear, "forward", lambda self, x: real(self, x) + 1e-3)
    model = Block().eval()
    with caplog.at_level(logging.WARNING, logger="workers.kernels"):
        assert pack_linear_layers(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert "does not match torch's" in caplog.text

    def broken(self: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(PackedLinear, "forward", broken)
    assert pack_linear_layers(model) == 0 and "no kernel for this shape" in caplog.text
    assert pack_linear_layers(torch.nn.Sequential(torch.nn.ReLU())) == 0  # nothing to pack


def test_the_kernel_is_resolved_from_the_setting_and_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_linear_kernel("auto", "cpu") == "onednn"
    assert resolve_linear_kernel("onednn", "cpu") == "onednn"
    assert resolve_linear_kernel("torch", "cpu") == "torch"
    assert resolve_linear_kernel("auto", "cuda") == "torch"
    assert resolve_linear_kernel("torch", "cuda") == "torch"
    with pytest.raises(ConfigError, match="runs on the CPU only; this model is on cuda"):
        resolve_linear_kernel("onednn", "cuda")
    monkeypatch.setattr(kernels, "onednn_available", lambda: False)
    assert resolve_linear_kernel("auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match="has no oneDNN"):
        resolve_linear_kernel("onednn", "cpu")


def test_rows_reach_onednn_in_a_bounded_set_of_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each row count a layer meets costs a kernel kept in memory: calls get at most ROW_CHUNK
    rows, padded to a multiple of ROW_STEP, so any input gives one of 16 counts."""
    seen: list[int] = []
    real = kernels._linear_pointwise

    def recording(rows: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append(rows.shape[0])
        return real(rows, *args)

    monkeypatch.setattr(kernels, "_linear_pointwise", recording)
    torch.manual_seed(5)
    linear = torch.nn.Linear(32, 48).eval()
    packed = PackedLinear(linear)
    for shape in [(0, 32), (1, 32), (16, 32), (17, 32), (3, 100, 32), (1, 256, 32), (600, 32)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            got, want = packed(x), linear(x)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), shape
    assert seen == [16, 16, 32, 256, 48, 256, 256, 256, 96]
    assert {kernels.ROW_STEP * k for k in range(1, kernels.ROW_CHUNK // kernels.ROW_STEP + 1)} >= set(seen)


def test_a_model_under_min_bytes_is_not_packed(caplog: pytest.LogCaptureFixture) -> None:
    model = Block().eval()
    with caplog.at_level(logging.INFO, logger="workers.kernels"):
        assert pack_linear_layers(model, min_bytes=1 << 20) == 0
    assert type(model.up) is torch.nn.Linear
    assert "0 MB of weights, under the 1 MB that SHM_MODEL_LINEAR_KERNEL=auto packs" in caplog.text
    assert pack_linear_layers(model, min_bytes=(64 * 256 * 2 + 64 * 64) * 4) > 0  # exactly enough


def test_auto_packs_a_model_under_min_bytes_where_onednn_measures_faster(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    measured: list[tuple[int, ...]] = []
    ratio = 0.9

    def time_ratio(linear: torch.nn.Linear) -> float:
        measured.append(tuple(linear.weight.shape))
        return ratio

    monkeypatch.setattr(kernels, "packed_time_ratio", time_ratio)
    model = Block().eval()
    with caplog.at_level(logging.INFO, logger="workers.kernels"):
        assert pack_linear_layers(model, min_bytes=1 << 20, measure=True) == 0
        assert "and oneDNN took 0.90x torch's time on the largest layer here" in caplog.text
        assert type(model.up) is torch.nn.Linear
        ratio = kernels.AUTO_RATIO
        assert pack_linear_layers(model, min_bytes=1 << 20, measure=True) == (64 * 256 * 2 + 64 * 64) * 4
    assert "oneDNN took 0.80x torch's time on the largest Linear layer here: packing" in caplog.text
    assert measured == [(256, 64), (256, 64)]  # the largest layer (the first of the two as large)
    measured.clear()
    assert pack_linear_layers(Block().eval(), min_bytes=1 << 20) == 0  # no measure: by size only
    assert pack_linear_layers(Block().eval(), min_bytes=0, measure=True) > 0  # large enough: nothing timed
    assert measured == []


def test_packed_time_ratio_is_the_packed_kernels_time_over_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the supervisor measures: no thread waits for a core another process holds
    try:
        linear = torch.nn.Linear(64, 128).eval()
        ratio = kernels.packed_time_ratio(linear, rounds=3, calls=5)
        assert 0 < ratio < 100
        real = kernels._linear_pointwise

        def slow(*args: object) -> torch.Tensor:
            deadline = time.perf_counter() + 0.01  # far longer than a 16 x 64 x 128 product
            while time.perf_counter() < deadline:
                pass
            return real(*args)

        monkeypatch.setattr(kernels, "_linear_pointwise", slow)
        assert kernels.packed_time_ratio(linear, rounds=3, calls=5) > 5
    finally:
        torch.set_num_threads(threads)
