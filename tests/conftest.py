"""Every test sees 8 simulated CPU devices, so sharding is always exercised (set before jax is imported)."""

import os
import sys
from pathlib import Path

# The demo's asset builder (scripts/assets.py) lives outside the library; tests import it as `assets`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# XLA's persistent compilation cache in a fresh folder per run, shared by this process, the subprocesses the tests
# start (scripts, CLI runs: they inherit the environment) and, when xdist's workers inherit it, both workers. Many
# tests compile the same tiny programs (the same model, step and batch shapes); a hit loads the executable instead
# of compiling it again (the executables are the same: XLA keys them by program, devices and options). Set
# JAX_COMPILATION_CACHE_DIR yourself to keep one between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlora-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def report_parity(request):
    """After a module that fills a module-level `PARITY_ERRORS` {name: max-abs error}, prints them (pytest -s)."""
    yield
    errors = getattr(request.module, "PARITY_ERRORS", None)
    if errors:
        width = max(len(k) for k in errors)
        print("\nmax-abs error vs transformers / PEFT (float32):")
        for key, err in sorted(errors.items()):
            print(f"  {key:{width}s} {err:.3e}")
