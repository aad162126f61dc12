"""Memory figures, log setup and the package's lazy public names, in process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import shm_model
from shm_model import logs, memory
from shm_model.memory import _kind, process_memory, smaps_breakdown, total_memory


def test_process_memory_of_this_process_and_of_a_gone_one() -> None:
    figures = process_memory(os.getpid())
    assert figures is not None and set(figures) == {"rss", "pss", "uss"}
    info = psutil.Process().memory_full_info()
    assert abs(figures["rss"] - info.rss) < 64 << 20
    assert 0 < figures["uss"] <= figures["pss"] <= figures["rss"]
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    assert process_memory(gone.pid) is None


@pytest.mark.parametrize("exc", [psutil.NoSuchProcess(1), psutil.AccessDenied(1), psutil.ZombieProcess(1)])
def test_process_memory_is_none_when_unreadable(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    class Unreadable:
        def __init__(self, pid: int) -> None:
            raise exc

    monkeypatch.setattr(memory.psutil, "Process", Unreadable)
    assert process_memory(1) is None


def test_total_memory_sums_each_figure_and_skips_gone_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = {1: {"rss": 10, "pss": 5, "uss": 2}, 2: {"rss": 100, "pss": 50, "uss": 20}, 3: None}
    monkeypatch.setattr(memory, "process_memory", figures.get)
    assert total_memory([1, 2, 3]) == {"rss": 110, "pss": 55, "uss": 22}
    assert total_memory([]) == {"rss": 0, "pss": 0, "uss": 0}


def test_mappings_are_told_apart_by_path() -> None:
    for path in ("/m/model.safetensors", "/m/pytorch_model.bin", "/m/w.pt", "/m/w.pth"):
        assert _kind(path) == "weight-file"
    assert _kind("/dev/shm/torch_1") == "shm"
    assert _kind("/memfd:torch (deleted)") == "shm"
    assert _kind("/usr/lib/libc.so.6") == "code-and-files"
    assert _kind("[heap]") == "heap-and-anon"
    assert _kind("") == "heap-and-anon"


def test_smaps_breakdown_sums_private_pages_per_kind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "7f00-7f10 r--p 00000000 08:01 1 /m/model.safetensors\n"
        "Size:                 64 kB\n"
        "Private_Clean:         4 kB\n"
        "Private_Dirty:         0 kB\n"
        "7f10-7f20 rw-p 00000000 00:00 0 \n"
        "Private_Clean:         1 kB\n"
        "Private_Dirty:         8 kB\n"
        "7f20-7f30 rw-s 00000000 00:01 2 /dev/shm/torch_1\n"
        "Private_Dirty:         2 kB\n"
        "7f30-7f40 r-xp 00000000 08:01 3 /usr/lib/lib a.so\n"
        "Private_Clean:         3 kB\n"
        "VmFlags: rd ex mr mw me\n"
        "7f40-7f50 rw-p 00000000 00:00 0 [heap]\n"
        "Private_Dirty:         5 kB\n"
        "7f50-7f60 r--p 00000000 08:01 4 /models/my model/model.safetensors\n"
        "Private_Clean:         6 kB\n"
    )
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(smaps if path == "/proc/7/smaps" else path))
    assert smaps_breakdown(7) == {
        "weight-file": {"private_clean": 4096 + 6144, "private_dirty": 0},  # a path with a space too
        "heap-and-anon": {"private_clean": 1024, "private_dirty": 13 * 1024},
        "shm": {"private_clean": 0, "private_dirty": 2048},
        "code-and-files": {"private_clean": 3072, "private_dirty": 0},
    }


def test_smaps_breakdown_of_this_process() -> None:
    breakdown = smaps_breakdown(os.getpid())
    assert breakdown["code-and-files"]["private_clean"] + breakdown["code-and-files"]["private_dirty"] > 0
    assert breakdown["heap-and-anon"]["private_dirty"] > 1 << 20


@pytest.fixture
def clean_root() -> logging.Logger:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._role)
    root.handlers = [h for h in root.handlers if not getattr(h, "_shm_model", False)]
    yield root
    root.handlers, root.level, logs._role = saved[0], saved[1], saved[2]


def test_log_lines_carry_role_and_pid(clean_root: logging.Logger, capsys: pytest.CaptureFixture) -> None:
    logs.setup("debug", role="worker")
    ours = [h for h in clean_root.handlers if getattr(h, "_shm_model", False)]
    assert len(ours) == 1 and ours[0].stream is sys.stderr
    assert clean_root.level == logging.DEBUG
    logging.getLogger("shm_model.test").debug("hello %s", "there")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f"DEBUG [worker {os.getpid()}] shm_model.test: hello there")
    logs.setup("warning")  # a second setup changes the level and keeps one handler and the role
    assert [h for h in clean_root.handlers if getattr(h, "_shm_model", False)] == ours
    assert ours[0].level == logging.WARNING and clean_root.level == logging.WARNING
    logging.getLogger("shm_model.test").warning("w")
    assert f"[worker {os.getpid()}]" in capsys.readouterr().err
    logs.set_role("supervisor")
    logging.getLogger("shm_model.test").error("e")
    assert f"ERROR [supervisor {os.getpid()}]" in capsys.readouterr().err


def test_the_role_is_client_until_named(clean_root: logging.Logger) -> None:
    logs._role = "client"
    logs.setup()
    assert clean_root.level == logging.INFO
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert logs._RoleFilter().filter(record) is True
    assert record.role == "client"  # type: ignore[attr-defined]


def test_public_names_are_lazy_and_stay_what_they_are() -> None:
    from shm_model.client import HostClient
    from shm_model.manager import ModelManager

    assert shm_model.HostClient is HostClient
    assert shm_model.ModelManager is ModelManager
    assert shm_model.__dict__["HostClient"] is HostClient  # cached after the first look-up
    for name in shm_model.__all__:
        assert getattr(shm_model, name) is not None
    with pytest.raises(AttributeError) as info:
        shm_model.nothing  # noqa: B018
    assert str(info.value) == "module 'shm_model' has no attribute 'nothing'"


def test_json_log_lines_are_one_object_each_with_role_pid_and_extras(
    clean_root: logging.Logger, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.setenv("SHM_MODEL_LOG_FORMAT", "json")
    monkeypatch.setenv("SHM_MODEL_LOG_LEVEL", "warning")
    logs.setup(role="supervisor")
    assert clean_root.level == logging.WARNING
    logger = logging.getLogger("shm_model.test")
    logger.info("not shown")
    logger.warning("café %d", 3, extra={"worker": 7})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "café" in lines[0]  # not escaped to \u00e9
    record = json.loads(lines[0])
    assert {k: v for k, v in record.items() if k != "time"} == {
        "level": "WARNING",
        "role": "supervisor",
        "pid": os.getpid(),
        "logger": "shm_model.test",
        "message": "café 3",
        "worker": 7,
    }
    assert record["time"].startswith("20")
    logs.setup(log_format="text")  # the level still comes from the environment
    assert clean_root.level == logging.WARNING
    logger.warning("plain")
    assert capsys.readouterr().err.strip().endswith(f"WARNING [supervisor {os.getpid()}] shm_model.test: plain")


def test_setup_reads_only_what_it_was_not_given(
    clean_root: logging.Logger, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHM_MODEL_LOG_FORMAT", "json")
    monkeypatch.setenv("SHM_MODEL_LOG_LEVEL", "error")
    logs.setup("debug", role="worker g1")
    assert clean_root.level == logging.DEBUG
    logging.getLogger("shm_model.test").debug("d")
    assert capsys.readouterr().err.startswith('{"time"')
    monkeypatch.delenv("SHM_MODEL_LOG_FORMAT")
    monkeypatch.setenv("SHM_MODEL_LOG_LEVEL", "bogus")
    logs.setup("info", log_format="text")  # both given: the bad variable is not read
    logging.getLogger("shm_model.test").info("i")
    assert capsys.readouterr().err.strip().endswith(f"INFO [worker g1 {os.getpid()}] shm_model.test: i")
    monkeypatch.delenv("SHM_MODEL_LOG_LEVEL")
    logs.setup()  # neither given nor set: info, as text
    assert clean_root.level == logging.INFO
    logging.getLogger("shm_model.test").info("i")
    assert capsys.readouterr().err.strip().endswith(f"INFO [worker g1 {os.getpid()}] shm_model.test: i")
    logs.setup("info", log_format="json")  # the handler that is there changes format
    logging.getLogger("shm_model.test").info("j")
    assert capsys.readouterr().err.startswith('{"time"')


def test_a_bad_log_setting_is_a_config_error(clean_root: logging.Logger, monkeypatch: pytest.MonkeyPatch) -> None:
    from shm_model.errors import ConfigError

    monkeypatch.setenv("SHM_MODEL_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="SHM_MODEL_LOG_FORMAT='xml' is invalid"):
        logs.setup("info")
