"""Hostile local users and clients: who may serve a client, who may stop the host, and what
connections, ids and unfinished frames may cost it. Everything is generated here, bounded in
time, and ends with its test."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from config.model_config import HostConfig, ManagerConfig, ModelConfig
from shm_model.client import HostClient
from shm_model.errors import Overloaded, PermissionDenied
from shm_model.manager import ModelManager
from shm_model.protocol import MAGIC, PREFIX, Frame, pack, recv_frame
from tests.conftest import Host, poll

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files of another uid and act as it")


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A root-owned directory other users can traverse (pytest's temporary tree is private)."""
    path = Path(tempfile.mkdtemp(prefix="shm-model-hostile-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_trusted_uids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHM_MODEL_TRUSTED_UIDS", raising=False)


class FakeHost:
    """A fake host in a forked child that counts the connections and bytes it receives and answers
    every frame with ``{"fake": true}``. With ``uid``, it drops to that uid before ``bind`` (or, with
    ``bind_first``, between ``bind`` and ``listen``, so that the socket file stays root's)."""

    def __init__(self, path: Path, *, uid: int | None = None, bind_first: bool = False) -> None:
        self.path = path
        control_r, self._control = os.pipe()
        self._result, result_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - child
            try:
                os.close(self._control)
                os.close(self._result)
                self._serve(control_r, result_w, uid, bind_first)
            finally:
                os._exit(0)
        os.close(control_r)
        os.close(result_w)
        poll(lambda: path.exists(), 10, what="the fake host's socket")

    def _serve(self, control: int, result: int, uid: int | None, bind_first: bool) -> None:  # pragma: no cover
        def drop() -> None:
            assert uid is not None
            os.setgid(uid)
            os.setuid(uid)

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if uid is not None and not bind_first:
            drop()
        listener.bind(str(self.path))
        if uid is not None and bind_first:
            drop()
        listener.listen(8)
        connections = received = 0
        buffers: dict[socket.socket, bytes] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([listener, control, *buffers], [], [], 1.0)
            if ready == [control]:  # asked to stop, and nothing is left to accept or read
                break
            if listener in ready:
                conn, _ = listener.accept()
                connections += 1
                buffers[conn] = b""
            for conn in [r for r in ready if isinstance(r, socket.socket) and r is not listener]:
                data = conn.recv(65536)
                if not data:
                    del buffers[conn]
                    conn.close()
                    continue
                received += len(data)
                buffers[conn] += data
                if len(buffers[conn]) >= PREFIX.size:
                    _, hlen, plen = PREFIX.unpack_from(buffers[conn])
                    if len(buffers[conn]) >= PREFIX.size + hlen + plen:
                        header = json.loads(buffers[conn][PREFIX.size : PREFIX.size + hlen])
                        buffers[conn] = b""
                        conn.sendall(pack({"id": header.get("id"), "ok": True, "result": {"fake": True}}))
        os.write(result, json.dumps({"connections": connections, "bytes": received}).encode())

    def stop(self) -> dict[str, int]:
        """End the fake host; return what it received."""
        if self.pid:
            os.close(self._control)
            os.waitpid(self.pid, 0)
            self.pid = 0
            with os.fdopen(self._result, "rb") as fh:
                self.seen = json.loads(fh.read())
        return self.seen


@pytest.fixture
def fake_hosts() -> Iterator[Callable[..., FakeHost]]:
    started: list[FakeHost] = []

    def start(path: Path, **kwargs: object) -> FakeHost:
        fake = FakeHost(path, **kwargs)  # type: ignore[arg-type]
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


# --- the client trusts only its own user's host -------------------------------------------------


@needs_root
def test_a_socket_directory_of_another_uid_is_refused_before_any_byte(reachable_dir: Path, fake_hosts) -> None:
    run = reachable_dir / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)  # as if another user had created /tmp/shm-model-<uid>/ first
    fake = fake_hosts(run / "host.sock", uid=NOBODY)
    with pytest.raises(PermissionDenied, match=f"socket directory {run} belongs to uid {NOBODY}") as refused:
        HostClient(str(run / "host.sock"), timeout=5).encode(["a secret text"])
    assert refused.value.details["owner"] == NOBODY and refused.value.details["path"] == str(run)
    assert fake.stop() == {"connections": 0, "bytes": 0}


@needs_root
def test_trusted_uids_may_serve(reachable_dir: Path, fake_hosts, monkeypatch: pytest.MonkeyPatch) -> None:
    run = reachable_dir / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)
    fake = fake_hosts(run / "host.sock", uid=NOBODY)
    assert HostClient(str(run / "host.sock"), timeout=5, trusted_uids=[NOBODY]).ping() == {"fake": True}
    monkeypatch.setenv("SHM_MODEL_TRUSTED_UIDS", str(NOBODY))
    assert HostClient(str(run / "host.sock"), timeout=5).ping() == {"fake": True}
    assert fake.stop()["connections"] == 2


