"""Shared weights on a KURE-shaped model (2.2 GB): slow, run with ``pytest -m slow``."""

from __future__ import annotations

import pytest

from tests.conftest import assert_workers_share_the_weights


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("placement", ["auto", "shm"])
def test_kure_shaped_workers_share_the_weights(host_factory, placement: str) -> None:
    from benchmarks.kure_model import build

    host = host_factory(MODEL_NAME=str(build()), SHM_MODEL_WEIGHTS=placement)
    batch = [f"{i}번째 문장: 서울특별시의 2023년 인구는 약 940만 명이다." for i in range(16)]
    status = assert_workers_share_the_weights(host, batch, rounds=3)
    weight_bytes = status["weight_bytes"]
    assert weight_bytes > 2 * 10**9
    # large enough for SHM_MODEL_LINEAR_KERNEL=auto to pack its Linear layers for oneDNN
    assert status["models"][0]["linear_kernel"] == "onednn" and status["weights"]["packed"] > 10**9
    peak = vm_hwm(status["pid"])
    print(
        f"\n{placement}: weights {weight_bytes / 2**20:.0f} MB, supervisor peak RSS {peak / 2**20:.0f} MB, "
        f"tree PSS {status['memory']['pss'] / 2**20:.0f} MB"
    )
    for worker in status["workers"]:
        print(f"  worker {worker['pid']}: USS {worker['uss'] / 2**20:.0f} MB, PSS {worker['pss'] / 2**20:.0f} MB")
    if placement == "shm":
        assert status["weights"]["file"] == 0
        assert peak < 1.25 * weight_bytes  # no transient second copy of the weights
