"""More of the memory rules, at their edges: safetensors headers that are short, huge or odd, the
figures a reading and the host's watch report, and the exact points where the host degrades,
restores and calls itself degraded."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from config.model_config import HostConfig
from shm_model import pressure
from shm_model.errors import InsufficientMemory
from shm_model.pressure import (
    Capacity,
    GenerationNeeds,
    HealthWindow,
    MemoryReading,
    MemoryWatch,
    PressurePolicy,
    PressureThresholds,
    checkpoint_bytes,
    degraded_reasons,
    reload_mode,
)

MiB = 1 << 20
GiB = 1 << 30


def header_file(path: Path, header: object, data: int = 0) -> None:
    """A safetensors file with this JSON header and ``data`` zero bytes after it."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)


# --- safetensors headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x01\x02", "shorter than its header length"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", f"header of {2**64 - 1} bytes is over {100 * 1024 * 1024}"),
        (struct.pack("<Q", 5) + b"[1,2]", "header is not an object"),
    ],
)
def test_an_unreadable_header_is_logged_with_its_file_and_reason_and_counted_by_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, why: str
) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    assert checkpoint_bytes(str(tmp_path)) == {"other": len(content)}
    assert caplog.messages == [f"cannot read the header of model.safetensors ({why}); counting its size"]


def test_a_header_of_exactly_the_largest_size_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    header_file(tmp_path / "model.safetensors", header, data=8)
    monkeypatch.setattr(pressure, "MAX_HEADER_BYTES", len(json.dumps(header).encode()))
    assert checkpoint_bytes(str(tmp_path)) == {"F32": 8}


def test_metadata_and_malformed_entries_of_a_header_are_not_counted(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"dtype": "F32", "data_offsets": [0, 4]},  # metadata is never a tensor
        "not_an_object": 5,
        "one_offset": {"dtype": "F32", "data_offsets": [4]},
        "string_offsets": {"dtype": "F32", "data_offsets": ["0", "4"]},
        "three_offsets": {"dtype": "F32", "data_offsets": [0, 4, 8]},
        "empty": {"dtype": "F16", "shape": [0], "data_offsets": [8, 8]},
        "backwards": {"dtype": "I8", "data_offsets": [9, 8]},
        "weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    header_file(tmp_path / "model.safetensors", header, data=24)
    assert checkpoint_bytes(str(tmp_path)) == {"F32": 16, "F16": 0, "I8": 0}


def test_checkpoint_bytes_add_up_across_files_and_folders(tmp_path: Path) -> None:
    header_file(tmp_path / "a.safetensors", {"x": {"dtype": "F32", "data_offsets": [0, 100]}}, data=100)
    header_file(tmp_path / "b.safetensors", {"y": {"dtype": "F32", "data_offsets": [0, 20]}}, data=20)
    (tmp_path / "c.safetensors").write_bytes(b"\x01")
    (tmp_path / "d.safetensors").write_bytes(b"\x01\x02\x03")
    assert checkpoint_bytes(str(tmp_path)) == {"F32": 120, "other": 4}

    pickled = tmp_path / "pickled"
    (pickled / "sub").mkdir(parents=True)
    (pickled / "pytorch_model.bin").write_bytes(b"x" * 300)
    (pickled / "sub" / "extra.pt").write_bytes(b"x" * 20)
    (pickled / "sub" / "notes.txt").write_bytes(b"x" * 7)  # not weights
    assert checkpoint_bytes(str(pickled)) == {"other": 320}


# --- what a reading and a generation report ---------------------------------------------------------


def test_a_reading_reports_its_figures_under_the_memory_limit() -> None:
    r = MemoryReading(
        available=60 * MiB, total=100 * MiB, cgroup_limit=50 * MiB, cgroup_usage=20 * MiB, psi=1.5, oom_kills=3,
        host_usage=30 * MiB,
    )  # fmt: skip
    assert r.as_dict(40 * MiB) == {
        "available": 60 * MiB,
        "total": 100 * MiB,
        "cgroup_limit": 50 * MiB,
        "cgroup_usage": 20 * MiB,
        "memory_limit": 40 * MiB,
        "host_usage": 30 * MiB,
        "headroom": 10 * MiB,  # 40 MiB allowed less 30 used: less than the cgroup's 30 MiB room
        "ceiling": 40 * MiB,
        "psi_some_avg10": 1.5,
        "oom_kills": 3,
    }


