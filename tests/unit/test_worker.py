"""A worker's request loop and its process setup, in process: a socketpair stands for the channel."""

from __future__ import annotations

import faulthandler
import logging
import os
import resource
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from config.model_config import HostConfig, ModelConfig
from shm_model.errors import BadRequest, ModelLoadError, PayloadTooLarge
from shm_model.protocol import MAGIC, PREFIX, Frame, pack, recv_frame, vectors_from_frame
from workers import models
from workers import worker as worker_module
from workers.backends import Backend, DummyBackend
from workers.models import ModelSet
from workers.worker import WORKER_BOOT_ERROR, Worker, channel_frame_limit, die_with_parent, run_forked


class Recorder(DummyBackend):
    def __init__(self) -> None:
        super().__init__(ModelConfig.load({}), HostConfig.load({"SHM_MODEL_BACKEND": "dummy"}))
        self.calls: list[tuple[str, Any]] = []

    def prepare_worker(self, threads: int) -> None:
        self.calls.append(("prepare", threads))
        super().prepare_worker(threads)

    def set_threads(self, threads: int) -> None:
        self.calls.append(("threads", threads))
        super().set_threads(threads)


class Broken(Recorder):
    def encode(self, texts: list[str], prompt: str | None) -> np.ndarray:
        raise ZeroDivisionError("division by zero")


def make_worker(backend: Backend | None, *, threads: int = 2, fd: int = -1, forked: bool = False) -> Worker:
    models = None if backend is None else ModelSet([("dummy", backend)])
    return Worker(
        fd, models, threads=threads, generation=4, parent_pid=os.getppid(), max_frame_bytes=1000, forked=forked
    )


def reply(data: bytes) -> Frame:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        return recv_frame(b, 1 << 24)


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, tuple[int, int]]]]:
    """init_process changes signal dispositions, the core limit (recorded here: a lowered hard limit
    cannot be raised again) and faulthandler: put them back."""
    saved_int = signal.getsignal(signal.SIGINT)
    was_enabled = faulthandler.is_enabled()
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level)
    calls: list[tuple[int, tuple[int, int]]] = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: calls.append((which, value)))
    yield calls
    signal.signal(signal.SIGINT, saved_int)
    root.handlers, root.level = saved_logging
    if not was_enabled:
        faulthandler.disable()


def test_the_channel_bound_allows_a_batch_of_a_whole_request() -> None:
    assert channel_frame_limit(1000) == 8 * 1000 + (1 << 20)
    w = make_worker(None)
    assert w.frame_limit == channel_frame_limit(1000)
    assert (w.threads, w.generation, w.forked, w.backend, w.channel) == (2, 4, False, None, None)


def test_an_encode_batch_gets_vectors_and_token_counts() -> None:
    backend = Recorder()
    w = make_worker(backend)
    frame = reply(w.handle({"op": "encode", "id": 9, "texts": ["a", "bb"], "prompt": "query: "}))
    assert frame.header["id"] == 9 and frame.header["ok"] is True
    assert frame.header["tokens"] == backend.count_tokens(["a", "bb"], "query: ")
    expected = backend.encode(["a", "bb"], "query: ")
    assert np.array_equal(vectors_from_frame(frame), expected)
    assert not np.array_equal(expected, backend.encode(["a", "bb"], None))  # the prompt was used
    assert backend.calls == []  # the batch asked for the threads it already had


def test_a_batch_sets_the_threads_it_was_given() -> None:
    backend = Recorder()
    w = make_worker(backend, threads=2)
    w.handle({"op": "encode", "id": 1, "texts": ["x"], "threads": 1})
    assert backend.calls == [("threads", 1)] and w.threads == 1
    for ignored in (0, -1, None, "2", 1.0):
        w.handle({"op": "encode", "id": 1, "texts": ["x"], "threads": ignored})
    assert backend.calls == [("threads", 1)]
    frame = reply(w.handle({"op": "encode", "id": 1, "texts": ["__threads__"], "threads": 3}))
    assert vectors_from_frame(frame)[0, 0] == 3.0
    assert w.threads == 3


