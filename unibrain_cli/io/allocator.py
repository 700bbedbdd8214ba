"""Keep freed memory in the process instead of handing it back to the kernel after every array.

glibc's malloc serves every block above its mmap threshold (128 KiB at start, raised dynamically
up to 32 MiB) from a fresh ``mmap`` and unmaps it on ``free``. A 1-mm volume is a 29 MB float32
array, and ``prepare`` / ``slice`` make several per volume (inflate buffer, parsed array, resampled
and normalised copies): every one of them was page-faulted in again from zero pages, a fifth of
``prepare``'s CPU time (six cases, one worker: system time 2.3-3.1 s of 11.5-12.5 s wall, 0.7-1.2
s with the settings below; `prepare` + `slice` 1.31x faster; README, *Benchmarks*). The training
stages do not gain measurably: torch's blocks already stay below glibc's dynamic threshold.

:func:`tune_malloc` raises the mmap threshold to 128 MiB (a float32 volume of a real 1-mm scan
and its float64 temporaries; where glibc refuses that, its older maximum of 32 MiB) and keeps up
to 1 GiB of free heap (trim threshold, top pad), the documented ``mallopt`` knobs. It changes
where blocks live, not what is computed (arrays and tensors are as aligned as before: torch asks
for 64-byte alignment itself; the demo's checkpoints and tables came out identical). It runs once,
in the CLI process, before any worker is forked (workers inherit it); it does nothing off glibc, when the user set any ``MALLOC_*_`` variable (theirs win), or with
``UNIBRAIN_TUNE_MALLOC=0`` (glibc's defaults; `make bench`'s ``malloc_data_steps`` compares both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
#: mmap threshold wanted, and the most that older glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
MMAP_THRESHOLD = 128 << 20
MMAP_THRESHOLD_OLD_MAX = 32 << 20
#: free heap kept before trimming, and the extra asked of the kernel per heap growth
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_ENV_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
#: set to 0 to keep glibc's defaults
OPT_OUT = "UNIBRAIN_TUNE_MALLOC"
_done = False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # musl has no mallopt knobs
        return None
    return libc


def tune_malloc(environ: dict[str, str] | None = None) -> bool:
    """Apply the settings above to this process; True when glibc accepted them.

    No-op (False) off glibc, when ``environ`` (default ``os.environ``) sets a ``MALLOC_*_``
    knob, or :data:`OPT_OUT` = 0. Idempotent.
    """
    global _done
    env = os.environ if environ is None else environ
    if any(k in env for k in _ENV_KNOBS) or env.get(OPT_OUT, "1").strip() == "0":
        return False
    if _done:
        return True
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_OLD_MAX) == 1
    ok = ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and libc.mallopt(M_TOP_PAD, TOP_PAD) == 1
    _done = ok
    return ok
