"""Request handling of a real host on the dummy backend: errors, queue, deadlines, faults."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from shm_model.client import HostClient
from shm_model.errors import (
    BadRequest,
    HostUnavailable,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    WorkerCrashed,
)
from shm_model.protocol import MAGIC, PREFIX, pack, raise_for_reply, recv_frame
from tests.conftest import Host, pid_alive, poll
from workers.backends import DummyBackend


def expected(texts: list[str], prompt: str = "") -> np.ndarray:
    return np.stack([DummyBackend.vector(prompt + t) for t in texts])


def raw(host: Host) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(host.socket)
    return sock


def assert_serves(host: Host) -> None:
    with HostClient(host.socket, timeout=10) as client:
        assert np.array_equal(client.encode(["still here"]), expected(["still here"]))


def test_encode_shapes_follow_sentence_transformers(dummy_host: Host) -> None:
    client = dummy_host.client()
    texts = [f"문장 {i}" for i in range(100)]
    assert np.array_equal(client.encode(texts), expected(texts))
    single = client.encode("하나")
    assert single.shape == (32,) and np.array_equal(single, expected(["하나"])[0])
    assert client.encode([]).shape == (0, 32)
    assert client.encode(("a", "b")).shape == (2, 32)
    normalized = client.encode(texts, normalize_embeddings=True)
    assert np.allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-6)
    assert client.get_sentence_embedding_dimension() == 32


def test_prompt_and_prompt_name(dummy_host: Host) -> None:
    client = dummy_host.client()
    assert np.array_equal(client.encode(["x"], prompt_name="query"), expected(["x"], "query: "))
    assert np.array_equal(client.encode(["x"], prompt="p: "), expected(["x"], "p: "))
    with pytest.raises(BadRequest, match="unknown prompt_name 'nope'; this model has: query, passage"):
        client.encode(["x"], prompt_name="nope")


def test_large_request_is_split_and_reassembled_in_order(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_MAX_BATCH_SIZE="7")
    texts = [f"t{i}" for i in range(3000)]  # more than one client chunk and many batches
    assert np.array_equal(host.client().encode(texts), expected(texts))
    assert sum(w["batches"] for w in host.status()["workers"]) >= 3000 // 7


def test_concurrent_requests_are_batched_and_in_order(dummy_host: Host) -> None:
    client = dummy_host.client()
    failures: list[str] = []

    def run(k: int) -> None:
        for i in range(50):
            texts = [f"{k}-{i}-{j}" for j in range(1 + (i % 3))]
            if not np.array_equal(client.encode(texts), expected(texts)):
                failures.append(f"{k}-{i}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    status = dummy_host.status()
    assert sum(w["requests_served"] for w in status["workers"]) == 16 * 50
    assert sum(w["batches"] for w in status["workers"]) < 16 * 50  # some requests shared a batch


@pytest.mark.serial  # the timeout must arrive within 0.1 s of its deadline
def test_timeout_arrives_by_the_deadline_and_hung_worker_is_replaced(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKER_GRACE="0.5")
    client = host.client()
    before = set(host.worker_pids())
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"timed out after 0\.3s"):
        client.encode(["__sleep__:30"], timeout=0.3)
    assert time.monotonic() - started < 0.3 + 0.1
    assert_serves(host)
    poll(lambda: set(host.worker_pids()) - before, 10, what="a replacement worker")
    status = host.status()
    assert status["counters"]["worker_aborts"] == 1
    assert len(status["workers"]) == 2
    assert "past its batch deadline" in host.log()


def test_default_timeout_applies_per_request_and_explicit_timeout_to_the_call(dummy_host) -> None:
    from shm_model.client import CHUNK_TEXTS

    # Three requests of CHUNK_TEXTS texts, each about 0.3 s: longer than 0.5 s in all.
    texts = [f"t{i}" for i in range(3 * CHUNK_TEXTS)]
    for i in range(0, len(texts), CHUNK_TEXTS):
        texts[i] = "__sleep__:0.3"
    client = dummy_host.client(timeout=0.5)
    started = time.monotonic()
    vectors = client.encode(texts)
    assert time.monotonic() - started > 0.5
    assert vectors.shape == (len(texts), 32)
    with pytest.raises(RequestTimeout):
        client.encode(texts, timeout=0.5)


def test_expired_request_is_never_sent_to_a_worker(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1", SHM_MODEL_WORKER_GRACE="30")
    client = host.client()
    blocker = threading.Thread(target=lambda: client.encode(["__sleep__:1"], timeout=5))
    blocker.start()
    poll(lambda: host.status()["workers"][0]["state"] == "busy", 5, what="busy worker")
    with pytest.raises(RequestTimeout):
        client.encode(["queued behind the sleeper"], timeout=0.2)
    blocker.join(10)
    workers = host.status()["workers"]
    assert workers[0]["texts"] == 1  # only the sleeper reached the worker


def test_full_queue_fails_fast_with_overloaded(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1", SHM_MODEL_QUEUE_SIZE="2")
    client = host.client(pool_size=8)
    busy = [threading.Thread(target=lambda: client.encode(["__sleep__:1"], timeout=10)) for _ in range(2)]
    for t in busy:
        t.start()
    poll(lambda: host.status()["in_flight"] == 2, 5, what="a full queue")
    with pytest.raises(Overloaded, match="limit 2"):
        client.encode(["one too many"])
    assert all(t.is_alive() for t in busy)  # refused at once, not after the queued work
    for t in busy:
        t.join(10)
    assert_serves(host)


@pytest.mark.parametrize(
    ("frame", "error", "closes"),
    [
        (PREFIX.pack(b"GET ", 10, 0) + b"x" * 10, ProtocolError, True),
        (PREFIX.pack(MAGIC, 0, 0), ProtocolError, True),
        (PREFIX.pack(MAGIC, 2**31, 0), PayloadTooLarge, True),
        (PREFIX.pack(MAGIC, 5, 0) + b"{nope", BadRequest, False),
        (PREFIX.pack(MAGIC, 2, 0) + b"\xff\xfe", BadRequest, False),
        (pack({"id": 1, "op": "explode"}), BadRequest, False),
        (pack({"op": "encode", "texts": ["a"]}), BadRequest, False),
        (pack({"id": 2, "op": "encode", "texts": ["a", 5]}), BadRequest, False),
        (pack({"id": 3, "op": "encode", "texts": "abc"}), BadRequest, False),
        (pack({"id": 4, "op": "encode", "texts": ["a"], "timeout_ms": -5}), BadRequest, False),
        (PREFIX.pack(MAGIC, 31, 0) + b'{"id":5,"op":"encode","texts":["\\ud800"]}'[:31], BadRequest, False),
    ],
)
def test_bad_frames_get_typed_errors_and_the_host_keeps_serving(
    dummy_host: Host, frame: bytes, error: type[Exception], closes: bool
) -> None:
    with raw(dummy_host) as sock:
        sock.sendall(frame)
        with pytest.raises(error):
            raise_for_reply(recv_frame(sock, 1 << 20))
        if closes:
            assert sock.recv(1) == b""
        else:  # the same connection still works
            sock.sendall(pack({"id": 99, "op": "ping"}))
            assert raise_for_reply(recv_frame(sock, 1 << 20)).header["id"] == 99
    assert_serves(dummy_host)


@pytest.mark.serial  # refused within 5 s
def test_millions_of_tiny_strings_are_refused_cheaply(dummy_host: Host) -> None:
    body = b'{"id":6,"op":"encode","texts":[' + b",".join([b'""'] * 2_000_000) + b"]}"
    with raw(dummy_host) as sock:
        started = time.monotonic()
        sock.sendall(PREFIX.pack(MAGIC, len(body), 0) + body)
        with pytest.raises(BadRequest, match="at most 16384 texts, got 2000000"):
            raise_for_reply(recv_frame(sock, 1 << 20))
        assert time.monotonic() - started < 5
    assert_serves(dummy_host)


def test_lone_surrogate_is_named(dummy_host: Host) -> None:
    body = b'{"id":5,"op":"encode","texts":["ok","\\ud800"]}'
    with raw(dummy_host) as sock:
        sock.sendall(PREFIX.pack(MAGIC, len(body), 0) + body)
        with pytest.raises(BadRequest, match="item 1 is not valid UTF-8"):
            raise_for_reply(recv_frame(sock, 1 << 20))


def test_oversize_request_from_the_client(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_MAX_FRAME_BYTES="65536")
    with pytest.raises(PayloadTooLarge, match="exceeds the limit of 65536 bytes"):
        host.client().encode(["x" * 2_000_000])
    assert_serves(host)


def test_client_rejects_bad_input_before_sending(dummy_host: Host) -> None:
    client = dummy_host.client()
    with pytest.raises(BadRequest, match="item 1 must be a string, not NoneType"):
        client.encode(["a", None])  # type: ignore[list-item]
    with pytest.raises(BadRequest, match="not bytes"):
        client.encode(b"abc")  # type: ignore[arg-type]


def test_poison_request_fails_alone_with_worker_crashed(dummy_host: Host) -> None:
    client = dummy_host.client(pool_size=16)
    before = set(dummy_host.worker_pids())
    results: dict[int, object] = {}

    def innocent(k: int) -> None:
        texts = [f"innocent {k} {i}" for i in range(3)]
        results[k] = np.array_equal(client.encode(texts), expected(texts))

    threads = [threading.Thread(target=innocent, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    with pytest.raises(WorkerCrashed, match="crashed a worker 2 times"):
        client.encode(["fine", "__crash__", "fine too"])
    for t in threads:
        t.join(30)
    assert results == {k: True for k in range(12)}
    poll(lambda: len(dummy_host.status()["workers"]) == 2, 10, what="respawn")
    status = dummy_host.status()
    assert status["counters"]["worker_crashes"] == 2
    assert status["counters"]["respawns"] == 2
    assert len(before - {w["pid"] for w in status["workers"]}) >= 1
    assert_serves(dummy_host)


def test_backend_error_reaches_the_client_typed(dummy_host: Host) -> None:
    with pytest.raises(BadRequest, match="asked to fail"):
        dummy_host.client().encode(["__error__"])
    assert_serves(dummy_host)


def test_socket_and_directory_are_private(dummy_host: Host) -> None:
    assert stat.S_IMODE(os.stat(dummy_host.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(dummy_host.socket)).st_mode) == 0o700


def test_a_second_host_on_the_same_socket_is_refused(dummy_host: Host, host_factory, tmp_path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "shm_model", "serve"],
        env=dummy_host.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"another host (pid {dummy_host.proc.pid}) is already serving" in proc.stderr
    assert_serves(dummy_host)


def test_a_file_in_place_of_the_socket_is_left_alone(host_factory, tmp_path) -> None:
    run = tmp_path / "file" / "run"
    run.mkdir(parents=True, mode=0o700)
    (run / "host.sock").write_text("precious")
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_SOCKET=str(run / "host.sock"), ready=False)
    assert host.proc.wait(60) == 2
    assert "exists and is not a socket" in host.log()
    assert (run / "host.sock").read_text() == "precious"


def test_shared_socket_directory_is_refused(host_factory, tmp_path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_SOCKET=str(shared / "h.sock"), ready=False)
    assert host.proc.wait(60) == 2
    assert "has mode 0777; the host needs a private directory" in host.log()


def _as_nobody(sock_path: str) -> str:
    """Connect from a forked child running as uid 65534; return what it saw."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                HostClient(sock_path, timeout=5).ping()
                result = "served"
            except PermissionDenied as exc:
                result = f"PermissionDenied: {exc}"
            except Exception as exc:  # noqa: BLE001
                result = f"{type(exc).__name__}: {exc}"
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as fh:
        return fh.read().decode()