def test_a_second_generation_adds_its_copied_weights_of_both_kinds_and_its_workers() -> None:
    needs = GenerationNeeds(weights={"file": 1000, "shm": 200, "anon": 30}, workers=3, worker_bytes=7)
    assert needs.second() == 200 + 30 + 3 * 7
    assert GenerationNeeds(weights={"anon": 30}, workers=0).second() == 30
    assert GenerationNeeds(weights={"file": 1000}, workers=0).second() == 0
    # int8 and oneDNN-packed weights are copies a second generation makes again
    packed = GenerationNeeds(weights={"file": 1000, "int8": 40, "packed": 500, "shm": 2}, workers=2, worker_bytes=7)
    assert packed.second() == 40 + 500 + 2 + 2 * 7


def test_a_reload_that_just_fits_overlaps_and_one_that_does_not_names_what_it_refused() -> None:
    needs = GenerationNeeds(weights={"shm": 100 * MiB}, workers=1, worker_bytes=20 * MiB)
    assert reload_mode("auto", needs, 120 * MiB) == "overlap"
    assert reload_mode("overlap", needs, 120 * MiB) == "overlap"
    with pytest.raises(InsufficientMemory) as info:
        reload_mode("overlap", needs, 120 * MiB - 1)
    assert str(info.value).startswith("not enough memory to reload beside the serving model: needs 120 MiB, ")


# --- degrade and restore at the edges -----------------------------------------------------------------


def reading(available: int = 8 * GiB, total: int = 16 * GiB, **kw: object) -> MemoryReading:
    return MemoryReading(available=available, total=total, **kw)  # type: ignore[arg-type]


FULL = Capacity(workers=4, max_batch_tokens=16384, queue_size=1024)


def test_an_odd_capacity_is_reduced_to_whole_numbers() -> None:
    policy = PressurePolicy(Capacity(workers=5, max_batch_tokens=10, queue_size=11), PressureThresholds())
    reduced = policy.reduced()
    assert reduced == Capacity(workers=2, max_batch_tokens=2, queue_size=2)
    assert all(type(v) is int for v in (reduced.workers, reduced.max_batch_tokens, reduced.queue_size))


def degraded_policy(thresholds: PressureThresholds, bad: MemoryReading) -> PressurePolicy:
    policy = PressurePolicy(FULL, thresholds)
    assert policy.update(0.0, bad) != FULL
    return policy


def test_psi_exactly_at_its_threshold_is_calm() -> None:
    policy = degraded_policy(PressureThresholds(psi=10.0, hold=5.0), reading(psi=25.0))
    policy.update(1.0, reading(psi=10.0))
    assert policy.update(6.0, reading(psi=10.0)) == FULL


def test_headroom_exactly_twice_the_low_mark_is_calm() -> None:
    policy = degraded_policy(PressureThresholds(low_fraction=0.125, hold=5.0), reading(available=GiB))
    policy.update(1.0, reading(available=4 * GiB))  # 2 x 12.5% of 16 GiB
    assert policy.update(6.0, reading(available=4 * GiB)) == FULL


def test_calm_is_judged_under_the_memory_limit() -> None:
    """SHM_MODEL_MEMORY_LIMIT=2 GiB on a 16 GiB machine: the low mark is 10% of 2 GiB, and calm is
    headroom under the limit of at least 20% of it, whatever RAM is free."""
    limit = PressureThresholds(memory_limit=2 * GiB, hold=5.0)
    policy = degraded_policy(limit, reading(host_usage=1900 * MiB))
    policy.update(1.0, reading(host_usage=1700 * MiB))  # 348 MiB under the limit: no pressure, not calm
    assert policy.update(10.0, reading(host_usage=1700 * MiB)).workers == 2
    policy.update(11.0, reading(host_usage=GiB))  # 1 GiB under the limit: calm
    assert policy.update(16.0, reading(host_usage=GiB)) == FULL


