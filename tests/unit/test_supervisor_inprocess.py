"""A whole host in the test process: the supervisor's event loop runs in the main thread and forks
dummy-backend workers; a client thread talks to it and stops it. The subprocess suites test the
same behaviour from outside; this one lets a tracing tool see the supervisor's code run."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config.model_config import HostConfig, ModelConfig
from shm_model.client import HostClient, wait_for_host
from shm_model.errors import BadRequest, HostUnavailable, PermissionDenied, WorkerCrashed
from shm_model.host import supervisor as supervisor_module
from shm_model.host.supervisor import Supervisor, available_cores, single_threaded
from tests.conftest import poll
from workers.backends import DummyBackend

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


@pytest.fixture
def host_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What serving changes in this process, put back after: signal handlers, thread settings."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def serve(tmp_path: Path, script: Callable[[str], Any], **env: str) -> tuple[int, Any, Supervisor]:
    """Run a host until ``script`` (in a thread, given the socket path) stops it; return its exit
    code, what the script returned, and the supervisor."""
    socket_path = str(tmp_path / "run" / "host.sock")
    settings = {"SHM_MODEL_BACKEND": "dummy", "SHM_MODEL_SOCKET": socket_path, "SHM_MODEL_WORKERS": "1", **env}
    supervisor = Supervisor(ModelConfig.load({}), HostConfig.load(settings))
    outcome: dict[str, Any] = {}

    def drive() -> None:
        try:
            outcome["result"] = script(socket_path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            outcome["error"] = exc
            os.kill(os.getpid(), signal.SIGTERM)  # do not leave the host serving

    thread = threading.Thread(target=drive)
    thread.start()
    code = supervisor.run()
    thread.join(30)
    if "error" in outcome:
        raise outcome["error"]
    return code, outcome.get("result"), supervisor


def test_a_host_serves_every_op_reloads_and_stops(tmp_path: Path, host_env: None) -> None:
    def script(socket_path: str) -> dict[str, Any]:
        seen: dict[str, Any] = {"ping": wait_for_host(socket_path, timeout=30)}
        with HostClient(socket_path, timeout=30) as c:
            seen["info"] = c.info()
            seen["vectors"] = c.encode(["a", "b"])
            seen["prompted"] = c.encode(["a"], prompt_name="query")
            seen["usage"] = c.encode(["abc"], return_usage=True)[1]
            with pytest.raises(BadRequest) as unknown:
                c.request("nope")
            seen["unknown"] = str(unknown.value)
            with pytest.raises(BadRequest):
                c.request("encode", texts=[1])
            seen["status"] = c.status()
            seen["reload"] = c.reload()
            seen["after"] = c.status()
            seen["stop"] = c.stop()
        return seen

    code, seen, supervisor = serve(tmp_path, script)
    assert code == 0
    assert seen["ping"] == {"pid": os.getpid(), "generation": 0}
    assert seen["info"]["model"] == "dummy" and seen["info"]["dimension"] == 32
    assert seen["info"]["pid"] == os.getpid()
    assert np.array_equal(seen["vectors"][1], DummyBackend.vector("b"))
    assert np.array_equal(seen["prompted"][0], DummyBackend.vector("query: a"))
    assert seen["usage"] > 0
    assert seen["unknown"].startswith("unknown op 'nope'")
    status = seen["status"]
    assert status["start_method"] == "fork" and len(status["workers"]) == 1
    assert status["workers"][0]["requests_served"] >= 3
    assert status["socket"] == str(tmp_path / "run" / "host.sock")
    assert status["cores"] == available_cores()
    assert status["threads_per_worker"] == "auto"
    assert status["stopping"] is False and status["in_flight"] == 0
    assert status["counters"]["errors_bad_request"] == 2
    assert status["memory"]["pss"] > 0 and status["supervisor"]["pid"] == os.getpid()
    assert status["boot_seconds"]["fork_until_ready"] > 0
    assert seen["reload"]["generation"] == 1
    assert seen["after"]["counters"]["reloads"] == 1
    assert [w["generation"] for w in seen["after"]["workers"]] == [1]
    assert seen["stop"] == {"stopping": True, "pid": os.getpid()}
    assert not os.path.exists(tmp_path / "run" / "host.sock")
    assert not os.path.exists(tmp_path / "run")
    assert supervisor.pool.workers == {} or all(not w for w in supervisor.pool.workers.values())


def test_a_stopping_host_refuses_new_work_and_sigterm_stops_it(tmp_path: Path, host_env: None) -> None:
    def script(socket_path: str) -> dict[str, Any]:
        wait_for_host(socket_path, timeout=30)
        seen: dict[str, Any] = {}
        with HostClient(socket_path, timeout=30) as c:
            c.encode(["warm"])
            supervisor_ref["s"]._stopping = True  # as during a drain
            with pytest.raises(HostUnavailable) as info:
                c.encode(["a"])
            seen["refused"] = str(info.value)
            seen["status"] = c.status()["stopping"]
            supervisor_ref["s"]._stopping = False
        os.kill(os.getpid(), signal.SIGTERM)
        return seen

    supervisor_ref: dict[str, Supervisor] = {}
    original = Supervisor.__init__

    def remember(self: Supervisor, *args: Any) -> None:
        original(self, *args)
        supervisor_ref["s"] = self

    Supervisor.__init__ = remember  # type: ignore[method-assign]
    try:
        code, seen, _ = serve(tmp_path, script)
    finally:
        Supervisor.__init__ = original  # type: ignore[method-assign]
    assert code == 0
    assert seen == {"refused": "the host is shutting down", "status": True}


def test_only_the_host_s_user_may_stop_or_reload_it(
    tmp_path: Path, host_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    me = os.getuid()

    def script(socket_path: str) -> list[str]:
        wait_for_host(socket_path, timeout=30)
        refused = []
        with HostClient(socket_path, timeout=30) as c:
            monkeypatch.setattr(supervisor_module.os, "getuid", lambda: me + 1)
            for op in ("stop", "reload"):
                with pytest.raises(PermissionDenied) as info:
                    c.request(op)
                refused.append(str(info.value))
            monkeypatch.setattr(supervisor_module.os, "getuid", lambda: me)
            c.stop()
        return refused

    code, refused, _ = serve(tmp_path, script, SHM_MODEL_ALLOWED_UIDS=str(me))
    assert code == 0
    assert refused == [
        f"only the host's own user (uid {me + 1}) may stop it, not uid {me}",
        f"only the host's own user (uid {me + 1}) may reload it, not uid {me}",
    ]


def test_a_batch_that_kills_its_worker_is_retried_then_refused_and_sighup_reloads(
    tmp_path: Path, host_env: None
) -> None:
    def script(socket_path: str) -> dict[str, Any]:
        wait_for_host(socket_path, timeout=30)
        seen: dict[str, Any] = {}
        with HostClient(socket_path, timeout=30) as c:
            with pytest.raises(WorkerCrashed) as info:
                c.encode(["__crash__"])
            seen["crashed"] = str(info.value)
            seen["after"] = c.encode(["a"]).shape  # a new worker serves
            os.kill(os.getpid(), signal.SIGHUP)
            poll(lambda: c.ping()["generation"] == 1, 30, what="the reload SIGHUP asked for")
            seen["status"] = c.status()
            c.stop()
        return seen

    code, seen, _ = serve(tmp_path, script, SHM_MODEL_CRASH_RETRIES="1")
    assert code == 0
    assert seen["crashed"] == "the request crashed a worker 2 times; it was not retried again"
    assert seen["after"] == (1, 32)
    assert seen["status"]["generation"] == 1
    assert seen["status"]["counters"]["reloads"] == 1


def test_single_threaded_keeps_settings_that_were_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    try:
        single_threaded()
        assert os.environ["OMP_NUM_THREADS"] == "3"
        assert os.environ["MKL_NUM_THREADS"] == "1"
        assert os.environ["GOMP_SPINCOUNT"] == "30000" and "OMP_WAIT_POLICY" not in os.environ
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("GOMP_SPINCOUNT")
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # a policy given by the user is kept, alone
        single_threaded()
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    finally:
        torch.set_num_threads(threads)


def test_available_cores_is_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    assert available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(supervisor_module.os, "sched_getaffinity", lambda pid: set())
    assert available_cores() == 1
    monkeypatch.delattr(supervisor_module.os, "sched_getaffinity")
    monkeypatch.setattr(supervisor_module.os, "cpu_count", lambda: None)
    assert available_cores() == 1
