"""Memory pressure: what the host reads about memory, what a model generation needs, and when to degrade.

Readings (I/O, small and bounded):

* ``read_memory`` -- RAM available (``psutil``), the cgroup's limit and working set (v2 ``memory.max`` /
  ``memory.current``, v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``, both less inactive file pages),
  PSI ``memory.pressure`` and the OOM-kill count (the cgroup's, else the system's ``/proc/vmstat``);
* ``checkpoint_bytes`` -- the weight bytes of a model directory by dtype, from safetensors headers (no torch).

Rules (pure: the clock and the readings are passed in, so they run in unit tests with fake ones):

* ``check_fits`` -- refuse a load or a reload that does not fit, naming needed and available bytes;
* ``reload_mode`` -- overlap (two generations at once) or swap (the old one released first);
* ``exit_cause`` -- why a worker ended: ``oom_kill``, ``watchdog`` or ``crash``;
* ``PressurePolicy`` -- degrade (fewer workers, smaller batches, a shorter queue) under pressure, restore after;
* ``HealthWindow`` -- recent error rate and p99 latency, for ``degraded`` and its reason.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import signal
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from config.model_config import HostConfig
from shm_model.errors import InsufficientMemory

log = logging.getLogger(__name__)

#: cgroup v1 reports "no limit" as a number near 2**63; anything above this is no limit.
NO_LIMIT = 1 << 60
#: Largest pseudo-file read (memory.stat is about 1 KiB; a settings-pointed directory may hold anything).
MAX_FILE_BYTES = 64 * 1024
#: Largest safetensors header read to count a checkpoint's bytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Working memory of a worker before one was measured (a forked worker after torch import: 40-60 MB).
DEFAULT_WORKER_BYTES = 64 * 1024 * 1024
#: Bytes per element of the safetensors dtypes.
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Restart causes of a worker, as reported in the log, status and metrics.
CAUSES = ("oom_kill", "watchdog", "crash")
#: Reasons a host says it is degraded (the ``reason`` label of ``shm_model_host_degraded``).
DEGRADED_KINDS = ("memory_pressure", "workers_below_target", "error_rate", "latency")
#: Memory of the model runtime in the supervisor: PSS after ``import torch, sentence_transformers`` was 329 MB.
RUNTIME_BYTES = {"sentence-transformers": 330 * 2**20, "dummy": 0}


def mib(n: int | float | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:.0f} MiB"


# --- readings --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Cgroup:
    """The memory files of one cgroup: ``version`` 2 (unified) or 1 (the memory controller)."""

    version: int
    directory: str

    @property
    def limit_file(self) -> str:
        return os.path.join(self.directory, "memory.max" if self.version == 2 else "memory.limit_in_bytes")

    @property
    def usage_file(self) -> str:
        return os.path.join(self.directory, "memory.current" if self.version == 2 else "memory.usage_in_bytes")

    @property
    def events_file(self) -> str:
        return os.path.join(self.directory, "memory.events" if self.version == 2 else "memory.oom_control")


def find_cgroup(directory: str | None = None, proc_cgroup: str = "/proc/self/cgroup") -> Cgroup | None:
    """The cgroup whose memory the host watches: ``directory`` if given (SHM_MODEL_CGROUP), else this
    process's own from ``/proc/self/cgroup``; None outside any cgroup with a memory controller."""
    if directory:
        if os.path.exists(os.path.join(directory, "memory.max")):
            return Cgroup(version=2, directory=directory)
        if os.path.exists(os.path.join(directory, "memory.limit_in_bytes")):
            return Cgroup(version=1, directory=directory)
        return None
    text = read_text(proc_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "memory" in controllers.split(","):
            root = "/sys/fs/cgroup/memory"
            for candidate in (root + path, root):
                if os.path.exists(os.path.join(candidate, "memory.limit_in_bytes")):
                    return Cgroup(version=1, directory=candidate)
        elif controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            for candidate in ("/sys/fs/cgroup" + path.rstrip("/"), "/sys/fs/cgroup"):
                if os.path.exists(os.path.join(candidate, "memory.max")):
                    return Cgroup(version=2, directory=candidate)
    return None


def read_text(path: str, limit: int = MAX_FILE_BYTES) -> str | None:
    """The first ``limit`` bytes of a small kernel file (/proc, /sys), or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("ascii", "replace")
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    value = text.strip()
    if value == "max":
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return None if number >= NO_LIMIT or number < 0 else number


def _keyed(path: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control, /proc/vmstat)."""
    out: dict[str, int] = {}
    for line in (read_text(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def read_psi(path: str) -> float | None:
    """The ``some avg10`` of a PSI file: percent of the last 10 s in which some task waited for memory."""
    for line in (read_text(path) or "").splitlines():
        if line.startswith("some "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                if key == "avg10":
                    try:
                        number = float(value)
                    except ValueError:
                        return None
                    return number if math.isfinite(number) and number >= 0 else None
    return None


@dataclass(frozen=True, kw_only=True)
class MemoryReading:
    """One look at memory. Byte counts; None where the figure cannot be read."""

    available: int  # RAM the kernel could give without swapping (psutil)
    total: int  # physical RAM
    cgroup_limit: int | None = None
    cgroup_usage: int | None = None  # the cgroup's working set: usage less inactive file pages
    psi: float | None = None  # PSI memory "some avg10", percent
    oom_kills: int | None = None
    host_usage: int | None = None  # PSS of the host's processes, when measured

    def ceiling(self, memory_limit: int | None) -> int:
        """The most the host may use: RAM, the cgroup limit and SHM_MODEL_MEMORY_LIMIT, whichever is least."""
        return min(x for x in (self.total, self.cgroup_limit, memory_limit) if x is not None)

    def headroom(self, memory_limit: int | None) -> int:
        """Bytes the host can still take: RAM available, room in the cgroup, room under SHM_MODEL_MEMORY_LIMIT."""
        room = [self.available]
        if self.cgroup_limit is not None and self.cgroup_usage is not None:
            room.append(self.cgroup_limit - self.cgroup_usage)
        if memory_limit is not None and self.host_usage is not None:
            room.append(memory_limit - self.host_usage)
        return max(0, min(room))

    def as_dict(self, memory_limit: int | None) -> dict[str, int | float | None]:
        return {
            "available": self.available,
            "total": self.total,
            "cgroup_limit": self.cgroup_limit,
            "cgroup_usage": self.cgroup_usage,
            "memory_limit": memory_limit,
            "host_usage": self.host_usage,
            "headroom": self.headroom(memory_limit),
            "ceiling": self.ceiling(memory_limit),
            "psi_some_avg10": self.psi,
            "oom_kills": self.oom_kills,
        }


def read_oom_kills(cgroup: Cgroup | None) -> int | None:
    """OOM kills counted by the cgroup (``oom_kill`` of memory.events / memory.oom_control), else by the
    whole system (``/proc/vmstat``, kernel 4.13+)."""
    if cgroup is not None:
        count = _keyed(cgroup.events_file).get("oom_kill")
        if count is not None:
            return count
    return _keyed("/proc/vmstat").get("oom_kill")


def read_memory(cgroup: Cgroup | None, host_pids: Iterable[int] = ()) -> MemoryReading:
    vm = psutil.virtual_memory()
    limit = usage = None
    psi_path = "/proc/pressure/memory"
    if cgroup is not None:
        limit = _read_int(cgroup.limit_file)
        usage = _read_int(cgroup.usage_file)
        if usage is not None:
            stat = _keyed(os.path.join(cgroup.directory, "memory.stat"))
            inactive = stat.get("inactive_file" if cgroup.version == 2 else "total_inactive_file", 0)
            usage = max(0, usage - inactive)
        if cgroup.version == 2 and os.path.exists(os.path.join(cgroup.directory, "memory.pressure")):
            psi_path = os.path.join(cgroup.directory, "memory.pressure")
    host_usage = None
    pids = list(host_pids)
    if pids:
        from shm_model.memory import total_memory

        host_usage = total_memory(pids)["pss"]
    return MemoryReading(
        available=int(vm.available),
        total=int(vm.total),
        cgroup_limit=limit,
        cgroup_usage=usage,
        psi=read_psi(psi_path),
        oom_kills=read_oom_kills(cgroup),
        host_usage=host_usage,
    )


# --- what a generation needs ----------------------------------------------------------------------


def _safetensors_bytes(path: str) -> dict[str, int]:
    """Bytes of each dtype in a safetensors file, from its header (bounded; no tensor is read)."""
    out: dict[str, int] = collections.Counter()
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than its header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"header of {length} bytes is over {MAX_HEADER_BYTES}")
        header = json.loads(fh.read(length))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        offsets = entry.get("data_offsets")
        dtype = str(entry.get("dtype"))
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets):
            out[dtype] += max(0, offsets[1] - offsets[0])
    return dict(out)


def checkpoint_bytes(directory: str) -> dict[str, int]:
    """Weight bytes of the model in ``directory`` by dtype (``F32``, ``BF16``, ...; ``other`` for pickled
    checkpoints, counted by file size). The weights load in the checkpoint's dtype (transformers 5's default)."""
    total: dict[str, int] = collections.Counter()
    safetensors = False
    for root, _, files in os.walk(directory):
        for name in files:
            if name.endswith(".safetensors"):
                safetensors = True
                try:
                    for dtype, nbytes in _safetensors_bytes(os.path.join(root, name)).items():
                        total[dtype] += nbytes
                except (OSError, ValueError) as exc:
                    log.warning("cannot read the header of %s (%s); counting its size", name, exc)
                    total["other"] += os.path.getsize(os.path.join(root, name))
    if not safetensors:  # pickled weights only: the file size is the estimate
        for root, _, files in os.walk(directory):
            total["other"] += sum(os.path.getsize(os.path.join(root, n)) for n in files if n.endswith(WEIGHT_SUFFIXES))
    return dict(total)


@dataclass(frozen=True, kw_only=True)
class GenerationNeeds:
    """What one generation of the model holds: weights by place (``file``: a read-only mapping of the
    checkpoint, shared through the page cache; ``shm``/``anon``: a copy in memory; ``int8``/``packed``:
    quantized or oneDNN-packed copies in the supervisor's memory) plus each worker's own working memory."""

    weights: Mapping[str, int]
    workers: int
    worker_bytes: int = DEFAULT_WORKER_BYTES
    runtime: int = 0  # the model runtime's own memory, paid once per host (RUNTIME_BYTES)

    @classmethod
    def from_checkpoint(
        cls,
        by_dtype: Mapping[str, int],
        *,
        placement: str,
        workers: int,
        worker_bytes: int = DEFAULT_WORKER_BYTES,
        runtime: int = 0,
    ) -> GenerationNeeds:
        """Before a load: safetensors weights stay file mappings with SHM_MODEL_WEIGHTS=auto and become
        shared memory with shm; pickled weights (``other``) are always copied."""
        mapped = sum(v for k, v in by_dtype.items() if k != "other") if placement == "auto" else 0
        copied = sum(by_dtype.values()) - mapped
        return cls(weights={"file": mapped, "shm": copied}, workers=workers, worker_bytes=worker_bytes, runtime=runtime)

    def total(self) -> int:
        """Bytes to load this generation with nothing else running."""
        return self.runtime + sum(self.weights.values()) + self.workers * self.worker_bytes

    def second(self) -> int:
        """Bytes a second generation adds beside this one: every weight it holds in memory (shared, private,
        quantized or packed) and its workers; file-mapped weights of the same checkpoint are the same
        page-cache pages."""
        return sum(v for k, v in self.weights.items() if k != "file") + self.workers * self.worker_bytes

    def describe(self) -> str:
        parts = [f"{mib(v)} {k}" for k, v in self.weights.items() if v]
        runtime = f"runtime {mib(self.runtime)}, " if self.runtime else ""
        return f"{runtime}weights {' + '.join(parts) or '0'}, {self.workers} workers x {mib(self.worker_bytes)}"


def check_fits(needed: int, available: int, *, what: str = "load the model", hint: str = "") -> None:
    """Raise ``InsufficientMemory`` naming both figures when ``needed`` bytes are more than ``available``."""
    if needed > available:
        raise InsufficientMemory(
            f"not enough memory to {what}: needs {mib(needed)}, {mib(available)} available"
            + (f"; {hint}" if hint else ""),
            needed=needed,
            available=available,
        )


def reload_mode(setting: str, needs: GenerationNeeds, headroom: int) -> str:
    """``overlap`` (new workers start before the old ones retire) when a second generation fits in
    ``headroom``; otherwise ``swap`` (the old generation is released first) unless SHM_MODEL_RELOAD=overlap,
    which refuses with the numbers."""
    if setting == "swap":
        return "swap"
    if needs.second() <= headroom:
        return "overlap"
    if setting == "overlap":
        check_fits(
            needs.second(),
            headroom,
            what="reload beside the serving model",
            hint=f"{needs.describe()}; set SHM_MODEL_RELOAD=swap or auto to release the old generation first",
        )
    return "swap"


# --- why a worker ended -----------------------------------------------------------------------------


def exit_cause(exit_code: int | None, *, aborted: bool, oom_before: int | None, oom_after: int | None) -> str:
    """``watchdog`` when the host aborted the worker, ``oom_kill`` when it died by SIGKILL that the host did
    not send while the OOM-kill count rose, ``crash`` otherwise."""
    if aborted:
        return "watchdog"
    killed = exit_code == -signal.SIGKILL
    if killed and oom_before is not None and oom_after is not None and oom_after > oom_before:
        return "oom_kill"
    return "crash"


# --- degrade and restore -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Capacity:
    """What the host runs with: workers, padded tokens per batch and requests admitted at once."""

    workers: int
    max_batch_tokens: int
    queue_size: int


@dataclass(frozen=True, kw_only=True)
class PressureThresholds:
    low_fraction: float = 0.1  # headroom below this share of the ceiling is pressure
    psi: float = 10.0  # PSI some avg10 (percent) above this is pressure
    hold: float = 30.0  # seconds without pressure before restoring
    memory_limit: int | None = None  # SHM_MODEL_MEMORY_LIMIT


class PressurePolicy:
    """Decides, from readings and the time, whether the host runs at full or degraded capacity.

    Pressure: headroom below ``low_fraction`` of the ceiling, or PSI above ``psi``. Under pressure the host
    halves its workers (at least one), quarters its padded-token cap per batch and quarters its queue. It
    restores once headroom is above twice the low mark and PSI at or below its threshold for ``hold`` seconds
    (no flapping at the edge).
    """

    def __init__(self, full: Capacity, thresholds: PressureThresholds) -> None:
        self.full = full
        self.thresholds = thresholds
        self.degraded_reason: str | None = None
        self.since: float | None = None  # when the current episode started
        self.calm_since: float | None = None
        self.episodes = 0

    @property
    def degraded(self) -> bool:
        return self.degraded_reason is not None

    def reduced(self) -> Capacity:
        full = self.full
        return Capacity(
            workers=max(1, full.workers // 2),
            max_batch_tokens=max(1, full.max_batch_tokens // 4),
            queue_size=max(1, full.queue_size // 4),
        )

    def capacity(self) -> Capacity:
        return self.reduced() if self.degraded else self.full

    def pressure(self, reading: MemoryReading) -> str | None:
        """Why ``reading`` is pressure, or None."""
        t = self.thresholds
        ceiling = reading.ceiling(t.memory_limit)
        headroom = reading.headroom(t.memory_limit)
        if headroom < t.low_fraction * ceiling:
            return f"memory pressure: {mib(headroom)} free of {mib(ceiling)} (below {t.low_fraction:.0%})"
        if reading.psi is not None and reading.psi > t.psi:
            return f"memory pressure: PSI some avg10 {reading.psi:.1f}% (above {t.psi:g}%)"
        return None

    def calm(self, reading: MemoryReading) -> bool:
        t = self.thresholds
        ceiling = reading.ceiling(t.memory_limit)
        psi_ok = reading.psi is None or reading.psi <= t.psi
        return psi_ok and reading.headroom(t.memory_limit) >= 2 * t.low_fraction * ceiling

    def update(self, now: float, reading: MemoryReading) -> Capacity:
        """Take a reading; return the capacity to run with from now on."""
        reason = self.pressure(reading)
        if reason is not None:
            if not self.degraded:
                self.episodes += 1
                self.since = now
            self.degraded_reason = reason
            self.calm_since = None
        elif self.degraded:
            if not self.calm(reading):
                self.calm_since = None
            elif self.calm_since is None:
                self.calm_since = now
            elif now - self.calm_since >= self.thresholds.hold:
                self.degraded_reason = None
                self.since = self.calm_since = None
        return self.capacity()


@dataclass
class HealthWindow:
    """Outcomes and latencies of the requests of the last ``window`` seconds (at most ``keep`` of them).
    Under ``min_samples`` requests there is no error rate and no p99: one slow first request is no trend."""

    window: float = 60.0
    keep: int = 4096
    min_samples: int = 20
    samples: collections.deque[tuple[float, bool, float]] = field(default_factory=collections.deque)

    def record(self, now: float, ok: bool, seconds: float) -> None:
        self.samples.append((now, ok, seconds))
        while len(self.samples) > self.keep:
            self.samples.popleft()

    def _recent(self, now: float) -> list[tuple[float, bool, float]]:
        while self.samples and self.samples[0][0] < now - self.window:
            self.samples.popleft()
        return list(self.samples)

    def error_rate(self, now: float) -> float | None:
        recent = self._recent(now)
        return sum(1 for _, ok, _ in recent if not ok) / len(recent) if len(recent) >= self.min_samples else None

    def p99(self, now: float) -> float | None:
        latencies = sorted(s for _, ok, s in self._recent(now) if ok)
        if len(latencies) < self.min_samples:
            return None
        return latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]


def degraded_reasons(
    *,
    pressure: str | None,
    workers: int,
    target: int,
    error_rate: float | None,
    max_error_rate: float,
    p99: float | None,
    max_p99: float,
) -> dict[str, str]:
    """Every reason the host is degraded now, by kind (``DEGRADED_KINDS``); empty when it is not."""
    reasons = {"memory_pressure": pressure} if pressure else {}
    if workers < target:
        reasons["workers_below_target"] = f"workers below target: {workers} of {target} ready"
    if error_rate is not None and error_rate > max_error_rate:
        reasons["error_rate"] = f"error rate {error_rate:.1%} over the last minute (above {max_error_rate:.1%})"
    if p99 is not None and p99 > max_p99:
        reasons["latency"] = f"p99 latency {p99 * 1000:.0f} ms over the last minute (above {max_p99 * 1000:.0f} ms)"
    return reasons


# --- the host's watch ----------------------------------------------------------------------------------


#: Seconds between measurements of the workers' own memory while serving.
WORKER_MEASURE_SECONDS = 30.0


class MemoryWatch:
    """The host's view of memory and of its own health: readings, the pressure policy, why workers died and
    how recent requests went. The supervisor calls it; it decides nothing about processes itself."""

    def __init__(self, cfg: HostConfig, full: Capacity) -> None:
        self.cfg = cfg
        self.cgroup = find_cgroup(None if cfg.cgroup == "auto" else cfg.cgroup)
        self.policy = PressurePolicy(
            full,
            PressureThresholds(
                low_fraction=cfg.memory_low,
                psi=cfg.psi_threshold,
                hold=cfg.pressure_hold,
                memory_limit=cfg.memory_limit,
            ),
        )
        self.window = HealthWindow()
        self.restarts: collections.Counter[str] = collections.Counter(dict.fromkeys(CAUSES, 0))
        self.worker_bytes: int | None = None  # the largest worker USS measured
        self.workers_measured_at = -math.inf
        self.last: MemoryReading | None = None
        self.oom_seen = read_oom_kills(self.cgroup)

    def read(self, pids: Iterable[int]) -> MemoryReading:
        """A reading; the host's processes are measured (PSS) only under SHM_MODEL_MEMORY_LIMIT."""
        self.last = read_memory(self.cgroup, pids if self.cfg.memory_limit is not None else ())
        return self.last

    def headroom(self, pids: Iterable[int]) -> int:
        return self.read(pids).headroom(self.cfg.memory_limit)

    def measure_workers(self, pids: Iterable[int]) -> None:
        """Take the workers' working memory (USS: what each holds of its own) into the estimates."""
        from shm_model.memory import process_memory

        for pid in pids:
            figures = process_memory(pid)
            if figures is not None:
                self.worker_bytes = max(self.worker_bytes or 0, figures["uss"])

    def sample(self, pids: Iterable[int], worker_pids: Iterable[int]) -> MemoryReading:
        """Take a reading, and measure the workers until they are first measured, then every
        WORKER_MEASURE_SECONDS (psutil reads each one's whole smaps: milliseconds for a large
        model): the part that reads files, run off the event loop."""
        now = time.monotonic()
        if self.worker_bytes is None or now - self.workers_measured_at >= WORKER_MEASURE_SECONDS:
            self.measure_workers(worker_pids)
            self.workers_measured_at = now
        return self.read(pids)

    def needs(self, weights: Mapping[str, int], workers: int, runtime: int = 0) -> GenerationNeeds:
        worker_bytes = DEFAULT_WORKER_BYTES if self.worker_bytes is None else self.worker_bytes
        return GenerationNeeds(weights=dict(weights), workers=workers, worker_bytes=worker_bytes, runtime=runtime)

    def check(self, now: float, reading: MemoryReading) -> Capacity:
        """The capacity to run with after ``reading``; logs when an episode starts and ends."""
        was = self.policy.degraded_reason
        capacity = self.policy.update(now, reading)
        if self.policy.degraded_reason and not was:
            log.warning(
                "%s; degrading to %d workers, %d padded tokens per batch, %d requests admitted",
                self.policy.degraded_reason,
                capacity.workers,
                capacity.max_batch_tokens,
                capacity.queue_size,
            )
        elif was and not self.policy.degraded:
            log.info(
                "memory pressure over; restoring %d workers, %d padded tokens per batch",
                capacity.workers,
                capacity.max_batch_tokens,
            )
        return capacity

    def worker_died(self, exit_code: int | None, *, aborted: bool) -> str:
        """Why a worker that the host did not retire ended; counted by cause."""
        after = read_oom_kills(self.cgroup)
        cause = exit_cause(exit_code, aborted=aborted, oom_before=self.oom_seen, oom_after=after)
        if after is not None:
            self.oom_seen = after
        self.restarts[cause] += 1
        return cause

    def record(self, now: float, ok: bool, seconds: float) -> None:
        self.window.record(now, ok, seconds)

    def report(self, now: float, *, workers: int, target: int) -> dict[str, Any]:
        """The ``health`` and ``memory_pressure`` parts of the host's status."""
        reasons = degraded_reasons(
            pressure=self.policy.degraded_reason,
            workers=workers,
            target=target,
            error_rate=self.window.error_rate(now),
            max_error_rate=self.cfg.degraded_error_rate,
            p99=self.window.p99(now),
            max_p99=self.cfg.degraded_p99_ms / 1000.0,
        )
        capacity = self.policy.capacity()
        reading = self.last.as_dict(self.cfg.memory_limit) if self.last is not None else {}
        return {
            "health": {"status": "degraded" if reasons else "ok", "reasons": reasons},
            "memory_pressure": {
                **reading,
                "degraded": self.policy.degraded,
                "degraded_for_s": None if self.policy.since is None else round(now - self.policy.since, 3),
                "episodes": self.policy.episodes,
                "capacity": asdict(capacity),
                "full_capacity": asdict(self.policy.full),
                "worker_bytes": self.worker_bytes,
                "cgroup": None if self.cgroup is None else asdict(self.cgroup),
            },
            "restarts": dict(self.restarts),
        }