@needs_root
def test_a_process_of_another_uid_serving_a_trusted_path_gets_no_byte(tmp_path: Path, fake_hosts) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    # Directory and socket file are this user's; the process listening on it is not.
    fake = fake_hosts(run / "host.sock", uid=NOBODY, bind_first=True)
    assert os.stat(run / "host.sock").st_uid == os.geteuid()
    with pytest.raises(PermissionDenied, match=rf"serving {run}/host.sock \(pid {fake.pid}\) runs as uid {NOBODY}"):
        HostClient(str(run / "host.sock"), timeout=5).encode(["a secret text"])
    assert fake.stop() == {"connections": 1, "bytes": 0}


@needs_root
def test_a_socket_of_another_uid_or_a_writable_directory_is_refused(tmp_path: Path, fake_hosts) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    fake = fake_hosts(run / "host.sock")
    os.chown(run / "host.sock", NOBODY, NOBODY)
    with pytest.raises(PermissionDenied, match=f"socket {run}/host.sock belongs to uid {NOBODY}"):
        HostClient(str(run / "host.sock"), timeout=5).ping()
    os.chown(run / "host.sock", os.geteuid(), os.getegid())
    run.chmod(0o733)
    with pytest.raises(PermissionDenied, match=f"socket directory {run} .* has mode 0733: other users may write"):
        HostClient(str(run / "host.sock"), timeout=5).ping()
    run.chmod(0o700)
    assert HostClient(str(run / "host.sock"), timeout=5).ping() == {"fake": True}
    assert fake.stop()["connections"] == 1


def test_no_socket_is_still_host_unavailable(tmp_path: Path) -> None:
    from shm_model.errors import HostUnavailable

    (tmp_path / "run").mkdir(mode=0o700)
    for path in (tmp_path / "run" / "host.sock", tmp_path / "missing" / "host.sock"):
        with pytest.raises(HostUnavailable, match="no host is serving"):
            HostClient(str(path), timeout=5).ping()


# --- autostart writes only to its own files --------------------------------------------------------


@pytest.fixture
def autostart_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], ModelManager]]:
    """Managers that may start a host; one they did start (a failed refusal) is stopped."""
    monkeypatch.setenv("SHM_MODEL_BACKEND", "dummy")
    managers: list[ModelManager] = []

    def make(socket_path: Path) -> ModelManager:
        manager = ModelManager(
            ModelConfig(name="bundled", device="cpu"),
            ManagerConfig(mode="shared", autostart=True, load_timeout=30),
            HostConfig(socket_path=str(socket_path)),
        )
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.close()
        if manager._started_host is not None:
            manager._started_host.kill()
            manager._started_host.wait(10)


def test_autostart_refuses_a_planted_log_symlink(tmp_path: Path, autostart_manager) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    (run / "host.log").symlink_to(target)
    with pytest.raises(PermissionDenied, match=f"{run}/host.log is a symlink; refusing to open it"):
        autostart_manager(run / "host.sock").get_model()
    assert target.read_text() == "precious\n"
    assert not (run / "host.sock").exists()  # no host was started


@needs_root
def test_autostart_refuses_a_directory_of_another_uid(reachable_dir: Path, autostart_manager) -> None:
    run = reachable_dir / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)
    with pytest.raises(PermissionDenied, match=f"socket directory {run} belongs to uid {NOBODY}"):
        autostart_manager(run / "host.sock").get_model()
    assert os.listdir(run) == []


# --- ids, connections, unfinished frames ------------------------------------------------------------


def raw_frame(header: bytes) -> bytes:
    return PREFIX.pack(MAGIC, len(header), 0) + header


def test_an_id_out_of_range_gets_a_typed_reply_and_the_connection_serves_on(dummy_host: Host) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(dummy_host.socket)
        for rid in (b"1" * 5000, str(2**63).encode(), str(-(2**64)).encode()):
            sock.sendall(raw_frame(b'{"id":' + rid + b',"op":"ping"}'))
            reply = recv_frame(sock, 1 << 20).header
            assert reply["id"] is None and reply["ok"] is False, reply
            assert reply["error"]["code"] == "bad_request", reply
        sock.sendall(pack({"id": 2**63 - 1, "op": "ping"}))
        reply = recv_frame(sock, 1 << 20).header
        assert reply["id"] == 2**63 - 1 and reply["ok"] is True
    assert dummy_host.proc.poll() is None


def ping_on(sock_path: str) -> tuple[socket.socket, Frame]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sock_path)
    try:
        sock.sendall(pack({"id": 1, "op": "ping"}))
    except BrokenPipeError:
        pass  # refused at once; its reply waits
    return sock, recv_frame(sock, 1 << 20)


