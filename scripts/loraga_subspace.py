"""How well LoRA-GA's randomized and streaming factorizations recover the exact top-2r gradient subspaces.

    python scripts/loraga_subspace.py                      # SmolLM2-135M, 8 gsm_symbolic batches of 2, r=8 (~10 min)
    python scripts/loraga_subspace.py --batches 4 --real 2:1
    python scripts/loraga_subspace.py --quick              # tiny random Llama, random tokens (seconds; for tests)

On real gradients (the mean over the estimation batches of dL/dK for every all-linear target, as
`jaxlora.lora.ga.estimate_gradients` computes them for LoRA-GA) it takes the exact SVD of every layer's gradient and
compares, for each oversampling (q = 2r + oversampling sketch columns) and number of power iterations (passes over the
batches = 2 + 2 * power), the top singular subspaces the approximate methods find with the exact ones:

    overlap(U_ex, U_m) = ||U_ex^T U_m||_F^2 / k      (1 = same k-dim subspace, k/dim = random)

for the top-2r left (input side, U_K) and right (output side, V_K) subspaces, the top-r ones, and exactly the slices
LoRA-GA's default direction ArB2r uses: a <- input side [0:r], b <- output side [r:2r]. Mean and min are over every
target of every layer (7 x 30 = 210 matrices on SmolLM2).

"streaming" rows come from two sources, both reported:
  - simulated: the streaming algorithm of `lora_ga.streaming_factorize` (same Omega per target, same range /
    co-range / power steps) applied to the exact accumulated gradient. A streaming pass computes mean_b(G_b) @ Omega =
    G @ Omega, so this is the same computation up to float32 rounding, and costs no passes over the data.
  - real (`--real OS:P`, oversampling in multiples of r): `lora_ga.streaming_factorize` itself, sketching through
    zero-effect LoRA branches; its overlap with the simulated run of the same config checks the equivalence, and its
    wall time gives the per-pass cost (fitted as compile + passes x per-pass) used for the simulated rows' estimate.
"randomized" rows run `lora_ga.factorize_gradient(g, "randomized", q, power, key)` on the exact gradient.

Outputs: a JSON (`--out-json`, default docs/loraga_subspace.json) and a markdown table (`--out-md`,
default docs/loraga_subspace.md), plus the recommended streaming default: the fewest passes (then the fewest sketch
columns) whose mean overlap is >= --threshold (0.99) for both slices ArB2r uses.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
from bench_common import machine_info  # noqa: E402 (scripts/, beside this file)

TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
PROMPT_TEMPLATE = "Question: {input}\nAnswer: "
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------ inputs


def gsm_batches(tokenizer, num_batches: int, batch_size: int, max_length: int, data_path: str | None = None,
                fixed_length: bool = False) -> list[dict]:
    """The first num_batches * batch_size gsm_symbolic training examples, in order, tokenized as training does
    (prompt "Question: {input}\\nAnswer: " masked, response "{target}" + eos) and padded to the training buckets
    (powers of two up to max_length; just max_length with fixed_length), as `jaxlora.training.setup.lora_ga_batches`."""
    import assets
    from jaxlora.training import data as data_lib
    path = data_path or str(assets.gsm_data_paths()["train"])
    cfg = data_lib.DataConfig(path=path, prompt_template=PROMPT_TEMPLATE, response_template="{target}",
                              max_length=max_length, bucket_lengths=(max_length,) if fixed_length else (),
                              max_examples=2 * num_batches * batch_size + 16)
    data = data_lib.load_tokenized(cfg, tokenizer, "train")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = data_lib.BatchLoader(data, batch_size, data_lib.bucket_lengths(cfg), pad, seed=0, shuffle=False)
    if loader.steps_per_epoch < num_batches:
        raise SystemExit(f"{path}: only {loader.steps_per_epoch} batches of {batch_size}, asked for {num_batches}")
    return [loader.batch(i) for i in range(num_batches)]


def random_batches(vocab: int, num_batches: int, batch_size: int, seq: int, seed: int = 0) -> list[dict]:
    """Random tokens; the first quarter of each row is a masked prompt, the last eighth padding."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_batches):
        ids = rng.integers(3, vocab, (batch_size, seq)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[:, seq - seq // 8:] = 0
        labels = np.where(mask == 1, ids, -100).astype(np.int32)
        labels[:, : seq // 4] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def load_model_and_batches(args):
    """(jaxlora Model, batches, description) for --quick or a real model folder."""
    import jaxlora
    if args.quick:
        model = jaxlora.Model.random(TINY_LLAMA, seed=0)
        batches = random_batches(TINY_LLAMA["vocab_size"], args.batches, args.batch_size, args.max_length)
        return model, batches, "tiny random Llama (2 layers, hidden 64, intermediate 96), random tokens"
    path = args.model
    if path is None:
        import assets
        path = str(assets.smollm2_path())
    model = jaxlora.from_pretrained(path, "float32")
    batches = gsm_batches(model.tokenizer(), args.batches, args.batch_size, args.max_length, args.data)
    return model, batches, f"{path} (float32), gsm_symbolic train (first {args.batches * args.batch_size} examples)"


# ------------------------------------------------------------------------------------------ linear algebra


def overlap(u_ex, u_m):
    """||U_ex^T U_m||_F^2 / k per stacked matrix: (..., d, k) x (..., d, k) -> (...,)."""
    import numpy as np
    k = u_ex.shape[-1]
    m = np.einsum("...dk,...dl->...kl", u_ex, u_m)
    return np.sum(m * m, axis=(-1, -2)) / k


def subspace_metrics(exact, approx, r: int) -> dict:
    """Per-matrix overlaps (flattened over targets and layers) of approx's subspaces with exact's."""
    import numpy as np
    cols = {k: [] for k in ("left_2r", "right_2r", "left_r", "right_r", "a_slice", "b_slice")}
    for path, (u_ex, _, vt_ex) in exact.items():
        u_m, _, vt_m = approx[path]
        v_ex, v_m = np.swapaxes(vt_ex, -1, -2), np.swapaxes(vt_m, -1, -2)
        cols["left_2r"].append(overlap(u_ex[..., :2 * r], u_m[..., :2 * r]))
        cols["right_2r"].append(overlap(v_ex[..., :2 * r], v_m[..., :2 * r]))
        cols["left_r"].append(overlap(u_ex[..., :r], u_m[..., :r]))
        cols["right_r"].append(overlap(v_ex[..., :r], v_m[..., :r]))
        cols["a_slice"].append(overlap(u_ex[..., :r], u_m[..., :r]))  # ArB2r: a <- input side [0:r]
        cols["b_slice"].append(overlap(v_ex[..., r:2 * r], v_m[..., r:2 * r]))  # b <- output side [r:2r]
    out = {}
    for k, v in cols.items():
        v = np.concatenate([np.atleast_1d(x).ravel() for x in v])
        out[k] = {"mean": float(np.mean(v)), "min": float(np.min(v))}
    return out


def to_numpy(triplets, k: int) -> dict:
    """Top-k triplets as float64 numpy."""
    import jax
    import numpy as np
    out = {}
    for p, (u, s, vt) in triplets.items():
        u, s, vt = jax.device_get((u, s, vt))
        out[p] = (np.asarray(u[..., :k], np.float64), np.asarray(s[..., :k], np.float64),
                  np.asarray(vt[..., :k, :], np.float64))
    return out


@functools.lru_cache(maxsize=None)
def _simulated_run(power: int):
    """jit(g (..., in, out), omega (..., q, out)) -> (U, S, Vt): streaming_factorize's steps on an explicit G."""
    import jax
    import jax.numpy as jnp

    def orth(y):
        return jnp.linalg.qr(y)[0]

    def sw(x):
        return jnp.swapaxes(x, -1, -2)

    def run(g, omega):
        qm = orth(g @ sw(omega))  # range pass: grad wrt a of (a=0, b=Omega) = G @ Omega^T
        for _ in range(power):
            z = sw(qm) @ g  # co-range pass: grad wrt b of (a=Q, b=0) = Q^T G
            qm = orth(g @ orth(sw(z)))  # range pass with b = orth(Z^T)^T
        ub, s, vt = jnp.linalg.svd(sw(qm) @ g, full_matrices=False)
        return qm @ ub, s, vt
    return jax.jit(run)


def simulated_streaming(grads: dict, targets, ga, r_of, shapes) -> dict:
    """`lora_ga.streaming_factorize`'s algorithm, with its Omegas, applied to the exact accumulated gradients."""
    import jax
    import jax.numpy as jnp
    from jaxlora.lora import ga as lora_ga

    run = _simulated_run(ga.power_iters())
    key = jax.random.key(ga.seed)
    out = {}
    for i, t in enumerate(targets):
        *lead, d_in, d_out = shapes[t.path]
        q = lora_ga.sketch_rank(ga, r_of[t.path], d_in, d_out)
        omega = jax.random.normal(jax.random.fold_in(key, i), (*lead, q, d_out), jnp.float32)
        out[t.path] = run(grads[t.path], omega)
    return out


# ------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct from assets)")
    p.add_argument("--data", default=None, help="JSONL with input/target (default: gsm_symbolic train)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--oversampling", default="0,1,2,4", help="oversampling values, in multiples of r")
    p.add_argument("--power", default="0,1,2", help="power iterations")
    p.add_argument("--randomized-extra", default="2:4",
                   help="extra randomized configs OS:P (OS in multiples of r); default = the library's default")
    p.add_argument("--real", default="2:0,2:1",
                   help="configs OS:P run through the real streaming_factorize ('' for none)")
    p.add_argument("--methods", default="streaming,randomized")
    p.add_argument("--threshold", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny random Llama, random tokens, small grid (smoke test; explicit flags still apply)")
    p.add_argument("--out-json", default=str(ROOT / "docs" / "loraga_subspace.json"))
    p.add_argument("--out-md", default=str(ROOT / "docs" / "loraga_subspace.md"))
    args = p.parse_args(argv)
    if args.quick:  # small grid: the whole run is mostly compilation
        for name, val in (("batches", 2), ("batch_size", 2), ("max_length", 32), ("r", 2), ("oversampling", "0,2"),
                          ("power", "0,1"), ("randomized_extra", ""), ("real", "2:0")):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, val)
    return args


def _pairs(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item.strip()]


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    import numpy as np
    from flax import traverse_util
    from jaxlora.lora import ga as lora_ga
    from jaxlora.lora import LoraConfig, LoraGAConfig

    info = machine_info()
    t_start = time.perf_counter()
    model, batches, source = load_model_and_batches(args)
    r = args.r
    lora_config = LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", init_lora_weights="lora_ga")
    targets = model.lora_targets(lora_config)
    r_of = {t.path: t.rank for t in targets}
    flat_abs = traverse_util.flatten_dict(model.abstract_params)
    shapes = {t.path: flat_abs[t.path + ("kernel",)].shape for t in targets}
    n_mats = sum(int(np.prod(s[:-2], dtype=int)) for s in shapes.values())
    print(f"{source}: {len(targets)} targets, {n_mats} matrices, r={r}, {len(batches)} batches of "
          f"{batches[0]['input_ids'].shape}", flush=True)

    t0 = time.perf_counter()
    grads = lora_ga.estimate_gradients(model, model.params, targets, batches, progress=False)
    jax.block_until_ready(grads)
    t_est = time.perf_counter() - t0
    gflat = {p[:-1]: g for p, g in traverse_util.flatten_dict(grads).items()}
    print(f"exact gradients: {t_est:.1f}s", flush=True)

    key = jax.random.key(args.seed)
    t0 = time.perf_counter()
    exact_full = {t.path: lora_ga.factorize_gradient(gflat[t.path], "exact", 0, 0, key) for t in targets}
    jax.block_until_ready(exact_full)
    t_exact = time.perf_counter() - t0
    spectrum = _spectrum_stats({p: np.asarray(jax.device_get(s), np.float64) for p, (_, s, _) in exact_full.items()},
                               r)
    exact = to_numpy(exact_full, 2 * r)
    del exact_full
    print(f"exact SVD: {t_exact:.1f}s; gaps {spectrum}", flush=True)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grid = [(o * r, p) for o in (int(x) for x in args.oversampling.split(","))
            for p in (int(x) for x in args.power.split(","))]
    rows = [{"method": "exact", "source": "jnp.linalg.svd", "oversampling": None, "q": None, "power": None,
             "passes": 1, "wall_s": t_est + t_exact, "wall_kind": "measured (estimation + SVD)",
             "estimation_s": t_est, "factorization_s": t_exact,
             "overlap": subspace_metrics(exact, exact, r)}]

    if "randomized" in methods:
        extra = [(o * r, p) for o, p in _pairs(args.randomized_extra)]
        for os_, power in grid + [c for c in extra if c not in grid]:
            ga = LoraGAConfig(svd_method="randomized", oversampling=os_, power_iterations=power, seed=args.seed)
            times = []
            for _ in range(2):  # cold (compiles, as lora_ga_init pays) and warm
                t0 = time.perf_counter()
                trip = {}
                for i, t in enumerate(targets):
                    g = gflat[t.path]
                    q = lora_ga.sketch_rank(ga, t.rank, *g.shape[-2:])
                    trip[t.path] = lora_ga.factorize_gradient(g, "randomized", q, power,
                                                              jax.random.fold_in(key, i))
                jax.block_until_ready(trip)
                times.append(time.perf_counter() - t0)
            met = subspace_metrics(exact, to_numpy(trip, 2 * r), r)
            rows.append({"method": "randomized", "source": "factorize_gradient on the exact gradient",
                         "oversampling": os_, "q": 2 * r + os_, "power": power, "passes": 1,
                         "wall_s": t_est + times[0], "wall_kind": "measured (estimation + cold factorization)",
                         "estimation_s": t_est, "factorization_s": times[0], "factorization_warm_s": times[1],
                         "overlap": met})
            print(_fmt_row(rows[-1]), flush=True)

    real_rows, checks = [], []
    if "streaming" in methods:
        sims = {}
        for os_, power in grid:
            ga = LoraGAConfig(svd_method="streaming", oversampling=os_, power_iterations=power, seed=args.seed)
            sim = to_numpy(simulated_streaming(gflat, targets, ga, r_of, shapes), 2 * r)
            sims[(os_, power)] = sim
            rows.append({"method": "streaming", "source": "simulated (streaming algorithm on the exact gradient)",
                         "oversampling": os_, "q": 2 * r + os_, "power": power, "passes": 2 + 2 * power,
                         "wall_s": None, "wall_kind": "estimated", "overlap": subspace_metrics(exact, sim, r)})
            print(_fmt_row(rows[-1]), flush=True)
        for om, power in _pairs(args.real):
            os_ = om * r
            ga = LoraGAConfig(svd_method="streaming", oversampling=os_, power_iterations=power, seed=args.seed)
            t0 = time.perf_counter()
            trip = lora_ga.streaming_factorize(model, model.params, targets, batches, ga, progress=False)
            jax.block_until_ready(trip)
            wall = time.perf_counter() - t0
            trip = to_numpy(trip, 2 * r)
            row = {"method": "streaming", "source": "real (lora_ga.streaming_factorize)", "oversampling": os_,
                   "q": 2 * r + os_, "power": power, "passes": 2 + 2 * power, "wall_s": wall,
                   "wall_kind": "measured (all passes, incl. compile)", "overlap": subspace_metrics(exact, trip, r)}
            real_rows.append(row)
            if (os_, power) in sims:
                checks.append({"oversampling": os_, "power": power,
                               "overlap_real_vs_simulated": subspace_metrics(sims[(os_, power)], trip, r)})
            print(_fmt_row(row), flush=True)
        fit = _fit_pass_time(real_rows, len(batches))
        for row in rows:
            if row["method"] == "streaming" and row["wall_s"] is None and fit is not None:
                row["wall_s"] = fit["compile_s"] + fit["per_pass_s"] * row["passes"]
                row["wall_kind"] = "estimated (compile + passes x per-pass time of the real runs)"
        rows.extend(real_rows)
    else:
        fit = None

    rec = recommend([x for x in rows if x["method"] == "streaming"], args.threshold)
    info["loadavg_end"] = list(os.getloadavg())
    result = {
        "description": "Subspace overlap ||U_ex^T U_m||_F^2 / k of LoRA-GA factorizations with the exact SVD of the "
                       "estimated gradient; mean and min over all targets and layers.",
        "model": source, "quick": args.quick, "r": r, "targets": [t.path[-1] for t in targets],
        "matrices": n_mats, "batches": len(batches), "batch_size": int(batches[0]["input_ids"].shape[0]),
        "seq_lengths": sorted({int(b["input_ids"].shape[1]) for b in batches}), "max_length": args.max_length,
        "threshold": args.threshold, "machine": info, "total_s": time.perf_counter() - t_start,
        "spectrum": spectrum, "pass_time_fit": fit, "real_vs_simulated": checks, "rows": rows,
        "recommendation": rec,
        "current_default": {"oversampling": 2 * r, "power": LoraGAConfig(svd_method="streaming").power_iters()},
    }
    write_outputs(result, args.out_json, args.out_md)
    print(markdown(result))
    return result


def _spectrum_stats(exact, r: int) -> dict:  # exact: path -> singular values (..., k)
    """Relative singular-value gaps at the slice boundaries (small gaps make a slice ill-defined, even exactly)."""
    import numpy as np
    gaps = {"s_r/s_r+1": [], "s_2r/s_2r+1": [], "s_2r/s_1": []}
    for s in exact.values():
        s = s.reshape(-1, s.shape[-1])
        gaps["s_r/s_r+1"].append(s[:, r - 1] / s[:, r])
        gaps["s_2r/s_2r+1"].append(s[:, 2 * r - 1] / s[:, 2 * r])
        gaps["s_2r/s_1"].append(s[:, 2 * r - 1] / s[:, 0])
    out = {}
    for k, v in gaps.items():
        v = np.concatenate(v)
        out[k] = {"median": float(np.median(v)), "min": float(np.min(v))}
    return out


def _fit_pass_time(real_rows, n_batches: int):
    """wall = compile + passes * per_pass, least squares over the real streaming runs (one run: no compile term)."""
    import numpy as np
    if not real_rows:
        return None
    x = np.array([r["passes"] for r in real_rows], float)
    y = np.array([r["wall_s"] for r in real_rows], float)
    if len(set(x)) >= 2:
        per_pass, compile_s = np.polyfit(x, y, 1)
        compile_s = max(float(compile_s), 0.0)
    else:
        per_pass, compile_s = float(np.mean(y / x)), 0.0
    return {"per_pass_s": float(per_pass), "compile_s": compile_s, "per_batch_s": float(per_pass) / n_batches}


def recommend(stream_rows, threshold: float) -> dict:
    """Fewest passes, then fewest sketch columns, with mean a- and b-slice overlap >= threshold (simulated rows:
    they cover the whole grid; real rows agree with them to rounding)."""
    cand = [x for x in stream_rows if x["source"].startswith("simulated")]
    ok = [x for x in cand if min(x["overlap"]["a_slice"]["mean"], x["overlap"]["b_slice"]["mean"]) >= threshold]
    if ok:
        best = min(ok, key=lambda x: (x["passes"], x["q"]))
        why = (f"fewest passes ({best['passes']}) and then fewest sketch columns (q={best['q']}) with mean overlap "
               f">= {threshold} for both slices ArB2r uses (a: input side [0:r], b: output side [r:2r])")
    elif cand:
        best = max(cand, key=lambda x: (min(x["overlap"]["a_slice"]["mean"], x["overlap"]["b_slice"]["mean"]),
                                        -x["passes"], -x["q"]))
        why = f"no configuration reached mean slice overlap {threshold}; this one comes closest"
    else:
        return {}
    return {"oversampling": best["oversampling"], "q": best["q"], "power": best["power"], "passes": best["passes"],
            "a_slice_mean": best["overlap"]["a_slice"]["mean"], "b_slice_mean": best["overlap"]["b_slice"]["mean"],
            "reached_threshold": bool(ok), "why": why}


# ------------------------------------------------------------------------------------------ output


def _fmt(m: dict) -> str:
    return f"{m['mean']:.4f} / {m['min']:.3f}"


def _fmt_row(row: dict) -> str:
    o = row["overlap"]
    wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.1f}"
    return (f"{row['method']:10s} {row['source'][:9]:9s} os={row['oversampling']} q={row['q']} p={row['power']} "
            f"passes={row['passes']} wall={wall} a={_fmt(o['a_slice'])} b={_fmt(o['b_slice'])} "
            f"L2r={_fmt(o['left_2r'])} R2r={_fmt(o['right_2r'])}")


def markdown(result: dict) -> str:
    r = result["r"]
    m = result["machine"]
    lines = [
        f"# LoRA-GA: subspace overlap with the exact SVD (r={r})", "",
        f"Model: {result['model']}; targets: {', '.join(result['targets'])} ({result['matrices']} matrices); "
        f"estimation: {result['batches']} batches x {result['batch_size']} (padded lengths "
        f"{result['seq_lengths']}, max_length {result['max_length']}).",
        f"Machine: {m['nproc']} x {m['cpu']}; load average {m['loadavg'][0]:.1f} at start, "
        f"{m['loadavg_end'][0]:.1f} at end; total {result['total_s']:.0f}s.", "",
        "Overlap = ||U_ex^T U_m||_F^2 / k, as `mean / min` over all matrices. a slice = input side [0:r] "
        "(= top-r left), b slice = output side [r:2r] (what ArB2r uses). Passes = passes over the estimation "
        "batches (exact/randomized: one gradient pass). Wall: exact/randomized = estimation + factorization "
        "(cold, incl. compile); streaming real = measured; streaming simulated = estimated from the real runs.", "",
        "| method | source | oversampling | q | power | passes | wall s | a slice [0:r] | b slice [r:2r] "
        "| left top-2r | right top-2r | left top-r | right top-r |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        o = row["overlap"]
        wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.1f}" + (
            " (est.)" if row["wall_kind"].startswith("estimated") else "")
        src = row["source"].split(" ")[0]
        dash = lambda v: "-" if v is None else str(v)  # noqa: E731
        lines.append(f"| {row['method']} | {src} | {dash(row['oversampling'])} | {dash(row['q'])} | "
                     f"{dash(row['power'])} | {row['passes']} | {wall} | {_fmt(o['a_slice'])} | {_fmt(o['b_slice'])} "
                     f"| {_fmt(o['left_2r'])} | {_fmt(o['right_2r'])} | {_fmt(o['left_r'])} | {_fmt(o['right_r'])} |")
    sp = result["spectrum"]
    lines += ["", "Singular-value gaps of the exact gradients (median / min over matrices): "
              + "; ".join(f"{k} {v['median']:.3f} / {v['min']:.3f}" for k, v in sp.items()) + "."]
    if result["real_vs_simulated"]:
        lines.append("Real streaming vs its simulation (same Omega), b-slice / left-2r overlap means: "
                     + "; ".join(f"os={c['oversampling']} p={c['power']}: "
                                 f"{c['overlap_real_vs_simulated']['b_slice']['mean']:.5f} / "
                                 f"{c['overlap_real_vs_simulated']['left_2r']['mean']:.5f}"
                                 for c in result["real_vs_simulated"]) + ".")
    if result["pass_time_fit"]:
        f = result["pass_time_fit"]
        lines.append(f"Streaming pass time (fit over the real runs): {f['per_pass_s']:.1f}s per pass "
                     f"({f['per_batch_s']:.2f}s per batch) + {f['compile_s']:.1f}s compile.")
    rec = result["recommendation"]
    if rec:
        cur = result["current_default"]
        lines += ["", f"Recommended streaming default: oversampling {rec['oversampling']} (q={rec['q']}), "
                  f"power {rec['power']} ({rec['passes']} passes): {rec['why']}. Slice overlaps "
                  f"{rec['a_slice_mean']:.4f} (a) / {rec['b_slice_mean']:.4f} (b). Current default: oversampling "
                  f"{cur['oversampling']}, power {cur['power']}."]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_json: str, out_md: str) -> None:
    for path in (out_json, out_md):
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(out_json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    pathlib.Path(out_md).write_text(markdown(result))


if __name__ == "__main__":
    main()
