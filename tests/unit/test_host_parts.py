"""The host's run directory, its reports and socket activation, in process."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config.errors import ConfigError
from shm_model import activation
from shm_model.host import reports
from shm_model.host.pool import WorkerState
from shm_model.host.rundir import LISTEN_BACKLOG, RunDirectory, remove_stale_segments
from shm_model.scheduling import BatchLimits, Scheduler

# --- run directory --------------------------------------------------------------------------------


def test_take_makes_a_private_directory_locks_and_cleanup_removes_all(tmp_path: Path) -> None:
    run = RunDirectory(str(tmp_path / "run" / "host.sock"))
    assert (run.lock_path, run.directory, run.shared) == (
        str(tmp_path / "run" / "host.sock.lock"),
        str(tmp_path / "run"),
        False,
    )
    run.take()
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    assert (tmp_path / "run" / "host.sock.lock").read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(os.stat(tmp_path / "run" / "host.sock.lock").st_mode) == 0o600
    sock = run.bind()
    st = os.stat(run.socket_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    run.cleanup()
    assert sock.fileno() == -1
    assert not (tmp_path / "run").exists()
    run.cleanup()  # twice is harmless


def test_a_shared_host_listens_for_every_uid(tmp_path: Path) -> None:
    run = RunDirectory(str(tmp_path / "run" / "host.sock"), allowed_uids=[1234])
    assert run.shared
    run.take()
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o711
        run.bind()
        assert stat.S_IMODE(os.stat(run.socket_path).st_mode) == 0o666
    finally:
        run.cleanup()


def test_an_existing_directory_is_kept_and_must_be_private(tmp_path: Path) -> None:
    directory = tmp_path / "mine"
    directory.mkdir(mode=0o700)
    run = RunDirectory(str(directory / "host.sock"))
    run.take()
    run.bind()
    run.cleanup()
    assert directory.is_dir() and list(directory.iterdir()) == []  # not made by the host: kept
    os.chmod(directory, 0o750)
    with pytest.raises(ConfigError) as info:
        RunDirectory(str(directory / "host.sock")).take()
    assert str(info.value) == (
        f"socket directory {directory} has mode 0750; the host needs a private directory (mode 0700): "
        f"run 'chmod 700 {directory}' or choose another SHM_MODEL_SOCKET"
    )
    os.chmod(directory, 0o711)
    RunDirectory(str(directory / "host.sock"), allowed_uids=[1]).take()  # 0711 is what a shared host makes


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 54321, -1)
    with pytest.raises(ConfigError) as info:
        RunDirectory(str(directory / "host.sock")).take()
    assert str(info.value) == (
        f"socket directory {directory} belongs to uid 54321, not to this user ({os.getuid()}); "
        "choose another SHM_MODEL_SOCKET"
    )


def test_a_second_host_on_the_socket_is_refused_with_the_holder_s_pid(tmp_path: Path) -> None:
    first = RunDirectory(str(tmp_path / "run" / "host.sock"))
    first.take()
    try:
        with pytest.raises(ConfigError) as info:
            RunDirectory(first.socket_path).take()
        assert str(info.value) == f"another host (pid {os.getpid()}) is already serving {first.socket_path}"
    finally:
        first.cleanup()
    blank = tmp_path / "b"
    blank.mkdir(mode=0o700)
    fd = os.open(blank / "host.sock.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that has not written its pid yet
    try:
        with pytest.raises(ConfigError) as unnamed:
            RunDirectory(str(blank / "host.sock"))._lock()
        assert str(unnamed.value) == f"another host (pid ?) is already serving {blank / 'host.sock'}"
    finally:
        os.close(fd)
    holder = RunDirectory(str(blank / "host.sock"))
    holder._lock()
    assert holder._lock_fd is not None
    holder._unlock()
    assert holder._lock_fd is None
    holder._unlock()


def test_a_stale_socket_is_removed_and_anything_else_refused(tmp_path: Path, caplog: Any) -> None:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    path = directory / "host.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    run = RunDirectory(str(path))
    with caplog.at_level(logging.INFO, logger="shm_model.host.rundir"):
        run.take()
    assert not path.exists()
    assert f"removing stale socket {path} left by a host that died" in caplog.messages
    run.cleanup()
    path.write_text("not a socket")
    other = RunDirectory(str(path))
    with pytest.raises(ConfigError) as info:
        other.take()
    assert str(info.value) == f"{path} exists and is not a socket; choose another SHM_MODEL_SOCKET"
    assert other._lock_fd is None  # the lock was let go
    RunDirectory(str(path.with_name("other.sock"))).take()


def test_stale_torch_segments_of_dead_processes_are_removed(tmp_path: Path, caplog: Any) -> None:
    caplog.set_level(logging.INFO, "shm_model.host.rundir")
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    dead = tmp_path / f"torch_{gone.pid}_1"
    alive = tmp_path / f"torch_{os.getpid()}_1"
    odd = tmp_path / "torch_x_1"
    bare = tmp_path / "torch"
    for p in (dead, alive, odd, bare):
        p.write_text("")
    assert remove_stale_segments(str(tmp_path / "torch*")) == [str(dead)]
    assert not dead.exists() and alive.exists() and odd.exists() and bare.exists()
    assert caplog.messages == [f"removed stale shared-memory file {dead}"]
    if os.geteuid() == 0:
        theirs = tmp_path / f"torch_{gone.pid}_2"
        theirs.write_text("")
        os.chown(theirs, 54321, -1)
        assert remove_stale_segments(str(tmp_path / "torch_*")) == []
        assert theirs.exists()


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    (directory / "host.sock.lock").symlink_to(target)
    with pytest.raises(OSError):
        RunDirectory(str(directory / "host.sock")).take()
    assert not target.exists()


def test_the_listen_backlog() -> None:
    assert LISTEN_BACKLOG == 1024


# --- socket activation ------------------------------------------------------------------------------


@pytest.fixture
def fd3(tmp_path: Path) -> Any:
    """A listening Unix socket on fd 3, as systemd passes it; fd 3 is restored after."""
    saved = os.dup(3) if _is_open(3) else None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "act.sock"))
    listener.listen(1)
    os.dup2(listener.fileno(), 3)
    listener.close()
    yield str(tmp_path / "act.sock")
    if saved is not None:
        os.dup2(saved, 3)
        os.close(saved)
    else:
        try:
            os.close(3)
        except OSError:
            pass


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_no_activation_without_both_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert activation.inherited_socket() is None
    assert os.environ["LISTEN_FDS"] == "1"  # untouched: not meant for anyone
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.delenv("LISTEN_FDS")
    assert activation.inherited_socket() is None


def test_the_passed_socket_is_taken_once_and_the_variables_removed(
    monkeypatch: pytest.MonkeyPatch, fd3: str, caplog: Any
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "host")
    with caplog.at_level(logging.INFO, logger="shm_model.activation"):
        sock = activation.inherited_socket()
    assert sock is not None and sock.fileno() == 3
    assert sock.getblocking() is False and os.get_inheritable(3) is False
    assert sock.getsockname() == fd3
    assert not any(k in os.environ for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    assert "systemd passed 2 sockets; serving the first (fd 3)" in caplog.text
    assert f"serving the socket systemd passed: {fd3}" in caplog.text
    sock.detach()


def test_sockets_meant_for_another_process_are_left(monkeypatch: pytest.MonkeyPatch) -> None:
    for pid in (str(os.getpid() + 1), "abc"):
        monkeypatch.setenv("LISTEN_PID", pid)
        monkeypatch.setenv("LISTEN_FDS", "1")
        assert activation.inherited_socket() is None
        assert "LISTEN_PID" not in os.environ  # a child must not take them either


@pytest.mark.parametrize("count", ["0", "65", "x", "-1"])
def test_a_bad_count_is_a_config_error(monkeypatch: pytest.MonkeyPatch, count: str) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", count)
    with pytest.raises(ConfigError) as info:
        activation.inherited_socket()
    assert str(info.value) == f"LISTEN_FDS={count!r} is invalid; allowed values: an integer from 1 to 64"


def test_fd_3_must_be_a_listening_unix_stream_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    saved = os.dup(3) if _is_open(3) else None
    try:
        for make, message in (
            (lambda: os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR), "fd 3 passed by systemd is not a socket"),
            (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach(), "is not a listening Unix stream"),
            (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach(), "is not a listening Unix stream"),
            (lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach(), "is not a listening Unix stream"),
        ):
            fd = make()
            os.dup2(fd, 3)
            os.close(fd)
            monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
            monkeypatch.setenv("LISTEN_FDS", "1")
            with pytest.raises(ConfigError) as info:
                activation.inherited_socket()
            assert message in str(info.value)
            assert _is_open(3)  # refused, not closed: it is systemd's
        os.close(3)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        with pytest.raises(ConfigError) as closed:
            activation.inherited_socket()
        assert str(closed.value) == "LISTEN_FDS=1 but fd 3 is not open (Bad file descriptor)"
    finally:
        if saved is not None:
            os.dup2(saved, 3)
            os.close(saved)


def test_bind_takes_the_passed_socket(monkeypatch: pytest.MonkeyPatch, fd3: str, tmp_path: Path) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    run = RunDirectory(str(tmp_path / "run" / "host.sock"))
    sock = run.bind()
    assert sock.fileno() == 3
    assert not os.path.exists(run.socket_path)
    run.cleanup()  # systemd's socket: not closed, not removed
    assert _is_open(3)
    sock.detach()


# --- reports ---------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, pid: int, state: WorkerState, started: float) -> None:
        self.pid, self.generation, self.state, self.started = pid, 2, state, started
        self.requests_served, self.batches, self.texts, self.threads = 5, 3, 40, 1
        self.paused_since: float | None = None


def test_info_names_the_model_and_this_process() -> None:
    meta = {"model": "m", "model_path": "/m", "dimension": 8, "max_seq_length": 64, "device": "cpu", "x": 1}
    assert reports.info(meta, 3) == {
        "model": "m",
        "model_path": "/m",
        "dimension": 8,
        "max_seq_length": 64,
        "device": "cpu",
        "prompts": {},
        "models": [
            {
                "model": "m",
                "model_path": "/m",
                "alias": None,
                "dimension": 8,
                "max_seq_length": 64,
                "device": "cpu",
                "dtype": None,
                "linear_kernel": None,
                "forward": None,
                "prompts": None,
            }
        ],
        "generation": 3,
        "pid": os.getpid(),
    }
    assert reports.info({"prompts": {"q": "q: "}}, 0)["prompts"] == {"q": "q: "}


def test_info_lists_every_served_model_the_first_being_the_default() -> None:
    first = {"model": "a", "alias": "small", "dimension": 8, "dtype": "float32", "prompts": {"q": "q: "}, "x": 1}
    second = {"model": "b", "alias": "large", "dimension": 16, "device": "cpu"}
    meta = {**first, "models": [first, second]}
    out = reports.info(meta, 1)
    assert (out["model"], out["dimension"], out["prompts"]) == ("a", 8, {"q": "q: "})
    assert [m["model"] for m in out["models"]] == ["a", "b"]
    assert out["models"][1] == {
        "model": "b",
        "model_path": None,
        "alias": "large",
        "dimension": 16,
        "max_seq_length": None,
        "device": "cpu",
        "dtype": None,
        "linear_kernel": None,
        "forward": None,
        "prompts": None,
    }
    assert out["models"][0]["dtype"] == "float32" and "x" not in out["models"][0]


def test_a_worker_whose_batch_is_paused_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports.time, "time", lambda: 1000.123456)
    paused = Worker(4, WorkerState.BUSY, 990.0)
    paused.paused_since = 12.0
    (row,) = reports.worker_rows([paused])
    assert row["paused"] is True and row["uptime_s"] == 10.123  # milliseconds


def test_worker_rows_are_sorted_by_pid() -> None:
    now = time.time()
    rows = reports.worker_rows([Worker(9, WorkerState.BUSY, now - 10), Worker(3, WorkerState.IDLE, now - 1)])
    assert [r["pid"] for r in rows] == [3, 9]
    assert rows[1] == {
        "pid": 9,
        "generation": 2,
        "state": "busy",
        "requests_served": 5,
        "batches": 3,
        "texts": 40,
        "threads": 1,
        "paused": False,
        "uptime_s": rows[1]["uptime_s"],
    }
    assert 10 <= rows[1]["uptime_s"] < 12
    assert len(str(rows[1]["uptime_s"]).split(".")[1]) <= 3


def test_percentiles() -> None:
    assert reports._percentiles(np.array([])) == {"p50": None, "p99": None, "max": None, "samples": 0}
    samples = np.arange(1, 101, dtype=np.float64) / 3
    assert reports._percentiles(samples) == {"p50": 16.833, "p99": 33.003, "max": 33.333, "samples": 100}


def test_queue_report_per_class() -> None:
    s = Scheduler(BatchLimits(max_texts=8, max_tokens=1000, max_bytes=1 << 20))
    s.stats["interactive"].requests = 4
    s.stats["interactive"].batches = 2
    s.stats["interactive"].texts = 9
    s.stats["interactive"].tokens = 90
    s.stats["interactive"].waits.extend([0.001, 0.003])
    s.stats["bulk"].batch_seconds.append(0.5)
    s.rates = {2: 1e-6, 1: 2.5e-6}
    report = reports.queue_report(s, 250.0)
    assert report["interactive"] == {
        **s.depth()["interactive"],
        "served_requests": 4,
        "batches": 2,
        "texts_served": 9,
        "tokens_served": 90,
        "wait_ms": {"p50": 2.0, "p99": 2.98, "max": 3.0, "samples": 2},
        "batch_ms": {"p50": None, "p99": None, "max": None, "samples": 0},
    }
    assert report["bulk"]["batch_ms"] == {"p50": 500.0, "p99": 500.0, "max": 500.0, "samples": 1}
    assert report["bulk_batch_ms"] == 250.0
    assert report["ms_per_1k_padded_tokens"] == {"1": 2.5, "2": 1.0}
    assert list(report["ms_per_1k_padded_tokens"]) == ["1", "2"]
    s.rates = {1: 1.23456e-6, 3: 1.23456e-3}  # seconds per padded token
    assert reports.queue_report(s, 250.0)["ms_per_1k_padded_tokens"] == {"1": 1.235, "3": 1234.56}


def test_add_memory_fills_each_worker_and_the_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = {
        os.getpid(): {"rss": 10, "pss": 5, "uss": 1},
        7: {"rss": 100, "pss": 50, "uss": 10},
    }
    monkeypatch.setattr(reports, "process_memory", figures.get)
    status = reports.add_memory({"workers": [{"pid": 7}, {"pid": 8}]})
    assert status["workers"] == [{"pid": 7, "rss": 100, "pss": 50, "uss": 10}, {"pid": 8}]
    assert status["supervisor"] == {"pid": os.getpid(), "rss": 10, "pss": 5, "uss": 1}
    assert status["memory"] == {"rss": 110, "pss": 55, "uss": 11}
    monkeypatch.setattr(reports, "process_memory", lambda pid: None)
    bare = reports.add_memory({"workers": []})
    assert bare["supervisor"] == {"pid": os.getpid(), "rss": 0, "pss": 0, "uss": 0}
    assert bare["memory"] == {"rss": 0, "pss": 0, "uss": 0}


def test_the_room_left_in_a_batch() -> None:
    limits = BatchLimits(max_texts=8, max_tokens=1000, max_bytes=500)
    assert limits.room(3, 100, 200) == (5, 700, 300)
    assert limits.room(3, 100, 200, token_budget=400) == (5, 100, 300)
    assert limits.room(3, 100, 200, token_budget=2000) == (5, 700, 300)
