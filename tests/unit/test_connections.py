"""The host's client connections in process: an asyncio server on a Unix socket, raw clients."""

from __future__ import annotations

import asyncio
import collections
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shm_model.errors import Overloaded
from shm_model.host import connections as connections_module
from shm_model.host.connections import SMALL_FRAME_BYTES, Connection, Connections, FrameBudget
from shm_model.protocol import MAGIC, PREFIX, Frame, pack

DEADLINE = 5.0


class Server:
    def __init__(self, path: str, **overrides: Any) -> None:
        self.path = path
        self.frames: list[tuple[Connection, Frame]] = []
        self.closed: list[Connection] = []
        self.counters: collections.Counter[str] = collections.Counter()
        settings: dict[str, Any] = {
            "allowed_uids": (),
            "max_connections": 4,
            "max_frame_bytes": 1 << 20,
            "frame_timeout": 5.0,
            "buffered_bytes": 1 << 20,
        }
        settings.update(overrides)
        self.on_frame: Callable[[Connection, Frame], None] = lambda conn, frame: self.frames.append((conn, frame))
        self.conns = Connections(
            on_frame=lambda c, f: self.on_frame(c, f),
            on_closed=self.closed.append,
            counters=self.counters,
            **settings,
        )

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_unix_server(self.conns.handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.conns.drain_and_close(0.5)
        await self.server.wait_closed()

    async def client(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.path)


async def reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    prefix = await asyncio.wait_for(reader.readexactly(PREFIX.size), DEADLINE)
    _, header_len, payload_len = PREFIX.unpack(prefix)
    header = json.loads(await reader.readexactly(header_len))
    await reader.readexactly(payload_len)
    return header


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), DEADLINE * 2))


@pytest.fixture
def sock_path(run_dir: Path) -> str:
    return str(run_dir / "h.sock")


