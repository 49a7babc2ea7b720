"""Running a script of scripts/ in a subprocess for the script tests: one CPU device (the suite's 8 simulated
devices are stripped from XLA_FLAGS), no hub, no display; a non-zero exit fails the test with the script's stderr."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = int(os.environ.get("JAXLORA_SCRIPT_TEST_TIMEOUT", "900"))  # < 60 s each on an idle 2-core machine


def script_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    return env


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def finite(x) -> bool:
    """A real finite number (not a bool, not None, not NaN/inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
