"""The other processes' load on the host's cores, from /proc files given as text."""

from __future__ import annotations

import os

import pytest

from shm_model.host.cpuload import OutsideLoad, busy_ticks, process_ticks
from shm_model.scheduling import CoreShare

STAT = """cpu  {a} 0 {b} 900 10 0 0 0 0 0
cpu0 {a0} 0 {b0} 400 5 0 1 0 0 0
cpu1 {a1} 0 {b1} 500 5 0 0 0 0 0
cpu2 7000 0 0 100 0 0 0 0 0 0
intr 12345
"""


def stat(cpu0: int, cpu1: int) -> str:
    return STAT.format(a=cpu0 + cpu1, b=0, a0=cpu0, b0=0, a1=cpu1, b1=0)


def pid_stat(pid: int, ticks: int) -> str:
    # pid (comm with ) and spaces) state ppid ... utime(14) stime(15)
    rest = " ".join(["S"] + ["0"] * 10 + [str(ticks), "0"] + ["0"] * 20)
    return f"{pid} (python -m shm) x) {rest}"


def test_busy_ticks_count_only_our_cpus_and_not_idle_or_iowait() -> None:
    text = "cpu0 10 1 2 400 5 3 1 0 0 0\ncpu1 20 0 0 500 5 0 0 0 0 0\ncpu2 999 0 0 0 0 0 0 0 0 0\n"
    assert busy_ticks(text, {0}) == 10 + 1 + 2 + 3 + 1
    assert busy_ticks(text, {0, 1}) == 17 + 20
    assert busy_ticks(text, {5}) == 0


def test_process_ticks_read_user_and_system_time_after_a_command_with_spaces() -> None:
    assert process_ticks(pid_stat(7, 42)) == 42
    assert process_ticks(pid_stat(7, 0).replace(" 0 0 0 0 0 0 0 0 0 0 0 0", " 0 0 0 0 0 0 0 0 0 0 5 6", 1)) == 11


def test_outside_load_is_what_the_cores_did_beyond_the_hosts_processes() -> None:
    files: dict[str, str] = {}

    def read(path: str) -> str | None:
        return files.get(path)  # None, as for the /proc file of a process that exited

    load = OutsideLoad({0, 1}, read=read, ticks=100)
    files.update({"/proc/stat": stat(0, 0), "/proc/10/stat": pid_stat(10, 0), "/proc/11/stat": pid_stat(11, 0)})
    assert load.sample(0.0, [10, 11]) == 0.0 and load.cores() == 0  # nothing to compare with yet
    # In one second: 150 ticks on our cores, 40 of them the host's; cpu2 (not ours) is ignored.
    files.update({"/proc/stat": stat(100, 50), "/proc/10/stat": pid_stat(10, 30), "/proc/11/stat": pid_stat(11, 10)})
    assert load.sample(1.0, [10, 11]) == 1.1 and load.cores() == 1
    # The next second: only the host works (a worker that exited is simply not read).
    files.update({"/proc/stat": stat(200, 50), "/proc/10/stat": pid_stat(10, 130)})
    del files["/proc/11/stat"]
    assert load.sample(2.0, [10, 11]) == 0.0 and load.cores() == 0
    # A worker that appeared counts whole; half a core of others counts as one.
    files.update({"/proc/stat": stat(300, 100), "/proc/10/stat": pid_stat(10, 180), "/proc/12/stat": pid_stat(12, 50)})
    assert load.sample(3.0, [10, 12]) == 0.5 and load.cores() == 1
    files.update({"/proc/stat": stat(1000, 1000)})
    load.sample(4.0, [])
    assert load.cores() == 2  # never more than our cores


def test_outside_load_reads_this_machine() -> None:
    load = OutsideLoad(os.sched_getaffinity(0))
    load.sample(0.0, [os.getpid()])
    assert load.sample(1.0, [os.getpid()]) >= 0.0


def test_an_unreadable_proc_stat_is_an_error_the_supervisor_reports() -> None:
    load = OutsideLoad({0}, read=lambda path: None)
    with pytest.raises(OSError, match="/proc/stat"):
        load.sample(0.0, [])


def test_a_batch_gets_no_thread_on_a_core_other_processes_keep_busy() -> None:
    share = CoreShare(2, 2)
    assert share.threads(0.0, held=0, busy_workers=0, idle_workers=2, waiting_pieces=1) == 2
    share.outside = 1
    assert share.threads(0.0, held=0, busy_workers=0, idle_workers=2, waiting_pieces=1) == 1
    assert share.last(0.0, held=0) == 1
    assert share.bulk(held=0, bulk_running=False) == 1
    # Never fewer than one: a batch on one thread waits for no other, so it still starts.
    share.outside = 2
    assert share.threads(0.0, held=0, busy_workers=0, idle_workers=2, waiting_pieces=1) == 1
    assert share.threads(0.0, held=1, busy_workers=1, idle_workers=1, waiting_pieces=1) == 1
    # Cores held by the host's own batches still block as before.
    share.outside = 0
    assert share.threads(0.0, held=2, busy_workers=2, idle_workers=0, waiting_pieces=1) == 0
    assert share.bulk(held=0, bulk_running=True) == 0
