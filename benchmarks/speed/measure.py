"""Wall time and peak memory of one call, on CPU or CUDA.

Peak memory is what the call needed *above* the memory held when it started (model, batches):
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the allocated
  bytes at the start (what the caching allocator handed out, not what it reserved).
- CPU: the process's resident-set high-water mark. Linux lets a process reset it (`5` into
  `/proc/self/clear_refs`), so the peak is `VmHWM − VmRSS at start`. Where that is not allowed the
  lifetime high-water mark `resource.getrusage(...).ru_maxrss` is used and the result is flagged
  `exact=False` (a lower bound when set-up itself peaked higher). Python's `tracemalloc` does not
  see torch's allocations, so it is not used. Run one method per fresh process, and call
  `unmap_freed_blocks()` first: glibc otherwise raises its mmap threshold as large blocks are freed
  and keeps later ones in its heap, so the high-water mark carries tens of MiB of freed memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Measurement:
    seconds: float
    peak_bytes: int  # above the memory held at the start
    exact: bool  # False: CPU fallback to the lifetime high-water mark


def measure(fn: Callable[[], object], device: str) -> tuple[Measurement, object]:
    """Run `fn()` once; return its wall time (CUDA-synchronized) and peak memory above the start."""
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        exact = True
    else:
        exact = _reset_high_water_mark()
        start_bytes = _status_kib("VmRSS") * 1024
    t = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    elif exact:
        peak = _status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Measurement(seconds, max(0, peak - start_bytes), exact), result


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
UNMAPPED_FROM = 64 * 1024


def unmap_freed_blocks() -> bool:
    """glibc: serve every allocation of ≥ 64 KiB from its own mapping, returned to the system when freed
    (a fixed threshold also stops glibc's dynamic raising of it), and trim the heap's top above 128 KiB,
    so the resident set follows the live tensors. False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, UNMAPPED_FROM)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2 * UNMAPPED_FROM)
        )
    except (OSError, AttributeError, TypeError):
        return False


def held_bytes(device: str) -> int:
    """Memory held now: CUDA's allocated bytes, or the process's resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated()
    return _status_kib("VmRSS") * 1024


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: CPU memory measurement needs Linux")
