"""QLoRA on CPU: a quantized frozen base (nf4, int8) against bf16 and fp32, SmolLM2-135M with LoRA on the demo data.

    python scripts/bench_quant.py                 # SmolLM2-135M-Instruct (real weights), 50 steps of the demo data
    python scripts/bench_quant.py --quick         # a tiny random Llama, 4 steps (smoke test, ~2 min on 2 cores)
    python scripts/bench_quant.py --variants nf4 bf16 --steps 20 --double-quant
    python scripts/bench_quant.py --steps 10 --rows 2 --bucket 256   # a smaller run for a busy 2-core CPU

Each variant runs in its own subprocess (its memory is its own): load the model (`jaxlora.from_pretrained`, the
quantized kernels quantized as they load), build the run of configs/smollm2_135m_cpu.yaml (LoRA r=8 on all-linear,
its optimizer and schedule, its micro-batch and accumulation, its data as the run loads it: prompt-masked gsm_symbolic
records packed into rows of 512 tokens, in the config's seeded order: every variant sees the same batches), then run
--steps steps.

    fp32   float32 weights and compute                      bf16   bfloat16 weights and compute
    int8   int8 kernels (per output channel), bf16 compute  nf4    NF4 kernels (blocks of 64), bf16 compute
           (embeddings, norms and the head in bf16)                 (--double-quant: 8-bit block scales)

Reported per variant: resident weight bytes (the param arrays on the device: the quantized kernels' codes and scales,
the rest), peak RSS of the process (ru_maxrss: loading, compilation and training) and of the training steps alone
(VmHWM reset after the first step of each bucket has compiled), tokens/s over the steps after those (non-pad tokens,
compilation excluded), the loss of every step, and at the end the mean |loss - bf16 loss| and the last-10-step mean
gap of nf4 and int8 against bf16 (and of bf16 against fp32, the gap bf16 rounding alone makes). Each worker prints a
line per step (loss, time, RSS) as it goes, echoed by the driver. Results go to --out (JSON) and a table on stdout. The 2-core CPU is often shared: the load
average at start and end is recorded; timings taken under load are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from bench_common import machine_info, maxrss_kb, reset_peak, status_kb, versions  # noqa: E402 (scripts/)

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "smollm2_135m_cpu.yaml"
VARIANTS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"),
            "nf4": ("bfloat16", "nf4")}
MARK = "@@bench "
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_folder(path: pathlib.Path) -> pathlib.Path:
    """A random tiny Llama with a tokenizer (for --quick): the demo data tokenizes with SmolLM2's tokenizer, so the
    tiny model gets random token batches instead (see `batches`)."""
    import torch
    import transformers
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return path


def run_config(args):
    """configs/smollm2_135m_cpu.yaml, with --steps, and --rows (micro-batch, no accumulation) / --bucket (one
    sequence length: the packed row length) where given: a smaller run for a busy CPU."""
    from jaxlora.config import load_run_config
    config = load_run_config(args.config_file or str(CONFIG))  # the driver's snapshot: every variant the same
    train = dataclasses.replace(config.train, max_steps=args.steps)
    if args.rows:
        train = dataclasses.replace(train, micro_batch_size=args.rows, grad_accum_steps=1)
    data = config.data
    if args.bucket:  # packed rows of --bucket tokens hold examples of at most that many (as a run with it would)
        data = dataclasses.replace(data, bucket_lengths=(args.bucket,), max_length=(
            min(data.max_length, args.bucket) if data.packing else data.max_length))
    return dataclasses.replace(config, train=train, data=data)


def batches(args, model_path: str, n: int) -> list[dict]:
    """The first n batches of the config's run (micro * accum rows), or random tokens for --quick."""
    import numpy as np
    config = run_config(args)
    rows = config.train.micro_batch_size * config.train.grad_accum_steps
    if args.quick:
        rng = np.random.default_rng(0)
        out = []
        for _ in range(n):
            ids = rng.integers(3, TINY["vocab_size"], (rows, 64), dtype=np.int32)
            labels = ids.copy()
            labels[:, :16] = -100
            out.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels})
        return out
    from transformers import AutoTokenizer
    from jaxlora.training import data as data_lib
    tok = AutoTokenizer.from_pretrained(model_path)
    data_cfg = dataclasses.replace(config.data, path=str(ROOT / config.data.path), eval_path=None,
                                   cache_dir=str(ROOT / config.data.cache_dir))
    from jaxlora.training.setup import make_loader
    data = data_lib.load_tokenized(data_cfg, tok, "train")
    loader = make_loader(dataclasses.replace(config, data=data_cfg), data, tok, rows)  # packed rows as the run packs
    return [loader.batch(i) for i in range(n)]


# ------------------------------------------------------------------------------------------ worker


