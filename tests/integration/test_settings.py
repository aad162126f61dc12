"""One settings table for the whole project: parsing, one-line errors for every family, --help
and the README; JSON logs of the host, its workers and the API; socket activation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import IO

import httpx
import pytest

from config import settings as config_settings
from config.api_config import ApiConfig
from config.errors import ConfigError as ConfigErrorOfConfig
from config.model_config import HostConfig, ManagerConfig, ModelConfig
from config.rag_config import IngestLimits, RagConfig
from config.settings import SETTINGS, read
from shm_model import errors
from tests.conftest import ROOT, Host, base_env, free_port, poll

README = (ROOT / "README.md").read_text()
CONFIGS = {
    "model": ModelConfig,
    "host": HostConfig,
    "manager": ManagerConfig,
    "api": ApiConfig,
    "rag": RagConfig,
    "ingest": IngestLimits,
}


def run(args: list[str], timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=base_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# --- the table -----------------------------------------------------------------------------------


def test_every_field_of_every_config_has_one_variable_and_its_default_is_the_shown_one() -> None:
    for family, cls in CONFIGS.items():
        names = {f.name for f in fields(cls)}
        rows = config_settings.settings_of(family)
        assert {s.field for s in rows} == names, family
        defaults = cls()
        for s in rows:
            shown = read(family, {s.env: s.default}) if s.default and " " not in s.default else {}
            if s.field in shown:
                assert shown[s.field] == getattr(defaults, s.field), (s.env, s.default)
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)


def test_config_error_is_one_class_in_the_one_tree() -> None:
    assert errors.ConfigError is ConfigErrorOfConfig
    assert issubclass(errors.ConfigError, errors.ShmModelError)
    rebuilt = errors.ShmModelError.from_dict(errors.ConfigError("X=1 is invalid").to_dict())
    assert type(rebuilt) is errors.ConfigError


@pytest.mark.parametrize(
    ("family", "env", "line"),
    [
        ("api", {"API_PORT": "abc"}, "API_PORT='abc' is invalid; allowed values: an integer from 1 to 65535"),
        ("api", {"CHAT_TIMEOUT": "-5"}, "CHAT_TIMEOUT='-5' is invalid; allowed values: a number of seconds > 0"),
        ("api", {"API_ALLOWED_HOSTS": "a b"}, "API_ALLOWED_HOSTS='a b' is invalid"),
        ("rag", {"RAG_LOG_LEVEL": "loud"}, "RAG_LOG_LEVEL='loud' is invalid; allowed values: debug, info, warning"),
        ("ingest", {"RAG_MAX_MEMORY_MB": "8"}, "RAG_MAX_MEMORY_MB='8' is invalid; allowed values: an integer >= 16"),
        (
            "manager",
            {"SHM_MODEL_MODE": "both"},
            "SHM_MODEL_MODE='both' is invalid; allowed values: auto, shared, local",
        ),
        ("logs", {"SHM_MODEL_LOG_FORMAT": "xml"}, "SHM_MODEL_LOG_FORMAT='xml' is invalid; allowed values: text, json"),
        ("host", {"SHM_MODEL_BULK_SHARE": "1"}, "SHM_MODEL_BULK_SHARE='1' is invalid; allowed values: a number"),
    ],
)
def test_a_bad_value_of_every_family_names_the_variable_and_the_allowed_values(
    family: str, env: dict[str, str], line: str
) -> None:
    with pytest.raises(errors.ConfigError) as info:
        read(family, env)
    assert str(info.value).startswith(line) and "\n" not in str(info.value)


def test_values_are_parsed_and_empty_ones_are_unset() -> None:
    api = ApiConfig.load({"API_PORT": " 9000 ", "API_KEEP_UPLOADS": "Yes", "API_KEY": "", "CHAT_MODEL": "m"})
    assert (api.port, api.keep_uploads, api.api_key, api.chat_model) == (9000, True, "", "m")
    assert ApiConfig.load({"API_HOST": "::1"}, port=1).allowed_hosts[-1] == "[::1]"
    host = HostConfig.load(
        {"SHM_MODEL_WORKERS": "AUTO", "SHM_MODEL_MAX_BUFFERED_BYTES": "", "SHM_MODEL_QUEUE_SIZE": "7"}
    )
    assert (host.workers, host.max_buffered_bytes, host.queue_size) == (None, None, 7)
    assert IngestLimits.load({"RAG_FILE_TIMEOUT": "2.5"}).file_timeout == 2.5
    assert read("logs", {"SHM_MODEL_LOG_FORMAT": "JSON"}) == {"format": "json"}


# --- commands: one line, exit status 2, never a traceback ----------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["-m", "shm_model", "serve"], {"MODEL_DEVICE": "tpu"}, "MODEL_DEVICE='tpu' is invalid; allowed values"),
        (["-m", "shm_model", "serve"], {"SHM_MODEL_WORKERS": "0"}, "SHM_MODEL_WORKERS='0' is invalid"),
        (["-m", "shm_model", "serve"], {"SHM_MODEL_LOG_FORMAT": "xml"}, "SHM_MODEL_LOG_FORMAT='xml' is invalid"),
        (["-m", "shm_model", "status"], {"SHM_MODEL_REQUEST_TIMEOUT": "soon"}, "SHM_MODEL_REQUEST_TIMEOUT='soon'"),
        (["-m", "shm_model", "status"], {"SHM_MODEL_TRUSTED_UIDS": "bob"}, "SHM_MODEL_TRUSTED_UIDS='bob' is invalid"),
        (["-m", "shm_model", "api"], {"API_PORT": "abc"}, "API_PORT='abc' is invalid; allowed values"),
        (["-m", "api_server"], {"CHAT_TIMEOUT": "never"}, "CHAT_TIMEOUT='never' is invalid; allowed values"),
        (["rag_with_tables.py", "stats"], {"RAG_LOG_LEVEL": "loud"}, "RAG_LOG_LEVEL='loud' is invalid"),
        (["rag_with_tables.py", "stats"], {"RAG_MAX_TABLE_CELLS": "0"}, "RAG_MAX_TABLE_CELLS='0' is invalid"),
        (["rag_with_tables.py", "query", "x"], {"SHM_MODEL_MODE": "both"}, "SHM_MODEL_MODE='both' is invalid"),
    ],
)
def test_a_bad_setting_stops_every_command_with_one_line_and_status_2(
    tmp_path: Path, args: list[str], env: dict[str, str], words: str
) -> None:
    env = {"SHM_MODEL_SOCKET": str(tmp_path / "run" / "h.sock"), "RAG_DB": str(tmp_path / "rag.db"), **env}
    done = run(args, **env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and words in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_api_port_does_not_break_other_commands(tmp_path: Path) -> None:
    done = run(["-m", "shm_model", "status"], API_PORT="abc", SHM_MODEL_SOCKET=str(tmp_path / "none.sock"))
    assert done.returncode == 1 and "host_unavailable" in done.stderr and "Traceback" not in done.stderr


def test_every_variable_is_in_the_help_and_the_readme_table() -> None:
    shown = run(["-m", "shm_model", "--help"]).stdout
    for setting in SETTINGS:
        assert setting.env in shown, setting.env
        assert f"| `{setting.env}` |" in README, setting.env
    api_help = run(["-m", "shm_model", "api", "--help"]).stdout
    rag_help = run(["rag_with_tables.py", "--help"]).stdout
    for setting in SETTINGS:
        if "api" in setting.families:
            assert setting.env in api_help, setting.env
        if {"rag", "ingest"} & set(setting.families):
            assert setting.env in rag_help, setting.env


@contextlib.contextmanager
def started(
    command: list[str], env: dict[str, str], log_path: Path, fd: int | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A server process writing to ``log_path`` (socket-activated with ``fd`` when given); its whole
    process group is killed when the block ends, whatever the test did."""
    with open(log_path, "w") as out:
        if fd is None:
            proc: subprocess.Popen[str] = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True, start_new_session=True,
            )  # fmt: skip
        else:
            proc = activated(command, fd, env=env, stdout=out)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def live(proc: subprocess.Popen[str], port: int) -> bool:
    assert proc.poll() is None, "the API server exited"
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --- JSON logs -----------------------------------------------------------------------------------


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert isinstance(record["pid"], int) and record["role"] and record["message"] is not None, record
    return records


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_json_logs_of_host_workers_and_api(host_factory, tmp_path: Path, start_method: str) -> None:
    host: Host = host_factory(
        SHM_MODEL_BACKEND="dummy", SHM_MODEL_LOG_FORMAT="json", SHM_MODEL_START_METHOD=start_method
    )
    with host.client(timeout=10) as client:
        assert client.encode(["hello"]).shape[0] == 1
    workers = host.worker_pids()
    poll(lambda: sum('"role": "worker' in line for line in host.log().splitlines()) >= len(workers), 10,
         what="a log line of each worker")  # fmt: skip
    api_log = tmp_path / "api.log"
    port = free_port()
    env = dict(host.env, SHM_MODEL_MODE="shared", RAG_DB=str(tmp_path / "rag.db"), API_PORT=str(port),
               API_UPLOAD_DIR=str(tmp_path / "up"), SHM_MODEL_LOG_LEVEL="info")  # fmt: skip
    with started([sys.executable, "-m", "api_server"], env, api_log) as api:
        poll(lambda: live(api, port), 60, interval=0.1, what="the API server")
        api_pid = api.pid
    assert host.terminate() == 0
    records = json_lines(host.log())
    roles = {(r["role"].split()[0], r["pid"]) for r in records}
    assert ("supervisor", host.proc.pid) in roles
    assert {pid for role, pid in roles if role == "worker"} >= set(workers)
    api_records = json_lines(api_log.read_text())
    assert api_records and all(r["role"] == "api" and r["pid"] == api_pid for r in api_records)