def test_errors_answer_the_batch_typed() -> None:
    w = make_worker(Recorder())
    unknown = reply(w.handle({"op": "ping", "id": 2})).header
    assert unknown["id"] == 2 and unknown["ok"] is False
    assert unknown["error"]["code"] == "internal_error"
    assert unknown["error"]["message"] == "worker got unknown op 'ping'; this is a bug"
    bad = reply(w.handle({"op": "encode", "id": 3, "texts": ["__error__"]})).header
    assert bad["error"] == BadRequest("the dummy backend was asked to fail").to_dict()
    broken = reply(make_worker(Broken()).handle({"op": "encode", "id": 4, "texts": ["a"]})).header
    assert broken["id"] == 4
    assert broken["error"]["code"] == "internal_error"
    assert broken["error"]["message"] == "encode failed: ZeroDivisionError: division by zero"
    missing = reply(w.handle({"op": "encode", "id": 5})).header
    assert missing["error"]["message"] == "encode failed: KeyError: 'texts'"


def test_run_says_ready_serves_batches_and_ends_when_the_channel_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(worker_module, "_release_free_memory", lambda: trims.append(1))
    monkeypatch.setattr(worker_module, "TRIM_AFTER_IDLE_SECONDS", 0.01)
    supervisor, channel = socket.socketpair()
    backend = Recorder()
    w = make_worker(backend, threads=3)
    w.channel = channel
    replies: list[Frame] = []
    trims_seen: list[int] = []

    def supervise() -> None:
        with supervisor:
            replies.append(recv_frame(supervisor, 1 << 20))
            trims_seen.append(len(trims))
            supervisor.sendall(pack({"op": "encode", "id": 0, "texts": ["a"]}))
            replies.append(recv_frame(supervisor, 1 << 20))
            deadline = time.monotonic() + 10  # left idle, the worker trims once
            while not trims and time.monotonic() < deadline:
                time.sleep(0.001)
            trims_seen.append(len(trims))
            # Two batches queued at once, then the end: the worker is never idle again.
            for i in (1, 2):
                supervisor.sendall(pack({"op": "encode", "id": i, "texts": ["a"] * (i + 1)}))
            supervisor.shutdown(socket.SHUT_WR)
            replies.extend(recv_frame(supervisor, 1 << 20) for _ in range(2))

    thread = threading.Thread(target=supervise)
    thread.start()
    assert w.run() == 0
    thread.join(10)
    channel.close()
    ready = replies[0].header
    assert ready == {"op": "ready", "pid": os.getpid(), "backend": w.backend.describe()}
    assert [vectors_from_frame(f).shape for f in replies[1:]] == [(1, 32), (2, 32), (3, 32)]
    assert backend.calls == [("prepare", 3)]
    # No trim before any batch ran; one while idle after the first; none between batches that
    # wait in line, nor at the end.
    assert trims_seen == [0, 1] and trims == [1]


def test_poll_briefly_returns_when_a_frame_comes_or_at_its_deadline_yielding_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    yields: list[int] = []
    monkeypatch.setattr(worker_module.os, "sched_yield", lambda: yields.append(1))
    supervisor, channel = socket.socketpair()
    with supervisor, channel:
        poller = select.poll()
        poller.register(channel, select.POLLIN)
        started = time.perf_counter()
        assert not worker_module.poll_briefly(poller, 0.05)
        assert 0.05 <= time.perf_counter() - started < 5 and yields  # it polled, giving way between polls
        threading.Timer(0.02, lambda: supervisor.sendall(b"x")).start()
        started = time.perf_counter()
        assert worker_module.poll_briefly(poller, 30)
        assert time.perf_counter() - started < 15  # at once, not at the deadline
        yields.clear()
        assert worker_module.poll_briefly(poller, 0)  # already readable: no wait at all
        assert not yields


