"""The supervisor's parts, called one by one in the test process: what ``status`` reports, the
configuration derived at start-up, which requests are refused, how a reload proceeds, and how memory
pressure and outside CPU load change the pool. Workers are the asyncio fakes of host_fakes.py (no
process is forked), the model loader is replaced where a reload needs one."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from config.model_config import HostConfig, ModelConfig
from shm_model import pressure
from shm_model.errors import BadRequest, HostUnavailable, InternalError, ShmModelError
from shm_model.host import supervisor as supervisor_module
from shm_model.host.cpuload import OutsideLoad
from shm_model.host.supervisor import Supervisor, available_cores
from shm_model.pressure import DEFAULT_WORKER_BYTES, MemoryReading, mib
from shm_model.protocol import Frame
from tests.unit.host_fakes import META, FakeConnection, FakeSpawner
from workers.worker import WORKER_BOOT_ERROR

T = TypeVar("T")
LOGGER = "shm_model.host.supervisor"
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def make_supervisor(tmp_path: Path, **host: Any) -> Supervisor:
    settings: dict[str, Any] = {"backend": "dummy", "workers": 1, **host}
    return Supervisor(ModelConfig(), HostConfig(socket_path=str(tmp_path / "run" / "host.sock"), **settings))


def attach(sup: Supervisor) -> FakeSpawner:
    """Workers of the pool become fakes (asyncio tasks on socket pairs)."""
    spawner = FakeSpawner(pool=sup.pool)
    sup.pool.spawner = spawner
    return spawner


def in_loop(sup: Supervisor) -> None:
    """What ``_serve`` sets up before anything else runs (without its signal handlers)."""
    sup._changed = asyncio.Event()
    sup._done = asyncio.Event()
    sup._reload_lock = asyncio.Lock()


async def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def stopped(sup: Supervisor) -> None:
    """Wait until the stop that began has ended: its task is gone and the host is done."""
    await until(lambda: not sup._tasks, what="the stop to end")
    assert sup._done is not None and sup._done.is_set()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def snapshot(sup: Supervisor) -> dict[str, Any]:
    return sup._status_snapshot()


class FakeModels(list[SimpleNamespace]):
    """What ``load_models`` returns: backends to log, and the generation's description."""

    def __init__(self, name: str, placement: dict[str, int] | None = None, count: int = 1) -> None:
        super().__init__(
            SimpleNamespace(
                name=f"{name}{i or ''}", dimension=2, load_seconds=0.5, placement=placement or {"shm": 3 * 2**20}
            )
            for i in range(count)
        )
        self.name = name

    def describe(self) -> dict[str, Any]:
        return {**META, "model": self.name, "load_seconds": 0.5}


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def frame(op: str, rid: Any = 1, **fields: Any) -> Frame:
    return Frame({"op": op, "id": rid, **fields}, b"")


def reply(conn: FakeConnection, rid: Any) -> dict[str, Any]:
    return conn.replies[rid].header


# --- status --------------------------------------------------------------------------------------


def test_status_of_a_host_before_it_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = make_supervisor(
        tmp_path, weights="shm", bulk_batch_ms=123, query_batch_ms=45, queue_size=77, max_batch_tokens=4000
    )
    monkeypatch.setattr(supervisor_module, "time", SimpleNamespace(time=lambda: 1000.0))
    sup.started = 1000.0 - 12.34567
    status = run(snapshot(sup))
    assert status["model"] is None and status["generation"] == 0 and status["pid"] == os.getpid()
    assert status["load_seconds"] is None and status["place_seconds"] is None
    assert status["boot_seconds"] == {"import": None, "load": None, "place": None, "fork_until_ready": 0.0}
    assert status["weight_bytes"] is None and status["weights"] is None
    assert status["weight_placement"] == "shm"
    assert status["start_method"] == "fork"
    assert status["threads_per_worker"] == "auto"  # on the CPU, threads on auto
    assert status["cores"] == available_cores()
    assert status["outside_busy_cores"] is None
    assert status["socket"] == str(tmp_path / "run" / "host.sock")
    assert status["uptime_s"] == 12.346
    assert status["queue_depth"] == 0 and status["in_flight"] == 0
    assert status["queue"]["bulk_batch_ms"] == 123 and status["queue"]["query_batch_ms"] == 45
    assert status["queue_size"] == 77
    assert status["stopping"] is False
    assert status["workers"] == [] and status["counters"] == {}
    pressure_report = status["memory_pressure"]
    assert pressure_report["full_capacity"] == {"workers": 1, "max_batch_tokens": 4000, "queue_size": 77}
    assert pressure_report["capacity"] == pressure_report["full_capacity"]
    assert pressure_report["second_generation"] == DEFAULT_WORKER_BYTES  # no weights yet, one worker
    assert status["health"]["status"] == "degraded"  # no worker serves yet
    assert status["restarts"] == {"oom_kill": 0, "watchdog": 0, "crash": 0}


