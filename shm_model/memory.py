"""Memory figures of processes (RSS, PSS, USS) from psutil, for status and benchmarks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

import psutil


class MemoryFigures(TypedDict):
    rss: int
    pss: int
    uss: int


def process_memory(pid: int) -> MemoryFigures | None:
    """RSS, PSS and USS of one process in bytes, or None if it is gone or unreadable."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}


def total_memory(pids: Iterable[int]) -> MemoryFigures:
    """Summed figures of several processes; the PSS sum is their true joint footprint."""
    return sum_figures(figures for figures in map(process_memory, pids) if figures)


def sum_figures(figures: Iterable[MemoryFigures]) -> MemoryFigures:
    total: MemoryFigures = {"rss": 0, "pss": 0, "uss": 0}
    for item in figures:
        total["rss"] += item["rss"]
        total["pss"] += item["pss"]
        total["uss"] += item["uss"]
    return total


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _kind(path: str) -> str:
    if path.endswith(WEIGHT_SUFFIXES):
        return "weight-file"
    if path.startswith(("/dev/shm/", "/memfd:")):
        return "shm"
    if path.startswith("/"):
        return "code-and-files"
    return "heap-and-anon"


def smaps_breakdown(pid: int) -> dict[str, dict[str, int]]:
    """Private clean and private dirty bytes of ``pid`` per kind of mapping (from smaps).

    Kinds: weight-file (a mapped checkpoint), shm (shared memory), code-and-files,
    heap-and-anon. A private copy of the weights would show as dirty bytes; clean
    private pages are file or page-cache pages that only this process maps so far.
    """
    out: dict[str, dict[str, int]] = {}
    kind = "heap-and-anon"
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split(None, 5)
                kind = _kind(parts[5].strip() if len(parts) > 5 else "")
            elif head in ("Private_Clean:", "Private_Dirty:"):
                entry = out.setdefault(kind, {"private_clean": 0, "private_dirty": 0})
                key = "private_clean" if head == "Private_Clean:" else "private_dirty"
                entry[key] += int(line.split()[1]) * 1024
    return out