@pytest.mark.parametrize("spin_ms", [0, 4])
def test_after_each_answer_a_worker_polls_for_its_next_batch_for_its_spin_time(
    monkeypatch: pytest.MonkeyPatch, spin_ms: int
) -> None:
    polls: list[float] = []
    real = worker_module.poll_briefly
    monkeypatch.setattr(worker_module, "poll_briefly", lambda poller, s: polls.append(s) or real(poller, s))
    supervisor, channel = socket.socketpair()
    backend = Recorder()
    w = Worker(
        -1, ModelSet([("dummy", backend)]), threads=1, generation=1, parent_pid=os.getppid(), max_frame_bytes=1000,
        forked=False, spin_seconds=spin_ms / 1000,
    )  # fmt: skip
    w.channel = channel

    def supervise() -> None:
        with supervisor:
            recv_frame(supervisor, 1 << 20)  # ready
            for i in range(2):
                supervisor.sendall(pack({"op": "encode", "id": i, "texts": ["a"]}))
                recv_frame(supervisor, 1 << 20)
            supervisor.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=supervise)
    thread.start()
    assert w.run() == 0
    thread.join(10)
    channel.close()
    assert polls == [spin_ms / 1000] * 2 if spin_ms else polls == []


def test_run_needs_both_a_model_and_a_channel_and_touches_neither_without_them() -> None:
    backend = Recorder()
    unset = make_worker(backend)  # init_process never ran: no channel
    with pytest.raises(AssertionError):
        unset.run()
    assert backend.calls == []  # the model's threads were not set up for a worker that cannot serve
    supervisor, channel = socket.socketpair()
    with supervisor, channel:
        no_model = make_worker(None)  # a spawned worker before its model is loaded
        no_model.channel = channel
        with pytest.raises(AssertionError):
            no_model.run()
        supervisor.setblocking(False)
        with pytest.raises(BlockingIOError):
            supervisor.recv(1)  # no "ready" was sent


def test_a_frame_over_the_channel_bound_ends_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor, channel = socket.socketpair()
    w = make_worker(Recorder())
    w.channel = channel
    with supervisor, channel:
        supervisor.sendall(PREFIX.pack(MAGIC, 100, w.frame_limit - PREFIX.size - 99))  # one byte over
        with pytest.raises(PayloadTooLarge):
            w.run()


def test_init_process_sets_up_signals_limits_and_the_channel(limits: list[tuple[int, tuple[int, int]]]) -> None:
    a, b = socket.socketpair()
    fd = os.dup(b.fileno())
    b.close()
    w = make_worker(Recorder(), fd=fd)
    w.init_process()
    try:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert limits == [(resource.RLIMIT_CORE, (0, 0))]
        assert faulthandler.is_enabled()
        assert w.channel is not None and w.channel.fileno() == fd
        assert w.channel.getblocking() is True
        from shm_model import logs

        assert logs._role == "worker g4"
    finally:
        a.close()
        if w.channel is not None:
            w.channel.close()
        from shm_model import logs

        logs.set_role("client")


def test_a_worker_whose_parent_is_gone_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    die_with_parent(os.getppid())
    assert exits == []
    die_with_parent(os.getppid() + 1_000_000)
    assert exits == [1]


