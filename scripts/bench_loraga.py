"""LoRA-GA initialization benchmark: jaxlora exact / randomized / streaming vs PEFT 0.21 vs a LoRA training step.

    python scripts/bench_loraga.py                      # SmolLM2-135M float32, 4 batches x 2 x 256 tokens, r=8, 2 rounds
    python scripts/bench_loraga.py --batches 8 --repeats 3
    python scripts/bench_loraga.py --quick              # tiny random Llama saved as an HF folder (smoke test)

Every variant runs in a fresh subprocess (so peak memory is its own), on the same estimation batches (tokenized once
into an .npz: the first batches x batch-size gsm_symbolic training examples, prompt "Question: {input}\\nAnswer: "
masked, padded to --seq) and the same loss (mean next-token cross entropy over labelled tokens, per batch, averaged
over batches):

  jaxlora-exact / -randomized / -streaming   `jaxlora.lora.ga.lora_ga_init` with that svd_method (library defaults
                                              otherwise); estimation and factorization times are the ones it logs
                                              (streaming does everything in its sketch passes: factorization 0)
  peft                                        transformers float32 model; `peft.tuners.lora.loraga.preprocess_loraga`
                                              (train_step = forward + backward over the same batches) then
                                              `get_peft_model` (torch.svd_lowrank q=4r, niter=4 per layer)
  lora-step-r / lora-step-q                   jaxlora LoRA training steps (`jaxlora.training.step`, AdamW) at rank r and at the
                                              streaming sketch rank q = 2r + oversampling (library default 4r), over
                                              the same batches (step 1 compiles; the time shown is per later step)

Memory: peak RSS. "peak" = VmHWM of the subprocess (includes loading; `bench_common.maxrss_kb`); "loaded" = RSS
once the model and batches are in memory; "delta" = the peak after that point (VmHWM after resetting it through
/proc/self/clear_refs, else ru_maxrss) minus "loaded". Rounds alternate the variants; medians are reported.
All times include JIT compilation (what a user waits for); jaxlora compiles, PEFT does not.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import PeakMeter, machine_info  # noqa: E402 (scripts/, beside this file)

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("jaxlora-exact", "peft", "jaxlora-randomized", "jaxlora-streaming", "lora-step-r", "lora-step-q")
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)


# ------------------------------------------------------------------------------------------ workers


def _load_batches(path: str) -> list[dict]:
    import numpy as np
    z = np.load(path)
    n = int(z["num_batches"])
    return [{k: z[f"{k}_{i}"] for k in ("input_ids", "attention_mask", "labels")} for i in range(n)]


def worker_prepare(args) -> dict:
    """Writes the batches (and, with --quick, the tiny HF model folder)."""
    import numpy as np
    sys.path.insert(0, str(HERE))
    import loraga_subspace as sub
    out = pathlib.Path(args.workdir)
    if args.quick:
        import torch
        import transformers
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "architectures"})
        transformers.LlamaForCausalLM(cfg).save_pretrained(out / "model")
        model_path = str(out / "model")
        batches = sub.random_batches(TINY_LLAMA["vocab_size"], args.batches, args.batch_size, args.seq)
        source = "tiny random Llama (2 layers, hidden 64), random tokens"
    else:
        from transformers import AutoTokenizer
        model_path = args.model or str(__import__("assets", fromlist=["x"]).smollm2_path())
        tok = AutoTokenizer.from_pretrained(model_path)
        batches = sub.gsm_batches(tok, args.batches, args.batch_size, args.seq, args.data, fixed_length=True)
        source = f"gsm_symbolic train, first {args.batches * args.batch_size} examples, padded to {args.seq}"
    arrays = {"num_batches": np.array(len(batches))}
    for i, b in enumerate(batches):
        arrays.update({f"{k}_{i}": v for k, v in b.items()})
    np.savez(out / "batches.npz", **arrays)
    labelled = int(sum((b["labels"][:, 1:] != -100).sum() for b in batches))
    from jaxlora.lora import LoraGAConfig
    from jaxlora.lora.ga import sketch_rank
    ga = LoraGAConfig(svd_method="streaming")  # the library's streaming defaults at rank r
    return {"model_path": model_path, "data": source, "labelled_tokens": labelled,
            "q": sketch_rank(ga, args.r, 10**9, 10**9), "power": ga.power_iters()}


def worker_jaxlora(args, method: str) -> dict:
    import logging
    import jax
    import jaxlora
    from jaxlora.lora import ga as lora_ga
    from jaxlora.lora import LoraConfig, LoraGAConfig

    meter = PeakMeter()
    model = jaxlora.from_pretrained(args.model_path, "float32")
    batches = _load_batches(args.batches_file)
    jax.block_until_ready(model.params)
    meter.mark()
    ga = LoraGAConfig(batch_size=args.batch_size, num_batches=len(batches), svd_method=method)
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=ALL_LINEAR, init_lora_weights="lora_ga",
                     lora_ga_config=ga)
    logged = {}

    class Grab(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("LoRA-GA (") and isinstance(record.args, tuple):
                logged["estimation_s"], logged["factorization_s"] = float(record.args[1]), float(record.args[2])

    logger = logging.getLogger("jaxlora.lora.ga")
    logger.setLevel(logging.INFO)
    logger.addHandler(Grab())
    t0 = time.perf_counter()
    lora = lora_ga.lora_ga_init(model, cfg, batches, progress=False)
    jax.block_until_ready(lora)
    total = time.perf_counter() - t0
    q = lora_ga.sketch_rank(ga, args.r, 10**9, 10**9)
    return {"total_s": total, "estimation_s": logged.get("estimation_s"),
            "factorization_s": logged.get("factorization_s"), "q": q if method != "exact" else None,
            "power": ga.power_iters() if method != "exact" else None, **meter.result()}


def worker_peft(args) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, LoraGAConfig, get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    meter = PeakMeter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    batches = [{k: torch.from_numpy(v).long() for k, v in b.items()} for b in _load_batches(args.batches_file)]
    meter.mark()
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=list(ALL_LINEAR), init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig())

    def train_step():
        for b in batches:  # HF's causal-LM loss: shifted, -100 ignored, mean over labelled tokens (as jaxlora)
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()

    t0 = time.perf_counter()
    preprocess_loraga(model, cfg, train_step)
    t1 = time.perf_counter()
    peft_model = get_peft_model(model, cfg)
    t2 = time.perf_counter()
    del peft_model
    return {"total_s": t2 - t0, "estimation_s": t1 - t0, "factorization_s": t2 - t1,
            "torch_threads": torch.get_num_threads(), **meter.result()}


def worker_lora_step(args, rank: int) -> dict:
    import jax
    import jaxlora
    from jaxlora.config import RunConfig
    from jaxlora.lora import LoraConfig
    from jaxlora.training import optim
    from jaxlora.training import step as step_lib
    from jaxlora.training.build import build_training

    meter = PeakMeter()
    model = jaxlora.from_pretrained(args.model_path, "float32")
    batches = _load_batches(args.batches_file)
    jax.block_until_ready(model.params)
    meter.mark()
    cfg = LoraConfig(r=rank, lora_alpha=args.alpha, target_modules=ALL_LINEAR)
    run = RunConfig(lora=cfg, optim=optim.OptimConfig())
    training = build_training(model, run, total_steps=100, rngs=(jax.random.key(0), jax.random.key(1)),
                              tx=optim.make_optimizer(run.optim, 100)[0])
    state, step = training.state, training.train_step
    times = []
    for b in batches[: max(2, min(len(batches), args.steps))]:
        t0 = time.perf_counter()
        state, metrics = step(model.params, state, step_lib.place_batch(b, model.mesh))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"total_s": sum(times), "first_step_s": times[0], "step_s": statistics.median(times[1:]),
            "steps": len(times), "rank": rank, "loss": float(metrics["loss"]), **meter.result()}


def run_worker(args) -> None:
    import logging
    logging.basicConfig(level=logging.WARNING)
    v = args.worker
    if v == "prepare":
        res = worker_prepare(args)
    elif v.startswith("jaxlora-"):
        res = worker_jaxlora(args, v.split("-", 1)[1])
    elif v == "peft":
        res = worker_peft(args)
    elif v in ("lora-step-r", "lora-step-q"):
        res = worker_lora_step(args, args.r if v == "lora-step-r" else args.q)
    else:
        raise SystemExit(f"unknown worker {v}")
    pathlib.Path(args.result_file).write_text(json.dumps(res))


# ------------------------------------------------------------------------------------------ driver


def _worker_env() -> dict:
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
    env["XLA_FLAGS"] = flags  # one CPU device, as a plain run
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def spawn(args, variant: str, workdir: pathlib.Path, extra: list[str]) -> dict:
    result = workdir / f"{variant}.{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", variant, "--workdir", str(workdir),
           "--result-file", str(result), "--batches", str(args.batches), "--batch-size", str(args.batch_size),
           "--seq", str(args.seq), "--r", str(args.r), "--alpha", str(args.alpha), "--steps", str(args.steps),
           *extra] + (["--quick"] if args.quick else [])
    if args.model:
        cmd += ["--model", args.model]
    if args.data:
        cmd += ["--data", args.data]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_worker_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    res = json.loads(result.read_text())
    res["process_s"] = time.perf_counter() - t0
    return res


def median_of(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        out[k] = statistics.median(vals) if vals and len(vals) == len(runs) else runs[0][k]
    return out


def table(result: dict) -> str:
    med = result["median"]
    m = result["machine"]
    a = result["args"]
    peft_t = med["peft"]["total_s"]
    step_q = med.get("lora-step-q", {})
    step_r = med.get("lora-step-r", {})
    lines = [
        "# LoRA-GA initialization benchmark", "",
        f"Model: {result['model']} (float32); data: {result['data']}; {a['batches']} batches x {a['batch_size']} x "
        f"{a['seq']} tokens ({result['labelled_tokens']} labelled); LoRA r={a['r']} on {', '.join(ALL_LINEAR)}; "
        f"streaming sketch rank q={result['q']} ({result['streaming_power']} power iteration(s), "
        f"{2 + 2 * result['streaming_power']} passes).",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']:.0f} GiB; load average "
        f"{result['load_start'][0]:.2f} / {result['load_start'][1]:.2f} (1 / 5 min) at start, "
        f"{result['load_end'][0]:.2f} / {result['load_end'][1]:.2f} at end; {a['repeats']} round(s), medians; "
        f"wall {result['wall_s']:.0f}s.", "",
        "| variant | estimation s | factorization s | rest s | total s (median; min) | PEFT / this (median; min) "
        "| peak RSS MB | loaded MB | delta MB | delta / LoRA step r=" + str(a["r"]) + " | delta / LoRA step q="
        + str(result["q"]) + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mins = {v: min(x["total_s"] for x in rs) for v, rs in result["runs"].items()}

    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    for v in VARIANTS:
        if v not in med:
            continue
        x = med[v]
        est, fac = x.get("estimation_s"), x.get("factorization_s")
        if v.startswith("lora-step"):
            est, fac, rest = None, None, None
            name = (f"{v} (rank {int(x['rank'])}; {x['step_s']:.2f}s/step after a {x['first_step_s']:.1f}s "
                    f"first step)")
            ratio = "-"
        else:
            name = v
            rest = statistics.median(r["total_s"] - (r["estimation_s"] or 0) - (r["factorization_s"] or 0)
                                     for r in result["runs"][v])
            ratio = f"{peft_t / x['total_s']:.2f}; {mins['peft'] / mins[v]:.2f}"
        rr = x["delta_mb"] / step_r["delta_mb"] if step_r.get("delta_mb") else None
        rq = x["delta_mb"] / step_q["delta_mb"] if step_q.get("delta_mb") else None
        lines.append(f"| {name} | {f(est)} | {f(fac)} | {f(rest)} | {f(x['total_s'])}; {f(mins[v])} | {ratio} | "
                     f"{f(x['peak_mb'], '.0f')} | {f(x['rss_loaded_mb'], '.0f')} | {f(x['delta_mb'], '.0f')} | "
                     f"{f(rr, '.2f')} | {f(rq, '.2f')} |")
    s = med.get("jaxlora-streaming")
    if s and step_q:
        lines += ["", "Targets (issue 3): >= 2x faster than PEFT (median; min): "
                  + ", ".join(f"{v.split('-')[1]} {peft_t / med[v]['total_s']:.2f}x; {mins['peft'] / mins[v]:.2f}x"
                              for v in VARIANTS if v.startswith("jaxlora-") and v in med)
                  + f"; streaming peak <= 1.1x a LoRA step's: delta {s['delta_mb'] / step_q['delta_mb']:.2f}x "
                  f"(q={result['q']}), {s['delta_mb'] / step_r['delta_mb']:.2f}x (r={a['r']}); absolute peak "
                  f"{s['peak_mb'] / step_q['peak_mb']:.2f}x (q), {s['peak_mb'] / step_r['peak_mb']:.2f}x (r)."]
    lines += ["", "Times include JIT compilation (jaxlora); PEFT's estimation is eager torch forward+backward and its "
              "factorization torch.svd_lowrank(q=4r, niter=4) per layer inside get_peft_model. jaxlora's estimation "
              "and factorization are the times lora_ga_init logs; rest = total minus both (building and placing a0/b0, "
              "and for streaming the sketch passes still running when its timer stops: its log "
              "stops the clock before blocking on the asynchronously dispatched passes). Delta = peak RSS after "
              "the model and batches were loaded minus the RSS at that point. Medians over rounds; under a "
              "loaded machine the min is the less disturbed figure."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="JSONL with input/target (default: gsm_symbolic train)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq", type=int, default=256, help="padded sequence length of every batch")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=3, help="LoRA training steps per lora-step run (>= 2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="tiny random Llama, 1 round (smoke test)")
    p.add_argument("--out-md", default=str(ROOT / "docs" / "bench_loraga.md"))
    p.add_argument("--out-json", default=None, help="default: --out-md with .json")
    p.add_argument("--keep", action="store_true", help="keep the work folder (batches, worker results)")
    # worker-only
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batches-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--q", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for name, val in (("batches", 2), ("batch_size", 2), ("seq", 32), ("r", 2), ("repeats", 1), ("steps", 2)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, val)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return {}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for need in ("peft",):
        if need not in variants:
            raise SystemExit("--variants must include peft (the ratios are relative to it)")
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_loraga_"))
    prep = spawn(args, "prepare", workdir, [])
    from_prep = ["--model-path", prep["model_path"], "--batches-file", str(workdir / "batches.npz")]
    q, power = prep["q"], prep["power"]
    from_prep += ["--q", str(q)]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.repeats):
        for v in variants:
            res = spawn(args, v, workdir, from_prep)
            runs[v].append(res)
            print(f"round {i + 1} {v}: total {res['total_s']:.1f}s, delta {res['delta_mb']:.0f} MB, "
                  f"peak {res['peak_mb']:.0f} MB (process {res['process_s']:.0f}s)", flush=True)
        if i + 1 < args.repeats:  # a partial table after each round (a long run stopped early still has one)
            _write(args, _result(args, prep, q, power, load_start, t_start, runs, i + 1), quiet=True)
    result = _result(args, prep, q, power, load_start, t_start, runs, args.repeats)
    _write(args, result)
    if not args.keep:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _result(args, prep, q, power, load_start, t_start, runs, rounds) -> dict:
    runs = {v: rs[:rounds] for v, rs in runs.items()}
    result = {"model": prep["model_path"], "data": prep["data"], "labelled_tokens": prep["labelled_tokens"],
              "args": {**{k: getattr(args, k) for k in ("batches", "batch_size", "seq", "r", "alpha", "steps",
                                                        "quick")}, "repeats": rounds},
              "q": q, "streaming_power": power, "machine": machine_info(), "load_start": load_start,
              "load_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t_start, "runs": runs,
              "median": {v: median_of(rs) for v, rs in runs.items()}}
    return result


def _write(args, result: dict, quiet: bool = False) -> None:
    md = table(result)
    out_md = pathlib.Path(args.out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    pathlib.Path(args.out_json or out_md.with_suffix(".json")).write_text(json.dumps(result, indent=1) + "\n")
    if not quiet:
        print(md)


if __name__ == "__main__":
    main()
