"""Keep freed host memory for reuse: glibc malloc settings for the trainer's and the analysis tools' processes.

PyTorch's CPU tensors come from malloc, and glibc hands memory back to the kernel eagerly: blocks above its
mmap threshold are unmapped when freed, and free space at the top of the heap beyond the trim threshold
(at most 64 MiB with glibc's self-adjusting defaults) is released. A workload that allocates and frees
the same few-MiB temporaries over and over — a training step on CPU, and above all the diagnostics' float64
sums and fits — then page-faults every page of them afresh each time: the demo's evaluation took ~130,000
minor faults and ~0.3 s of system time per call. With the mmap threshold fixed at its maximum (32 MiB) and
a 1 GiB trim threshold, freed blocks stay in the heap and are reused (≈0 faults after the first
evaluation; the demo's evaluations 0.92 → 0.72 s, README "Diagnostics cost"). This is what PyTorch's CPU
performance guide gets from preloading jemalloc or tcmalloc (`torch.backends.xeon.run_cpu`), without a
library to install.

Left alone when the process already chose: a preloaded allocator (LD_PRELOAD naming jemalloc, tcmalloc or
mimalloc), glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_, or GLIBC_TUNABLES
setting glibc.malloc; and off glibc (macOS, musl), where there is no mallopt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD_BYTES = 2**30
_USER_CHOICES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator_chosen_by_user(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    preload = environ.get("LD_PRELOAD", "")
    return (any(name in preload for name in _PRELOADED_ALLOCATORS) or any(key in environ for key in _USER_CHOICES)
            or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's mmap and trim thresholds for this process (and the data-loader workers it forks later).
    Returns whether they were set."""
    if not sys.platform.startswith("linux") or allocator_chosen_by_user():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
