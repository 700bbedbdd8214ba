"""tune_malloc: large arrays come from the heap, not from one mmap each; user settings win."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unibrain_cli.io import allocator

GLIBC = allocator._libc() is not None and hasattr(allocator._libc(), "mallinfo2")

PROBE = r"""
import ctypes, sys
import numpy as np
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI2
if sys.argv[1] == "tune":
    from unibrain_cli.io.allocator import tune_malloc
    assert tune_malloc()
before = libc.mallinfo2().hblkhd
a = np.ones(6 << 20, dtype=np.float32)  # 24 MiB: one 1-mm volume's size
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


def _mmapped_mib(mode: str, env: dict[str, str] | None = None) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_large_arrays_leave_the_mmap_path_after_tuning():
    assert _mmapped_mib("plain") >= 24  # glibc default: a fresh mmap per large block
    assert _mmapped_mib("tune") == 0  # from the heap


def test_user_malloc_settings_win(monkeypatch):
    monkeypatch.setattr(allocator, "_done", False)
    assert allocator.tune_malloc({"MALLOC_ARENA_MAX": "2"}) is False
    assert allocator.tune_malloc({"UNIBRAIN_TUNE_MALLOC": "0"}) is False
    assert allocator._done is False


def test_off_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.tune_malloc({}) is False


class _FakeLibc:
    """mallopt as glibc before 2.35: thresholds above 32 MiB refused."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.mallopt = self

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 0 if param == allocator.M_MMAP_THRESHOLD and value > allocator.MMAP_THRESHOLD_OLD_MAX else 1


def test_older_glibc_gets_its_largest_threshold(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(allocator, "_done", False)
    monkeypatch.setattr(allocator, "_libc", lambda: fake)
    assert allocator.tune_malloc({}) is True
    assert fake.calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD),
                          (allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD_OLD_MAX),
                          (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD),
                          (allocator.M_TOP_PAD, allocator.TOP_PAD)]
    monkeypatch.setattr(allocator, "_done", False)  # leave the module as the real process had it
