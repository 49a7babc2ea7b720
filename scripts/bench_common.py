"""What benchmark and study scripts record about a run: the machine, library versions, and resident memory peaks.

Shared by bench_throughput.py, bench_loraga.py, loraga_subspace.py and convergence.py (imported as a sibling module),
so every report describes its machine the same way. It imports neither JAX nor torch, so a PEFT worker's memory is
its own. Linux /proc based; elsewhere the fields are None or "unknown" rather than an error.
"""

from __future__ import annotations

import os
import platform
import resource
from importlib.metadata import PackageNotFoundError, version

VERSIONED = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def memory_gib() -> float | None:
    """Total RAM (GiB)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) / 2**20 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None


def machine_info() -> dict:
    """CPUs, their model, RAM, platform, Python and the load average now (a busy machine skews timings)."""
    return {"nproc": os.cpu_count(), "cpu": cpu_name(), "mem_gib": memory_gib(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg": list(os.getloadavg())}


def versions(packages=VERSIONED) -> dict:
    """Installed version of each package (None where it is not installed)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def status_kb(field: str) -> int | None:
    """A /proc/self/status field in KiB (VmRSS: resident now, VmHWM: resident peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def maxrss_kb() -> int:
    """This process's peak resident set since it started (KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak() -> bool:
    """Resets VmHWM so later peaks exclude what came before (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Resident memory of one phase: `mark()` when the inputs are loaded, `result()` after: the loaded RSS, the
    process's absolute peak, and the peak from the mark on (VmHWM after a reset; ru_maxrss where it cannot reset)."""

    def mark(self):
        self.peak_before_kb = maxrss_kb()
        self.loaded_kb = status_kb("VmRSS") or 0
        self.reset = reset_peak()

    def result(self) -> dict:
        after = status_kb("VmHWM") if self.reset else None
        after = after if after is not None else maxrss_kb()
        return {"rss_loaded_mb": self.loaded_kb / 1024, "peak_mb": max(self.peak_before_kb, maxrss_kb()) / 1024,
                "peak_after_load_mb": after / 1024, "delta_mb": (after - self.loaded_kb) / 1024,
                "hwm_reset": self.reset}
