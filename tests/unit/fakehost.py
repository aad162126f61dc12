"""A scripted model host in a thread of the test process, for in-process client and CLI tests."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shm_model.protocol import recv_frame, result_reply, vectors_reply

#: What the scripted host does with a request: the bytes to answer, or None to close the connection.
Respond = Callable[[dict[str, Any]], bytes | None]
OTHER_UID = 54321


class FakeHost:
    """A Unix socket server in a thread; ``respond`` answers each frame; records what it saw."""

    def __init__(self, path: Path, respond: Respond) -> None:
        self.path = str(path)
        self.respond = respond
        self.headers: list[dict[str, Any]] = []
        self.connections = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.open: list[socket.socket] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    frame = recv_frame(conn, 1 << 30)
                except (OSError, EOFError, ValueError):
                    return
                self.headers.append(frame.header)
                reply = self.respond(frame.header)
                if reply is None:
                    return
                try:
                    conn.sendall(reply)
                except OSError:
                    return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        self.listener.close()
        for conn in self.open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)


def encode_reply(header: dict[str, Any], dim: int = 3) -> bytes:
    texts = header["texts"]
    rows = [[len(t), i, 1.0] + [0.0] * (dim - 3) for i, t in enumerate(texts)]
    vectors = np.array(rows, dtype=np.float32).reshape(len(texts), dim)
    return vectors_reply(header["id"], vectors, tokens=sum(len(t) for t in texts))


def default_respond(header: dict[str, Any]) -> bytes | None:
    if header["op"] == "encode":
        return encode_reply(header)
    return result_reply(header["id"], {"op": header["op"], "dimension": 3, "max_seq_length": 128})