def test_status_of_fixed_threads_before_configuration_is_one_thread(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path, threads_per_worker=3)
    assert run(snapshot(sup))["threads_per_worker"] == 1


def test_status_reports_the_model_s_timings_and_the_host_s_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = make_supervisor(tmp_path, workers=2, threads_per_worker=3)
    sup._configure()
    sup._set_meta(
        {
            **META,
            "load_seconds": 1.5,
            "import_seconds": 0.25,
            "place_seconds": 0.125,
            "weight_bytes": 4096,
            "weights": {"shm": 4096},
        }
    )
    sup.workers_ready_seconds = 0.123456
    sup.outside = OutsideLoad({0})
    sup.outside.busy = 1.23456
    sup.pool.backend = [SimpleNamespace(placement={"shm": 1000, "file": 50}), SimpleNamespace(placement={"anon": 7})]
    sup.watch.worker_bytes = 10
    sup.dispatcher.queue_size = 55
    sup.counters["requests"] = 4
    status = run(snapshot(sup))
    assert status["model"] == "fake" and status["dimension"] == 2
    assert status["load_seconds"] == 1.5 and status["place_seconds"] == 0.125
    assert status["boot_seconds"] == {"import": 0.25, "load": 1.5, "place": 0.125, "fork_until_ready": 0.123}
    assert status["weight_bytes"] == 4096 and status["weights"] == {"shm": 4096}
    assert status["weight_placement"] == "auto"
    assert status["threads_per_worker"] == 3
    assert status["outside_busy_cores"] == 1.23
    assert status["queue_size"] == 55
    assert status["counters"] == {"requests": 4}
    # a second generation copies the weights held in memory (not the mapped file) and starts 2 workers
    assert status["memory_pressure"]["second_generation"] == 1000 + 7 + 2 * 10
    assert status["memory_pressure"]["full_capacity"]["workers"] == 2


def test_status_off_the_loop_adds_memory(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path)
    status = run(sup.status())
    assert status["supervisor"]["pid"] == os.getpid() and status["memory"]["pss"] > 0


# --- configuration -----------------------------------------------------------------------------------


def test_configure_fixed_threads_and_warns_of_more_threads_than_cores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path, workers=2, threads_per_worker=3, max_frame_bytes=1 << 20)
    sup._cores = 5
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sup._configure()
    assert sup.pool.size == 2
    spawner = sup.pool.spawner
    assert (spawner.start_method, spawner.threads, spawner.max_frame_bytes) == ("fork", 3, 1 << 20)  # type: ignore[attr-defined]
    assert spawner.spin_seconds == 0.003  # type: ignore[attr-defined]  # SHM_MODEL_WORKER_SPIN_MS's default
    assert (sup.dispatcher.threads, sup.dispatcher.dynamic_threads) == (3, False)
    assert sup.watch.policy.full.workers == 2
    assert messages(caplog, logging.WARNING) == ["2 workers x 3 threads > 5 cores; expect contention"]


def test_configure_threads_on_auto_share_the_cores_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path, workers=2)
    sup._cores = 4
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sup._configure()
    assert sup._threads == 2 and sup.pool.spawner.threads == 2  # type: ignore[attr-defined]
    assert (sup.dispatcher.threads, sup.dispatcher.dynamic_threads) == (2, True)
    assert messages(caplog, logging.WARNING) == []  # 2 x 2 threads on 4 cores is no contention
    sup._device = "cuda:0"  # threads on auto, but not on the CPU: fixed
    assert sup._dynamic_threads() is False


def test_the_device_is_the_cpu_for_the_dummy_backend_else_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.model_source as model_source

    asked: list[str] = []
    monkeypatch.setattr(model_source, "resolve_device", lambda device: asked.append(device) or f"resolved {device}")
    assert make_supervisor(tmp_path)._resolve_device() == "cpu"
    assert asked == []
    sup = Supervisor(ModelConfig(device="cpu"), HostConfig(socket_path=str(tmp_path / "s.sock")))
    assert sup._resolve_device() == "resolved cpu"
    assert asked == ["cpu"]