def test_run_forked_exits_with_run_s_code_or_1(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    w = make_worker(Recorder())
    monkeypatch.setattr(w, "init_process", lambda: None)
    monkeypatch.setattr(w, "run", lambda: 0)
    run_forked(w)
    monkeypatch.setattr(w, "run", lambda: 1 / 0)
    run_forked(w)
    monkeypatch.setattr(w, "init_process", lambda: 1 / 0)
    monkeypatch.setattr(w, "run", lambda: 0)
    run_forked(w)
    assert exits == [0, 1, 1]


@pytest.mark.parametrize(
    ("options", "role", "ready"),
    [
        (["--generation", "02", "--threads", "3"], "worker g2", "ready (3 torch threads)"),
        ([], "worker g0", "ready (1 torch threads)"),  # the defaults
    ],
)
def test_a_spawned_worker_loads_its_backend_and_serves(
    monkeypatch: pytest.MonkeyPatch,
    limits: list,
    caplog: pytest.LogCaptureFixture,
    options: list[str],
    role: str,
    ready: str,
) -> None:
    from shm_model import logs

    caplog.set_level(logging.INFO, "workers.worker")
    monkeypatch.setenv("SHM_MODEL_BACKEND", "dummy")
    monkeypatch.setenv("SHM_MODEL_LOG_LEVEL", "warning")
    monkeypatch.setenv("SHM_MODEL_WORKER_SPIN_MS", "9")
    polls: list[float] = []
    monkeypatch.setattr(worker_module, "poll_briefly", lambda poller, seconds: polls.append(seconds))
    supervisor, channel = socket.socketpair()
    fd = os.dup(channel.fileno())
    channel.close()
    frames: list[Frame] = []

    def supervise() -> None:
        with supervisor:
            frames.append(recv_frame(supervisor, 1 << 20))
            supervisor.sendall(pack({"op": "encode", "id": 1, "texts": ["a"]}))
            frames.append(recv_frame(supervisor, 1 << 20))

    thread = threading.Thread(target=supervise)
    thread.start()
    try:
        argv = ["--fd", str(fd), "--parent", str(os.getppid()), *options]
        assert worker_module.main(argv) == 0
        assert logs._role == role
    finally:
        thread.join(10)
        logs.set_role("client")
    assert [m for m in caplog.messages if m.startswith("ready")] == [ready]
    assert frames[0].header["op"] == "ready" and frames[0].header["backend"]["model"] == "dummy"
    assert vectors_from_frame(frames[1]).shape == (1, 32)
    assert polls == [0.009]  # SHM_MODEL_WORKER_SPIN_MS, read by the spawned worker itself


def test_a_spawned_worker_that_cannot_load_the_model_exits_with_the_boot_error(
    monkeypatch: pytest.MonkeyPatch, limits: list, caplog: pytest.LogCaptureFixture
) -> None:
    def cannot_load(*args: object, **kwargs: object) -> Backend:
        assert kwargs == {"place": False}  # a spawned worker keeps the weights it loaded
        raise ModelLoadError("model 'x' not found")

    monkeypatch.setattr(models, "load_models", cannot_load)
    monkeypatch.setenv("SHM_MODEL_LOG_LEVEL", "warning")
    a, b = socket.socketpair()
    fd = os.dup(b.fileno())
    b.close()
    try:
        assert worker_module.main(["--fd", str(fd), "--parent", str(os.getppid())]) == WORKER_BOOT_ERROR
        assert "worker could not load the model: model 'x' not found" in caplog.messages
        from shm_model import logs

        assert logs._role == "worker g0"  # no --generation: the first
    finally:
        a.close()
        os.close(fd)
        from shm_model import logs

        logs.set_role("client")


def test_the_spawned_worker_s_command_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        worker_module.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m workers.worker [-h] --fd FD [--generation GENERATION]\n")
    assert " --parent PARENT [--threads THREADS]\n" in out
    assert "--fd FD               inherited channel descriptor" in out
    assert "--parent PARENT       supervisor pid" in out
    assert out.count("One worker process: receives batches") == 1
    for missing in (["--parent", "1"], ["--fd", "5"]):
        with pytest.raises(SystemExit) as usage:
            worker_module.main(missing)
        assert usage.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


def test_memory_is_given_back_through_glibc() -> None:
    trim = worker_module._malloc_trim()
    assert trim() in (0, 1)  # malloc_trim's answer: whether memory was released


def _wait_exit(pid: int, seconds: float) -> int | None:
    """The exit code of child ``pid``, or None (after killing it) if it has not exited in time."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_a_forked_worker_does_not_wait_for_a_progress_lock_a_killed_worker_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tqdm's lock is a semaphore shared across fork; sentence-transformers takes it on every
    batch. Held by a worker that was SIGKILLed mid-batch, it must not block the workers forked
    after it: each takes a lock of its own."""
    import multiprocessing

    from tqdm import std

    monkeypatch.setattr(std.TqdmDefaultWriteLock, "mp_lock", multiprocessing.RLock(), raising=False)
    monkeypatch.setattr(std.tqdm, "_lock", std.TqdmDefaultWriteLock(), raising=False)  # as the model load made it

    held_r, held_w = os.pipe()
    holder = os.fork()
    if holder == 0:  # a worker that takes the lock and is killed before it lets go
        std.tqdm.get_lock().acquire()
        os.write(held_w, b"x")
        signal.pause()
        os._exit(0)
    try:
        assert os.read(held_r, 1) == b"x"
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.close(held_r)
        os.close(held_w)

    child = os.fork()
    if child == 0:  # a worker forked after: what it does up to its first batch
        code = 1
        try:
            worker_module.own_progress_lock()
            list(std.trange(3, disable=True))
            code = 0
        finally:
            os._exit(code)
    assert _wait_exit(child, 30) == 0, "the forked worker blocked on the progress-bar lock a killed worker held"

    class Bar(std.tqdm):  # a bar class that made a lock of its own before the fork
        pass

    class Plain(std.tqdm):  # one that uses tqdm's
        pass

    monkeypatch.setattr(Bar, "_lock", std.TqdmDefaultWriteLock(), raising=False)
    monkeypatch.delattr(std.tqdm, "_lock", raising=False)  # tqdm's own not made yet
    worker_module.own_progress_lock()  # here too: the lock the killed worker holds is no longer used
    assert std.TqdmDefaultWriteLock.mp_lock is None
    lock = std.tqdm.get_lock()
    assert Bar.get_lock() is lock and Plain.get_lock() is lock and "_lock" not in vars(Plain)
    list(std.trange(3, disable=True))


def test_a_paused_batch_waits_at_the_gate_until_the_flag_is_cleared(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "workers.worker")
    supervisor, channel = socket.socketpair()
    pause = bytearray(b"\x01")
    w = Worker(-1, ModelSet([("dummy", Recorder())]), threads=3, generation=4, parent_pid=0, max_frame_bytes=1000,
               forked=False, pause=pause)  # type: ignore[arg-type]  # fmt: skip
    w.channel = channel
    thread = threading.Thread(target=w.run)
    thread.start()
    try:
        assert recv_frame(supervisor, 1 << 20).header["op"] == "ready"
        supervisor.sendall(pack({"op": "encode", "id": 1, "texts": ["__sleep__:0.01"]}))
        supervisor.settimeout(0.2)
        with pytest.raises(TimeoutError):
            recv_frame(supervisor, 1 << 20)  # held between two steps while the flag is set
        pause[0] = 0
        supervisor.settimeout(5)
        assert recv_frame(supervisor, 1 << 20).header["ok"] is True
    finally:
        supervisor.close()
        thread.join(5)
        channel.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "workers.worker"]
    assert messages == ["ready (3 torch threads)", "channel closed; exiting"]


