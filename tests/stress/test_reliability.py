"""Reliability: chaos, protocol fuzzing, soak, supervisor death with fallback, ingestion kills,
HTTP load. Each test is bounded in time and count and ends what it starts. Figures go to
stdout (run with -s to read them)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.common import percentile
from shm_model.client import HostClient
from shm_model.errors import ShmModelError
from shm_model.protocol import MAGIC, PREFIX
from tablerag import samples
from tests.conftest import ROOT, Host, api_server, base_env, pid_alive, poll

# --- chaos ------------------------------------------------------------------------------------


def test_chaos_kills_a_worker_every_200ms_and_no_request_is_lost(host_factory, bundled_model) -> None:
    # Killing workers at random looks like poison to the host; allow more retries than the default.
    host = host_factory(MODEL_NAME="bundled", SHM_MODEL_CRASH_RETRIES="8")
    texts = [f"혼돈 시험 문장 {i}: 서울 {i * 7}" for i in range(200)]
    reference = bundled_model.encode(texts)
    client = host.client(pool_size=8, timeout=60)
    threads_n, per_thread = 8, 125
    results: dict[int, int] = {}
    wrong: list[int] = []
    failures: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def send(t: int) -> None:
        for j in range(per_thread):
            rid = t * per_thread + j
            text_index = rid % len(texts)
            started = time.perf_counter()
            try:
                vector = client.encode(texts[text_index])
            except ShmModelError as exc:
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - started)
                results[rid] = results.get(rid, 0) + 1
                if np.abs(vector - reference[text_index]).max() > 1e-5:
                    wrong.append(rid)

    kills = 0

    def killer() -> None:
        nonlocal kills
        rng = random.Random(7)
        while not done.wait(0.2):
            pids = host.worker_pids()
            if pids:
                try:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass

    senders = [threading.Thread(target=send, args=(t,)) for t in range(threads_n)]
    chaos = threading.Thread(target=killer)
    started = time.monotonic()
    chaos.start()
    for t in senders:
        t.start()
    for t in senders:
        t.join(240)
    done.set()
    chaos.join(5)
    elapsed = time.monotonic() - started
    total = threads_n * per_thread
    status = host.status()
    print(
        f"\nchaos: {total} requests, {kills} workers killed, {status['counters'].get('respawns', 0)} respawns, "
        f"{len(failures)} failed, {len(wrong)} wrong, lost {total - len(results) - len(failures)}, "
        f"p50 {percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms, "
        f"{elapsed:.1f} s"
    )
    assert failures == [] and wrong == []
    assert len(results) == total and set(results.values()) == {1}  # none lost, none duplicated
    assert kills >= 10 and status["counters"].get("respawns", 0) >= kills // 2
    poll(lambda: len(host.worker_pids()) == 2, 10, what="two workers after the chaos")


# --- protocol fuzzing --------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
OPS = st.sampled_from(["encode", "ping", "info", "status", "reload", "stop", "", "ENCODE", "x" * 300, "__init__"])


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    header = draw(st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6))
    if draw(st.booleans()):
        header["op"] = draw(OPS | JSON_VALUES)
    if draw(st.booleans()):
        header["id"] = draw(JSON_VALUES)
    if draw(st.booleans()):
        header["texts"] = draw(st.lists(st.text(max_size=30) | JSON_VALUES, max_size=8) | JSON_VALUES)
    if draw(st.booleans()):
        header["timeout_ms"] = draw(JSON_VALUES)
    if header.get("op") in ("stop", "reload"):
        header["op"] = "ping"  # everything but asking the host to stop or to reload
    return json.dumps(header, allow_nan=True).encode()


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "header", "lengths", "truncated", "bad_utf8", "payload"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "lengths":
        return PREFIX.pack(MAGIC, draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))) + draw(
            st.binary(max_size=16)
        )
    body = draw(headers())
    if kind == "bad_utf8":
        body = body[:5] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + body[5:]
    payload = draw(st.binary(max_size=32)) if kind == "payload" else b""
    frame = PREFIX.pack(MAGIC, len(body), len(payload)) + body + payload
    if kind == "truncated":
        frame = frame[: draw(st.integers(0, max(0, len(frame) - 1)))]
    return frame


@pytest.fixture(scope="module")
def fuzz_host(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import launch

    host = launch(tmp_path_factory.mktemp("fuzz"), SHM_MODEL_BACKEND="dummy", SHM_MODEL_LOG_LEVEL="error")
    try:
        host.wait_ready()
        yield host
    finally:
        host.terminate()


FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "1000"))
fuzz_seen = {"cases": 0, "replies": 0, "closed": 0}


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(frame=frames())
def test_fuzzed_frames_get_a_typed_error_or_a_closed_connection(fuzz_host: Host, frame: bytes) -> None:
    fuzz_seen["cases"] += 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(fuzz_host.socket)
        try:
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)  # a truncated frame ends here
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except (BrokenPipeError, ConnectionResetError):
            data = b""
        except TimeoutError:
            pytest.fail(f"the host neither answered nor closed within 5 s: {frame[:80]!r}")
    if data:
        fuzz_seen["replies"] += 1
        magic, hlen, _ = PREFIX.unpack_from(data)
        assert magic == MAGIC
        reply = json.loads(data[PREFIX.size : PREFIX.size + hlen])
        assert reply["ok"] is True or isinstance(reply["error"]["code"], str), reply
    else:
        fuzz_seen["closed"] += 1
    assert fuzz_host.proc.poll() is None, "the host died"
    if fuzz_seen["cases"] % 250 == 0:  # a normal request still works
        with HostClient(fuzz_host.socket, timeout=10) as client:
            assert client.encode(["still serving"]).shape == (1, 32)


def test_fuzzing_ran_and_the_host_serves_after_it(fuzz_host: Host) -> None:
    print(f"\nfuzzing: {fuzz_seen}")
    assert fuzz_seen["cases"] >= FUZZ_CASES and fuzz_seen["replies"] > 0 and fuzz_seen["closed"] > 0
    with HostClient(fuzz_host.socket, timeout=10) as client:
        assert client.encode("after fuzzing").shape == (32,)
        assert client.status()["pid"] == fuzz_host.proc.pid


# --- soak -----------------------------------------------------------------------------------------


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize(
    ("backend", "requests"),
    [("dummy", 20_000), ("bundled", 1_000), pytest.param("bundled", 20_000, marks=pytest.mark.slow)],
)
def test_soak_leaks_no_memory_descriptors_or_segments(host_factory, backend: str, requests: int) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    env = {"SHM_MODEL_BACKEND": "dummy"} if backend == "dummy" else {"MODEL_NAME": "bundled"}
    host = host_factory(SHM_MODEL_LOG_LEVEL="warning", **env)
    client = host.client(pool_size=4, timeout=60)
    dim = 32 if backend == "dummy" else 384
    n_threads, n_texts = 4, 250

    def run(n: int) -> None:
        def worker(t: int) -> None:
            for i in range(n // n_threads):
                # The same texts a thread throughout, all seen in the warm-up: new words
                # would page in more of the weights.
                assert client.encode([f"soak {t} {i % n_texts}", "둘"]).shape == (2, dim)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)

    # Warm-up: pools, caches, the allocator, and the pages of the weights that these texts touch
    # (worker RSS counts the file-backed weight pages as they are first read): every thread's
    # texts at least once.
    run(max(n_threads * n_texts, min(requests // 5, 4_000)))
    workers = {pid: psutil.Process(pid).memory_info().rss for pid in host.worker_pids()}
    sup_fds = fds(host.proc.pid)
    started = time.monotonic()
    run(requests)
    elapsed = time.monotonic() - started
    growth = {pid: psutil.Process(pid).memory_info().rss / rss - 1 for pid, rss in workers.items()}
    figures = [f"{g:+.2%}" for g in growth.values()]
    print(f"\nsoak ({backend}): {requests} requests in {elapsed:.1f} s, worker RSS growth {figures}")
    assert set(host.worker_pids()) == set(workers)  # no worker was replaced
    assert all(g < 0.02 for g in growth.values()), growth
    # Connections closed by short-lived status clients are reaped by the event loop soon after.
    poll(lambda: fds(host.proc.pid) <= sup_fds, 5, what=f"the supervisor's descriptors back to {sup_fds}")
    assert set(os.listdir("/dev/shm")) == shm_before


# --- supervisor death, with the manager's fallback -------------------------------------------------


def test_auto_mode_falls_back_to_local_when_the_supervisor_dies(host_factory, tmp_path: Path) -> None:
    host = host_factory(MODEL_NAME="bundled")
    workers = host.worker_pids()
    code = (
        "import os, signal, time\n"
        "from shm_model import ModelManager\n"
        "model = ModelManager.get_instance().get_model()\n"
        "before = model.encode(['하나'])\n"
        "print('path', model.path, flush=True)\n"
        f"os.kill({host.proc.pid}, signal.SIGKILL)\n"
        "started = time.monotonic()\n"
        "after = model.encode(['하나'])\n"
        "print('path', model.path, flush=True)\n"
        "print('diff', float(abs(before - after).max()), 'seconds', round(time.monotonic() - started, 2))\n"
    )
    env = base_env(MODEL_NAME="bundled", SHM_MODEL_MODE="auto", SHM_MODEL_SOCKET=host.socket)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0] == "path shared" and lines[1] == "path local"
    assert float(lines[2].split()[1]) < 1e-5
    poll(lambda: not any(pid_alive(p) for p in workers), 2, what="the workers to die with the supervisor")


# --- ingestion killed midway ------------------------------------------------------------------------


def test_ingestion_killed_midway_leaves_a_consistent_store_and_resumes(bundled_host: Host, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    for i in range(3):
        samples.write_corpus(docs / f"set{i}")
    total = sum(1 for path in docs.rglob("*") if path.is_file())
    db = tmp_path / "rag.db"
    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=bundled_host.socket, RAG_DB=str(db))
    cmd = [sys.executable, str(ROOT / "rag_with_tables.py"), "ingest", "--events", str(docs)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        done = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line).get("event") == "file":
                done += 1
                if done == 5:
                    proc.kill()
                    break
    finally:
        proc.kill()
        proc.wait(10)

    def check() -> int:
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            for path, expected, actual in conn.execute(
                "SELECT d.path, d.chunks, (SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id) FROM documents d"
            ):
                assert expected == actual > 0, path
            assert conn.execute(
                "SELECT COUNT(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents)"
            ).fetchone() == (0,)
            return int(conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    partial = check()
    assert 5 <= partial < total
    rerun = subprocess.run([*cmd[:-2], "--json", str(docs)], env=env, cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert len(report["unchanged"]) == partial and len(report["added"]) == total - partial
    assert check() == total
    added = total - partial
    print(f"\ningestion: killed after {partial} of {total} files; the re-run added {added}, skipped {partial}")


# --- HTTP under load ---------------------------------------------------------------------------------


@pytest.mark.serial  # clients' timeouts under a full CPU would be errors
def test_http_load_has_no_errors_but_explicit_429(bundled_host: Host, tmp_path: Path) -> None:
    import httpx

    env = base_env(SHM_MODEL_MODE="shared", SHM_MODEL_SOCKET=bundled_host.socket, RAG_DB=str(tmp_path / "r.db"))
    with api_server(env, tmp_path / "api.log") as url:
        statuses: dict[int, int] = {}
        latencies: list[float] = []
        lock = threading.Lock()
        stop = time.monotonic() + float(os.environ.get("HTTP_LOAD_SECONDS", "10"))

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                i = 0
                while time.monotonic() < stop:
                    started = time.perf_counter()
                    r = http.post("/v1/embeddings", json={"input": [f"부하 {k} {i}"]})
                    with lock:
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                        latencies.append(time.perf_counter() - started)
                    i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        total = sum(statuses.values())
        print(
            f"\nhttp: 50 clients, {total} requests, statuses {statuses}, "
            f"p50 {percentile(latencies, 50) * 1000:.0f} ms, p99 {percentile(latencies, 99) * 1000:.0f} ms"
        )
        assert total > 100 and set(statuses) <= {200, 429}


# --- no unpickling anywhere ----------------------------------------------------------------------------


def test_no_code_path_unpickles() -> None:
    sources = [p for d in ("shm_model", "workers", "config", "tablerag", "api") for p in (ROOT / d).rglob("*.py")]
    sources += [ROOT / "api_server.py", ROOT / "rag_with_tables.py"]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for word in ("import pickle", "from pickle", "cPickle", "marshal.loads", "torch.load(", "shelve", "dill"):
            assert word not in text, f"{path.relative_to(ROOT)} uses {word}"
