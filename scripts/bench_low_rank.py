"""`low_rank_matmul`'s custom VJP vs plain autodiff of (x @ a) @ b, timed in the same run on LoRA-layer shapes.

    python scripts/bench_low_rank.py                      # SmolLM2-135M MLP shapes, CPU, float32
    python scripts/bench_low_rank.py --repeats 15 --iters 5
    JAX_PLATFORMS=cuda python scripts/bench_low_rank.py --dtype bfloat16

The custom backward (jaxlora/lora/weights.py) was tuned on XLA:CPU; this measures whether it still pays, wherever it
runs. Timed: a jitted value_and_grad w.r.t. (x, a, b) of sum(y * g), g a fixed random cotangent, for

    up    x (B, T, 576)  -> 1536    (gate_proj / up_proj)
    down  x (B, T, 1536) -> 576     (down_proj, the transposed shape)

each as the LoRA branch alone (y = s * (x @ a) @ b) and as the whole layer (y = x @ W0 + s * (x @ a) @ b, W0 frozen:
no gradient). Both implementations are compiled first and checked to give the same gradients; then each repeat times
`--iters` calls of each, alternating which goes first, and the report is the median over repeats of the per-call time,
and custom / plain (< 1: the custom VJP is faster). A loaded machine skews both sides, not always equally: look at
the load average printed before and after, and rerun on a quiet machine before deciding.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402


def cpu_model() -> str:
    """lscpu's model name (else /proc/cpuinfo's)."""
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if line.startswith("Model name:"):
                    return line.split(":", 1)[1].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return bench_common.cpu_name()


def build(kind: str, mode: str, impl: str, scale: float):
    """The jitted value_and_grad of one case, taking (x, a, b, w0, g)."""
    import jax
    import jax.numpy as jnp

    from jaxlora.lora.weights import low_rank_matmul_cpu as low_rank_matmul  # the custom VJP, on any backend

    branch = low_rank_matmul if impl == "custom" else (lambda x, a, b: (x @ a) @ b)

    def loss(x, a, b, w0, g):
        y = scale * branch(x, a, b)
        if mode == "layer":
            y = x @ jax.lax.stop_gradient(w0) + y
        return jnp.sum((y * g).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def inputs(kind: str, batch: int, seq: int, d_model: int, d_ff: int, rank: int, dtype: str, seed: int = 0):
    import jax
    d_in, d_out = (d_model, d_ff) if kind == "up" else (d_ff, d_model)
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (batch, seq, d_in), dtype)
    a = (jax.random.normal(k[1], (d_in, rank)) * d_in ** -0.5).astype(dtype)
    b = (jax.random.normal(k[2], (rank, d_out)) * rank ** -0.5).astype(dtype)
    w0 = (jax.random.normal(k[3], (d_in, d_out)) * d_in ** -0.5).astype(dtype)
    g = jax.random.normal(k[4], (batch, seq, d_out), dtype)
    return jax.block_until_ready((x, a, b, w0, g))


def check_same(f_custom, f_plain, args, dtype: str) -> float:
    """Largest gradient difference relative to the gradient's largest entry (fails the run if not tiny)."""
    import jax
    import numpy as np
    (_, got), (_, ref) = f_custom(*args), f_plain(*args)
    worst = 0.0
    for g, r in zip(jax.device_get(got), jax.device_get(ref)):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        worst = max(worst, float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)))
    limit = 1e-4 if dtype == "float32" else 5e-2
    if worst > limit:
        raise SystemExit(f"custom and plain gradients differ: {worst:.2e} relative > {limit}")
    return worst


def time_calls(f, args, iters: int) -> float:
    """Seconds per call, over `iters` back-to-back calls."""
    import jax
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d-model", type=int, default=576, help="SmolLM2-135M hidden_size")
    p.add_argument("--d-ff", type=int, default=1536, help="SmolLM2-135M intermediate_size")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7, help="alternating timing rounds (the median is reported)")
    p.add_argument("--iters", type=int, default=3, help="calls per implementation per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each after compiling")
    p.add_argument("--kinds", default="up,down")
    p.add_argument("--modes", default="branch,layer")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxlora.backends import skip_tpu_backend_without_tpu
    skip_tpu_backend_without_tpu()  # no libtpu noise on a CPU/GPU host
    dev = jax.devices()[0]
    machine = {**bench_common.machine_info(), "cpu": cpu_model(), "jax_backend": jax.default_backend(),
               "device": getattr(dev, "device_kind", str(dev)), "devices": jax.device_count(),
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(f"machine: {machine['cpu']} ({machine['nproc']} CPUs), jax {jax.__version__} backend "
          f"{machine['jax_backend']} ({machine['device']}), load average {machine['loadavg']}")
    print(f"shapes: B={args.batch} T={args.seq} d_model={args.d_model} d_ff={args.d_ff} r={args.rank} {args.dtype}; "
          f"{args.repeats} rounds x {args.iters} calls each, alternating")
    dtype = jnp.dtype(args.dtype)
    results = []
    for kind in args.kinds.split(","):
        data = inputs(kind, args.batch, args.seq, args.d_model, args.d_ff, args.rank, dtype)
        for mode in args.modes.split(","):
            fns = {impl: build(kind, mode, impl, 2.0) for impl in ("custom", "plain")}
            for f in fns.values():  # compile, then warm up
                for _ in range(1 + args.warmup):
                    jax.block_until_ready(f(*data))
            err = check_same(fns["custom"], fns["plain"], data, args.dtype)
            times = {"custom": [], "plain": []}
            for r in range(args.repeats):
                for impl in (("custom", "plain") if r % 2 == 0 else ("plain", "custom")):
                    times[impl].append(time_calls(fns[impl], data, args.iters))
            med = {impl: statistics.median(t) for impl, t in times.items()}
            row = {"kind": kind, "mode": mode, "custom_ms": med["custom"] * 1e3, "plain_ms": med["plain"] * 1e3,
                   "ratio": med["custom"] / med["plain"], "grad_rel_diff": err,
                   "custom_all_ms": [t * 1e3 for t in times["custom"]],
                   "plain_all_ms": [t * 1e3 for t in times["plain"]]}
            results.append(row)
            spread = lambda t: f"{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}"
            print(f"  {kind:4s} {mode:6s}  custom {row['custom_ms']:8.2f} ms  plain {row['plain_ms']:8.2f} ms  "
                  f"custom/plain {row['ratio']:.3f}   (ranges {spread(times['custom'])} / {spread(times['plain'])} ms;"
                  f" grads agree to {err:.1e})")
    machine["loadavg_after"] = list(os.getloadavg())
    print(f"load average after: {machine['loadavg_after']}  (custom/plain < 1: the custom VJP is faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "versions": bench_common.versions(),
                                               "args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