def test_connections_over_the_limit_are_overloaded(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1", SHM_MODEL_MAX_CONNECTIONS="3")
    held: list[socket.socket] = []

    def one_more() -> bool:
        sock, frame = ping_on(host.socket)
        if frame.header["ok"]:
            held.append(sock)
            return True
        sock.close()  # the connection of wait_ready() may not be reaped yet
        return False

    try:
        for _ in range(3):
            poll(one_more, 10, what="a connection under the limit")
        with pytest.raises(Overloaded, match=r"3 connections open \(limit 3, SHM_MODEL_MAX_CONNECTIONS\)"):
            HostClient(host.socket, timeout=5).ping()
        held.pop().close()
        poll(one_more, 10, what="a connection once one closed")
        held.pop().close()
        _, frame = poll(lambda: (r := ping_on(host.socket))[1].header["ok"] and r, 10, what="a free connection")
        assert frame.header["result"]["pid"] == host.proc.pid
    finally:
        for sock in held:
            sock.close()


@pytest.mark.serial  # frame timeouts and a normal request within 5 s
def test_connections_announcing_huge_frames_cannot_exhaust_memory(host_factory) -> None:
    host = host_factory(SHM_MODEL_BACKEND="dummy", SHM_MODEL_WORKERS="1", SHM_MODEL_FRAME_TIMEOUT="20")
    supervisor = psutil.Process(host.proc.pid)
    rss_before = supervisor.memory_info().rss
    announced = 64 * 2**20 - PREFIX.size  # the largest frame the host accepts
    chunk = b"x" * 2**20
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(200)]
    sent = dict.fromkeys(socks, 0)
    open_ = set(socks)
    try:
        for sock in socks:
            sock.connect(host.socket)
            sock.sendall(PREFIX.pack(MAGIC, announced, 0))
            sock.setblocking(False)
        # Send every frame but its last byte, as fast as the host reads; it refuses what it cannot hold.
        deadline = time.monotonic() + 90
        while any(sent[s] < announced - 1 for s in open_):
            assert time.monotonic() < deadline, "the host neither read nor refused the frames in 90 s"
            _, writable, _ = select.select([], [s for s in open_ if sent[s] < announced - 1], [], 1.0)
            for sock in writable:
                try:
                    sent[sock] += sock.send(chunk[: announced - 1 - sent[sock]])
                except (BrokenPipeError, ConnectionResetError):
                    open_.discard(sock)
                except BlockingIOError:
                    pass
        rss = supervisor.memory_info().rss
        stalled = [s for s in open_ if sent[s] == announced - 1]
        started = time.monotonic()
        with HostClient(host.socket, timeout=10) as client:
            assert client.encode(["a normal request"]).shape == (1, 32)
            served_in = time.monotonic() - started
            with pytest.raises(Overloaded, match="SHM_MODEL_MAX_BUFFERED_BYTES"):
                client.encode(["x" * 200_000])  # a large frame does not fit while the budget is held
        print(
            f"\n200 connections announcing 64 MB: {len(stalled)} frames held ({sum(sent.values()) / 2**20:.0f} MB "
            f"sent), {200 - len(open_)} refused; supervisor RSS +{(rss - rss_before) / 2**20:.0f} MB; "
            f"a normal request served in {served_in * 1000:.0f} ms"
        )
        assert rss - rss_before < 512 * 2**20
        assert 1 <= len(stalled) <= 2 and len(open_) == len(stalled)  # 2 x 64 MB: the default budget
        assert served_in < 5
        # An unfinished frame is dropped after SHM_MODEL_FRAME_TIMEOUT with a typed reply.
        for sock in stalled:
            sock.setblocking(True)
            sock.settimeout(30)
            reply = recv_frame(sock, 1 << 20).header
            assert reply["id"] is None and reply["error"]["code"] == "timeout", reply
            assert sock.recv(1) == b""
    finally:
        for sock in socks:
            sock.close()
    with HostClient(host.socket, timeout=10) as client:
        assert client.encode(["x" * 200_000]).shape == (1, 32)  # the budget is free again
        assert client.status()["counters"]["frame_timeouts"] == len(stalled)


# --- only the host's own user may stop or reload it -------------------------------------------------


def as_nobody(code: Callable[[], object]) -> object:
    """Run ``code`` in a forked child as uid 65534; return its result or the name of its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                result: object = code()
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                result = f"{type(exc).__name__}: {exc}"
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as fh:
        return json.loads(fh.read())


@needs_root
def test_an_allowed_uid_may_encode_but_not_stop_or_reload(host_factory, reachable_dir: Path) -> None:
    host = host_factory(
        SHM_MODEL_BACKEND="dummy",
        SHM_MODEL_WORKERS="1",
        SHM_MODEL_ALLOWED_UIDS=str(NOBODY),
        SHM_MODEL_SOCKET=str(reachable_dir / "run" / "host.sock"),
    )

    def client() -> HostClient:
        return HostClient(host.socket, timeout=10)

    assert as_nobody(lambda: client().encode(["from nobody"]).shape[0]) == 1
    assert as_nobody(lambda: client().status()["pid"]) == host.proc.pid
    assert as_nobody(lambda: client().info()["dimension"]) == 32
    for op in ("stop", "reload"):
        result = as_nobody(lambda op=op: client().request(op).header["result"])
        assert result == f"PermissionDenied: only the host's own user (uid {os.getuid()}) may {op} it, not uid {NOBODY}"
    status = host.status()
    assert status["generation"] == 0 and not status["stopping"]
    assert status["counters"]["errors_permission_denied"] == 2
    with client() as own:
        assert own.reload()["generation"] == 1  # the host's own user may