@pytest.fixture
def reachable_dir() -> Iterator[str]:
    """A directory other users can traverse (pytest's own temporary tree is private)."""
    path = tempfile.mkdtemp(prefix="shm-model-uid-")
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_are_refused(host_factory, reachable_dir: str) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_SOCKET=f"{reachable_dir}/run/host.sock")
    # The private directory stops them first ...
    assert _as_nobody(host.socket).startswith("PermissionDenied: cannot connect")
    # ... and the peer-uid check stops them even where the socket is reachable.
    os.chmod(os.path.dirname(host.socket), 0o711)
    os.chmod(host.socket, 0o666)
    assert _as_nobody(host.socket).startswith("PermissionDenied: uid 65534 may not use this host")
    assert host.status()["counters"]["refused"] == 1
    assert_serves(host)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_allowed_uids_may_connect(host_factory, reachable_dir: str) -> None:
    host = host_factory(
        SHM_MODEL_BACKEND="dummy", SHM_MODEL_ALLOWED_UIDS="65534", SHM_MODEL_SOCKET=f"{reachable_dir}/run/host.sock"
    )
    assert stat.S_IMODE(os.stat(os.path.dirname(host.socket)).st_mode) == 0o711
    assert _as_nobody(host.socket) == "served"


def test_spawned_workers_work(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_START_METHOD="spawn")
    assert host.status()["start_method"] == "spawn"
    assert_serves(host)
    pid = host.worker_pids()[0]
    os.kill(pid, 9)
    poll(lambda: pid not in host.worker_pids() and len(host.worker_pids()) == 2, 30, what="respawn")
    assert_serves(host)


def test_pooled_connection_survives_a_host_restart(host_factory, tmp_path) -> None:
    path = tmp_path / "restart"
    host = host_factory(SHM_MODEL_BACKEND="dummy", path=path)
    client = HostClient(host.socket, timeout=10)
    client.encode(["warm the pool"])
    assert host.terminate() == 0
    second = host_factory(SHM_MODEL_BACKEND="dummy", path=path)
    assert second.socket == host.socket
    assert np.array_equal(client.encode(["again"]), expected(["again"]))
    client.close()


def test_client_without_host_raises_host_unavailable(tmp_path) -> None:
    with pytest.raises(HostUnavailable, match=r"no host is serving .*shm-model serve"):
        HostClient(str(tmp_path / "none.sock")).encode("x")


def test_workers_die_with_the_supervisor(dummy_host: Host) -> None:
    workers = dummy_host.worker_pids()
    os.kill(dummy_host.proc.pid, 9)
    dummy_host.proc.wait(5)
    poll(lambda: not any(pid_alive(p) for p in workers), 2, what="workers to exit")