def progress(variant: str, text: str) -> None:
    """One progress line on stderr, at once (the driver echoes it as it comes)."""
    print(f"[{variant}] {text}", file=sys.stderr, flush=True)


def worker(args) -> None:
    """One variant: load, build, train --steps steps, a progress line per step on stderr; one JSON line on stdout."""
    import logging
    logging.basicConfig(level=logging.WARNING)
    import jax
    import numpy as np
    from jaxlora import quant, sharding
    from jaxlora.backends import skip_tpu_backend_without_tpu
    from jaxlora.models.model import from_pretrained
    from jaxlora.training import data as data_lib
    from jaxlora.training.build import build_training
    from jaxlora.training.step import place_batch
    skip_tpu_backend_without_tpu()  # after the imports (flax registers lowerings for every platform), before a backend

    name = args.worker
    dtype, quantization = VARIANTS[name]
    param_dtype = dtype
    if quantization and args.quant_compute:  # e.g. float32 compute over bf16 params and dequantized kernels
        dtype = args.quant_compute
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    t0 = time.perf_counter()
    model = from_pretrained(args.model_path, dtype, param_dtype=param_dtype, mesh=mesh, quantization=quantization,
                            double_quant=args.double_quant and quantization == "nf4")
    jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t0
    leaves = jax.tree.leaves(model.params, is_leaf=quant.is_quantized)
    q_bytes = sum(x.nbytes for x in leaves if quant.is_quantized(x))
    weight_bytes = q_bytes + sum(x.nbytes for x in leaves if not quant.is_quantized(x))
    loaded_mb = (status_kb("VmRSS") or 0) / 1024
    progress(name, f"loaded in {load_s:.1f}s: weights {weight_bytes / 2**20:.1f} MB (quantized kernels "
                   f"{q_bytes / 2**20:.1f} MB), RSS {loaded_mb:.0f} MB")

    config = run_config(args)
    training = build_training(model, config, total_steps=args.steps)
    host = batches(args, args.model_path, args.steps)
    state, losses, step_s, seen, timed_s, timed_tokens, hwm_reset = training.state, [], [], set(), 0.0, 0, False
    for i, b in enumerate(host):
        shape = b["input_ids"].shape
        t0 = time.perf_counter()
        state, m = training.train_step(training.params, state, place_batch(b, mesh))
        losses.append(float(m["loss"]))  # waits for the step
        dt = time.perf_counter() - t0
        step_s.append(dt)
        tokens = data_lib.count_tokens(b)
        if shape in seen:
            timed_s += dt
            timed_tokens += tokens
            note = f"{tokens / dt:.0f} tokens/s"
        else:  # this bucket compiled in this step: not timed; the steady peak starts after it
            seen.add(shape)
            hwm_reset = reset_peak()
            note = f"compiled for {shape[0]}x{shape[1]}"
        progress(name, f"step {i + 1}/{len(host)} loss {losses[-1]:.4f} ({dt:.1f}s, {note}, RSS "
                       f"{(status_kb('VmRSS') or 0) / 1024:.0f} MB)")
    steady = status_kb("VmHWM") if hwm_reset else None
    sys.stdout.write(MARK + json.dumps({
        "variant": name, "dtype": dtype, "param_dtype": param_dtype, "quantization": quantization,
        "double_quant": bool(args.double_quant and quantization == "nf4"), "load_s": load_s,
        "weight_bytes": weight_bytes, "quantized_kernel_bytes": q_bytes, "loaded_rss_mb": loaded_mb,
        "peak_rss_mb": maxrss_kb() / 1024, "steady_peak_rss_mb": steady / 1024 if steady else None,
        "tokens_per_s": timed_tokens / timed_s if timed_s else None, "timed_steps": len(host) - len(seen),
        "step_s": step_s, "losses": losses, "finite": bool(np.all(np.isfinite(losses)))}) + "\n")


# ------------------------------------------------------------------------------------------ driver