def test_check_load_counts_every_model_s_checkpoint_and_the_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.model_source as model_source

    sup = Supervisor(ModelConfig(name="a,b"), HostConfig(socket_path=str(tmp_path / "s.sock"), workers=2))
    sup.pool.size = 2
    resolved: list[str] = []
    monkeypatch.setattr(
        model_source,
        "resolve_model",
        lambda cfg: resolved.append(cfg.name) or SimpleNamespace(location=f"/m/{cfg.name}"),
    )
    sizes = {"/m/a": {"F32": 100 * 2**20}, "/m/b": {"F16": 50 * 2**20, "other": 10 * 2**20}}
    monkeypatch.setattr(supervisor_module, "checkpoint_bytes", lambda location: sizes[location])
    looked: list[list[int]] = []
    monkeypatch.setattr(sup.watch, "headroom", lambda pids: looked.append(list(pids)) or 2**40)
    checked: list[tuple[int, int, str]] = []
    monkeypatch.setattr(supervisor_module, "check_fits", lambda n, a, hint: checked.append((n, a, hint)))
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    sup._check_load()
    runtime = pressure.RUNTIME_BYTES["sentence-transformers"]
    workers = 2 * DEFAULT_WORKER_BYTES
    assert resolved == ["a", "b"] and looked == [[os.getpid()]]
    described = f"runtime {mib(runtime)}, weights 150 MiB file + 10 MiB shm, 2 workers x 64 MiB"
    assert checked == [
        (
            runtime + 160 * 2**20 + workers,
            2**40,
            f"estimated {described}; fewer SHM_MODEL_WORKERS, a smaller model, or more room "
            "(SHM_MODEL_MEMORY_LIMIT, the cgroup's limit) would fit",
        )
    ]
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace())  # imported: the runtime is measured
    sup.cfg = HostConfig(socket_path=sup.cfg.socket_path, weights="shm")
    sup._check_load()
    assert checked[-1][0] == 160 * 2**20 + workers
    assert "estimated weights 160 MiB shm, 2 workers" in checked[-1][2]


def test_check_load_refuses_a_model_that_does_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = make_supervisor(tmp_path)
    monkeypatch.setattr(sup.watch, "headroom", lambda pids: 2**20)
    with pytest.raises(ShmModelError, match=r"needs 64 MiB, 1 MiB available; estimated weights 0, 1 workers"):
        sup._check_load()


# --- what the parts are wired to -------------------------------------------------------------------


def test_the_parts_share_the_counters_the_exit_causes_and_the_health_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = make_supervisor(tmp_path, allowed_uids=(4321,), max_frame_bytes=1 << 20)
    assert sup.pool.counters is sup.counters and sup.connections.counters is sup.counters
    assert sup.dispatcher.counters is sup.counters
    assert sup.connections.on_closed == sup.dispatcher.abandon
    assert sup.connections.budget.limit == 2 << 20
    assert sup.rundir.shared is True  # another uid may connect: the directory is traversable
    assert make_supervisor(tmp_path).rundir.shared is False
    assert sup.pool.exit_cause is not None
    assert sup.pool.exit_cause(-signal.SIGKILL, True) == "watchdog"
    monkeypatch.setattr(pressure, "read_oom_kills", lambda cgroup: 5)
    sup.watch.oom_seen = 4
    assert sup.pool.exit_cause(-signal.SIGKILL, False) == "oom_kill"
    assert sup.watch.restarts == {"oom_kill": 1, "watchdog": 1, "crash": 0}
    assert sup.dispatcher.on_answer is not None
    sup.dispatcher.on_answer(100.0, False, 0.5)
    assert list(sup.watch.window.samples) == [(100.0, False, 0.5)]


# --- loading --------------------------------------------------------------------------------------


