"""HostClient against a scripted host in a thread of the test process: pooling, retries, deadlines,
access checks and encode's arguments, each with the error a caller sees."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shm_model import client as client_module
from shm_model.client import (
    CHUNK_BYTES,
    CHUNK_TEXTS,
    HostClient,
    _chunks,
    _convert,
    check_peer,
    check_socket,
    check_socket_directory,
    trusted_uid_set,
    wait_for_host,
)
from shm_model.errors import (
    BadRequest,
    ConfigError,
    HostUnavailable,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
)
from shm_model.protocol import Frame, error_reply, result_reply, too_long, vectors_reply
from tests.conftest import poll
from tests.unit.fakehost import OTHER_UID, FakeHost, encode_reply

# --- access checks ---------------------------------------------------------------------


def test_trusted_uids_are_this_user_root_and_the_extra_ones() -> None:
    assert trusted_uid_set() == frozenset({os.getuid(), os.geteuid(), 0})
    assert trusted_uid_set([7, 8]) == frozenset({os.getuid(), os.geteuid(), 0, 7, 8})


def test_socket_directory_must_be_a_private_directory_of_a_trusted_uid(tmp_path: Path) -> None:
    trusted = trusted_uid_set()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    check_socket_directory(str(private), trusted, "s")
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(PermissionDenied) as not_dir:
        check_socket_directory(str(a_file), trusted, "s")
    assert str(not_dir.value) == f"{a_file} is not a directory; refusing to use s"
    for mode in (0o720, 0o702, 0o777):
        os.chmod(private, mode)
        with pytest.raises(PermissionDenied) as writable:
            check_socket_directory(str(private), trusted, "s")
        assert str(writable.value) == (
            f"socket directory {private} (uid {os.getuid()}) has mode {mode:04o}: other users may write to it; "
            "refusing to use s (the host's socket belongs in a private directory)"
        )
        assert writable.value.details == {"socket": "s", "path": str(private), "owner": os.getuid()}
    os.chmod(private, 0o755)
    check_socket_directory(str(private), trusted, "s")  # readable by others is fine


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
def test_a_directory_or_socket_of_another_uid_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, -1)
    with pytest.raises(PermissionDenied) as info:
        check_socket_directory(str(theirs), trusted_uid_set(), "s")
    assert str(info.value) == (
        f"socket directory {theirs} belongs to uid {OTHER_UID}, which is not this user ({os.geteuid()}), root or "
        "a trusted uid (SHM_MODEL_TRUSTED_UIDS: none); refusing to use the host at s"
    )
    assert info.value.details == {"socket": "s", "owner": OTHER_UID, "path": str(theirs)}
    check_socket_directory(str(theirs), trusted_uid_set([OTHER_UID]), "s")
    with pytest.raises(PermissionDenied) as named:
        check_socket_directory(str(theirs), trusted_uid_set([7, 3]), "s")
    assert "(SHM_MODEL_TRUSTED_UIDS: 3, 7)" in str(named.value)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    sock_path = mine / "host.sock"
    sock_path.write_text("")
    os.chown(sock_path, OTHER_UID, -1)
    with pytest.raises(PermissionDenied) as sock:
        check_socket(str(sock_path), trusted_uid_set())
    assert str(sock.value).startswith(f"socket {sock_path} belongs to uid {OTHER_UID}, which is not this user")
    assert sock.value.details["path"] == str(sock_path)
    assert str(sock.value).endswith(f"refusing to use the host at {sock_path}")
    assert sock.value.details["socket"] == str(sock_path)
    check_socket(str(sock_path), trusted_uid_set([OTHER_UID]))


def test_a_missing_socket_or_directory_is_host_unavailable(tmp_path: Path) -> None:
    for path in (tmp_path / "host.sock", tmp_path / "nowhere" / "host.sock"):
        with pytest.raises(HostUnavailable) as info:
            check_socket(str(path), trusted_uid_set())
        assert str(info.value) == (
            f"no host is serving {path} (No such file or directory); start one with 'shm-model serve'"
        )
        assert info.value.details == {"socket": str(path)}
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(PermissionDenied):  # a file where the directory should be
        check_socket(str(a_file / "host.sock"), trusted_uid_set())


def test_the_peer_must_run_as_a_trusted_uid() -> None:
    a, b = socket.socketpair()
    with a, b:
        check_peer(a, trusted_uid_set(), "s")
        with pytest.raises(PermissionDenied) as info:
            check_peer(a, {OTHER_UID}, "s")
        assert str(info.value).startswith(f"the process serving s (pid {os.getpid()}) runs as uid {os.geteuid()},")
        assert info.value.details == {"socket": "s", "owner": os.geteuid(), "pid": os.getpid()}


# --- construction ------------------------------------------------------------------------


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHM_MODEL_SOCKET", str(tmp_path / "a.sock"))
    monkeypatch.setenv("SHM_MODEL_REQUEST_TIMEOUT", "7.5")
    monkeypatch.setenv("SHM_MODEL_TRUSTED_UIDS", "11,12")
    c = HostClient()
    assert (c.socket_path, c.timeout, c.pool_size, c.connect_timeout) == (str(tmp_path / "a.sock"), 7.5, 4, 5.0)
    assert c.trusted_uids == trusted_uid_set([11, 12])
    c = HostClient("b.sock", timeout=2, trusted_uids=[13], pool_size=1, connect_timeout=1)
    assert (c.socket_path, c.timeout, c.pool_size, c.connect_timeout) == ("b.sock", 2, 1, 1)
    assert c.trusted_uids == trusted_uid_set([13])
    monkeypatch.delenv("SHM_MODEL_SOCKET")
    monkeypatch.delenv("SHM_MODEL_REQUEST_TIMEOUT")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    c = HostClient(timeout=None)
    assert c.socket_path == str(tmp_path / "shm-model" / "host.sock")
    assert c.timeout == 30.0  # the setting's default


# --- requests ----------------------------------------------------------------------------


def test_requests_carry_id_op_deadline_and_fields(start: Callable[..., FakeHost]) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        assert c.ping() == {"op": "ping", "dimension": 3, "max_seq_length": 128}
        assert c.info()["op"] == "info"
        assert c.status()["op"] == "status"
        assert c.reload()["op"] == "reload"
        assert c.stop(timeout=3)["op"] == "stop"
        assert c.get_sentence_embedding_dimension() == 3
        assert c.get_embedding_dimension() == 3
        assert c.max_seq_length == 128
        frame = c.request("status", timeout=2, extra="x")
        assert isinstance(frame, Frame)
    ids = [h["id"] for h in host.headers]
    assert ids == list(range(1, len(ids) + 1))
    assert [h["op"] for h in host.headers[:5]] == ["ping", "info", "status", "reload", "stop"]
    assert 9000 < host.headers[0]["timeout_ms"] <= 10000
    assert 590_000 < host.headers[3]["timeout_ms"] <= 600_000  # reload waits for a model load
    assert 2000 < host.headers[4]["timeout_ms"] <= 3000
    assert host.headers[-1]["extra"] == "x"
    assert host.headers[-1]["timeout_ms"] <= 2000
    assert host.connections == 1  # one pooled connection served every request


def test_a_timeout_must_be_positive(start: Callable[..., FakeHost]) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        for bad in (0, -1.0, float("nan")):
            with pytest.raises(BadRequest) as info:
                c.request("ping", timeout=bad)
            assert str(info.value) == f"timeout must be > 0 seconds, got {bad!r}"
            with pytest.raises(BadRequest) as enc:
                c.encode(["a"], timeout=bad)
            assert str(enc.value) == f"timeout must be > 0 seconds, got {bad!r}"
    assert host.headers == []


def test_a_silent_host_times_out_and_its_connection_is_dropped(start: Callable[..., FakeHost]) -> None:
    gate = threading.Event()

    def respond(header: dict[str, Any]) -> bytes | None:
        if header["op"] == "status":
            gate.wait(10)
        return result_reply(header["id"], {})

    host = start(respond)
    with HostClient(host.path, timeout=10) as c:
        c.ping()
        with pytest.raises(RequestTimeout) as info:
            c.request("status", timeout=0.2)
        assert str(info.value).startswith("no reply from the host within 0.")
        assert 0.1 < info.value.details["timeout"] <= 0.2
        gate.set()
        assert c._idle == []
        c.ping()  # a fresh connection: the late reply to status can never answer it
    assert host.connections == 2


def test_a_request_whose_deadline_passed_is_not_sent(start: Callable[..., FakeHost]) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        with pytest.raises(RequestTimeout) as info:
            c._request("ping", 0.0, {})
        assert str(info.value) == "the request's deadline passed before it was sent"
    assert host.headers == []


def test_a_pooled_connection_closed_by_the_host_is_retried_once_on_a_fresh_one(
    start: Callable[..., FakeHost],
) -> None:
    seen: list[int] = []

    def respond(header: dict[str, Any]) -> bytes | None:
        seen.append(header["id"])
        return result_reply(header["id"], {"n": len(seen)})

    host = start(respond)
    with HostClient(host.path, timeout=10) as c:
        c.ping()
        for conn in host.open:  # the host drops its idle connection
            conn.shutdown(socket.SHUT_RDWR)
        assert c.ping() == {"n": 2}
    assert host.connections == 2
    assert seen == [1, 2]


def test_a_pooled_connection_is_retried_once_only(start: Callable[..., FakeHost]) -> None:
    host = start()
    with HostClient(host.path, timeout=10, pool_size=2) as c:
        first = c._acquire(1e18)[0]
        second = c._acquire(1e18)[0]
        c._release(first)
        c._release(second)
        poll(lambda: host.connections == 2, 10, what="both connections accepted")
        for conn in list(host.open):
            conn.shutdown(socket.SHUT_RDWR)
        with pytest.raises(HostUnavailable) as info:
            c.ping()
        assert str(info.value).endswith("closed the connection (connection closed after 0 of 12 bytes)")
        assert c._idle == []
    assert host.headers == []


def test_a_fresh_connection_the_host_closes_is_unavailable_at_once(start: Callable[..., FakeHost]) -> None:
    host = start(lambda header: None)
    with HostClient(host.path, timeout=10) as c:
        with pytest.raises(HostUnavailable) as info:
            c.ping()
    assert str(info.value) == f"the host at {host.path} closed the connection (connection closed after 0 of 12 bytes)"
    assert info.value.details == {"socket": host.path}
    assert host.connections == 1  # not retried: a fresh connection was refused


def test_a_reply_cut_inside_a_frame_on_a_pooled_connection_is_not_retried(start: Callable[..., FakeHost]) -> None:
    calls: list[str] = []

    def respond(header: dict[str, Any]) -> bytes | None:
        calls.append(header["op"])
        reply = result_reply(header["id"], {})
        return reply if header["op"] == "ping" else reply[:5]

    host = start(respond)
    with HostClient(host.path, timeout=10) as c:
        c.ping()
        threading.Timer(0.2, lambda: [conn.shutdown(socket.SHUT_RDWR) for conn in host.open]).start()
        with pytest.raises(HostUnavailable) as info:
            c.status()
        assert "closed the connection (connection closed after 5 of 12 bytes)" in str(info.value)
    assert calls == ["ping", "status"]


def test_a_reply_to_another_request_is_a_protocol_error(start: Callable[..., FakeHost]) -> None:
    host = start(lambda header: result_reply(header["id"] + 100, {}))
    with HostClient(host.path, timeout=10) as c:
        with pytest.raises(ProtocolError) as info:
            c.ping()
        assert str(info.value) == "reply for request 101, expected 1"
        assert c._idle == []


def test_a_connection_level_error_closes_the_connection_and_raises_its_type(start: Callable[..., FakeHost]) -> None:
    host = start(lambda header: error_reply(None, Overloaded("too many connections")))
    with HostClient(host.path, timeout=10) as c:
        with pytest.raises(Overloaded) as info:
            c.ping()
        assert str(info.value) == "too many connections"
        assert c._idle == []
    typed = start(lambda header: error_reply(header["id"], BadRequest("no")), name="b.sock")
    with HostClient(typed.path, timeout=10) as c:
        with pytest.raises(BadRequest):
            c.ping()
        assert len(c._idle) == 1  # an error answering this request leaves the connection usable


def test_a_reply_to_a_frame_the_host_refused_is_read_after_a_broken_pipe(start: Callable[..., FakeHost]) -> None:
    def refuse(conn: socket.socket) -> None:
        with conn:
            conn.recv(12)
            conn.sendall(error_reply(None, PayloadTooLarge("frame too large")))
            conn.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                conn.recv(1)

    host = start()
    host.handle = refuse  # type: ignore[method-assign]
    with HostClient(host.path, timeout=10) as c:
        with pytest.raises(PayloadTooLarge) as info:
            c.encode(["x" * (CHUNK_BYTES - 100)])
        assert str(info.value) == "frame too large"


def test_the_pool_keeps_at_most_pool_size_connections_and_close_ends_them(start: Callable[..., FakeHost]) -> None:
    host = start()
    c = HostClient(host.path, timeout=10, pool_size=1)
    socks = [c._acquire(1e18) for _ in range(3)]
    assert [reused for _, reused in socks] == [False, False, False]
    for sock, _ in socks:
        c._release(sock)
    assert c._idle == [socks[0][0]]
    assert socks[1][0].fileno() == -1 and socks[2][0].fileno() == -1
    assert c._acquire(1e18) == (socks[0][0], True)
    c._release(socks[0][0])
    c.close()
    assert socks[0][0].fileno() == -1
    with pytest.raises(HostUnavailable) as info:
        c.ping()
    assert str(info.value) == "this client is closed"
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c._release(late)  # returned after close: closed, not pooled
    assert late.fileno() == -1 and c._idle == []


def test_connecting_to_a_socket_nobody_listens_on_is_unavailable(run_dir: Path) -> None:
    path = run_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    with HostClient(str(path), timeout=5) as c:
        with pytest.raises(HostUnavailable) as info:
            c.ping()
    assert str(info.value) == f"no host is serving {path} (Connection refused); start one with 'shm-model serve'"


def test_connect_errors_are_typed(monkeypatch: pytest.MonkeyPatch, start: Callable[..., FakeHost]) -> None:
    host = start()
    timeouts: list[float | None] = []

    def fail_with(exc: OSError) -> Callable[[socket.socket, object], None]:
        def connect(self: socket.socket, address: object) -> None:
            timeouts.append(self.gettimeout())
            raise exc

        return connect

    cases = [
        (PermissionError(13, "Permission denied"), PermissionDenied, "cannot connect to the host at {p}: "
         "Permission denied (the host runs as another user or its socket is private)"),
        (FileNotFoundError(2, "No such file or directory"), HostUnavailable, "no host is serving {p} "
         "(No such file or directory); start one with 'shm-model serve'"),
        (TimeoutError("timed out"), HostUnavailable, "cannot connect to the host at {p}: timed out"),
        (OSError(11, "Resource temporarily unavailable"), HostUnavailable,
         "cannot connect to the host at {p}: [Errno 11] Resource temporarily unavailable"),
    ]  # fmt: skip
    for exc, cls, message in cases:
        monkeypatch.setattr(socket.socket, "connect", fail_with(exc))
        with HostClient(host.path, timeout=10, connect_timeout=2.5) as c:
            with pytest.raises(cls) as info:
                c.ping()
            assert type(info.value) is cls
            assert str(info.value) == message.format(p=host.path)
            assert info.value.details == {"socket": host.path}
    assert timeouts == [2.5] * 4
    monkeypatch.setattr(socket.socket, "connect", fail_with(TimeoutError("timed out")))
    with HostClient(host.path, timeout=0.5, connect_timeout=2.5) as c, pytest.raises(HostUnavailable):
        c.ping()
    assert 0.3 < timeouts[-1] <= 0.5  # the connect waits no longer than the request's deadline


def test_a_peer_of_an_untrusted_uid_is_refused_before_anything_is_sent(
    monkeypatch: pytest.MonkeyPatch, start: Callable[..., FakeHost]
) -> None:
    host = start()
    closed: list[socket.socket] = []

    def refuse(sock: socket.socket, trusted: object, path: str) -> None:
        closed.append(sock)
        raise PermissionDenied("untrusted peer")

    monkeypatch.setattr(client_module, "check_peer", refuse)
    with HostClient(host.path, timeout=10) as c, pytest.raises(PermissionDenied):
        c.ping()
    assert closed[0].fileno() == -1
    assert host.headers == []


# --- encode -------------------------------------------------------------------------------


def test_encode_returns_rows_in_order_across_chunks(start: Callable[..., FakeHost]) -> None:
    host = start()
    texts = [f"t{i}" + "x" * (i % 7) for i in range(CHUNK_TEXTS * 2 + 5)]
    with HostClient(host.path, timeout=10) as c:
        vectors = c.encode(texts)
        assert vectors.shape == (len(texts), 3) and vectors.dtype == np.float32
        assert vectors[:, 0].tolist() == [len(t) for t in texts]
        assert [len(h["texts"]) for h in host.headers] == [CHUNK_TEXTS, CHUNK_TEXTS, 5]
        assert {h["priority"] for h in host.headers} == {"bulk"}
        assert all("truncate" not in h and "prompt" not in h and "prompt_name" not in h for h in host.headers)
        one = c.encode("abcd")
        assert one.shape == (3,) and one[0] == 4
        assert host.headers[-1]["priority"] == "interactive"
        assert c.encode(iter(["a", "b"])).shape == (2, 3)


def test_encode_sends_prompt_priority_and_truncate(start: Callable[..., FakeHost]) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        c.encode(["a"] * 20, priority="interactive", prompt="query: ", prompt_name="ignored", truncate=False)
        c.encode(["a"], prompt_name="passage", priority="bulk", truncate=True)
    first, second = host.headers
    assert (first["priority"], first["prompt"], first["truncate"]) == ("interactive", "query: ", False)
    assert "prompt_name" not in first
    assert (second["priority"], second["prompt_name"]) == ("bulk", "passage")
    assert "prompt" not in second and "truncate" not in second


def test_encode_refuses_what_the_host_cannot_do(start: Callable[..., FakeHost]) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"output_value": "token_embeddings"}, "the host returns float32 sentence embeddings only"),
            ({"precision": "int8"}, "the host returns float32 sentence embeddings only"),
            ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
            ({"priority": "urgent"}, "priority must be one of interactive, bulk, not 'urgent'"),
            ({"truncate_dim": 0}, "truncate_dim must be an integer >= 1, got 0"),
            ({"truncate_dim": True}, "truncate_dim must be an integer >= 1, got True"),
            ({"truncate_dim": 2.0}, "truncate_dim must be an integer >= 1, got 2.0"),
            ({"truncate_dim": 4}, "truncate_dim=4 is more than the model's dimension 3"),
        ]
        for kwargs, message in cases:
            with pytest.raises(BadRequest) as info:
                c.encode(["a"], **kwargs)
            assert str(info.value) == message
        for sentences, kind in ((b"abc", "bytes"), (bytearray(b"a"), "bytearray"), (5, "int")):
            with pytest.raises(BadRequest) as bad:
                c.encode(sentences)  # type: ignore[arg-type]
            assert str(bad.value) == f"sentences must be a string or a list of strings, not {kind}"
        with pytest.raises(BadRequest):
            c.encode(["a", 1])  # type: ignore[list-item]
        assert c.encode(["a"], batch_size=1, truncate_dim=3).shape == (1, 3)


def test_encode_truncates_then_normalizes_and_counts_tokens(start: Callable[..., FakeHost]) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        cut = c.encode(["abc", "de"], truncate_dim=2)
        assert cut.tolist() == [[3.0, 0.0], [2.0, 1.0]]
        assert cut.flags["C_CONTIGUOUS"]
        unit = c.encode(["abc", "de"], truncate_dim=2, normalize_embeddings=True)
        assert np.allclose(unit, [[1.0, 0.0], [2 / 5**0.5, 1 / 5**0.5]])
        vectors, tokens = c.encode(["abc", "de"], return_usage=True)
        assert tokens == 5 and vectors.shape == (2, 3)
        _, total = c.encode(["a" * 10] * (CHUNK_TEXTS + 1), return_usage=True)
        assert total == 10 * (CHUNK_TEXTS + 1)
        empty = c.encode([])
        assert empty.shape == (0, 3)
        assert c.encode([], normalize_embeddings=True).shape == (0, 3)
        assert c.encode([], return_usage=True)[1] == 0


def test_a_zero_vector_normalizes_to_zero_not_nan(start: Callable[..., FakeHost]) -> None:
    host = start(lambda h: vectors_reply(h["id"], np.zeros((1, 3)), tokens=1))
    with HostClient(host.path, timeout=10) as c:
        assert c.encode(["a"], normalize_embeddings=True).tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("tokens", [None, -1, True, 1.5, "3"])
def test_a_reply_without_a_token_count_is_a_protocol_error_only_when_usage_is_asked(
    start: Callable[..., FakeHost], tokens: object
) -> None:
    host = start(lambda h: vectors_reply(h["id"], np.ones((1, 3)), tokens=tokens))
    with HostClient(host.path, timeout=10) as c:
        assert c.encode(["a"]).shape == (1, 3)
        with pytest.raises(ProtocolError) as info:
            c.encode(["a"], return_usage=True)
        assert str(info.value) == f"the host's reply has no token count (tokens={tokens!r})"


def test_a_reply_with_the_wrong_number_of_vectors_is_a_protocol_error(start: Callable[..., FakeHost]) -> None:
    host = start(lambda h: vectors_reply(h["id"], np.ones((len(h["texts"]) + 1, 3)), tokens=1))
    with HostClient(host.path, timeout=10) as c:
        with pytest.raises(ProtocolError) as info:
            c.encode(["a", "b"])
        assert str(info.value) == "host returned 3 vectors for 2 texts"
    wide = start(lambda h: vectors_reply(h["id"], np.ones((1, 5)), tokens=1), name="wide.sock")
    with HostClient(wide.path, timeout=10) as c, pytest.raises(ProtocolError) as info:
        c.encode(["a", "b"])
    assert str(info.value) == "host returned 1 vectors for 2 texts"


def test_a_refused_long_input_is_named_by_its_index_in_the_whole_call(start: Callable[..., FakeHost]) -> None:
    def respond(header: dict[str, Any]) -> bytes:
        if "long" in header["texts"]:
            return error_reply(header["id"], too_long(header["texts"].index("long"), 900, 512))
        return encode_reply(header)

    host = start(respond)
    texts = ["a"] * (CHUNK_TEXTS + 3) + ["long"]
    with HostClient(host.path, timeout=10) as c:
        with pytest.raises(PayloadTooLarge) as info:
            c.encode(texts, truncate=False)
        assert info.value.details == {"index": CHUNK_TEXTS + 3, "tokens": 900, "limit": 512}
        assert str(info.value).startswith(f"item {CHUNK_TEXTS + 3} has 900 tokens")
        with pytest.raises(PayloadTooLarge) as first:
            c.encode(["long"], truncate=False)
        assert first.value.details["index"] == 0
    odd = start(lambda h: error_reply(h["id"], PayloadTooLarge("odd", index="x")), name="odd.sock")
    with HostClient(odd.path, timeout=10) as c, pytest.raises(PayloadTooLarge) as info:
        c.encode(["a"] * (CHUNK_TEXTS + 1))
    assert str(info.value) == "odd"


def test_each_chunk_gets_the_default_timeout_an_explicit_one_bounds_the_call(start: Callable[..., FakeHost]) -> None:
    host = start()
    texts = ["a"] * (CHUNK_TEXTS + 1)
    with HostClient(host.path, timeout=10) as c:
        c.encode(texts)
        assert all(9000 < h["timeout_ms"] <= 10000 for h in host.headers)
        host.headers.clear()
        c.encode(texts, timeout=3)
        assert all(h["timeout_ms"] <= 3000 for h in host.headers)


def test_a_progress_bar_sets_the_request_size(start: Callable[..., FakeHost], capsys: pytest.CaptureFixture) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        vectors = c.encode(["a"] * 10, batch_size=4, show_progress_bar=True)
        assert vectors.shape == (10, 3)
        assert [len(h["texts"]) for h in host.headers] == [4, 4, 2]
        assert "10/10" in capsys.readouterr().err
        host.headers.clear()
        c.encode(["a"] * 10, batch_size=4)
        assert [len(h["texts"]) for h in host.headers] == [10]
        c.encode(["a"] * 3, batch_size=4, show_progress_bar=True)
        assert "Batches" not in capsys.readouterr().err  # one request: no bar


def test_tensors_are_returned_when_asked() -> None:
    torch = pytest.importorskip("torch")  # only here: encode's own tests stay free of torch
    result = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = _convert(result, False, convert_to_numpy=True, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.tolist() == result.tolist()
    assert _convert(result, True, convert_to_numpy=False, convert_to_tensor=True).tolist() == [0.0, 1.0, 2.0]
    rows = _convert(result, False, convert_to_numpy=False, convert_to_tensor=False)
    assert isinstance(rows, list) and [r.tolist() for r in rows] == result.tolist()
    row = _convert(result, True, convert_to_numpy=False, convert_to_tensor=False)
    assert isinstance(row, torch.Tensor) and row.tolist() == [0.0, 1.0, 2.0]
    assert _convert(result, True, convert_to_numpy=True, convert_to_tensor=False).tolist() == [0.0, 1.0, 2.0]
    assert _convert(result, False, convert_to_numpy=True, convert_to_tensor=False) is result


def test_chunks_are_bounded_by_count_and_bytes() -> None:
    assert list(_chunks([], 4)) == [[]]
    assert list(_chunks(["a"] * 5, 2)) == [["a", "a"], ["a", "a"], ["a"]]
    assert list(_chunks(["a"] * 4, 2)) == [["a", "a"], ["a", "a"]]
    half = "가" * (CHUNK_BYTES // 6)  # CHUNK_BYTES / 2 bytes
    assert [len(c) for c in _chunks([half, half, half], 10)] == [2, 1]
    big = "x" * (CHUNK_BYTES + 1)
    assert [len(c) for c in _chunks([big, "a", big], 10)] == [1, 1, 1]
    assert [len(c) for c in _chunks(["a", big], 10)] == [1, 1]
    exact = "x" * (CHUNK_BYTES - 1)
    assert [len(c) for c in _chunks([exact, "a", "b"], 10)] == [2, 1]


def test_wait_for_host_polls_until_a_host_answers(run_dir: Path, start: Callable[..., FakeHost]) -> None:
    path = run_dir / "later.sock"
    threading.Timer(0.3, lambda: start(name="later.sock")).start()
    assert wait_for_host(str(path), timeout=10, interval=0.02) == {"op": "ping", "dimension": 3, "max_seq_length": 128}
    with pytest.raises(HostUnavailable) as info:
        wait_for_host(str(run_dir / "never.sock"), timeout=0.2, interval=0.02)
    assert str(info.value) == f"no host answered on {run_dir / 'never.sock'} within 0.2s"


def test_wait_for_host_stops_when_the_started_host_has_exited(run_dir: Path) -> None:
    class Exits:
        """A started host that exits after its second poll."""

        def __init__(self) -> None:
            self.polls = 0
            self.returncode: int | None = None

        def poll(self) -> int | None:
            self.polls += 1
            if self.polls >= 2:
                self.returncode = 3
            return self.returncode

    process = Exits()
    path = run_dir / "exits.sock"
    with pytest.raises(HostUnavailable) as info:
        wait_for_host(str(path), timeout=30, interval=0.01, process=process)
    assert str(info.value) == f"the host started on {path} exited with 3 before it answered"
    assert process.polls == 2  # one poll after each failed ping, then no wait for the deadline


def test_timeouts_reach_the_host_with_millisecond_precision(start: Callable[..., FakeHost]) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        c.ping(timeout=2)
        c.info(timeout=2)
        c.status(timeout=2)
        c.encode(["a"], timeout=0.5)
    assert [h["op"] for h in host.headers] == ["ping", "info", "status", "encode"]
    assert all(h["timeout_ms"] <= 2000 for h in host.headers)
    assert host.headers[-1]["timeout_ms"] <= 500
    assert all(isinstance(h["timeout_ms"], float) for h in host.headers)
    assert all(len(repr(h["timeout_ms"]).split(".")[1]) <= 3 for h in host.headers)


def test_a_request_sent_at_its_deadline_is_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    class Clock:
        @staticmethod
        def monotonic() -> float:
            return 100.0

    monkeypatch.setattr(client_module, "time", Clock)
    with pytest.raises(RequestTimeout):
        HostClient("unused.sock", timeout=1)._request("ping", 100.0, {})


def test_a_silent_host_times_out_at_the_deadline_not_later(start: Callable[..., FakeHost]) -> None:
    gate = threading.Event()
    host = start(lambda header: gate.wait(10) and None)
    with HostClient(host.path, timeout=10) as c:
        began = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            c.request("status", timeout=0.2)
        assert time.monotonic() - began < 0.9
        assert len(repr(info.value.details["timeout"]).split(".")[1]) <= 3
    gate.set()


def test_a_bad_timeout_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHM_MODEL_REQUEST_TIMEOUT", "soon")
    with pytest.raises(ConfigError) as info:
        HostClient("x.sock")
    assert str(info.value).startswith("SHM_MODEL_REQUEST_TIMEOUT=")


def test_a_socket_the_user_may_not_reach_is_permission_denied(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
    path = str(run_dir / "host.sock")
    real_stat = os.stat

    def stat(p: str, *args: object, **kwargs: object) -> os.stat_result:
        if p == path:
            raise PermissionError(13, "Permission denied")
        return real_stat(p, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client_module.os, "stat", stat)
    with pytest.raises(PermissionDenied) as info:
        check_socket(path, trusted_uid_set())
    assert str(info.value) == (
        f"cannot connect to the host at {path}: Permission denied "
        "(the host runs as another user or its socket is private)"
    )
    assert info.value.details == {"socket": path}


def test_access_errors_name_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionDenied) as info:
        check_socket(str(shared / "host.sock"), trusted_uid_set())
    assert str(info.value).endswith(
        f"refusing to use {shared / 'host.sock'} (the host's socket belongs in a private directory)"
    )
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(PermissionDenied) as not_dir:
        check_socket_directory(str(a_file), trusted_uid_set(), "s")
    assert not_dir.value.details == {"socket": "s"}
    here = tmp_path / "here"
    here.mkdir(mode=0o700)
    (here / "host.sock").write_text("")
    monkeypatch.chdir(here)
    check_socket("host.sock", trusted_uid_set())  # a bare name: the socket directory is the current one


def test_the_peer_check_names_the_socket(monkeypatch: pytest.MonkeyPatch, start: Callable[..., FakeHost]) -> None:
    host = start()
    real = client_module.check_peer
    monkeypatch.setattr(client_module, "check_peer", lambda sock, trusted, path: real(sock, {OTHER_UID}, path))
    with HostClient(host.path, timeout=10) as c, pytest.raises(PermissionDenied) as info:
        c.ping()
    assert str(info.value).startswith(f"the process serving {host.path} (pid {os.getpid()})")
    assert str(info.value).endswith(f"refusing to use the host at {host.path}")


def test_encode_edges(start: Callable[..., FakeHost], capsys: pytest.CaptureFixture) -> None:
    host = start()
    with HostClient(host.path, timeout=10) as c:
        assert c.encode(["abc"], truncate_dim=1).tolist() == [[3.0]]
        with pytest.raises(BadRequest) as info:
            c.encode(["a"], truncate_dim=4)
        assert info.value.details == {"truncate_dim": 4, "dimension": 3}
        assert c.encode(["x"] * 16385).shape == (16385, 3)  # more than one request may carry
        host.headers.clear()
        c.encode(["a"] * 40, show_progress_bar=True)
        assert [len(h["texts"]) for h in host.headers] == [32, 8]  # the default batch_size
        err = capsys.readouterr().err
        assert "Batches: 100%" in err and "40/40" in err and "text/s" in err
        c.encode(["a"] * 10, batch_size=5, show_progress_bar=True)
        assert "Batches" in capsys.readouterr().err  # two requests get a bar
    small = start(lambda h: vectors_reply(h["id"], np.array([[0.3, 0.4, 0.0]]), tokens=1), name="small.sock")
    with HostClient(small.path, timeout=10) as c:
        assert np.allclose(c.encode(["a"], normalize_embeddings=True), [[0.6, 0.8, 0.0]])
        torch = pytest.importorskip("torch")
        assert isinstance(c.encode(["a"], convert_to_tensor=True), torch.Tensor)


def test_a_too_long_error_without_integer_details_is_raised_as_the_host_sent_it(
    start: Callable[..., FakeHost],
) -> None:
    def respond(header: dict[str, Any]) -> bytes:
        if "bad" in header["texts"]:
            return error_reply(header["id"], PayloadTooLarge("odd", index="x", tokens=1, limit=2))
        return encode_reply(header)

    host = start(respond)
    with HostClient(host.path, timeout=10) as c:
        for texts in (["bad"], ["a"] * CHUNK_TEXTS + ["bad"]):
            with pytest.raises(PayloadTooLarge) as info:
                c.encode(texts)
            assert str(info.value) == "odd"


def test_a_chunk_after_a_full_one_starts_from_zero_bytes() -> None:
    full = "x" * CHUNK_BYTES
    assert [len(c) for c in _chunks([full, full, ""], 10)] == [1, 2]


def test_wait_for_host_bounds_each_ping_by_its_own_timeout(start: Callable[..., FakeHost]) -> None:
    gate = threading.Event()
    host = start(lambda header: gate.wait(10) and None)
    began = time.monotonic()
    with pytest.raises(HostUnavailable):
        wait_for_host(host.path, timeout=0.3, interval=0.01)
    assert time.monotonic() - began < 2.0
    gate.set()
