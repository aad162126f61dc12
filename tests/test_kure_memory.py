"""Shared weights on a KURE-shaped model (2.2 GB): slow, run with ``pytest -m slow``."""

from __future__ import annotations

import threading

import pytest

from shm_model.memory import smaps_breakdown


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
    client = host.client(pool_size=4)
    batch = [f"{i}번째 문장: 서울특별시의 2023년 인구는 약 940만 명이다." for i in range(16)]
    threads = [threading.Thread(target=lambda: client.encode(batch, timeout=300)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    status = host.status()
    weight_bytes = status["weight_bytes"]
    assert weight_bytes > 2 * 10**9
    assert all(w["requests_served"] > 0 for w in status["workers"])
    peak = vm_hwm(status["pid"])
    print(
        f"\n{placement}: weights {weight_bytes / 2**20:.0f} MB, supervisor peak RSS {peak / 2**20:.0f} MB, "
        f"tree PSS {status['memory']['pss'] / 2**20:.0f} MB"
    )
    for worker in status["workers"]:
        breakdown = smaps_breakdown(worker["pid"])
        print(
            f"  worker {worker['pid']}: USS {worker['uss'] / 2**20:.0f} MB, PSS {worker['pss'] / 2**20:.0f} MB, "
            f"{ {k: {kk: round(vv / 2**20) for kk, vv in v.items()} for k, v in breakdown.items()} }"
        )
        for kind in ("weight-file", "shm"):
            assert breakdown.get(kind, {}).get("private_dirty", 0) == 0
        assert worker["uss"] < 0.25 * weight_bytes
    if placement == "shm":
        assert status["weights"]["file"] == 0
        assert peak < 1.25 * weight_bytes  # no transient second copy of the weights
