"""Weight placement: where a loaded model's tensors live so that forked workers share them
without copying (a read-only file mapping of the checkpoint, or shared memory), read from
``/proc/self/maps``."""

from __future__ import annotations

import bisect
import ctypes
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Mappings:
    starts: list[int] = field(default_factory=list)
    entries: list[tuple[int, int, str]] = field(default_factory=list)

    @classmethod
    def read(cls) -> _Mappings:
        m = cls()
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                m.starts.append(lo)
                m.entries.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
        return m

    def path_of(self, address: int) -> str | None:
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            lo, hi, path = self.entries[i]
            if lo <= address < hi:
                return path
        return None


def classify(path: str | None) -> str:
    """'file' for a mapping of a regular file, 'shm' for shared memory, else 'anon'."""
    if not path or path.startswith("["):
        return "anon"
    if path.startswith("/dev/shm/") or path.startswith("/memfd:") or "(deleted)" in path:
        return "shm"
    return "file" if os.path.isfile(path) else "anon"


_PAGE = os.sysconf("SC_PAGE_SIZE")
_MADV_DONTNEED = 4


def drop_pages(address: int, nbytes: int) -> None:
    """Release the resident pages of an unmodified private file mapping (they re-read on use)."""
    lo = (address + _PAGE - 1) // _PAGE * _PAGE
    hi = (address + nbytes) // _PAGE * _PAGE
    if hi > lo:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def file_mapped(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (address, bytes) ranges that lie in a mapping of a regular file (their pages can be
    dropped and are read again from the file on use)."""
    mappings = _Mappings.read()
    return [(address, nbytes) for address, nbytes in ranges if classify(mappings.path_of(address)) == "file"]


def place_weights(model: Any, placement: str) -> dict[str, int]:
    """Put the model's tensors where forked workers share them; return bytes per place (each storage once).

    ``shm`` moves every tensor to shared memory, one storage at a time: it copies the
    storage, drops the source pages of a file mapping while the source is still
    referenced (so no second copy stays resident), then points the tensors at the copy.
    ``auto`` keeps tensors that already live in a file mapping (safetensors mmap: shared
    through the page cache, resident only where touched) and moves the rest.
    Tensors that share a storage (tied weights) keep sharing it.
    """
    import torch

    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.device.type == "cpu"]
    mappings = _Mappings.read()
    placed = {"file": 0, "shm": 0, "anon": 0}
    moved: dict[int, Any] = {}
    kept: set[int] = set()  # storages left where they are (counted once however many tensors use them)
    for tensor in tensors:
        source = tensor.untyped_storage()
        address, nbytes = source.data_ptr(), source.nbytes()
        kind = classify(mappings.path_of(address))
        if kind == "shm" or source.is_shared():
            placed["shm"] += nbytes if address not in kept else 0
            kept.add(address)
            continue
        if kind == "file" and placement == "auto":
            placed["file"] += nbytes if address not in kept else 0
            kept.add(address)
            continue
        target = moved.get(address)
        if target is None:
            target = torch.UntypedStorage._new_shared(nbytes)
            target.copy_(source)
            if kind == "file":
                drop_pages(address, nbytes)
            moved[address] = target
            placed["shm"] += nbytes
        view = torch.empty(0, dtype=tensor.dtype).set_(target, tensor.storage_offset(), tensor.size(), tensor.stride())
        tensor.data = view
        del source
    return placed
