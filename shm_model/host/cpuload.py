"""How many of the host's cores other processes keep busy, so that no batch is given a core it
would have to share.

A batch on two threads beside one busy process runs at the pace of the thread that shares a
core: each of the model's parallel regions waits at its barrier for the thread the scheduler
preempted. Measured on the bundled model, 2 cores, a one-sentence query beside one busy-loop
process: p50 120-130 ms on 2 threads, 27-37 ms on 1. Batches on one thread each do not wait
for one another, so outside load only lowers how many threads a batch gets, never whether it
starts (``scheduling.CoreShare.outside``).

The load is read from /proc/stat for the CPUs this process may run on, less the CPU time of
the host's own processes (/proc/<pid>/stat), over the last sampling interval.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable

from shm_model.pressure import read_text

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: Seconds between two readings.
INTERVAL = 0.2
#: /proc/stat holds a line per CPU before its long interrupt counts: room for thousands of CPUs.
_read = functools.partial(read_text, limit=1 << 20)


def busy_ticks(proc_stat: str, cpus: set[int]) -> int:
    """Ticks the given CPUs spent on anything but idle and I/O wait, from /proc/stat's ``cpuN`` lines."""
    total = 0
    for line in proc_stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        fields = [int(v) for v in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(fields) - sum(fields[3:5])
    return total


def process_ticks(pid_stat: str) -> int:
    """User and system ticks of one process (its threads, not its children) from /proc/<pid>/stat."""
    fields = pid_stat.rpartition(")")[2].split()  # after the command, which may hold spaces
    return int(fields[11]) + int(fields[12])


class OutsideLoad:
    """Cores' worth of CPU that processes other than the host's used over the last interval."""

    def __init__(
        self, cpus: Iterable[int], read: Callable[[str], str | None] = _read, ticks: int = CLOCK_TICKS
    ) -> None:
        self.cpus = set(cpus)
        self.read = read
        self.ticks = ticks
        self.busy = 0.0  # cores, over the last interval
        self._last: tuple[float, int, dict[int, int]] | None = None

    def sample(self, now: float, pids: Iterable[int]) -> float:
        """Read the counters; the outside load since the previous reading (0 on the first).
        Raises OSError when /proc/stat cannot be read."""
        stat = self.read("/proc/stat")
        if stat is None:
            raise OSError("cannot read /proc/stat")
        cores = busy_ticks(stat, self.cpus)
        own: dict[int, int] = {}
        for pid in pids:
            text = self.read(f"/proc/{pid}/stat")  # None: a worker that just exited
            if text is not None:
                with contextlib.suppress(ValueError, IndexError):
                    own[pid] = process_ticks(text)
        if self._last is not None:
            then, cores_then, own_then = self._last
            # A process that appeared since counts whole (it started within the interval).
            mine = sum(ticks - own_then.get(pid, 0) for pid, ticks in own.items())
            seconds = now - then
            if seconds > 0:
                self.busy = max(0.0, (cores - cores_then - mine) / self.ticks / seconds)
        self._last = (now, cores, own)
        return self.busy

    def cores(self) -> int:
        """Whole cores the outside load takes: more than half a core busy counts as one."""
        return min(len(self.cpus), int(self.busy + 0.5))
