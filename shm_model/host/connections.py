"""Client connections and their admission: who may connect, how many at once, and how much
of their frames the host holds in memory.

* A peer's uid (``SO_PEERCRED``) must be the host's own or in ``SHM_MODEL_ALLOWED_UIDS``.
* At most ``SHM_MODEL_MAX_CONNECTIONS`` are open; one more is told ``Overloaded`` and closed.
* Once a frame's first byte arrives, the whole frame must arrive within
  ``SHM_MODEL_FRAME_TIMEOUT``; a frame over ``SMALL_FRAME_BYTES`` reserves its announced size
  in a ``FrameBudget`` shared by all connections before its body is read.
* A client that stops reading its replies is disconnected once ``MAX_CONNECTION_BUFFER``
  bytes wait for it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from shm_model.errors import (
    BadRequest,
    InternalError,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RequestTimeout,
    ShmModelError,
)
from shm_model.protocol import PREFIX, ConnectionClosed, Frame, error_reply, read_body, unpack_prefix

log = logging.getLogger(__name__)

MAX_CONNECTION_BUFFER = 64 * 1024 * 1024  # a client that stops reading is disconnected
SMALL_FRAME_BYTES = 1 << 16  # request frames up to this size are read without a FrameBudget reservation
#: Replies buffered for one client before the host waits for it to read them.
DRAIN_ABOVE = 1 << 20
PEERCRED = struct.Struct("3i")


@dataclass(eq=False)
class Connection:
    writer: asyncio.StreamWriter
    uid: int
    pid: int = 0
    closed: bool = False
    requests: set[Any] = field(default_factory=set)  # admitted and not yet answered

    def send(self, data: bytes) -> None:
        if self.closed or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_CONNECTION_BUFFER:
            log.warning("client (uid %d) stopped reading replies; disconnecting it", self.uid)
            self.close()
            return
        self.writer.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    def drop(self, error: ShmModelError) -> None:
        """Send a connection-level error and close, without waiting for a client that does not read."""
        self.send(error_reply(None, error))
        if not self.closed and self.writer.transport.get_write_buffer_size():
            self.closed = True
            self.writer.transport.abort()
        self.close()


class FrameBudget:
    """Bytes of large request frames being read at once, across all connections.

    A frame's prefix announces its size; a frame over SMALL_FRAME_BYTES reserves that size
    before its body is read, and a frame that does not fit is refused with ``Overloaded``.
    So clients that announce large frames and send them slowly, or never finish them, cannot
    make the host buffer more than ``limit`` bytes (plus SMALL_FRAME_BYTES per connection).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> int:
        """Reserve room for a frame of ``size`` bytes; returns the bytes to ``release`` after it."""
        if size <= SMALL_FRAME_BYTES:
            return 0
        if self.used + size > self.limit:
            raise Overloaded(
                f"the host is reading {self.used} bytes of other large requests (limit "
                f"{self.limit}, SHM_MODEL_MAX_BUFFERED_BYTES); retry later",
                limit=self.limit,
            )
        self.used += size
        return size

    def release(self, reserved: int) -> None:
        self.used -= reserved


class Connections:
    """Accepts clients, reads their frames and hands each to ``on_frame``; ``on_closed`` runs
    when a client goes away (its queued work is then dropped)."""

    def __init__(
        self,
        *,
        on_frame: Callable[[Connection, Frame], None],
        on_closed: Callable[[Connection], None],
        allowed_uids: Collection[int],
        max_connections: int,
        max_frame_bytes: int,
        frame_timeout: float,
        buffered_bytes: int,
        counters: collections.Counter[str],
    ) -> None:
        self.on_frame = on_frame
        self.on_closed = on_closed
        self.allowed_uids = allowed_uids
        self.max_connections = max_connections
        self.max_frame_bytes = max_frame_bytes
        self.frame_timeout = frame_timeout
        self.budget = FrameBudget(buffered_bytes)
        self.counters = counters
        self.open: set[Connection] = set()

    def admit(self, writer: asyncio.StreamWriter) -> Connection | None:
        """The connection if its peer may use the host and there is room for it; else None
        (the peer was told why)."""
        sock = writer.get_extra_info("socket")
        peer_pid, uid, _ = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
        conn = Connection(writer, uid, peer_pid)
        if uid != os.getuid() and uid not in self.allowed_uids:
            log.warning("refused a connection from uid %d (pid %d)", uid, peer_pid)
            self.counters["refused"] += 1
            conn.send(error_reply(None, PermissionDenied(f"uid {uid} may not use this host")))
            conn.close()
            return None
        if len(self.open) >= self.max_connections:
            log.warning("refused a connection from uid %d (pid %d): %d open", uid, peer_pid, len(self.open))
            self.counters["errors_overloaded"] += 1
            conn.drop(
                Overloaded(
                    f"the host has {len(self.open)} connections open (limit {self.max_connections}, "
                    "SHM_MODEL_MAX_CONNECTIONS); retry later",
                    limit=self.max_connections,
                )
            )
            return None
        self.open.add(conn)
        return conn

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client until it closes, breaks the protocol or is dropped."""
        conn = self.admit(writer)
        if conn is None:
            return
        try:
            while not conn.closed:
                frame = await self._next_frame(conn, reader)
                if frame is None:
                    break
                if isinstance(frame, Frame):
                    self.on_frame(conn, frame)
                if conn.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                    await conn.writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("handling a connection of uid %d failed; this is a bug", conn.uid)
            conn.drop(InternalError("the host failed to handle this connection"))
        finally:
            conn.close()
            self.open.discard(conn)
            self.on_closed(conn)

    async def _next_frame(self, conn: Connection, reader: asyncio.StreamReader) -> Frame | bool | None:
        """The next frame; False when a bad frame was answered and skipped; None at the end."""
        # Idle between frames costs one connection slot; once a frame starts, it must be
        # complete within SHM_MODEL_FRAME_TIMEOUT, and a large one must fit the FrameBudget.
        first = await reader.read(1)
        if not first:
            return None
        timer = asyncio.get_running_loop().call_later(self.frame_timeout, self._frame_expired, conn)
        reserved = 0
        try:
            prefix = first + await reader.readexactly(PREFIX.size - 1)
            header_len, payload_len = unpack_prefix(prefix, self.max_frame_bytes)
            reserved = self.budget.reserve(PREFIX.size + header_len + payload_len)
            return await read_body(reader, header_len, payload_len)
        except (ConnectionClosed, asyncio.IncompleteReadError):
            return None
        except (ProtocolError, PayloadTooLarge, Overloaded) as exc:  # the stream is out of step
            self.counters[f"errors_{exc.code}"] += 1
            conn.send(error_reply(None, exc))
            return None
        except BadRequest as exc:  # frame consumed, connection still in step
            self.counters[f"errors_{exc.code}"] += 1
            conn.send(error_reply(None, exc))
            return False
        finally:
            timer.cancel()
            self.budget.release(reserved)

    def _frame_expired(self, conn: Connection) -> None:
        log.warning("client (uid %d) did not finish a frame in %gs; disconnecting it", conn.uid, self.frame_timeout)
        self.counters["frame_timeouts"] += 1
        conn.drop(RequestTimeout(f"the frame was not completed within {self.frame_timeout:g}s"))

    async def drain_and_close(self, timeout: float = 1.0) -> None:
        for conn in list(self.open):
            try:
                await asyncio.wait_for(conn.writer.drain(), timeout)
            except Exception:  # noqa: BLE001 - a client that went away or does not read
                pass
            conn.close()
