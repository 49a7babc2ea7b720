"""What benchmark and study scripts record about a run: the machine, library versions, and resident memory peaks.

Shared by bench_throughput.py, bench_loraga.py, loraga_subspace.py and convergence.py (imported as a sibling module),
so every report describes its machine the same way. It imports neither JAX nor torch, so a PEFT worker's memory is
its own. Linux /proc based; elsewhere the fields are None or "unknown" rather than an error.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
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


_HWM_BEFORE_RESETS_KB = 0  # the largest VmHWM that a reset_peak() cleared


def maxrss_kb() -> int:
    """This process's peak resident set since it started (KiB), from VmHWM (and the peaks reset_peak cleared).

    Not ru_maxrss: Linux carries it across fork + exec, so a worker started by a 600 MB driver reported 600 MB
    whatever it used itself."""
    hwm = status_kb("VmHWM")
    if hwm is None:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return max(hwm, _HWM_BEFORE_RESETS_KB)


def reset_peak() -> bool:
    """Resets VmHWM so later peaks exclude what came before (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    global _HWM_BEFORE_RESETS_KB
    _HWM_BEFORE_RESETS_KB = max(_HWM_BEFORE_RESETS_KB, status_kb("VmHWM") or 0)
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


MARK = "@@bench "  # prefix of a worker's reply lines (libraries may print to stdout too)


def reply(obj: dict) -> None:
    """A worker's answer to the driver: one JSON line after MARK."""
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


class WorkerProcess:
    """The driver's handle on one long-lived worker subprocess: `ask(op=...)` writes a JSON command to its stdin and
    returns its next MARK reply; its stderr goes to `<workdir>/<name>.log`, quoted when it dies."""

    def __init__(self, name: str, cmd: list[str], env: dict, workdir):
        self.name = name
        self.log = open(pathlib.Path(workdir) / f"{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, bufsize=1)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        raise RuntimeError(f"{self.name} worker exited (rc {self.proc.returncode}); see its log:\n"
                           + pathlib.Path(self.log.name).read_text()[-4000:])

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()
