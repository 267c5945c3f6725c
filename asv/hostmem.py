"""Host memory on CPU runs: glibc's malloc told to reuse freed memory instead of handing it back to the kernel.

A frozen upstream's forward allocates and frees the same large activations for every utterance (HuBERT Base's
first conv layer alone writes 512 x 16,000 floats, 32 MiB, per 5 s of audio). glibc serves a block above its
mmap threshold (128 KiB at start, rising with use to at most 32 MiB) with a fresh mmap and unmaps it on free, and
trims the free top of its heap back to the kernel; either way the next allocation's pages are zero-filled by the
kernel again, one page fault per 4 KiB. On a 2-core AMD EPYC VM, embedding 60 demo utterances with a full-size
HuBERT Base took 0.9-1.6 M page faults and 9-13 s of system time in a 52-56 s pass; with these settings and the
audio read in-process (asv.extract.EVAL_WORKERS) it took 13-74 k faults, 0.3-1.0 s of system time and 45 s.
Training there (16 updates of 10 demo utterances, trimmed HuBERT Base): 3.5-4.3 M faults and 17-19 s of system
time before, 0.5-0.7 M and 4-6 s after; the wall time, 156-178 s before and 147-170 s after, moved less than the
machine's run-to-run noise, and the peak RSS stayed in the same range (1.7-2.8 GiB after, 2.1-2.5 before).

PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc; glibc's own `mallopt` does it
from inside the process, with nothing to install. The cost: the process keeps its peak heap for its lifetime (a
long utterance's activations stay reserved for the next one), which a CPU run reaches anyway on its longest input.
GPU runs keep their activations on the device and are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap. One padded training batch of 10 x 8 s through a Base model's first
# conv layer is 10 x 512 x 25,600 floats (500 MiB); larger blocks are rare enough to be mapped as before.
MMAP_THRESHOLD = 1 << 30
# Never give the heap's free top back (the largest value the int parameter holds).
TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Tune glibc's malloc for this process (once; later calls return the first answer). False where the C library
    is not glibc (macOS, musl) or refuses a setting: the run then allocates as before, only slower."""
    global _applied
    if _applied is None:
        mallopt = _glibc_mallopt()
        _applied = mallopt is not None and all(
            mallopt(param, value) == 1
            for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        )
    return _applied


def retain_freed_memory_on(device) -> bool:
    """retain_freed_memory() when `device` (a torch.device or its type name) is the CPU; False otherwise."""
    kind = getattr(device, "type", str(device))
    return kind == "cpu" and retain_freed_memory()


def _glibc_mallopt():
    """glibc's mallopt, or None where the C library is another one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has a mallopt that ignores everything)
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
