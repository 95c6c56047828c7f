"""What a run costs: seconds, peak RSS (from /proc, so Linux-only), peak device memory and XLA
compilations of a warm-up and of the timed part after it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def _proc_status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process. Not ru_maxrss: a child's counts its parent's RSS before exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS mark (VmHWM); where that is refused the increase is an upper bound."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure(side, warm_up: Callable, timed: Callable):
    """(figures, warm_up(), timed()): seconds of each, the peak RSS of the process so far (loading
    included), the peak RSS during the timed part alone, and how far that rose above the RSS the
    timed part started from (memory kept from warming up, say by an allocator, is not counted).
    On an accelerator, the same two peaks of device memory (the timed one where the framework can
    restart its mark; None otherwise). On a shared machine, cores_used (CPU seconds / wall seconds
    of the timed part) and the load average say how much of the machine the worker had. JAX's
    warmup_compiles and timed_compiles: the XLA compilations of each part, the timed one's 0 where
    warming up met every shape. side: the framework's worker module (jax_side, torch_reference)."""
    compilations = side.compilations()
    start = time.perf_counter()
    warm = warm_up()
    warmup_seconds = time.perf_counter() - start
    load_peak_kb, load_peak_device = _proc_status_kb("VmHWM"), side.device_peak_mb()
    _reset_peak_rss()
    device_reset = side.reset_device_peak()
    rss_before_kb = _proc_status_kb("VmRSS")
    compiled_before = None if compilations is None else len(compilations)  # before the timed part
    start, cpu_start = time.perf_counter(), time.process_time()
    # Plain Python values or numpy: the work is done when it returns (.item(), .cpu(), float() and
    # np.asarray wait for the device), so no explicit synchronisation is needed.
    out = timed()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    timed_peak_kb, timed_peak_device = _proc_status_kb("VmHWM"), side.device_peak_mb()
    figures = {"warmup_seconds": warmup_seconds, "seconds": seconds,
               "peak_rss_mb": max(load_peak_kb, timed_peak_kb) / 1024, "timed_peak_rss_mb": timed_peak_kb / 1024,
               "rss_increase_mb": max(timed_peak_kb - rss_before_kb, 0) / 1024,
               "peak_device_mb": None if timed_peak_device is None else max(load_peak_device, timed_peak_device),
               "timed_peak_device_mb": timed_peak_device if device_reset else None,
               "cores_used": cpu_seconds / seconds, "load_average_1m": os.getloadavg()[0],
               "warmup_compiles": compiled_before,
               "timed_compiles": None if compilations is None else len(compilations) - compiled_before}
    return figures, warm, out


def compile_seconds(side, figures: dict) -> float:
    """XLA's compilation seconds before the timed part (the warm-up's every batch shape); PyTorch
    compiles nothing."""
    compilations = side.compilations()
    return 0.0 if compilations is None else sum(compilations[: figures["warmup_compiles"]])