def run_variant(name: str, args, model_path: str) -> dict:
    """Runs one variant's worker, echoing its progress lines (stderr) as they come; its result line (stdout)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name, "--model-path", model_path,
           "--config-file", args.config_file, "--steps", str(args.steps)] + (["--quick"] if args.quick else []) + (
               ["--double-quant"] if args.double_quant else []) + (
               ["--rows", str(args.rows)] if args.rows else []) + (["--bucket", str(args.bucket)] if args.bucket else []) + (
               ["--quant-compute", args.quant_compute] if args.quant_compute else [])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as the demo runs
    tail: list[str] = []  # the last stderr lines, for the error message
    with tempfile.TemporaryFile("w+") as out:  # stdout to a file: only stderr is read while it runs
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        for line in proc.stderr:
            if line.startswith(f"[{name}] "):
                print("  " + line.rstrip(), flush=True)
            tail = (tail + [line])[-60:]
        rc = proc.wait()
        out.seek(0)
        for line in out.read().splitlines():
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
    raise RuntimeError(f"{name} worker failed (rc {rc}):\n{''.join(tail)[-4000:]}")


def table(results: list[dict]) -> str:
    rows = [("variant", "compute", "weights MB", "kernels MB", "peak RSS MB", "step RSS MB", "tokens/s", "loss[0]",
             "loss[-1]")]
    for r in results:
        rows.append((r["variant"] + ("+dq" if r["double_quant"] else ""), r["dtype"], f"{r['weight_bytes'] / 2**20:.1f}",
                     f"{r['quantized_kernel_bytes'] / 2**20:.1f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['steady_peak_rss_mb']:.0f}" if r["steady_peak_rss_mb"] else "-",
                     f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-",
                     f"{r['losses'][0]:.4f}", f"{r['losses'][-1]:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def gap(results: list[dict], a: str, b: str) -> dict | None:
    by = {r["variant"]: r for r in results}
    if a not in by or b not in by:
        return None
    la, lb = by[a]["losses"], by[b]["losses"]
    diffs = [abs(x - y) for x, y in zip(la, lb)]
    tail = min(10, len(la))
    return {"mean_abs_gap": sum(diffs) / len(diffs), "max_abs_gap": max(diffs),
            "last10_mean_gap": sum(la[-tail:]) / tail - sum(lb[-tail:]) / tail}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny random Llama and random tokens, 4 steps")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="training steps per variant (default 50; 4 with --quick)")
    p.add_argument("--double-quant", action="store_true", help="nf4 with double quantization of the block scales")
    p.add_argument("--quant-compute", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype of the nf4/int8 variants (default bfloat16; their other params stay bf16): "
                        "float32 is ~2x faster on XLA:CPU, and nf4 vs fp32 is then the quantization gap alone")
    p.add_argument("--rows", type=int, default=None,
                   help="rows per step (micro-batch, no accumulation) instead of the config's: a busy CPU")
    p.add_argument("--bucket", type=int, default=None,
                   help="one sequence length (e.g. 256) instead of the config's (packed rows of that length)")
    p.add_argument("--out", default=None, help="JSON results (default runs/bench_quant[_quick].json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 50)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(HERE))
    load_start = list(os.getloadavg())
    out = pathlib.Path(args.out or ROOT / "runs" / f"bench_quant{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def report() -> dict:  # written after each variant, so a long run that is stopped keeps what it finished
        busy = load_start[0] > 1.0  # other work on the CPU when it started (at the end the load is the workers' own)
        r = {"model": "tiny random Llama" if args.quick else "SmolLM2-135M-Instruct", "steps": args.steps,
             "rows": args.rows, "bucket": args.bucket, "quant_compute": args.quant_compute,
             "config": str(CONFIG.relative_to(ROOT)), "machine": machine_info(), "versions": versions(),
             "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()), "results": results,
             "nf4_vs_bf16": gap(results, "nf4", "bf16"), "int8_vs_bf16": gap(results, "int8", "bf16"),
             "nf4_vs_fp32": gap(results, "nf4", "fp32"), "int8_vs_fp32": gap(results, "int8", "fp32"),
             "bf16_vs_fp32": gap(results, "bf16", "fp32"),  # the gap bf16 compute alone makes: the yardstick
             "tokens_per_s_under_load": busy}
        out.write_text(json.dumps(r, indent=2))
        return r

    with tempfile.TemporaryDirectory() as tmp:
        args.config_file = str(pathlib.Path(tmp) / CONFIG.name)  # read once: an edit mid-run changes no variant's data
        pathlib.Path(args.config_file).write_text(CONFIG.read_text())
        if args.quick:
            model_path = str(tiny_folder(pathlib.Path(tmp) / "tiny"))
        else:
            import assets
            model_path = str(assets.smollm2_path())
        for name in args.variants:
            print(f"{name}: running {args.steps} steps ...", flush=True)
            results.append(run_variant(name, args, model_path))
            final = report()
    busy = final["tokens_per_s_under_load"]
    print(table(results))
    for key in ("nf4_vs_bf16", "int8_vs_bf16", "nf4_vs_fp32", "int8_vs_fp32", "bf16_vs_fp32"):
        if final[key]:
            g = final[key]
            print(f"{key}: mean |loss gap| {g['mean_abs_gap']:.4f}, max {g['max_abs_gap']:.4f}, last-10 mean gap "
                  f"{g['last10_mean_gap']:+.4f}")
    print(f"load average {load_start[0]:.1f} -> {final['loadavg_end'][0]:.1f}; results in {out}")
    if busy:
        print("tokens/s were measured under load (other processes on the CPU): not comparable; losses and memory "
              "are unaffected")


if __name__ == "__main__":
    main()
