"""In-process fakes for the host's parts: workers that are asyncio tasks on socket pairs,
a spawner that starts, signals and reaps them, and a client connection that keeps replies.

A fake worker speaks the real worker protocol (``ready``, then encode batches answered
with vectors and token counts); texts steer it: ``__crash__`` makes it exit mid-batch,
``__hang__`` makes it never answer, ``__error__`` makes it answer with an error. A vector
is ``[len(text), batch size]`` so tests can see how texts were batched.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shm_model.errors import BadRequest
from shm_model.host.pool import Started
from shm_model.protocol import (
    PREFIX,
    ConnectionClosed,
    Frame,
    error_reply,
    pack,
    read_frame,
    unpack_prefix,
    vectors_from_frame,
    vectors_reply,
)

FRAME_LIMIT = 1 << 24
DIMENSION = 2
META = {"model": "fake", "dimension": DIMENSION, "max_seq_length": 128, "prompts": {"query": "query: "}}


@dataclass
class FakeSpawner:
    """Starts fake workers; ``boot`` decides per start whether the worker says ready."""

    boot: bool = True
    pool: Any = None  # the WorkerPool, told of exits as SIGCHLD would
    pids: Iterator[int] = field(default_factory=lambda: itertools.count(1000))
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    sockets: dict[int, socket.socket] = field(default_factory=dict)
    signals: list[tuple[int, signal.Signals]] = field(default_factory=list)
    batches: list[tuple[int, list[str], int]] = field(default_factory=list)  # (pid, texts, threads)
    gated: list[bool] = field(default_factory=list)  # each batch's "pausable", as the worker read it
    exited: list[tuple[int, int]] = field(default_factory=list)
    pauses: dict[int, bytearray] = field(default_factory=dict)  # each worker's pause flag
    paused_while: list[tuple[int, str]] = field(default_factory=list)  # (pid, text) a batch waited on
    started: int = 0

    async def start(self, generation: int, backend: Any) -> Started:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = next(self.pids)
        self.started += 1
        self.sockets[pid] = child
        self.pauses[pid] = bytearray(1)
        self.tasks[pid] = asyncio.get_running_loop().create_task(self._run(pid, child, self.boot))
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        return Started(pid, reader, writer, self.pauses[pid])

    async def _run(self, pid: int, child: socket.socket, boot: bool) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=child)
        if not boot:
            self.exit(pid, 3)
            return
        writer.write(pack({"op": "ready", "pid": pid, "backend": META}))
        while True:
            try:
                frame = await read_frame(reader, FRAME_LIMIT)
            except (ConnectionClosed, ConnectionError):
                return
            texts = frame.header["texts"]
            self.batches.append((pid, texts, frame.header.get("threads", 0)))
            if "__crash__" in texts:
                self.exit(pid, -signal.SIGSEGV)
                return
            if "__hang__" in texts:
                await asyncio.Event().wait()
            gated = frame.header.get("pausable") is True  # a worker passes the gate only then
            self.gated.append(gated)
            for text in texts:  # "__layers__:N": N steps, passing the pause gate before each
                if text.startswith("__layers__:"):
                    for _ in range(int(text.split(":")[1])):
                        while gated and self.pauses[pid][0]:
                            self.paused_while.append((pid, text))
                            await asyncio.sleep(0.001)
                        await asyncio.sleep(0.001)
            if "__error__" in texts:
                writer.write(error_reply(frame.header["id"], BadRequest("the model refused a text")))
                continue
            writer.write(self.reply(frame.header["id"], texts))

    def reply(self, batch_id: int, texts: list[str]) -> bytes:
        """A worker's answer to a batch: one vector per text, (its length, the batch's size)."""
        vectors = np.array([[len(t), len(texts)] for t in texts], dtype=np.float32)
        return vectors_reply(batch_id, vectors, tokens=[len(t) for t in texts])

    def exit(self, pid: int, code: int) -> None:
        """The worker process ends: its channel closes and SIGCHLD reaches the pool."""
        sock = self.sockets.pop(pid, None)
        if sock is None:
            return
        sock.close()
        task = self.tasks.pop(pid)
        if task is not asyncio.current_task():
            task.cancel()
        self.exited.append((pid, code))
        if self.pool is not None:
            asyncio.get_running_loop().call_soon(self.pool.reap)

    def signal(self, pid: int, sig: signal.Signals) -> None:
        self.signals.append((pid, sig))
        if sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGABRT):
            self.exit(pid, -sig)

    def reap(self) -> Iterator[tuple[int, int]]:
        exited, self.exited = self.exited, []
        yield from exited

    def wait(self, pid: int) -> None:
        pass

    def sent(self, sig: signal.Signals) -> list[int]:
        return [pid for pid, s in self.signals if s == sig]


@dataclass
class Events:
    """PoolEvents that records what the pool reported (and forwards to a dispatcher if given)."""

    idle: int = 0
    lost: list[tuple[int, list[Any], bool]] = field(default_factory=list)
    fatal_reasons: list[str] = field(default_factory=list)
    dispatcher: Any = None

    def worker_idle(self) -> None:
        self.idle += 1
        if self.dispatcher is not None:
            self.dispatcher.dispatch()

    def batch_lost(self, worker: Any, pieces: list[Any]) -> None:
        self.lost.append((worker.pid, pieces, worker.aborted))
        if self.dispatcher is not None:
            self.dispatcher.batch_lost(worker, pieces)

    def changed(self) -> None:
        pass

    def fatal(self, reason: str) -> None:
        self.fatal_reasons.append(reason)


class FakeConnection:
    """A client connection that keeps every reply frame, decoded."""

    def __init__(self, pid: int = 1) -> None:
        self.pid = pid
        self.uid = 0
        self.closed = False
        self.requests: set[Any] = set()
        self.replies: dict[Any, Frame] = {}
        self.at: dict[Any, float] = {}  # monotonic time each reply was sent

    def send(self, data: bytes) -> None:
        header_len, _ = unpack_prefix(data[: PREFIX.size], FRAME_LIMIT)
        header = json.loads(data[PREFIX.size : PREFIX.size + header_len])
        self.replies[header.get("id")] = Frame(header, data[PREFIX.size + header_len :])
        self.at[header.get("id")] = time.monotonic()

    def vectors(self, rid: Any) -> np.ndarray:
        return vectors_from_frame(self.replies[rid])

    def error(self, rid: Any) -> str | None:
        frame = self.replies[rid]
        return None if frame.header.get("ok") else frame.header["error"]["code"]