def test_frames_reach_the_handler_and_closing_is_reported(sock_path: str) -> None:
    async def test() -> None:
        async with Server(sock_path) as s:
            reader, writer = await s.client()
            writer.write(pack({"id": 1}, b"pay") + pack({"id": 2}))
            await until(lambda: len(s.frames) == 2, "two frames")
            assert [f.header for _, f in s.frames] == [{"id": 1}, {"id": 2}]
            assert s.frames[0][1].payload == b"pay"
            conn = s.frames[0][0]
            assert conn.uid == __import__("os").getuid() and conn.pid == __import__("os").getpid()
            assert s.conns.open == {conn}
            conn.send(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.close()
            await until(lambda: s.closed == [conn], "the close")
            assert s.conns.open == set() and conn.closed

    run(test)


def test_one_connection_over_the_limit_is_told_and_closed(sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        async with Server(sock_path, max_connections=1) as s:
            _, w1 = await s.client()
            w1.write(pack({"id": 1}))
            await until(lambda: len(s.frames) == 1, "the first client")
            r2, _w2 = await s.client()  # kept: a dropped writer closes its connection
            header = await reply(r2)
            assert header["id"] is None and header["ok"] is False
            assert header["error"] == {
                "code": "overloaded",
                "message": "the host has 1 connections open (limit 1, SHM_MODEL_MAX_CONNECTIONS); retry later",
                "details": {"limit": 1},
            }
            assert await asyncio.wait_for(r2.read(), DEADLINE) == b""
            assert s.counters["errors_overloaded"] == 1
            assert len(s.conns.open) == 1
            r3, _w3 = await s.client()
            assert (await reply(r3))["error"]["code"] == "overloaded"
            assert s.counters["errors_overloaded"] == 2
            assert f"refused a connection from uid {os.getuid()} (pid {os.getpid()}): 1 open" in caplog.messages

    run(test)


def test_a_peer_of_another_uid_is_refused_unless_allowed(
    sock_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    me = os.getuid()
    monkeypatch.setattr(connections_module.os, "getuid", lambda: me + 1)

    async def test() -> None:
        async with Server(sock_path) as s:
            reader, _writer = await s.client()
            header = await reply(reader)
            assert header["error"]["code"] == "permission_denied"
            assert header["error"]["message"] == f"uid {me} may not use this host"
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
            assert s.counters["refused"] == 1 and s.closed == []
            assert caplog.messages == [f"refused a connection from uid {me} (pid {os.getpid()})"]
            again, _again = await s.client()
            assert (await reply(again))["error"]["code"] == "permission_denied"
            assert s.counters["refused"] == 2
        async with Server(sock_path, allowed_uids=[me]) as s:
            _, writer = await s.client()
            writer.write(pack({"id": 1}))
            await until(lambda: len(s.frames) == 1, "an allowed peer's frame")

    run(test)


def test_a_broken_frame_is_answered_and_ends_the_connection(sock_path: str) -> None:
    async def test() -> None:
        async with Server(sock_path, max_frame_bytes=100) as s:
            for data, code in (
                (PREFIX.pack(b"XXXX", 2, 0) + b"{}", "protocol_error"),
                (PREFIX.pack(MAGIC, 200, 0), "payload_too_large"),
            ):
                reader, writer = await s.client()
                writer.write(data)
                header = await reply(reader)
                assert header["error"]["code"] == code
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
                assert s.counters[f"errors_{code}"] == 1
            reader, writer = await s.client()
            writer.write(PREFIX.pack(b"XXXX", 2, 0) + b"{}")
            assert (await reply(reader))["error"]["code"] == "protocol_error"
            assert s.counters["errors_protocol_error"] == 2
            assert s.frames == []

    run(test)


def test_a_bad_header_is_answered_and_the_connection_goes_on(sock_path: str) -> None:
    async def test() -> None:
        async with Server(sock_path) as s:
            reader, writer = await s.client()
            writer.write(PREFIX.pack(MAGIC, 5, 0) + b"nope!" + pack({"id": 3}))
            header = await reply(reader)
            assert header["error"]["code"] == "bad_request"
            await until(lambda: len(s.frames) == 1, "the next frame")
            assert s.frames[0][1].header == {"id": 3}
            assert s.counters["errors_bad_request"] == 1
            writer.write(PREFIX.pack(MAGIC, 5, 0) + b"nope?")
            assert (await reply(reader))["error"]["code"] == "bad_request"
            assert s.counters["errors_bad_request"] == 2

    run(test)


def test_a_frame_cut_short_ends_the_connection_quietly(sock_path: str) -> None:
    async def test() -> None:
        async with Server(sock_path) as s:
            for data in (MAGIC, pack({"id": 1}, b"abc")[:-1]):
                reader, writer = await s.client()
                writer.write(data)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
            assert s.frames == [] and sum(s.counters.values()) == 0
            await until(lambda: len(s.closed) == 2, "both closes")

    run(test)


def test_a_frame_not_finished_in_time_drops_the_client(sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    async def test() -> None:
        async with Server(sock_path, frame_timeout=0.1) as s:
            reader, writer = await s.client()
            writer.write(MAGIC[:1])
            header = await reply(reader)
            assert header["error"] == {
                "code": "timeout",
                "message": "the frame was not completed within 0.1s",
                "details": {},
            }
            assert s.counters["frame_timeouts"] == 1
            assert f"client (uid {os.getuid()}) did not finish a frame in 0.1s; disconnecting it" in caplog.messages
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
            _, idle = await s.client()  # idle between frames: no timeout
            await asyncio.sleep(0.3)
            idle.write(pack({"id": 1}))
            await until(lambda: len(s.frames) == 1, "the idle client's frame")

    run(test)


def test_large_frames_share_a_budget(sock_path: str) -> None:
    async def test() -> None:
        size = SMALL_FRAME_BYTES * 2
        async with Server(sock_path, buffered_bytes=size + 100) as s:
            _, w1 = await s.client()
            big = pack({"id": 1}, b"x" * (size - 100))
            w1.write(big[: PREFIX.size + 5])  # announced, not finished: holds its reservation
            await until(lambda: s.conns.budget.used == len(big), "the reservation")
            r2, w2 = await s.client()
            w2.write(big)
            header = await reply(r2)
            assert header["error"]["code"] == "overloaded"
            assert header["error"]["details"] == {"limit": size + 100}
            w1.write(big[PREFIX.size + 5 :])
            await until(lambda: len(s.frames) == 1, "the first large frame")
            assert s.conns.budget.used == 0
            _, w3 = await s.client()
            w3.write(pack({"id": 2}, b"y" * 1000))  # small frames need no reservation
            await until(lambda: len(s.frames) == 2, "a small frame")

    run(test)


def test_a_handler_that_fails_drops_the_connection_with_an_internal_error(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def test() -> None:
        async with Server(sock_path) as s:

            def fail(conn: Connection, frame: Frame) -> None:
                raise KeyError("x")

            s.on_frame = fail
            reader, writer = await s.client()
            writer.write(pack({"id": 1}))
            header = await reply(reader)
            assert header["error"]["code"] == "internal_error"
            assert header["error"]["message"] == "the host failed to handle this connection"
            await until(lambda: len(s.closed) == 1, "the close")
            (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
            assert record.getMessage() == f"handling a connection of uid {os.getuid()} failed; this is a bug"
            assert record.exc_info is not None and record.exc_info[0] is KeyError

    run(test)


def test_drain_and_close_ends_every_connection(sock_path: str) -> None:
    async def test() -> None:
        async with Server(sock_path) as s:
            readers, writers = [], []  # a writer that is dropped closes its connection
            for i in range(3):
                reader, writer = await s.client()
                writer.write(pack({"id": i}))
                readers.append(reader)
                writers.append(writer)
            await until(lambda: len(s.frames) == 3, "three clients")
            for conn, frame in s.frames:
                conn.send(b"bye%d" % frame.header["id"])
            await s.conns.drain_and_close(1.0)
            for i, reader in enumerate(readers):
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b"bye%d" % i
            assert all(conn.closed for conn, _ in s.frames)

    run(test)


def test_a_closed_connection_sends_nothing_and_closes_once() -> None:
    class Writer:
        def __init__(self) -> None:
            self.written: list[bytes] = []
            self.closes = 0

        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def close(self) -> None:
            self.closes += 1

        class transport:
            @staticmethod
            def get_write_buffer_size() -> int:
                return 0

    writer = Writer()
    conn = Connection(writer, 0)  # type: ignore[arg-type]
    conn.send(b"a")
    conn.close()
    conn.close()
    conn.send(b"b")
    assert writer.written == [b"a"] and writer.closes == 1


def test_a_client_that_stops_reading_is_disconnected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Writer:
        aborted = False
        closed = False
        size = connections_module.MAX_CONNECTION_BUFFER + 1

        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            raise AssertionError("nothing is written to a client that does not read")

        def close(self) -> None:
            self.closed = True

        @property
        def transport(self) -> Any:
            writer = self

            class Transport:
                def get_write_buffer_size(self) -> int:
                    return writer.size

                def abort(self) -> None:
                    writer.aborted = True

            return Transport()

    writer = Writer()
    conn = Connection(writer, 7)  # type: ignore[arg-type]
    conn.send(b"x")
    assert conn.closed and writer.closed
    assert caplog.messages == ["client (uid 7) stopped reading replies; disconnecting it"]
    full = Writer()
    full.size = connections_module.MAX_CONNECTION_BUFFER  # up to the limit, replies are still queued
    sent: list[bytes] = []
    full.write = sent.append  # type: ignore[method-assign]
    Connection(full, 0).send(b"y")  # type: ignore[arg-type]
    assert sent == [b"y"] and not full.closed
    quiet = Writer()
    quiet.size = 0
    quiet.write = lambda data: None  # type: ignore[method-assign]
    conn3 = Connection(quiet, 0)  # type: ignore[arg-type]
    conn3.drop(Overloaded("full"))
    assert quiet.closed and not quiet.aborted and conn3.closed  # nothing buffered: a plain close
    writer2 = Writer()
    writer2.size = 10
    writer2.write = lambda data: None  # type: ignore[method-assign]
    conn2 = Connection(writer2, 0)  # type: ignore[arg-type]
    conn2.drop(Overloaded("full"))
    assert writer2.aborted and conn2.closed  # replies still buffered: aborted, not waited for
    assert not writer2.closed


def test_the_frame_budget() -> None:
    budget = FrameBudget(SMALL_FRAME_BYTES * 3)
    assert budget.reserve(SMALL_FRAME_BYTES) == 0
    assert budget.used == 0
    assert budget.reserve(SMALL_FRAME_BYTES + 1) == SMALL_FRAME_BYTES + 1
    assert budget.reserve(SMALL_FRAME_BYTES * 2 - 1) == SMALL_FRAME_BYTES * 2 - 1
    assert budget.used == SMALL_FRAME_BYTES * 3
    with pytest.raises(Overloaded) as info:
        budget.reserve(SMALL_FRAME_BYTES + 1)
    assert str(info.value) == (
        f"the host is reading {SMALL_FRAME_BYTES * 3} bytes of other large requests "
        f"(limit {SMALL_FRAME_BYTES * 3}, SHM_MODEL_MAX_BUFFERED_BYTES); retry later"
    )
    assert info.value.details == {"limit": SMALL_FRAME_BYTES * 3}
    budget.release(SMALL_FRAME_BYTES + 1)
    assert budget.used == SMALL_FRAME_BYTES * 2 - 1


def test_drain_and_close_gives_up_on_a_client_that_does_not_read(sock_path: str) -> None:
    async def test() -> None:
        async with Server(sock_path) as s:
            _reader, writer = await s.client()  # kept, never read
            writer.write(pack({"id": 1}))
            await until(lambda: len(s.frames) == 1, "the client")
            conn = s.frames[0][0]
            conn.send(b"x" * (4 << 20))  # more than the socket buffers hold
            loop = asyncio.get_running_loop()
            start = loop.time()
            await asyncio.wait_for(s.conns.drain_and_close(0.1), DEADLINE)
            assert loop.time() - start < 2.0 and conn.closed

    run(test)