def test_the_pause_gate_returns_once_the_flag_is_clear() -> None:
    flag = bytearray(b"\x01")
    gate = worker_module.pause_gate(flag)  # type: ignore[arg-type]
    thread = threading.Thread(target=gate)
    thread.start()
    thread.join(0.05)
    assert thread.is_alive()
    flag[0] = 0
    thread.join(5)
    assert not thread.is_alive()


def test_a_batch_for_a_named_model_is_encoded_by_that_model() -> None:
    first, second = Recorder(), Recorder()
    second.dimension = 8
    w = Worker(-1, ModelSet([("a", first), ("b", second)]), threads=1, generation=0, parent_pid=0,
               max_frame_bytes=1000, forked=False)  # fmt: skip
    assert vectors_from_frame(reply(w.handle({"op": "encode", "id": 1, "texts": ["x"], "model": "b"}))).shape == (1, 8)
    assert vectors_from_frame(reply(w.handle({"op": "encode", "id": 1, "texts": ["x"]}))).shape == (1, 32)
    missing = reply(w.handle({"op": "encode", "id": 1, "texts": ["x"], "model": "c"})).header
    assert missing["error"]["code"] == "model_not_found"


def test_a_failed_encode_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    make_worker(Broken()).handle({"op": "encode", "id": 4, "texts": ["a"]})
    (record,) = [r for r in caplog.records if r.name == "workers.worker"]
    assert record.getMessage() == "encode failed" and record.levelname == "ERROR"
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