def test_load_logs_each_model_and_their_total_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path)
    seen: list[object] = []

    def load_models(model_cfg: ModelConfig, host_cfg: HostConfig) -> FakeModels:
        seen.append(sup.pool.loading_model)
        return FakeModels("m", {"shm": 5}, count=2)

    clock = iter([10.0, 12.5, 20.0, 21.0])
    monkeypatch.setattr(supervisor_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(supervisor_module, "load_models", load_models)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        models = sup._load()
    assert [b.name for b in models] == ["m", "m1"]
    assert seen == [True] and sup.pool.loading_model is False
    assert messages(caplog) == [
        "loaded m (cpu, dim 2) in 0.50s; weights {'shm': 5}",
        "loaded m1 (cpu, dim 2) in 0.50s; weights {'shm': 5}",
        "loaded 2 models in 2.50s",
    ]
    caplog.clear()
    monkeypatch.setattr(supervisor_module, "load_models", lambda m, h: FakeModels("one"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sup._load()
    assert messages(caplog) == ["loaded one (cpu, dim 2) in 0.50s; weights {'shm': 3145728}"]


def test_a_failed_load_lets_workers_be_replaced_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = make_supervisor(tmp_path)

    def fail(model_cfg: ModelConfig, host_cfg: HostConfig) -> FakeModels:
        raise OSError("no checkpoint")

    monkeypatch.setattr(supervisor_module, "load_models", fail)
    with pytest.raises(OSError):
        sup._load()
    assert sup.pool.loading_model is False


def test_start_generation_takes_the_last_worker_s_model_when_spawned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = make_supervisor(tmp_path)
    metas = [{"model": "first"}, {"model": "middle"}, {"model": "last"}]
    answers: list[list[dict[str, Any]]] = [metas, metas, []]

    async def start_generation(generation: int, backend: Any) -> list[dict[str, Any]]:
        return answers.pop(0)

    clock = iter([1.0, 1.25, 2.0, 2.5, 3.0, 3.125])
    monkeypatch.setattr(supervisor_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(sup.pool, "start_generation", start_generation)
    sup._set_meta({"model": "loaded"})
    run(sup._start_generation(0, None))  # forked workers share the loaded model: its meta stays
    assert sup._meta == {"model": "loaded"} and sup.workers_ready_seconds == 0.25
    sup._start_method = "spawn"
    run(sup._start_generation(1, None))
    assert sup._meta == {"model": "last"} and sup.dispatcher.meta == {"model": "last"}
    assert sup.workers_ready_seconds == 0.5
    run(sup._start_generation(2, None))  # no worker described its model
    assert sup._meta == {"model": "last"} and sup.workers_ready_seconds == 0.125


# --- requests -------------------------------------------------------------------------------------


def test_a_stopping_host_answers_ping_info_status_and_stop_and_refuses_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path)
    sup._set_meta(META)
    conn = FakeConnection()
    conn.uid = os.getuid()

    async def scenario() -> None:
        in_loop(sup)
        sup._begin_stop("test")
        for rid, op in enumerate(("ping", "info", "stop", "encode", "reload"), 1):
            sup._handle_request(conn, frame(op, rid, texts=["a"]))
        sup._handle_request(conn, frame("status", 6))
        await until(lambda: 6 in conn.replies, what="the status answer")
        await stopped(sup)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(scenario())
    assert reply(conn, 1)["result"] == {"pid": os.getpid(), "generation": 0}
    assert reply(conn, 2)["result"]["model"] == "fake"
    assert reply(conn, 3)["result"] == {"stopping": True, "pid": os.getpid()}
    for rid in (4, 5):
        assert reply(conn, rid)["error"]["code"] == "host_unavailable"
        assert reply(conn, rid)["error"]["message"] == "the host is shutting down"
    assert reply(conn, 6)["result"]["stopping"] is True
    assert sup.counters["errors_host_unavailable"] == 2
    assert messages(caplog)[0] == "stopping (test): draining 0 requests"  # stop did not begin again


def test_a_stop_request_stops_the_host(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sup = make_supervisor(tmp_path)
    conn = FakeConnection()
    conn.uid = os.getuid()

    async def scenario() -> None:
        in_loop(sup)
        sup._handle_request(conn, frame("stop", "s"))
        assert sup._stopping is True and sup.pool.stopping is True
        await stopped(sup)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(scenario())
    assert reply(conn, "s")["result"] == {"stopping": True, "pid": os.getpid()}
    assert messages(caplog) == ["stopping (stop request): draining 0 requests", "stopped"]


def test_another_user_may_not_stop_or_reload(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path)
    conn = FakeConnection()
    conn.uid = os.getuid() + 1
    for op in ("stop", "reload"):
        sup._handle_request(conn, frame(op, op))
        error = reply(conn, op)["error"]
        assert error["code"] == "permission_denied" and error["details"] == {"op": op}
        assert error["message"] == f"only the host's own user (uid {os.getuid()}) may {op} it, not uid {conn.uid}"
    assert sup._stopping is False and sup.counters["errors_permission_denied"] == 2


def test_a_bad_request_is_answered_with_its_id_or_none(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path)
    conn = FakeConnection()
    sup._handle_request(conn, frame("nope", 9))
    assert reply(conn, 9)["error"]["code"] == "bad_request"
    sup._handle_request(conn, Frame({"op": "ping", "id": [1]}, b""))  # an id that cannot be answered
    assert reply(conn, None)["error"]["code"] == "bad_request"
    assert sup.counters["errors_bad_request"] == 2


def test_a_failure_of_the_host_is_an_internal_error_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path)
    conn = FakeConnection()
    conn.uid = 1234

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(sup.dispatcher, "submit", broken)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sup._handle_request(conn, frame("encode", 7, texts=["a"]))
    error = reply(conn, 7)["error"]
    assert error["code"] == "internal_error" and error["message"] == "the host failed to handle this request"
    assert sup.counters["errors_internal_error"] == 1
    assert messages(caplog, logging.ERROR) == ["request 7 of uid 1234 failed; this is a bug"]


def test_an_answer_that_fails_is_an_error_reply(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path)
    conn = FakeConnection()

    async def refused() -> dict[str, Any]:
        raise BadRequest("not now", op="reload")

    run(sup._answer(conn, 5, refused()))
    assert reply(conn, 5)["error"] == {"code": "bad_request", "message": "not now", "details": {"op": "reload"}}


def test_background_tasks_are_kept_until_they_end(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path)

    async def scenario() -> None:
        gate = asyncio.Event()
        sup._background(gate.wait())
        assert len(sup._tasks) == 1 and all(isinstance(t, asyncio.Task) for t in sup._tasks)
        gate.set()
        await until(lambda: not sup._tasks, what="the task to be dropped")

    run(scenario())


# --- reload ---------------------------------------------------------------------------------------


async def serving(sup: Supervisor) -> FakeSpawner:
    """Generation 0 served by fake workers."""
    in_loop(sup)
    spawner = attach(sup)
    await sup._start_generation(0, None)
    return spawner


def reload_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, headroom: int, **host: Any) -> Supervisor:
    sup = make_supervisor(tmp_path, **host)
    sup._set_meta(META)
    monkeypatch.setattr(sup.watch, "headroom", lambda pids: headroom)
    loads = iter(range(1, 10))
    monkeypatch.setattr(supervisor_module, "load_models", lambda m, h: FakeModels(f"gen{next(loads)}"))
    return sup


def test_a_reload_beside_the_serving_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sup = reload_host(tmp_path, monkeypatch, 2**40)
    asked: list[list[int]] = []
    monkeypatch.setattr(sup.watch, "headroom", lambda pids: asked.append(list(pids)) or 2**40)
    released: list[int] = []

    async def scenario() -> list[dict[str, Any]]:
        spawner = await serving(sup)
        old = list(sup.pool.workers)
        monkeypatch.setattr(sup.pool, "release", lambda: released.append(1))
        first = await sup.reload()
        assert asked == [[os.getpid(), *old]]
        assert spawner.sent(signal.SIGTERM) == old  # the old worker retires once the new one serves
        assert sup.pool.backend is not None and sup.pool.backend.name == "gen1"
        second = await sup.reload()
        await sup.pool.stop()
        return [first, second]

    with caplog.at_level(logging.INFO, logger=LOGGER):
        first, second = run(scenario())
    assert released == []
    assert first["model"] == "gen1" and first["generation"] == 1 and first["reload_mode"] == "overlap"
    assert second["model"] == "gen2" and second["generation"] == 2
    assert sup.info()["model"] == "gen2"
    assert sup.counters["reloads"] == 2 and sup.counters["reloads_overlap"] == 2
    assert "reloads_swap" not in sup.counters
    log_lines = [m for m in messages(caplog) if m.startswith("reload")]
    second_needs = mib(3 * 2**20 + DEFAULT_WORKER_BYTES)  # the copied weights of gen1 and one worker
    assert log_lines == [
        f"reloading by overlap (generation 1): a second generation needs {mib(DEFAULT_WORKER_BYTES)} "
        f"(weights 0, 1 workers x 64 MiB), {mib(2**40)} available",
        "reloaded: generation 1 serving",
        f"reloading by overlap (generation 2): a second generation needs {second_needs} "
        f"(weights 3 MiB shm, 1 workers x 64 MiB), {mib(2**40)} available",
        "reloaded: generation 2 serving",
    ]


def test_a_reload_by_swap_releases_the_old_generation_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = reload_host(tmp_path, monkeypatch, 2**40, reload="swap")  # swap although both would fit

    async def scenario() -> dict[str, Any]:
        spawner = await serving(sup)
        old = list(sup.pool.workers)
        released: list[list[int]] = []
        release = sup.pool.release

        async def recorded() -> None:
            released.append(spawner.sent(signal.SIGTERM))
            await release()
            released.append(spawner.sent(signal.SIGTERM))

        monkeypatch.setattr(sup.pool, "release", recorded)
        result = await sup.reload()
        assert released == [[], old]
        assert sup.pool.generation == 1 and len(sup.pool.serving()) == 1
        await sup.pool.stop()
        return result

    result = run(scenario())
    assert result["reload_mode"] == "swap" and result["model"] == "gen1"
    assert sup.counters["reloads"] == 1 and sup.counters["reloads_swap"] == 1


def test_a_reload_of_a_stopping_host_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = reload_host(tmp_path, monkeypatch, 2**40)

    async def scenario() -> None:
        in_loop(sup)
        sup._stopping = True
        with pytest.raises(HostUnavailable, match=r"^the host is shutting down$"):
            await sup.reload()

    run(scenario())


def test_a_failed_reload_keeps_serving_the_previous_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sup = reload_host(tmp_path, monkeypatch, 2**40)

    def fail(model_cfg: ModelConfig, host_cfg: HostConfig) -> FakeModels:
        raise RuntimeError("boom")

    monkeypatch.setattr(supervisor_module, "load_models", fail)

    async def scenario() -> None:
        await serving(sup)
        with pytest.raises(InternalError, match=r"^reload failed: RuntimeError: boom$"):
            await sup.reload()
        await sup._reload_logged()
        assert sup.pool.generation == 0 and len(sup.pool.serving()) == 1
        await sup.pool.stop()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(scenario())
    assert sup._stopping is False and sup.exit_code == 0 and "reloads" not in sup.counters
    assert messages(caplog, logging.ERROR) == [
        "reload failed, still serving the previous model: reload failed: RuntimeError: boom"
    ]


def test_a_reload_that_fails_after_the_release_stops_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sup = reload_host(tmp_path, monkeypatch, 0)  # no room for a second generation: swap

    def fail(model_cfg: ModelConfig, host_cfg: HostConfig) -> FakeModels:
        raise InternalError("no model")

    monkeypatch.setattr(supervisor_module, "load_models", fail)

    async def scenario() -> None:
        await serving(sup)
        with pytest.raises(InternalError, match=r"^no model$"):
            await sup.reload()
        await stopped(sup)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(scenario())
    assert sup.exit_code == WORKER_BOOT_ERROR and sup._stopping is True
    assert messages(caplog, logging.ERROR) == [
        "reload failed after the old generation was released; stopping: no model"
    ]
    assert "stopping (reload failed): draining 0 requests" in messages(caplog)


def test_a_reload_of_spawned_workers_takes_their_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = reload_host(tmp_path, monkeypatch, 2**40)
    sup._set_meta({"model": "before"})

    async def scenario() -> dict[str, Any]:
        spawner = await serving(sup)
        sup._start_method = "spawn"
        backends: list[Any] = []
        start = spawner.start

        async def recorded(generation: int, backend: Any) -> Any:
            backends.append(backend)
            return await start(generation, backend)

        monkeypatch.setattr(spawner, "start", recorded)
        result = await sup.reload()
        assert backends == [None] and sup.pool.backend is None
        await sup.pool.stop()
        return result

    result = run(scenario())
    assert result["model"] == "fake" and result["generation"] == 1


def test_a_reload_whose_workers_fail_to_start_retires_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = reload_host(tmp_path, monkeypatch, 2**40)

    async def scenario() -> None:
        spawner = await serving(sup)
        old = list(sup.pool.workers)

        async def half_started(generation: int, backend: Any) -> list[dict[str, Any]]:
            await sup.pool.spawn(generation, backend)
            raise InternalError("a worker did not become ready")

        monkeypatch.setattr(sup.pool, "start_generation", half_started)
        with pytest.raises(InternalError, match="did not become ready"):
            await sup.reload()
        new = [pid for pid in sup.pool.workers if pid not in old]
        assert spawner.sent(signal.SIGTERM) == new and len(new) == 1
        assert sup.pool.generation == 0 and [w.pid for w in sup.pool.serving()] == old
        await sup.pool.stop()

    run(scenario())


# --- memory pressure and outside load --------------------------------------------------------------


def test_memory_pressure_shrinks_the_pool_and_calm_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = make_supervisor(
        tmp_path, workers=2, pressure_interval=0.001, pressure_hold=0.0, queue_size=80, max_batch_tokens=400
    )
    sup._configure()
    short = MemoryReading(available=2**20, total=2**34)
    calm = MemoryReading(available=2**33, total=2**34)
    readings = [short]
    seen: list[tuple[list[int], list[int]]] = []

    def sample(pids: list[int], running: list[int]) -> MemoryReading:
        seen.append((list(pids), list(running)))
        if not readings[1:]:
            sup._stopping = True
        return readings.pop(0)

    monkeypatch.setattr(sup.watch, "sample", sample)

    async def scenario() -> None:
        spawner = await serving(sup)
        pids = sorted(sup.pool.workers)
        starting = await sup.pool.spawn(0, None)  # not ready yet: not measured
        await sup._watch_memory()
        assert seen == [([os.getpid(), *pids, starting.pid], pids)]
        assert sup.pool.size == 1 and sup.dispatcher.queue_size == 20
        assert sup.dispatcher.scheduler.limits.max_tokens == 100
        assert len(spawner.sent(signal.SIGTERM)) == 2  # the pool runs one worker
        assert sup.watch.policy.since is not None
        assert sup.watch.policy.since <= asyncio.get_running_loop().time()
        readings.extend([calm, calm])
        sup._stopping = False
        await sup._watch_memory()
        assert sup.pool.size == 2 and sup.dispatcher.queue_size == 80
        assert sup.dispatcher.scheduler.limits.max_tokens == 400
        await until(lambda: len(sup.pool.serving()) == 2, what="a second worker")
        assert sup.counters["respawns"] == 1
        await sup.pool.stop()

    run(scenario())
    assert sup.watch.policy.episodes == 1 and not sup.watch.policy.degraded


class FakeOutside:
    def __init__(self, cpus: set[int], sup: Supervisor, error: Exception | None = None) -> None:
        self.cpus = cpus
        self.sup = sup
        self.error = error
        self.busy = 1.6
        self.samples: list[tuple[float, list[int]]] = []

    def sample(self, now: float, pids: list[int]) -> float:
        self.samples.append((now, list(pids)))
        if self.error is not None:
            raise self.error
        if len(self.samples) == 2:
            self.sup._stopping = True
        return self.busy

    def cores(self) -> int:
        return 2


def test_outside_load_takes_cores_from_the_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sup = make_supervisor(tmp_path)
    monkeypatch.setattr(supervisor_module, "available_cpus", lambda: {0, 1})
    monkeypatch.setattr(supervisor_module, "INTERVAL", 0.001)
    monkeypatch.setattr(supervisor_module, "OutsideLoad", lambda cpus: FakeOutside(cpus, sup))
    shares: list[int] = []

    async def scenario() -> None:
        spawner = await serving(sup)
        start = asyncio.get_running_loop().time()
        shares.append(sup.dispatcher.core_share.outside)
        await sup._watch_cpu()
        outside = sup.outside
        assert isinstance(outside, FakeOutside) and outside.cpus == {0, 1}
        assert [pids for _, pids in outside.samples] == [[os.getpid(), *spawner.tasks]] * 2
        assert all(isinstance(now, float) and now >= start for now, _ in outside.samples)
        await sup.pool.stop()

    run(scenario())
    assert shares == [0] and sup.dispatcher.core_share.outside == 2


def test_outside_load_that_cannot_be_read_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path)
    monkeypatch.setattr(supervisor_module, "available_cpus", lambda: {0})
    monkeypatch.setattr(
        supervisor_module, "OutsideLoad", lambda cpus: FakeOutside(cpus, sup, OSError("cannot read /proc/stat"))
    )
    share = sup.dispatcher.core_share.outside
    with caplog.at_level(logging.INFO, logger=LOGGER):
        run(sup._watch_cpu())
    assert messages(caplog, logging.WARNING) == [
        "cannot read the CPU load of other processes (cannot read /proc/stat); not taking it into account"
    ]
    assert len(sup.outside.samples) == 1 and sup.dispatcher.core_share.outside == share  # type: ignore[union-attr]
    monkeypatch.setattr(supervisor_module, "available_cpus", lambda: None)  # not Linux: nothing is read
    sup.outside = None
    run(sup._watch_cpu())
    assert sup.outside is None


# --- serve and stop -------------------------------------------------------------------------------


@pytest.fixture
def host_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Signal handlers that serving installs, put back after."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def serve_until_sigterm(sup: Supervisor, also: Callable[[], Awaitable[None]] | None = None) -> int:
    sup.rundir.take()

    async def main() -> int:
        served = asyncio.ensure_future(sup._serve())
        await until(lambda: sup._server is not None or served.done(), what="the host to serve")
        if not served.done():
            if also is not None:
                await also()
            os.kill(os.getpid(), signal.SIGTERM)
        return await served

    try:
        return run(main())
    finally:
        sup.rundir.cleanup()


def test_serve_logs_what_it_serves_and_sigterm_stops_it(
    tmp_path: Path, host_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path, pressure_interval=60.0)
    sup._configure()
    attach(sup)
    sup._set_meta(META)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        code = serve_until_sigterm(sup)
    assert code == 0
    cores = sup._cores
    assert messages(caplog) == [
        f"serving fake on {sup.socket_path}: 1 fork workers, up to {cores} threads per batch from {cores} cores",
        "stopping (SIGTERM): draining 0 requests",
        "stopped",
    ]
    assert sup._server is not None and not sup._server.is_serving()
    assert sup.outside is not None  # the outside load is watched (threads on auto)


def test_serve_with_fixed_threads_does_not_watch_the_outside_load(
    tmp_path: Path, host_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path, threads_per_worker=2, pressure_interval=60.0)
    sup._configure()
    attach(sup)
    sup._set_meta(META)

    limits: list[int] = []
    handle = sup.connections.handle

    async def recorded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits.append(reader._limit)  # type: ignore[attr-defined]
        await handle(reader, writer)

    monkeypatch.setattr(sup.connections, "handle", recorded)

    async def connect() -> None:
        _, writer = await asyncio.open_unix_connection(sup.socket_path)
        await until(lambda: limits, what="the connection")
        writer.close()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert serve_until_sigterm(sup, connect) == 0
    assert limits == [1 << 16]  # a client's stream buffers 64 KiB before its transport pauses
    assert messages(caplog)[0] == f"serving fake on {sup.socket_path}: 1 fork workers, 2 threads each"
    assert sup.outside is None


def test_serve_ends_with_the_boot_error_when_workers_do_not_start(
    tmp_path: Path, host_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sup = make_supervisor(tmp_path)
    attach(sup)

    async def fail(generation: int, backend: Any) -> list[dict[str, Any]]:
        raise InternalError("worker 7 did not become ready")

    monkeypatch.setattr(sup.pool, "start_generation", fail)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert serve_until_sigterm(sup) == WORKER_BOOT_ERROR
    assert messages(caplog, logging.ERROR) == ["worker 7 did not become ready"]


def test_stop_drains_requests_in_flight(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path, graceful_timeout=10.0)
    conn = FakeConnection()

    async def scenario() -> None:
        await serving(sup)
        sup._set_meta(META)
        sup._handle_request(conn, frame("encode", 1, texts=["__layers__:20"]))
        assert sup.dispatcher.requests
        sup._begin_stop("test")
        await stopped(sup)

    run(scenario())
    assert reply(conn, 1)["ok"] is True
    assert sup.pool.workers == {}


def test_stop_fails_requests_still_in_flight_at_the_deadline(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path, graceful_timeout=0.05)
    conn = FakeConnection()

    async def scenario() -> None:
        await serving(sup)
        sup._set_meta(META)
        sup._handle_request(conn, frame("encode", 1, texts=["__hang__"]))
        sup._begin_stop("test")
        await stopped(sup)

    run(scenario())
    error = reply(conn, 1)["error"]
    assert error == {
        "code": "host_unavailable",
        "message": "the host stopped before the request finished",
        "details": {},
    }
    assert sup.pool.workers == {}
