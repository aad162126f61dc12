"""The wire format spoken on the host socket and on each worker channel.

A frame is a 12-byte prefix, a JSON header and an optional binary payload::

    magic b"SHM1" | header length (u32 LE) | payload length (u32 LE) | header | payload

The header is a UTF-8 JSON object. Requests carry ``id``, ``op`` and ``timeout_ms``
(the deadline, relative to arrival); replies carry the same ``id`` and ``ok``. Vectors
travel as the payload, raw little-endian float32 in row-major order, with their
``shape`` in the header; a worker adds the token count of each text (``tokens``, a list),
the host the tokens the model read for the whole request (``tokens``, an integer). An
encode request may carry ``truncate: false``: an input longer than the model's
``max_seq_length`` tokens is then refused (``PayloadTooLarge``) instead of cut.
Nothing is ever pickled. Both lengths are checked against a bound before anything is read.

This module imports nothing else of the project but ``errors``.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from shm_model.errors import BadRequest, PayloadTooLarge, ProtocolError, ShmModelError

MAGIC = b"SHM1"
PREFIX = struct.Struct("<4sII")
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
VECTOR_DTYPE = np.dtype("<f4")
MAX_ID_LENGTH = 128
#: Integer ids are echoed in replies; they must fit a signed 64-bit integer.
MAX_INT_ID = 2**63 - 1
#: Texts in one encode request; clients split longer inputs (the Python client sends 1,024).
MAX_TEXTS_PER_REQUEST = 16384

#: Priority classes of encode requests, most urgent first (``priority`` in the header).
PRIORITIES = ("interactive", "bulk")
#: Without a ``priority``, a request of at most this many texts is interactive, a larger one bulk.
INTERACTIVE_MAX_TEXTS = 16

#: Operations a client may ask of the host.
OPS = ("encode", "info", "status", "ping", "reload", "stop")


class ConnectionClosed(EOFError):
    """The peer closed the connection; ``at_boundary`` when no byte of a frame had arrived."""

    def __init__(self, message: str, *, at_boundary: bool = False) -> None:
        super().__init__(message)
        self.at_boundary = at_boundary


@dataclass(frozen=True, slots=True)
class Frame:
    header: dict[str, Any]
    payload: bytes = b""


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return PREFIX.pack(MAGIC, len(raw), len(payload)) + raw + payload


def unpack_prefix(prefix: bytes, max_frame_bytes: int) -> tuple[int, int]:
    """Validate a frame prefix and return (header length, payload length)."""
    magic, header_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}, expected {MAGIC!r}")
    if header_len == 0:
        raise ProtocolError("frame has an empty header")
    size = PREFIX.size + header_len + payload_len
    if size > max_frame_bytes:
        raise PayloadTooLarge(
            f"frame of {size} bytes exceeds the limit of {max_frame_bytes} bytes",
            size=size,
            limit=max_frame_bytes,
        )
    return header_len, payload_len


def decode_header(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"frame header is not valid UTF-8 (byte {exc.start})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError also covers Python's int digit limit
        raise BadRequest(f"frame header is not valid JSON: {exc!s:.200}") from None
    if not isinstance(header, dict):
        raise BadRequest(f"frame header must be a JSON object, not {type(header).__name__}")
    return header


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionClosed(f"connection closed after {got} of {n} bytes", at_boundary=got == 0)
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, max_frame_bytes: int) -> Frame:
    """Read one frame from a blocking socket (honours the socket's timeout)."""
    header_len, payload_len = unpack_prefix(_recv_exactly(sock, PREFIX.size), max_frame_bytes)
    try:
        header = decode_header(_recv_exactly(sock, header_len))
        payload = _recv_exactly(sock, payload_len) if payload_len else b""
    except ConnectionClosed as exc:
        raise ConnectionClosed(f"connection closed inside a frame ({exc})") from None
    return Frame(header, payload)


async def read_prefix(reader: asyncio.StreamReader, max_frame_bytes: int) -> tuple[int, int]:
    """Read and validate a frame prefix from an asyncio stream: (header length, payload length)."""
    try:
        prefix = await reader.readexactly(PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        raise ConnectionClosed(
            f"connection closed after {len(exc.partial)} prefix bytes", at_boundary=not exc.partial
        ) from None
    return unpack_prefix(prefix, max_frame_bytes)


async def read_body(reader: asyncio.StreamReader, header_len: int, payload_len: int) -> Frame:
    """Read the header and payload announced by a validated prefix."""
    try:
        raw = await reader.readexactly(header_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError:
        raise ConnectionClosed("connection closed inside a frame") from None
    return Frame(decode_header(raw), payload)


async def read_frame(reader: asyncio.StreamReader, max_frame_bytes: int) -> Frame:
    """Read one frame from an asyncio stream.

    A header that is not JSON raises ``BadRequest`` after the whole frame was consumed,
    so the connection stays usable; framing errors raise ``ProtocolError`` or
    ``PayloadTooLarge`` and leave the stream at an unknown position.
    """
    header_len, payload_len = await read_prefix(reader, max_frame_bytes)
    return await read_body(reader, header_len, payload_len)


# --- replies -------------------------------------------------------------------------


def error_reply(request_id: Any, error: ShmModelError) -> bytes:
    return pack({"id": request_id, "ok": False, "error": error.to_dict()})


def result_reply(request_id: Any, result: dict[str, Any]) -> bytes:
    return pack({"id": request_id, "ok": True, "result": result})


def vectors_reply(request_id: Any, vectors: np.ndarray, **extra: Any) -> bytes:
    array = np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE)
    if array.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got shape {array.shape}; this is a bug")
    header = {"id": request_id, "ok": True, "shape": list(array.shape), **extra}
    return pack(header, array.tobytes())


def vectors_from_frame(frame: Frame) -> np.ndarray:
    """Decode the float32 matrix of a vectors reply, checking its shape against its size."""
    shape = frame.header.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(f"vectors reply has an invalid shape {shape!r}")
    rows, dim = shape
    if rows * dim * VECTOR_DTYPE.itemsize != len(frame.payload):
        raise ProtocolError(f"vectors reply of shape {shape} needs {rows * dim * 4} bytes, got {len(frame.payload)}")
    return np.frombuffer(frame.payload, dtype=VECTOR_DTYPE).reshape(rows, dim)


def raise_for_reply(frame: Frame) -> Frame:
    """Return the frame if it reports success, else raise the typed error it carries."""
    ok = frame.header.get("ok")
    if ok is True:
        return frame
    if ok is False:
        raise ShmModelError.from_dict(frame.header.get("error"))
    raise ProtocolError(f"reply without a boolean 'ok': {frame.header!r:.200}")


# --- request validation (shared by the client, the host and the workers) -------------


def validate_texts(value: object, limit: int | None = MAX_TEXTS_PER_REQUEST) -> list[str]:
    """Check that ``value`` is a list of at most ``limit`` UTF-8-encodable strings, naming the first bad item."""
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise BadRequest(f"'texts' must be a list of strings, not {type(value).__name__}")
    if limit is not None and len(value) > limit:
        raise BadRequest(f"a request may carry at most {limit} texts, got {len(value)}; split the input", limit=limit)
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRequest(
                f"item {index} must be a string, not {type(item).__name__}",
                index=index,
            )
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(
                f"item {index} is not valid UTF-8 (lone surrogate at character {exc.start})",
                index=index,
            ) from None
    return list(value)


def _valid_id(rid: object) -> bool:
    if isinstance(rid, bool):
        return False
    if isinstance(rid, int):
        return -MAX_INT_ID <= rid <= MAX_INT_ID
    return isinstance(rid, str) and len(rid) <= MAX_ID_LENGTH


def request_id(header: dict[str, Any]) -> Any:
    rid = header.get("id")
    if rid is None or isinstance(rid, bool):
        raise BadRequest("request header needs an 'id' (integer or string)")
    if _valid_id(rid):
        return rid
    raise BadRequest(
        f"request 'id' must be an integer of magnitude at most 2**63 - 1 or a string of at most "
        f"{MAX_ID_LENGTH} characters"
    )


def reply_id(header: dict[str, Any]) -> Any:
    """The id to answer a request with: its own when valid, else None (a connection-level reply)."""
    rid = header.get("id")
    return rid if _valid_id(rid) else None


def request_op(header: dict[str, Any]) -> str:
    op = header.get("op")
    if op not in OPS:
        raise BadRequest(f"unknown op {op!r}; expected one of {', '.join(OPS)}", op=str(op)[:64])
    return op


def request_timeout(header: dict[str, Any]) -> float | None:
    """The request's timeout in seconds, or None when the client left it to the host."""
    value = header.get("timeout_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise BadRequest(f"'timeout_ms' must be a positive number, got {value!r:.64}")
    return float(value) / 1000.0


def default_priority(count: int) -> str:
    """The class of a request that names none: a few texts are a query, many are bulk work."""
    return "interactive" if count <= INTERACTIVE_MAX_TEXTS else "bulk"


def request_priority(header: dict[str, Any], count: int) -> str:
    """The request's priority class; by its size when it names none."""
    value = header.get("priority")
    if value is None:
        return default_priority(count)
    if value not in PRIORITIES:
        raise BadRequest(f"'priority' must be one of {', '.join(PRIORITIES)}, not {str(value)[:64]!r}")
    return value


def optional_bool(header: dict[str, Any], key: str, default: bool) -> bool:
    value = header.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise BadRequest(f"'{key}' must be true, false or null, not {type(value).__name__}")


def token_counts(header: dict[str, Any], count: int) -> list[int]:
    """The ``tokens`` of a worker's vectors reply: one non-negative integer per text."""
    value = header.get("tokens")
    if (
        not isinstance(value, list)
        or len(value) != count
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)
    ):
        raise ProtocolError(f"vectors reply needs 'tokens', one count per text ({count}), got {value!r:.100}")
    return value


def too_long(index: int, tokens: int, limit: int) -> PayloadTooLarge:
    """The error of an input over the model's length when truncation was refused."""
    return PayloadTooLarge(
        f"item {index} has {tokens} tokens; the model takes at most {limit} (truncation was refused)",
        index=index,
        tokens=tokens,
        limit=limit,
    )


def optional_str(header: dict[str, Any], key: str) -> str | None:
    value = header.get(key)
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"'{key}' must be a string or null, not {type(value).__name__}")
