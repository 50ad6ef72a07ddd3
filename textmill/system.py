"""What this process may use of the machine it runs on: its CPUs (affinity and container quota) and glibc's allocator.

Shared by the cleaning pool (`pipelines.clean.worker_count`) and the serving engine (torch threads, the memory a
model load leaves behind)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from pathlib import Path
from typing import Any

__all__ = ["available_cpus", "configure_allocator", "release_memory"]


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), capped by a cgroup CPU quota (a container's
    `--cpus` / a Kubernetes CPU limit: cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), at least 1. `os.cpu_count()` counts
    the host's cores, which oversubscribes a container."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            fields = (cgroup_root / quota_file).read_text().split()
            quota = fields[0]
            period = fields[1] if period_file is None else (cgroup_root / period_file).read_text().strip()
            if quota not in ("max", "-1"):
                cpus = min(cpus, max(1, -(-int(quota) // int(period))))
            break
        except (OSError, ValueError, IndexError):
            continue
    return max(1, cpus)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc mallopt(3) parameters
ALLOCATOR_KEEP_BYTES = 32 << 20                # glibc's largest mmap threshold: blocks below it come from the heap


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim   # glibc's
        return libc
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Collect garbage and hand the allocator's free memory back to the kernel (glibc `malloc_trim`, every arena).
    Called after a model version is loaded or freed: with `configure_allocator`'s thresholds the fp32 copy and the
    quality check's activations would otherwise stay resident (4.7 GB instead of 2.7 GB after loading GPT-2 medium)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def configure_allocator() -> bool:
    """Keep freed activation memory in the process instead of handing it back to the kernel after every op (glibc only;
    False elsewhere, where nothing is changed).

    The engine's worker is not the main thread, so glibc serves it from a per-thread arena whose free memory above the
    trim threshold is returned to the kernel and faulted in again on the next allocation: ~2,400 page faults per
    GPT-2-medium prefill layer stack, and a 20-25 % slower decode step on the bench machine (bench/RESULTS.md). Fixed
    thresholds (32 MiB mmap, 512 MiB trim) turn off glibc's dynamic ones; memory use is then bounded by the peak, as
    before, but stays mapped. Same knobs as `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`, set from inside."""
    libc = _libc()
    if libc is None:
        return False
    kept = libc.mallopt(M_MMAP_THRESHOLD, ALLOCATOR_KEEP_BYTES)
    return bool(kept) and bool(libc.mallopt(M_TRIM_THRESHOLD, 16 * ALLOCATOR_KEEP_BYTES))
