"""The wire format and the typed errors, without a host."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

import shm_model
from shm_model import errors
from shm_model.errors import BadRequest, PayloadTooLarge, ProtocolError, ShmModelError
from shm_model.protocol import (
    MAGIC,
    PREFIX,
    ConnectionClosed,
    Frame,
    decode_header,
    pack,
    raise_for_reply,
    recv_frame,
    request_id,
    request_op,
    request_timeout,
    unpack_prefix,
    validate_texts,
    vectors_from_frame,
    vectors_reply,
)


def roundtrip(data: bytes, limit: int = 1 << 20) -> Frame:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        return recv_frame(b, limit)


def test_frame_roundtrip_keeps_header_and_payload() -> None:
    frame = roundtrip(pack({"id": 7, "op": "encode", "texts": ["안녕", "x"]}, b"\x00\x01"))
    assert frame.header == {"id": 7, "op": "encode", "texts": ["안녕", "x"]}
    assert frame.payload == b"\x00\x01"


def test_bad_magic_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        unpack_prefix(PREFIX.pack(b"HTTP", 2, 0), 1 << 20)


def test_lengths_are_bounded_before_reading() -> None:
    with pytest.raises(PayloadTooLarge, match="exceeds the limit of 4096"):
        unpack_prefix(PREFIX.pack(MAGIC, 4000, 2**32 - 1), 4096)
    with pytest.raises(ProtocolError, match="empty header"):
        unpack_prefix(PREFIX.pack(MAGIC, 0, 0), 4096)


def test_truncated_frame_is_connection_closed() -> None:
    data = pack({"id": 1, "op": "ping"})
    with pytest.raises(ConnectionClosed) as info:
        roundtrip(data[:-3])
    assert not info.value.at_boundary
    with pytest.raises(ConnectionClosed) as info:
        roundtrip(b"")
    assert info.value.at_boundary


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"\xff\xfe", "not valid UTF-8"), (b"{nope", "not valid JSON"), (b"[1, 2]", "must be a JSON object")],
)
def test_bad_headers_are_bad_requests(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_header(raw)


def test_validate_texts_names_the_bad_item() -> None:
    assert validate_texts(["a", ""]) == ["a", ""]
    with pytest.raises(BadRequest, match="item 2 must be a string, not int"):
        validate_texts(["a", "b", 3])
    with pytest.raises(BadRequest, match="item 1 is not valid UTF-8"):
        validate_texts(["a", "\ud800"])
    with pytest.raises(BadRequest, match="must be a list of strings, not str"):
        validate_texts("abc")
    with pytest.raises(BadRequest, match="at most 16384 texts, got 16385"):
        validate_texts([""] * 16385)
    assert len(validate_texts([""] * 16385, limit=None)) == 16385


def test_request_fields_are_validated() -> None:
    assert request_id({"id": "abc"}) == "abc"
    for bad in ({}, {"id": True}, {"id": 1.5}, {"id": "x" * 500}):
        with pytest.raises(BadRequest):
            request_id(bad)
    with pytest.raises(BadRequest, match="unknown op 'explode'"):
        request_op({"op": "explode"})
    assert request_timeout({"timeout_ms": 250}) == 0.25
    assert request_timeout({}) is None
    for bad in (0, -1, "1", float("nan"), True):
        with pytest.raises(BadRequest, match="timeout_ms"):
            request_timeout({"timeout_ms": bad})


def test_vectors_survive_the_wire_bit_for_bit() -> None:
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    frame = roundtrip(vectors_reply(9, vectors))
    out = vectors_from_frame(raise_for_reply(frame))
    assert out.dtype == np.float32 and out.shape == (3, 5)
    assert np.array_equal(out, vectors)


def test_vector_payload_must_match_its_shape() -> None:
    with pytest.raises(ProtocolError, match="needs 24 bytes"):
        vectors_from_frame(Frame({"ok": True, "shape": [2, 3]}, b"\x00" * 20))
    with pytest.raises(ProtocolError, match="invalid shape"):
        vectors_from_frame(Frame({"ok": True, "shape": [-1, 3]}, b""))


@pytest.mark.parametrize("cls", [getattr(errors, name) for name in errors.__all__])
def test_every_error_survives_the_socket_with_its_type(cls: type[ShmModelError]) -> None:
    error = cls("something went wrong", index=3)
    frame = roundtrip(pack({"id": 1, "ok": False, "error": error.to_dict()}))
    with pytest.raises(cls) as info:
        raise_for_reply(frame)
    assert type(info.value) is cls
    assert info.value.message == "something went wrong"
    assert info.value.details == {"index": 3}


def test_unknown_or_malformed_errors_become_protocol_errors() -> None:
    assert isinstance(ShmModelError.from_dict({"code": "nope", "message": "x"}), ProtocolError)
    assert isinstance(ShmModelError.from_dict("oops"), ProtocolError)
    with pytest.raises(ProtocolError, match="without a boolean 'ok'"):
        raise_for_reply(Frame({"id": 1}))


def test_public_names_stay_what_they_are() -> None:
    assert set(shm_model.__all__) == {
        "BadRequest",
        "ConfigError",
        "HostClient",
        "HostUnavailable",
        "InternalError",
        "ManagedModel",
        "ManagerConfig",
        "ModelConfig",
        "ModelLoadError",
        "ModelManager",
        "ModelNotFound",
        "ModelStatus",
        "Overloaded",
        "PayloadTooLarge",
        "PermissionDenied",
        "ProtocolError",
        "RequestTimeout",
        "ShmModelError",
        "WorkerCrashed",
        "get_model_with_fallback",
        "wait_for_host",
    }
    for name in shm_model.__all__:
        assert getattr(shm_model, name) is not None


def test_prefix_is_little_endian() -> None:
    assert pack({"a": 1})[:12] == MAGIC + struct.pack("<II", 7, 0)
