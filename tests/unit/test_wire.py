"""The wire format and the typed errors, every branch in process: exact bytes, exact messages."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import numpy as np
import pytest

from shm_model import errors
from shm_model.errors import BadRequest, PayloadTooLarge, ProtocolError, ShmModelError
from shm_model.protocol import (
    INTERACTIVE_MAX_TEXTS,
    MAGIC,
    MAX_ID_LENGTH,
    MAX_INT_ID,
    PREFIX,
    ConnectionClosed,
    Frame,
    decode_header,
    default_priority,
    error_reply,
    optional_bool,
    optional_str,
    pack,
    raise_for_reply,
    read_frame,
    recv_frame,
    reply_id,
    request_id,
    request_op,
    request_priority,
    request_timeout,
    result_reply,
    token_counts,
    too_long,
    unpack_prefix,
    validate_texts,
    vectors_from_frame,
    vectors_reply,
)


def frame_of(data: bytes) -> Frame:
    prefix = PREFIX.unpack(data[: PREFIX.size])
    header = data[PREFIX.size : PREFIX.size + prefix[1]]
    return Frame(json.loads(header), data[PREFIX.size + prefix[1] :])


def roundtrip(data: bytes, limit: int = 1 << 20) -> Frame:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        return recv_frame(b, limit)


def read_async(data: bytes, limit: int = 1 << 20) -> Frame:
    async def run() -> Frame:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader, limit)

    return asyncio.run(run())


# --- framing ---------------------------------------------------------------------------


def test_pack_writes_the_exact_bytes_compact_and_utf8() -> None:
    data = pack({"id": 1, "t": "가"}, b"xyz")
    raw = '{"id":1,"t":"가"}'.encode()
    assert data == MAGIC + struct.pack("<II", len(raw), 3) + raw + b"xyz"
    assert pack({"a": 1}) == MAGIC + struct.pack("<II", 7, 0) + b'{"a":1}'


def test_unpack_prefix_bounds_the_whole_frame_inclusively() -> None:
    assert unpack_prefix(PREFIX.pack(MAGIC, 10, 20), 42) == (10, 20)  # 12 + 10 + 20 == 42: fits
    with pytest.raises(PayloadTooLarge) as info:
        unpack_prefix(PREFIX.pack(MAGIC, 10, 21), 42)
    assert str(info.value) == "frame of 43 bytes exceeds the limit of 42 bytes"
    assert info.value.details == {"size": 43, "limit": 42}
    with pytest.raises(ProtocolError) as bad:
        unpack_prefix(PREFIX.pack(b"SHM2", 1, 0), 42)
    assert str(bad.value) == "bad frame magic b'SHM2', expected b'SHM1'"
    with pytest.raises(ProtocolError) as empty:
        unpack_prefix(PREFIX.pack(MAGIC, 0, 0), 42)
    assert str(empty.value) == "frame has an empty header"
    assert unpack_prefix(PREFIX.pack(MAGIC, 1, 0), 13) == (1, 0)


def test_decode_header_names_each_failure() -> None:
    assert decode_header('{"a":"가"}'.encode()) == {"a": "가"}
    with pytest.raises(BadRequest) as utf:
        decode_header(b'{"a":"\xff"}')
    assert str(utf.value) == "frame header is not valid UTF-8 (byte 6)"
    with pytest.raises(BadRequest) as js:
        decode_header(b"{nope")
    assert str(js.value).startswith("frame header is not valid JSON: Expecting property name")
    with pytest.raises(BadRequest) as deep:
        decode_header(b"[" * 100_000)
    assert str(deep.value).startswith("frame header is not valid JSON: ")
    with pytest.raises(BadRequest) as arr:
        decode_header(b"[1]")
    assert str(arr.value) == "frame header must be a JSON object, not list"


def test_recv_frame_reads_header_and_payload_and_reports_where_it_was_cut() -> None:
    assert roundtrip(pack({"id": 1}, b"\x00" * 5)) == Frame({"id": 1}, b"\x00" * 5)
    assert roundtrip(pack({"id": 2})) == Frame({"id": 2}, b"")
    with pytest.raises(ConnectionClosed) as none:
        roundtrip(b"")
    assert none.value.at_boundary is True
    assert str(none.value) == "connection closed after 0 of 12 bytes"
    with pytest.raises(ConnectionClosed) as part:
        roundtrip(MAGIC + b"\x01")
    assert part.value.at_boundary is False
    assert str(part.value) == "connection closed after 5 of 12 bytes"
    with pytest.raises(ConnectionClosed) as inside:
        roundtrip(pack({"id": 1}, b"abc")[:-1])
    assert inside.value.at_boundary is False
    assert str(inside.value) == "connection closed inside a frame (connection closed after 2 of 3 bytes)"


def test_recv_frame_reads_a_frame_that_arrives_in_pieces() -> None:
    data = pack({"id": 7}, b"p" * 100_000)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(True)
        import threading

        sender = threading.Thread(target=lambda: [a.sendall(data[i : i + 1000]) for i in range(0, len(data), 1000)])
        sender.start()
        frame = recv_frame(b, 1 << 20)
        sender.join()
    assert frame == Frame({"id": 7}, b"p" * 100_000)


def test_async_reader_matches_the_blocking_one() -> None:
    assert read_async(pack({"id": 1}, b"ab")) == Frame({"id": 1}, b"ab")
    assert read_async(pack({"id": 1})) == Frame({"id": 1}, b"")
    with pytest.raises(ConnectionClosed) as empty:
        read_async(b"")
    assert empty.value.at_boundary is True
    assert str(empty.value) == "connection closed after 0 prefix bytes"
    with pytest.raises(ConnectionClosed) as part:
        read_async(MAGIC)
    assert part.value.at_boundary is False
    assert str(part.value) == "connection closed after 4 prefix bytes"
    with pytest.raises(ConnectionClosed) as inside:
        read_async(pack({"id": 1}, b"abc")[:-1])
    assert str(inside.value) == "connection closed inside a frame"
    assert inside.value.at_boundary is False
    with pytest.raises(PayloadTooLarge):
        read_async(pack({"id": 1}, b"x" * 100), limit=50)


def test_connection_closed_defaults_to_inside_a_frame() -> None:
    assert ConnectionClosed("x").at_boundary is False
    assert str(ConnectionClosed("x")) == "x"


# --- replies ---------------------------------------------------------------------------


def test_replies_carry_id_ok_and_their_content() -> None:
    assert frame_of(error_reply(3, BadRequest("no", index=1))).header == {
        "id": 3,
        "ok": False,
        "error": {"code": "bad_request", "message": "no", "details": {"index": 1}},
    }
    assert frame_of(result_reply("a", {"x": 1})).header == {"id": "a", "ok": True, "result": {"x": 1}}
    vectors = np.arange(6, dtype=np.float64).reshape(2, 3)
    frame = frame_of(vectors_reply(5, vectors, tokens=[1, 2]))
    assert frame.header == {"id": 5, "ok": True, "shape": [2, 3], "tokens": [1, 2]}
    assert frame.payload == vectors.astype("<f4").tobytes()
    decoded = vectors_from_frame(frame)
    assert decoded.dtype == np.dtype("<f4")
    assert decoded.tolist() == vectors.tolist()
    with pytest.raises(ValueError) as flat:
        vectors_reply(1, np.zeros(3))
    assert str(flat.value) == "vectors must be 2-D, got shape (3,); this is a bug"


@pytest.mark.parametrize("shape", [None, [1], [1, 2, 3], [1, -1], [True, 1], [1, 1.0], "1,1", (1, 1)])
def test_vectors_from_frame_refuses_a_bad_shape(shape: object) -> None:
    with pytest.raises(ProtocolError) as info:
        vectors_from_frame(Frame({"shape": shape}, b"\x00" * 4))
    assert str(info.value) == f"vectors reply has an invalid shape {shape!r}"


def test_vectors_from_frame_checks_the_size_and_takes_zero_rows() -> None:
    with pytest.raises(ProtocolError) as info:
        vectors_from_frame(Frame({"shape": [2, 3]}, b"\x00" * 20))
    assert str(info.value) == "vectors reply of shape [2, 3] needs 24 bytes, got 20"
    assert vectors_from_frame(Frame({"shape": [0, 3]}, b"")).shape == (0, 3)
    assert vectors_from_frame(Frame({"shape": [1, 0]}, b"")).shape == (1, 0)


def test_raise_for_reply_rebuilds_the_typed_error() -> None:
    ok = Frame({"ok": True})
    assert raise_for_reply(ok) is ok
    with pytest.raises(errors.Overloaded) as info:
        raise_for_reply(frame_of(error_reply(1, errors.Overloaded("busy", queued=3))))
    assert info.value.details == {"queued": 3}
    for header in ({"ok": 1}, {}, {"ok": "true"}):
        with pytest.raises(ProtocolError) as bad:
            raise_for_reply(Frame(header))
        assert str(bad.value) == f"reply without a boolean 'ok': {header!r}"


# --- request fields --------------------------------------------------------------------


def test_validate_texts_names_the_first_bad_item() -> None:
    assert validate_texts(("a", "b")) == ["a", "b"]
    assert isinstance(validate_texts(("a",)), list)
    assert validate_texts(["a"] * 3, limit=3) == ["a"] * 3
    assert validate_texts(["a"] * 5, limit=None) == ["a"] * 5
    for value, kind in (("abc", "str"), (None, "NoneType"), ({"a": 1}, "dict")):
        with pytest.raises(BadRequest) as info:
            validate_texts(value)
        assert str(info.value) == f"'texts' must be a list of strings, not {kind}"
    with pytest.raises(BadRequest) as many:
        validate_texts(["a"] * 4, limit=3)
    assert str(many.value) == "a request may carry at most 3 texts, got 4; split the input"
    assert many.value.details == {"limit": 3}
    with pytest.raises(BadRequest) as item:
        validate_texts(["a", 1])
    assert str(item.value) == "item 1 must be a string, not int"
    assert item.value.details == {"index": 1}
    with pytest.raises(BadRequest) as surrogate:
        validate_texts(["a", "b", "x\ud800"])
    assert str(surrogate.value) == "item 2 is not valid UTF-8 (lone surrogate at character 1)"
    assert surrogate.value.details == {"index": 2}


def test_request_ids_are_bounded_integers_or_short_strings() -> None:
    assert request_id({"id": MAX_INT_ID}) == MAX_INT_ID
    assert request_id({"id": -MAX_INT_ID}) == -MAX_INT_ID
    assert request_id({"id": "x" * MAX_ID_LENGTH}) == "x" * MAX_ID_LENGTH
    assert request_id({"id": 0}) == 0
    for missing in ({}, {"id": None}, {"id": True}, {"id": False}):
        with pytest.raises(BadRequest) as info:
            request_id(missing)
        assert str(info.value) == "request header needs an 'id' (integer or string)"
    for bad in (MAX_INT_ID + 1, -MAX_INT_ID - 1, "x" * (MAX_ID_LENGTH + 1), 1.5, [1]):
        with pytest.raises(BadRequest) as info:
            request_id({"id": bad})
        assert str(info.value) == (
            "request 'id' must be an integer of magnitude at most 2**63 - 1 or a string of at most 128 characters"
        )
    assert reply_id({"id": 4}) == 4
    assert reply_id({"id": "a"}) == "a"
    assert reply_id({"id": True}) is None
    assert reply_id({"id": MAX_INT_ID + 1}) is None
    assert reply_id({}) is None


def test_request_op_timeout_priority_and_optional_fields() -> None:
    assert request_op({"op": "encode"}) == "encode"
    with pytest.raises(BadRequest) as op:
        request_op({"op": "x" * 100})
    assert str(op.value) == f"unknown op {'x' * 100!r}; expected one of encode, info, status, ping, reload, stop"
    assert op.value.details == {"op": "x" * 64}
    assert request_timeout({}) is None
    assert request_timeout({"timeout_ms": None}) is None
    assert request_timeout({"timeout_ms": 1500}) == 1.5
    assert request_timeout({"timeout_ms": 0.5}) == 0.0005
    for bad in (0, -1, True, "5", float("inf"), float("nan")):
        with pytest.raises(BadRequest) as info:
            request_timeout({"timeout_ms": bad})
        assert str(info.value) == f"'timeout_ms' must be a positive number, got {bad!r}"
    assert default_priority(INTERACTIVE_MAX_TEXTS) == "interactive"
    assert default_priority(INTERACTIVE_MAX_TEXTS + 1) == "bulk"
    assert request_priority({}, 1) == "interactive"
    assert request_priority({"priority": None}, 100) == "bulk"
    assert request_priority({"priority": "bulk"}, 1) == "bulk"
    with pytest.raises(BadRequest) as prio:
        request_priority({"priority": "y" * 100}, 1)
    assert str(prio.value) == f"'priority' must be one of interactive, bulk, not {'y' * 64!r}"
    assert optional_bool({}, "truncate", True) is True
    assert optional_bool({"truncate": None}, "truncate", False) is False
    assert optional_bool({"truncate": False}, "truncate", True) is False
    with pytest.raises(BadRequest) as flag:
        optional_bool({"truncate": 0}, "truncate", True)
    assert str(flag.value) == "'truncate' must be true, false or null, not int"
    assert optional_str({}, "prompt") is None
    assert optional_str({"prompt": "q: "}, "prompt") == "q: "
    with pytest.raises(BadRequest) as text:
        optional_str({"prompt": 1}, "prompt")
    assert str(text.value) == "'prompt' must be a string or null, not int"


def test_token_counts_one_non_negative_integer_per_text() -> None:
    assert token_counts({"tokens": [0, 3]}, 2) == [0, 3]
    for bad in (None, [1], [1, 2, 3], [1, -1], [1, True], [1, 1.0], (1, 2)):
        with pytest.raises(ProtocolError) as info:
            token_counts({"tokens": bad}, 2)
        assert str(info.value) == f"vectors reply needs 'tokens', one count per text (2), got {bad!r}"


def test_too_long_names_the_item_and_its_count() -> None:
    error = too_long(3, 700, 512)
    assert isinstance(error, PayloadTooLarge)
    assert str(error) == "item 3 has 700 tokens; the model takes at most 512 (truncation was refused)"
    assert error.details == {"index": 3, "tokens": 700, "limit": 512}


# --- errors ----------------------------------------------------------------------------


def test_every_error_survives_the_wire_with_its_class_and_details() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ShmModelError)]
    assert len({c.code for c in classes}) == len(classes) >= 12
    for cls in classes:
        error = cls("what went wrong", where=1)
        assert str(error) == error.message == "what went wrong"
        data = error.to_dict()
        assert data == {"code": cls.code, "message": "what went wrong", "details": {"where": 1}}
        back = ShmModelError.from_dict(json.loads(json.dumps(data)))
        assert type(back) is cls
        assert (back.message, back.details) == ("what went wrong", {"where": 1})


def test_from_dict_turns_malformed_errors_into_protocol_errors() -> None:
    bare = ShmModelError.from_dict({"code": "overloaded", "message": "m", "details": [1]})
    assert type(bare) is errors.Overloaded and bare.details == {}
    assert ShmModelError.from_dict({"code": "overloaded", "message": "m"}).details == {}
    for data in ({"code": "nope", "message": "m"}, {"code": 1, "message": "m"}, {"code": "overloaded"}):
        error = ShmModelError.from_dict(data)
        assert type(error) is ProtocolError
        assert str(error) == f"unknown error from peer: {data!r}"
    error = ShmModelError.from_dict("x" * 300)
    assert type(error) is ProtocolError
    assert str(error) == f"malformed error object from peer: {'x' * 300!r:.200}"


def test_error_classes_keep_their_builtin_bases() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.HostUnavailable, ConnectionError)
    assert issubclass(errors.PermissionDenied, PermissionError)
    assert issubclass(errors.RequestTimeout, TimeoutError)
    assert issubclass(errors.BadRequest, ValueError)
    assert issubclass(errors.PayloadTooLarge, errors.BadRequest)