def test_an_error_rate_or_p99_exactly_at_its_limit_is_not_degraded() -> None:
    edge = dict(pressure=None, workers=2, target=2, error_rate=0.05, max_error_rate=0.05, p99=2.0, max_p99=2.0)
    assert degraded_reasons(**edge) == {}  # type: ignore[arg-type]


def test_the_health_window_counts_exactly_its_minimum_and_keeps_a_sample_at_its_edge() -> None:
    window = HealthWindow(window=5.0, min_samples=20)
    for i in range(20):
        window.record(95.0, ok=i != 0, seconds=0.5 if i else 9.0)
    assert window.error_rate(100.0) == pytest.approx(0.05)  # 20 requests, one failed; 95.0 is still in the window
    assert window.p99(100.0) is None  # 19 of them answered: no p99 yet
    window.record(99.0, ok=True, seconds=0.25)
    assert window.p99(100.0) == 0.5  # 20 answered
    assert window.error_rate(100.5) is None  # those at 95.0 are out


# --- the host's watch --------------------------------------------------------------------------------


def watch_without_cgroup(tmp_path: Path, **cfg: object) -> MemoryWatch:
    return MemoryWatch(HostConfig(socket_path=str(tmp_path / "s"), cgroup=str(tmp_path / "none"), **cfg), FULL)  # type: ignore[arg-type]


def test_the_watch_s_headroom_is_under_the_memory_limit_with_the_host_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shm_model.memory

    measured: list[list[int]] = []

    def total_memory(pids: list[int]) -> dict[str, int]:
        measured.append(list(pids))
        return {"pss": GiB - 10 * MiB}

    monkeypatch.setattr(shm_model.memory, "total_memory", total_memory)
    watch = watch_without_cgroup(tmp_path, memory_limit=GiB)
    assert watch.cgroup is None
    assert watch.headroom([os.getpid()]) == 10 * MiB
    assert measured == [[os.getpid()]]


def test_the_watch_reports_nothing_read_yet_and_no_cgroup(tmp_path: Path) -> None:
    watch = watch_without_cgroup(tmp_path)
    report = watch.report(0.0, workers=4, target=4)
    assert report["health"] == {"status": "ok", "reasons": {}}
    assert report["memory_pressure"] == {
        "degraded": False,
        "degraded_for_s": None,
        "episodes": 0,
        "capacity": {"workers": 4, "max_batch_tokens": 16384, "queue_size": 1024},
        "full_capacity": {"workers": 4, "max_batch_tokens": 16384, "queue_size": 1024},
        "worker_bytes": None,
        "cgroup": None,
    }
    watch.worker_bytes = 50 * MiB
    assert watch.report(0.0, workers=4, target=4)["memory_pressure"]["worker_bytes"] == 50 * MiB


def test_the_watch_reports_errors_latency_and_how_long_it_has_been_degraded(tmp_path: Path) -> None:
    watch = watch_without_cgroup(tmp_path, memory_limit=4 * GiB, degraded_error_rate=0.1, degraded_p99_ms=1500)
    for _ in range(20):
        watch.record(1.0, True, 3.0)
    for _ in range(5):
        watch.record(1.0, False, 0.1)
    usage = int(3.9 * GiB)
    under_limit = reading(available=8 * GiB, host_usage=usage)
    watch.last = under_limit  # as ``read`` leaves it
    watch.check(1.0, under_limit)
    report = watch.report(1.12345, workers=4, target=4)
    assert report["health"]["reasons"] == {
        "memory_pressure": "memory pressure: 102 MiB free of 4096 MiB (below 10%)",
        "error_rate": "error rate 20.0% over the last minute (above 10.0%)",
        "latency": "p99 latency 3000 ms over the last minute (above 1500 ms)",
    }
    figures = report["memory_pressure"]
    assert figures["degraded_for_s"] == 0.123
    assert (figures["memory_limit"], figures["headroom"], figures["ceiling"]) == (4 * GiB, 4 * GiB - usage, 4 * GiB)
