"""Priority classes, per-batch threads and abandoned requests, end to end on dummy-backend hosts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from shm_model.protocol import pack, recv_frame, vectors_from_frame
from tests.conftest import poll

pytestmark = pytest.mark.serial  # waits measured against the cores other processes leave free

SLEEP = "__sleep__:0.05"


def test_a_query_is_not_stuck_behind_bulk_work(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1", SHM_MODEL_BULK_BATCH_MS="100")
    bulk = host.client(timeout=60)
    bulk.encode([SLEEP] * 10, priority="bulk")  # teaches the host how long a bulk text takes
    done = threading.Event()
    worker = threading.Thread(target=lambda: (bulk.encode([SLEEP] * 60, priority="bulk"), done.set()))
    started = time.monotonic()
    worker.start()
    poll(lambda: host.status()["queue"]["bulk"]["batches"] > 1, 10, what="the bulk job to run")
    query = host.client(timeout=10)
    began = time.monotonic()
    vector = query.encode("안녕하세요", priority="interactive")
    waited = time.monotonic() - began
    assert vector.shape == (32,)
    assert not done.is_set(), "the bulk job (3 s of work) ended before the query was answered"
    worker.join(60)
    bulk_seconds = time.monotonic() - started
    assert waited < bulk_seconds / 3, (waited, bulk_seconds)  # first in, first out would wait for all of it
    status = host.status()
    assert status["queue"]["interactive"]["served_requests"] == 1
    assert status["queue"]["bulk"]["batches"] >= 10  # cut into batches of about 100 ms


@pytest.mark.parametrize("pause", ["true", "false"])
def test_a_query_borrows_the_cores_of_a_long_bulk_text(host_factory, pause: str) -> None:
    """One bulk text that runs for seconds on every core: with SHM_MODEL_PAUSE_BULK the query
    is answered while it waits between two steps (layers), else after it."""
    # Every core, whatever else runs on this machine: the thread count alone is under test.
    host = host_factory(
        SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="2", SHM_MODEL_PAUSE_BULK=pause, SHM_MODEL_OUTSIDE_LOAD="false"
    )
    bulk = host.client(timeout=60)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (bulk.encode(["__sleep__:3"], priority="bulk"), done.set()))
    worker.start()
    poll(lambda: any(w["state"] == "busy" for w in host.status()["workers"]), 10, what="the bulk text to run")
    threads = host.client(timeout=30).encode(["__threads__"], priority="interactive")
    answered_first = not done.is_set()
    worker.join(60)
    counters = host.status()["counters"]
    if pause == "true":
        assert answered_first and counters["bulk_pauses"] == 1
        assert threads[0, 0] == len(os.sched_getaffinity(0))  # every core: the bulk text lent its own
    else:
        assert not answered_first and "bulk_pauses" not in counters


def test_a_lone_batch_gets_every_core_and_busy_workers_never_share_one(host_factory) -> None:
    cores = len(os.sched_getaffinity(0))
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="2", SHM_MODEL_OUTSIDE_LOAD="false")
    client = host.client(timeout=30)
    assert client.encode("__threads__")[0] == cores
    # Several requests at once: no batch may run on a core another batch holds.
    results: list[float] = []

    def send() -> None:
        vectors = host.client(timeout=30).encode(["__sleep__:0.2", "__threads__"], priority="interactive")
        results.append(float(vectors[1][0]))

    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    seen_busy_threads = 0
    while any(t.is_alive() for t in senders):
        workers = host.status()["workers"]
        busy = sum(w["threads"] for w in workers if w["state"] == "busy")
        seen_busy_threads = max(seen_busy_threads, busy)
        assert busy <= cores, workers
    for t in senders:
        t.join(30)
    assert len(results) == 4 and all(1 <= r <= cores for r in results)
    assert seen_busy_threads >= 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_lone_batch_leaves_the_core_a_busy_process_holds(host_factory) -> None:
    cores = len(os.sched_getaffinity(0))
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="2")
    client = host.client(timeout=30)
    assert host.status()["outside_busy_cores"] is not None
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        poll(lambda: client.encode("__threads__")[0] == cores - 1, 15, interval=0.1, what="a thread fewer")
        assert host.status()["outside_busy_cores"] >= 0.5
    finally:
        busy.kill()
        busy.wait(10)
    poll(lambda: client.encode("__threads__")[0] == cores, 15, interval=0.1, what="every core again")


def test_fixed_threads_are_kept(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="2", SHM_MODEL_THREADS_PER_WORKER="1")
    assert host.client(timeout=30).encode("__threads__")[0] == 1
    assert host.status()["threads_per_worker"] == 1


def test_the_queued_work_of_a_client_that_went_away_is_not_encoded(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1")
    busy = host.client(timeout=30)
    holder = threading.Thread(target=lambda: busy.encode(["__sleep__:1"]))
    holder.start()
    poll(lambda: any(w["state"] == "busy" for w in host.status()["workers"]), 10, what="a busy worker")
    with socket.socket(socket.AF_UNIX) as gone:
        gone.connect(host.socket)
        gone.sendall(pack({"id": 1, "op": "encode", "texts": [f"t{i}" for i in range(100)], "priority": "bulk"}))
        poll(lambda: host.status()["queue"]["bulk"]["texts"] == 100, 10, what="the request to be queued")
    poll(lambda: host.status()["counters"].get("abandoned") == 1, 10, what="the request to be dropped")
    holder.join(30)
    status = host.status()
    assert status["queue"]["bulk"]["texts"] == 0
    assert sum(w["texts"] for w in status["workers"]) == 1  # only the sleeping text was encoded
    # the host still serves
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(host.socket)
        sock.sendall(pack({"id": 2, "op": "encode", "texts": ["x"], "priority": "interactive"}))
        assert vectors_from_frame(recv_frame(sock, 1 << 20)).shape == (1, 32)


def test_priority_must_be_a_known_class(dummy_host) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(dummy_host.socket)
        sock.sendall(pack({"id": 1, "op": "encode", "texts": ["x"], "priority": "urgent"}))
        reply = recv_frame(sock, 1 << 20).header
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert "interactive, bulk" in reply["error"]["message"]
    assert np.asarray(dummy_host.client().encode(["x"] * 20)).shape == (20, 32)  # 20 texts: bulk by default