# --- socket activation ---------------------------------------------------------------------------

CHILD = """
import os, sys
from shm_model.activation import inherited_socket
try:
    sock = inherited_socket()
except Exception as exc:
    print(type(exc).__name__, exc, flush=True)
    sys.exit(3)
print(sock is not None and sock.getsockname(), os.environ.get("LISTEN_FDS"), os.get_inheritable(3), flush=True)
if sock is not None:
    sock.setblocking(True)
    conn, _ = sock.accept()
    conn.sendall(b"served by " + str(os.getpid()).encode())
    conn.close()
"""


#: What systemd does after fork: the socket as fd 3, LISTEN_FDS, LISTEN_PID (kept by exec), exec.
SYSTEMD_EXEC = """
import os, sys
fd, pid, fds, *command = sys.argv[1:]
os.dup2(int(fd), 3)
os.environ.update(LISTEN_FDS=fds, LISTEN_PID=str(os.getpid()) if pid == "self" else pid)
os.execv(command[0], command)
"""


def activated(
    command: list[str],
    fd: int,
    pid: str = "self",
    fds: str = "1",
    env: dict[str, str] | None = None,
    stdout: IO[str] | int = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """Run ``command`` as systemd runs a socket-activated service."""
    return subprocess.Popen(
        [sys.executable, "-c", SYSTEMD_EXEC, str(fd), pid, fds, *command], env=env or base_env(), cwd=ROOT,
        pass_fds=(fd,), stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


def test_inherited_socket_is_taken_from_fd_3(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    with listening(path) as sock:
        child = activated([sys.executable, "-c", CHILD], sock.fileno())
        try:
            assert child.stdout is not None
            assert child.stdout.readline().split() == [str(path), "None", "False"]
            with socket.socket(socket.AF_UNIX) as peer:
                peer.settimeout(10)
                peer.connect(str(path))
                assert peer.recv(100) == f"served by {child.pid}".encode()
            assert child.wait(10) == 0
        finally:
            child.kill()
            child.wait()


def test_a_socket_meant_for_another_process_or_not_listening_is_not_taken(tmp_path: Path) -> None:
    with listening(tmp_path / "b.sock") as sock:
        other = activated([sys.executable, "-c", CHILD], sock.fileno(), pid="1")
        out, _ = other.communicate(timeout=30)
        assert out.split() == ["False", "None", "True"]  # not ours: left alone, the variables removed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        wrong = activated([sys.executable, "-c", CHILD], unbound.fileno())
        out, _ = wrong.communicate(timeout=30)
        assert wrong.returncode == 3 and "not a listening Unix stream socket" in out
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unbound:
        many = activated([sys.executable, "-c", CHILD], unbound.fileno(), fds="100000")
        out, _ = many.communicate(timeout=30)
        assert many.returncode == 3 and "LISTEN_FDS='100000' is invalid" in out


def test_port_setting_reaches_the_api_server(tmp_path: Path, dummy_host: Host) -> None:
    port = free_port()
    env = dict(dummy_host.env, API_PORT=str(port), SHM_MODEL_MODE="shared", RAG_DB=str(tmp_path / "rag.db"),
               API_UPLOAD_DIR=str(tmp_path / "up"))  # fmt: skip
    with started([sys.executable, "-m", "shm_model", "api"], env, tmp_path / "api.log") as api:
        poll(lambda: live(api, port), 60, interval=0.1, what="the API server on API_PORT")
