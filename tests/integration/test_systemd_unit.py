"""contrib/systemd: the service's ExecStart, with its Environment=, serves and stops on SIGTERM;
under socket activation it serves the socket systemd holds and leaves it in place.

The unit's command line is run as written, with three substitutions for what systemd (or the
installation) provides: the install prefix /opt/shm-model is this checkout (its virtualenv's
bin/ for the commands), the paths systemd creates are temporary ones, and the backend is the
dummy one (no model to load).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from shm_model.client import HostClient
from tests.conftest import ROOT, base_env, pid_alive, poll
from tests.integration.test_settings import started

UNITS = ROOT / "contrib" / "systemd"
PREFIX = "/opt/shm-model"
BIN = Path(sys.executable).parent


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def command_line(service: dict[str, list[str]]) -> list[str]:
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith(PREFIX + "/.venv/bin/"), argv
    argv[0] = str(BIN / Path(argv[0]).name)
    assert os.access(argv[0], os.X_OK), f"{argv[0]} is missing: install the project (scripts/install.sh)"
    return argv


def environment(service: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in service.get("Environment", []):
        for assignment in shlex.split(entry):
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


def stop_seconds(service: dict[str, list[str]]) -> float:
    return float(service["TimeoutStopSec"][0])


def served(path: str, proc: subprocess.Popen[str]) -> list[int]:
    """Wait until the host answers on ``path``; encode once; the worker pids."""

    def answers() -> bool:
        assert proc.poll() is None, "the service exited"
        with HostClient(path, timeout=10) as client:
            try:
                client.ping()
                return True
            except OSError:
                return False

    poll(answers, 60, interval=0.1, what=f"the service on {path}")
    with HostClient(path, timeout=10) as client:
        assert client.encode(["안녕하세요", "hello"]).shape[0] == 2
        return [w["pid"] for w in client.status()["workers"]]


def stopped_by_sigterm(proc: subprocess.Popen[str], workers: list[int], seconds: float) -> None:
    proc.send_signal(signal.SIGTERM)  # KillMode=mixed: SIGTERM to the main process only
    assert proc.wait(seconds) == 0
    poll(lambda: not any(pid_alive(pid) for pid in workers), 10, what="the workers to end")


def service_env(service: dict[str, list[str]], tmp_path: Path) -> dict[str, str]:
    env = base_env(**environment(service))
    assert env["SHM_MODEL_LOG_FORMAT"] == "json" and env["SHM_MODEL_SOCKET"].startswith("/run/shm-model/")
    runtime = tmp_path / "run"  # RuntimeDirectory=shm-model with RuntimeDirectoryMode=0700
    runtime.mkdir(mode=int(service["RuntimeDirectoryMode"][0], 8))
    env.update(
        SHM_MODEL_SOCKET=str(runtime / Path(env["SHM_MODEL_SOCKET"]).name),
        MODEL_CACHE_DIR=str(tmp_path / "cache"),
        SHM_MODEL_BACKEND="dummy",
    )
    return env


def test_the_service_command_line_serves_logs_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    service = unit("shm-model.service")["Service"]
    assert service["KillMode"] == ["mixed"] and service["RestartPreventExitStatus"] == ["2"]
    env = service_env(service, tmp_path)
    log = tmp_path / "service.log"
    with started(command_line(service), env, log) as proc:
        workers = served(env["SHM_MODEL_SOCKET"], proc)
        stopped_by_sigterm(proc, workers, stop_seconds(service))
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert {r["role"].split()[0] for r in records} >= {"supervisor", "worker"}
    assert all(isinstance(r["pid"], int) for r in records)
    assert not os.path.exists(env["SHM_MODEL_SOCKET"])


def test_socket_activation_serves_the_socket_systemd_holds_and_leaves_it(tmp_path: Path) -> None:
    service = unit("shm-model.service")["Service"]
    sock_unit = unit("shm-model.socket")["Socket"]
    (listen_stream,) = sock_unit["ListenStream"]
    assert listen_stream.startswith("/") and Path(listen_stream).parent != Path("/run/shm-model")
    env = service_env(service, tmp_path)
    path = tmp_path / Path(listen_stream).name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:  # what systemd holds
        held.bind(str(path))
        os.chmod(path, int(sock_unit["SocketMode"][0], 8))
        held.listen(int(sock_unit["Backlog"][0]))
        for run in range(2):  # a restarted service takes the same socket again
            with started(command_line(service), env, tmp_path / f"service{run}.log", fd=held.fileno()) as proc:
                workers = served(str(path), proc)
                assert not os.path.exists(env["SHM_MODEL_SOCKET"])  # it bound no socket of its own
                stopped_by_sigterm(proc, workers, stop_seconds(service))
            assert path.is_socket()