def test_a_worker_that_fails_logs_why_before_it_exits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "_exit", lambda code: None)
    w = make_worker(Recorder())
    monkeypatch.setattr(w, "init_process", lambda: 1 / 0)
    run_forked(w)
    (record,) = [r for r in caplog.records if r.name == "workers.worker"]
    assert record.getMessage() == "worker failed" and record.exc_info is not None


def test_a_worker_asks_to_be_killed_with_its_parent() -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    signum = ctypes.c_int(-1)
    libc.prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
    saved = signum.value
    try:
        die_with_parent(os.getppid())
        libc.prctl(2, ctypes.byref(signum), 0, 0, 0)
        assert signum.value == signal.SIGKILL
    finally:
        libc.prctl(1, saved, 0, 0, 0)  # PR_SET_PDEATHSIG: as it was


def test_a_forked_worker_drops_the_parent_s_descriptors_and_signal_handlers(
    limits: list[tuple[int, tuple[int, int]]],
) -> None:
    """What a forked worker must not keep of the supervisor: its wakeup fd and signal handlers, and
    every descriptor but its channel (client connections, the listening socket, other channels).
    A spawned worker (a fresh interpreter) has nothing of the supervisor's: it keeps what it has."""
    import json

    a, b = socket.socketpair()
    spawned = make_worker(Recorder(), fd=os.dup(b.fileno()))
    saved_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        spawned.init_process()
        os.fstat(a.fileno())  # still open
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, saved_term)
        for sock in (a, b, spawned.channel):
            if sock is not None:
                sock.close()
        from shm_model import logs

        logs.set_role("client")
    supervisor, channel = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(channel.fileno(), 10)
            for fd in (3, 9, 11, 12):
                os.dup2(supervisor.fileno(), fd)
            _, wake = os.pipe()
            os.set_blocking(wake, False)
            signal.set_wakeup_fd(wake)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGABRT):
                signal.signal(sig, lambda *args: None)
            w = Worker(10, None, threads=1, generation=2, parent_pid=os.getppid(), max_frame_bytes=1000, forked=True)
            w.init_process()
            still_open = []
            for fd in range(3, 64):
                try:
                    os.fstat(fd)
                except OSError:
                    continue
                still_open.append(fd)
            handlers = [signal.getsignal(s) is signal.SIG_DFL for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD)]
            report = {
                "open": still_open,
                "wakeup": signal.set_wakeup_fd(-1),
                "handlers": [*handlers, signal.getsignal(signal.SIGABRT) is signal.SIG_DFL],
                "sigint": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
            }
            assert w.channel is not None
            w.channel.sendall(json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    channel.close()
    with supervisor:
        supervisor.settimeout(30)
        data = b""
        while chunk := supervisor.recv(1 << 16):
            data += chunk
    assert _wait_exit(pid, 30) == 0
    assert json.loads(data) == {"open": [10], "wakeup": -1, "handlers": [True] * 4, "sigint": True}


def test_the_channel_poller_tells_a_waiting_frame_even_on_a_descriptor_above_1024() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1100:
        pytest.skip(f"the descriptor limit ({hard}) leaves no room above 1024")
    if soft <= 1100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200 if hard == resource.RLIM_INFINITY else min(hard, 1200), hard))
    a, b = socket.socketpair()
    try:
        high = socket.socket(fileno=os.dup2(b.fileno(), 1100))
        with a, b, high:
            poller = worker_module._channel_poller(high)
            assert not poller.poll(0)
            a.sendall(b"x")
            assert poller.poll(5000)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
