"""Weight placement's reading of /proc/self/maps, in process."""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from pathlib import Path

import pytest
import torch

from workers.placement import _Mappings, classify, drop_pages, file_mapped, place_weights


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


PAGE = mmap.PAGESIZE
PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # mmap(-1, n) alone is shared: "/dev/zero (deleted)"


def address_of(mapped: mmap.mmap) -> int:
    """The address of a writable mapping's first byte."""
    view = ctypes.c_char.from_buffer(mapped)
    address = ctypes.addressof(view)
    del view  # an exported buffer would keep the mapping from closing
    return address


def resident_bytes(address: int) -> int:
    """Resident bytes (Rss in /proc/self/smaps) of this process's mapping that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_pseudo_mapping_is_anonymous_even_beside_a_file_of_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("[heap]", "[stack]", "[anon:x]"):
        (tmp_path / name).write_bytes(b"x")
        assert classify(name) == "anon", name
    assert classify("w.bin") == "anon"  # a relative name that is no file here
    (tmp_path / "w.bin").write_bytes(b"x")
    assert classify("w.bin") == "file"


def test_mappings_keep_a_path_with_spaces_whole_and_give_anonymous_memory_no_path(tmp_path: Path) -> None:
    path = tmp_path / "my weights  v2.bin"
    path.write_bytes(b"\0" * PAGE * 2)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as named:
        with mmap.mmap(-1, PAGE * 2, flags=PRIVATE) as anonymous:
            maps = _Mappings.read()
            assert maps.path_of(address_of(named)) == str(path)
            assert classify(maps.path_of(address_of(named))) == "file"
            assert maps.path_of(address_of(anonymous)) == ""


def test_file_mapped_keeps_only_the_ranges_in_a_mapping_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * PAGE * 2)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as in_file:
        with mmap.mmap(-1, PAGE, flags=PRIVATE) as anonymous:
            file_address, anon_address = address_of(in_file), address_of(anonymous)
            ranges = [(anon_address, PAGE), (file_address + 8, PAGE), (0, 16), (file_address, 2 * PAGE)]
            assert file_mapped(ranges) == [(file_address + 8, PAGE), (file_address, 2 * PAGE)]
            assert file_mapped([(anon_address, PAGE)]) == []


def test_drop_pages_gives_back_whole_pages_of_the_range_only(tmp_path: Path) -> None:
    """A private mapping of a file whose pages were all written: a dropped page reads the file again,
    one that was kept still holds what was written."""
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * PAGE * 6)

    def pages_from_file(mapped: mmap.mmap) -> list[bool]:
        return [mapped[i * PAGE : (i + 1) * PAGE] == b"\1" * PAGE for i in range(6)]

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        base = address_of(mapped)
        mapped[:] = b"\2" * PAGE * 6
        drop_pages(base + PAGE, 4 * PAGE)  # exactly pages 1 to 4
        assert pages_from_file(mapped) == [False, True, True, True, True, False]
        mapped[:] = b"\2" * PAGE * 6
        drop_pages(base + PAGE + 1, 3 * PAGE)  # from inside page 1 to inside page 4: pages 2 and 3
        assert pages_from_file(mapped) == [False, False, True, True, False, False]
        mapped[:] = b"\2" * PAGE * 6
        drop_pages(base + PAGE + 1, PAGE)  # no whole page
        assert pages_from_file(mapped) == [False] * 6


def buffers(**tensors: torch.Tensor) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, tensor in tensors.items():
        module.register_buffer(name, tensor)
    return module


def test_views_of_one_storage_share_one_copy_in_shared_memory_counted_once() -> None:
    base = torch.arange(64 * 64, dtype=torch.float32)
    model = buffers(t=base[:2048].view(32, 64).t(), tail=base[2048:])  # a transposed view and an offset one
    placed = place_weights(model, "shm")
    assert placed == {"file": 0, "shm": 64 * 64 * 4, "anon": 0}
    storage = model.t.untyped_storage()
    assert storage.is_shared() and storage.data_ptr() == model.tail.untyped_storage().data_ptr()
    assert storage.data_ptr() != base.untyped_storage().data_ptr()
    assert model.t.stride() == (1, 64) and model.tail.storage_offset() == 2048
    assert torch.equal(model.t, base[:2048].view(32, 64).t()) and torch.equal(model.tail, base[2048:])
    # placed again, the shared storage is still counted once
    assert place_weights(model, "shm") == {"file": 0, "shm": 64 * 64 * 4, "anon": 0}
    assert model.t.untyped_storage().data_ptr() == storage.data_ptr()


def test_weights_already_in_shared_memory_stay_where_they_are() -> None:
    fd, name = tempfile.mkstemp(dir="/dev/shm", prefix="shm-model-test-")
    try:
        os.ftruncate(fd, 4 * PAGE)
        with mmap.mmap(fd, 4 * PAGE) as shared:
            weights = torch.frombuffer(shared, dtype=torch.float32)
            weights.fill_(3.0)
            model = buffers(w=weights, head=weights[:16])
            address = weights.untyped_storage().data_ptr()
            assert not weights.untyped_storage().is_shared()  # torch did not make it: it is a mapping of /dev/shm
            assert place_weights(model, "shm") == {"file": 0, "shm": 4 * PAGE, "anon": 0}
            assert model.w.untyped_storage().data_ptr() == address
            assert model.head.untyped_storage().data_ptr() == address
            del weights, model
    finally:
        os.close(fd)
        os.unlink(name)


def test_a_file_mapped_tensor_moved_to_shared_memory_leaves_no_page_of_the_file_resident(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    values = torch.arange(16 * PAGE // 4, dtype=torch.float32)
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        address = address_of(mapped)
        weights = torch.frombuffer(mapped, dtype=torch.float32)
        kept = buffers(w=weights, head=weights[:16])  # two tensors, one storage
        assert float(kept.w.sum()) == float(values.sum())  # every page read: resident
        assert resident_bytes(address) == 16 * PAGE
        assert place_weights(kept, "auto") == {"file": 16 * PAGE, "shm": 0, "anon": 0}
        assert kept.w.untyped_storage().data_ptr() == address
        assert resident_bytes(address) == 16 * PAGE
        moved = buffers(w=torch.frombuffer(mapped, dtype=torch.float32))
        assert place_weights(moved, "shm") == {"file": 0, "shm": 16 * PAGE, "anon": 0}
        assert moved.w.untyped_storage().is_shared() and torch.equal(moved.w, values)
        assert resident_bytes(address) == 0  # the mapping is still there, its pages were given back
        assert kept.head.untyped_storage().data_ptr() == address
        del weights, kept, moved
