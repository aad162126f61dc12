"""Where the model comes from and which device it loads on, in process: CUDA's presence and free
memory are faked (the machine has no GPU), as is the hub."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from config.model_config import ModelConfig
from shm_model.errors import InsufficientMemory
from workers.model_source import ModelSource, resolve_device, resolve_model

MiB = 1 << 20


def fake_cuda(monkeypatch: pytest.MonkeyPatch, free: int, total: int) -> list[int]:
    """A CUDA device with ``free`` of ``total`` bytes; returns a list that counts the memory queries."""
    queries: list[int] = []

    def mem_get_info() -> tuple[int, int]:
        queries.append(1)
        return free, total

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return queries


def test_auto_loads_on_cuda_when_the_weights_fit_in_its_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    queries = fake_cuda(monkeypatch, free=1024 * MiB, total=4096 * MiB)
    assert resolve_device("auto", 512 * MiB) == "cuda"
    assert resolve_device("auto", 1024 * MiB) == "cuda"  # exactly the free memory still fits
    assert resolve_device("cuda", 1024 * MiB) == "cuda"
    assert len(queries) == 3
    assert resolve_device("cpu", 8192 * MiB) == "cpu"  # cpu asks nothing of the device
    assert resolve_device("auto") == "cuda"  # nothing to fit: no query
    assert len(queries) == 3


def test_auto_falls_back_to_cpu_with_a_warning_when_cuda_has_no_room(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cuda(monkeypatch, free=1024 * MiB, total=4096 * MiB)
    with caplog.at_level(logging.WARNING, logger="workers.model_source"):
        assert resolve_device("auto", 1024 * MiB + 1) == "cpu"
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "workers.model_source",
            "WARNING",
            "cuda has 1024 MiB free of 4096 MiB, the model needs 1024 MiB: loading on cpu",
        )
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workers.model_source"):
        assert resolve_device("auto", 3000 * MiB) == "cpu"
    assert [r.getMessage() for r in caplog.records] == [
        "cuda has 1024 MiB free of 4096 MiB, the model needs 3000 MiB: loading on cpu"
    ]


def test_cuda_without_room_refuses_with_both_figures(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cuda(monkeypatch, free=1024 * MiB, total=4096 * MiB)
    with caplog.at_level(logging.WARNING, logger="workers.model_source"), pytest.raises(InsufficientMemory) as info:
        resolve_device("cuda", 3000 * MiB)
    assert str(info.value) == (
        "not enough memory to load the model on cuda: needs 3000 MiB, 1024 MiB available; "
        "of 4096 MiB; use MODEL_DEVICE=auto"
    )
    assert info.value.details == {"needed": 3000 * MiB, "available": 1024 * MiB}
    assert caplog.records == []  # refused, not a fallback to cpu


def test_a_download_asks_the_hub_for_the_named_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, Any, bool]] = []

    def download(name: str, cache_dir: Any = None, local_files_only: bool = False) -> str:
        calls.append((name, cache_dir, local_files_only))
        if local_files_only:
            raise OSError("not cached")
        return f"/downloaded/{name}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(name="org/model-2", cache_dir=str(tmp_path / "cache"))
    assert resolve_model(cfg) == ModelSource("/downloaded/org/model-2", "hub")
    assert calls[-1] == ("org/model-2", str(tmp_path / "cache"), False)
    assert [name for name, _, _ in calls] == ["org/model-2"] * 3
