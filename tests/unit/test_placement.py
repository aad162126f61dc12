"""Weight placement's reading of /proc/self/maps, in process."""

from __future__ import annotations

import mmap
from pathlib import Path

from workers.placement import _Mappings, classify


def test_mappings_name_the_file_behind_an_address_and_classify_it(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\0" * mmap.PAGESIZE * 4)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ):
        maps = _Mappings.read()
        own = [(lo, hi) for lo, hi, p in maps.entries if p == str(path)]
        assert len(own) == 1, "the mapping of the file is listed once"
        lo, hi = own[0]
        assert maps.path_of(lo) == str(path) and maps.path_of(hi - 1) == str(path)
        assert maps.path_of(hi) != str(path)
        assert classify(maps.path_of(lo)) == "file"
    assert classify(None) == "anon" and classify("[heap]") == "anon" and classify("[stack]") == "anon"
    assert classify("/dev/shm/torch_123_0") == "shm" and classify("/memfd:x (deleted)") == "shm"
    assert classify(str(tmp_path / "gone")) == "anon"  # a mapped file that no longer exists
