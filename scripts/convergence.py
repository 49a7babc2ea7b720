"""Convergence on real data: plain LoRA vs LoRA-GA vs full fine-tuning of SmolLM2-135M-Instruct on GSM8K-style
worked solutions (training: reasoning-gym gsm_symbolic; held-out loss and greedy accuracy: the real GSM8K test set).

    python scripts/convergence.py                 # the CPU default: about an hour on an idle 2-core machine
    python scripts/convergence.py --seeds 0 --steps 30 --grid-steps 10 --out-dir docs/convergence/medium
    python scripts/convergence.py --full          # GPU-sized: longer, bigger batches, more evaluation
    python scripts/convergence.py --quick         # tiny random Llama, a few steps (smoke test, < 1 min)

Protocol (LoRA-GA paper, arXiv 2407.05000, scaled down):
  * LoRA and LoRA-GA: r=8, alpha 16, rsLoRA (scale alpha/sqrt(r)), q/k/v/o/gate/up/down, dropout 0.05; LoRA-GA with
    the stable scale (gamma 16), ArB2r, randomized SVD, gradients estimated on the first 2 x 16 training examples (the
    init is cached and reused across learning rates and seeds: it does not depend on either).
  * Full fine-tuning (the upper reference) trains every base parameter: `jaxlora.training.step`'s trainable tree
    {"lora": {}, "full": all params}, the same step and optimizer.
  * Every run: AdamW (weight decay 0), warmup then cosine decay over --steps, global-norm clipping 1.0, batch --batch,
    examples of at most --max-length tokens (longer training problems are left out rather than cut before their
    answer), prompt "Question: {input}\\nAnswer: " masked. Runs of one seed see the same batches in the same order.
  * Learning rate per method: a small grid (--lora-lrs, --loraga-lrs, --full-lrs), each run at seed --seeds[0] for
    --grid-steps steps of the full schedule; the lowest mean training loss over the grid's last steps wins. The
    winning run is continued to --steps (so the grid costs only its losers), then the other seeds run at that rate.
  * Held-out loss: the first --eval-examples GSM8K test problems (truncated to --max-length), every --eval-every
    steps. Accuracy: greedy decoding of the first --acc-examples test problems (same prompt), the answer after
    "####" or else the last number, compared with GSM8K's "#### N".

Budget of the default (an estimate from the step cost, not a measured idle run): a LoRA step on 4 x 256 tokens of
SmolLM2-135M is ~0.6 TFLOP (`train_flops_per_token`), ~5-8 s on an idle 2-core CPU; the default runs ~370 step
equivalents (3 grids x 12 steps x 2 LoRA methods, 3 seeds x 40 steps, full fine-tuning at ~1.5x a LoRA step for 2 grid
runs + 1 seed) plus ~50 held-out evaluations of 32 problems and 10 greedy decodes of 32 problems.

Outputs in --out-dir: convergence.png (training and held-out loss vs step, mean over seeds with min/max band; the
training curve is a trailing mean over --smooth steps), convergence.json (every curve, grid and setting) and
convergence.md (the table: steps LoRA-GA needs to reach plain LoRA's final training loss, final held-out loss and
accuracy per method, plus the machine and its load average).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
from bench_common import machine_info, versions  # noqa: E402 (scripts/, beside this file)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "Question: {input}\nAnswer: "
METHODS = ("lora", "lora_ga", "full")
LABELS = {"lora": "LoRA", "lora_ga": "LoRA-GA", "full": "full fine-tuning", "base": "base model (no training)"}
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)

PRESETS = {  # what --quick / --full change (explicit flags win)
    "quick": dict(steps=6, grid_steps=3, batch=2, max_length=128, seeds="0,1", eval_every=3, eval_examples=4,
                  eval_batch=4, acc_examples=4, max_new_tokens=8, lora_lrs="3e-4,1e-3", loraga_lrs="1e-4",
                  full_lrs="1e-4", ga_batches=2, max_train=64),
    "full": dict(steps=300, grid_steps=100, batch=16, gen_batch=64, max_length=512, eval_every=25, eval_examples=256,
                 eval_batch=32, acc_examples=250, max_new_tokens=320, ga_batches=64, max_train=None,
                 full_lrs="1e-5,2e-5,5e-5"),
}


# ---------------------------------------------------------------------------------------------------- data


def answer_number(text: str) -> str | None:
    """The final answer of a worked solution: the number after "####", else the last number in the text."""
    m = re.search(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
    nums = [m.group(1)] if m else re.findall(r"-?[\d,]*\.?\d+", text)
    if not nums:
        return None
    s = nums[-1].replace(",", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return None
    return str(int(x)) if x == int(x) else str(x)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def filtered_train_file(src, dst: pathlib.Path, tokenizer, cfg, limit: int | None) -> int:
    """Writes the training records whose prompt + solution + EOS fit cfg.max_length; returns how many."""
    from jaxlora.training.data import tokenize_example
    keep = []
    for rec in read_jsonl(src):
        if not tokenize_example(rec, cfg, tokenizer)["truncated"]:
            keep.append(rec)
        if limit and len(keep) >= limit:
            break
    dst.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


# ---------------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    """One training run: its state, compiled step and history, advanced step by step."""
    method: str
    lr: float
    seed: int
    params: object  # the frozen base it trains against (the loaded weights, for every method)
    state: object
    step_fn: object
    loader: object
    done: int = 0
    train_losses: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)  # [step, held-out loss]
    seconds: float = 0.0
    accuracy: float | None = None
    answers: list = dataclasses.field(default_factory=list)


class Study:
    def __init__(self, args):
        import jax
        from jaxlora import sharding
        from jaxlora.training import data as data_lib
        from jaxlora.models.model import Model, from_pretrained
        from jaxlora.training import step as step_lib

        self.args, self.jax = args, jax
        from jaxlora.backends import skip_tpu_backend_without_tpu
        skip_tpu_backend_without_tpu()  # no libtpu noise on a CPU/GPU host
        self.mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
        from transformers import AutoTokenizer
        import assets
        model_path = args.model or str(assets.smollm2_path(prepare=True))
        paths = assets.gsm_data_paths() if (args.train_data and args.test_data) else assets.prepare_gsm_data()
        self.train_path, self.test_path = args.train_data or paths["train"], args.test_data or paths["test"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if args.quick:
            self.model = Model.random({**TINY_LLAMA, "vocab_size": len(self.tokenizer),
                                       "eos_token_id": self.tokenizer.eos_token_id}, mesh=self.mesh)
            self.model_name = f"tiny random Llama (2 layers, hidden 32; {pathlib.Path(model_path).name} tokenizer)"
        else:
            self.model = from_pretrained(model_path, args.dtype, mesh=self.mesh)
            self.model_name = pathlib.Path(model_path).name
        self.base_params = self.model.params
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        out = pathlib.Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.data_cfg = data_lib.DataConfig(
            path=str(out / "train_filtered.jsonl"), eval_path=str(self.test_path), prompt_template=PROMPT,
            response_template="{target}", max_length=args.max_length, bucket_lengths=(args.max_length,),
            max_examples=None)
        self.n_train = filtered_train_file(self.train_path, out / "train_filtered.jsonl", self.tokenizer,
                                           self.data_cfg, args.max_train)
        self.train_data = data_lib.load_tokenized(self.data_cfg, self.tokenizer, "train")
        eval_cfg = dataclasses.replace(self.data_cfg, max_examples=args.eval_examples)
        self.eval_data = data_lib.load_tokenized(eval_cfg, self.tokenizer, "eval")
        self.eval_loader = data_lib.BatchLoader(self.eval_data, min(args.eval_batch, len(self.eval_data)),
                                                (args.max_length,), self.pad, shuffle=False)
        self.eval_fn = jax.jit(step_lib.make_eval_step(self.model))
        self.test_records = read_jsonl(self.test_path)[: args.acc_examples]
        self.steps_cache: dict = {}

    # -------------------------------------------------------------------------------------- building runs

    def lora_config(self, method: str):
        from jaxlora.lora import LoraConfig, LoraGAConfig
        a = self.args
        ga = LoraGAConfig(batch_size=2, num_batches=a.ga_batches, direction="ArB2r", scale="stable",
                          stable_gamma=16, svd_method="randomized", seed=0,
                          cache_dir=None if a.quick else str(ROOT / ".cache" / "jaxlora" / "loraga"))
        return LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.05, target_modules=ALL_LINEAR,
                          init_lora_weights="lora_ga" if method == "lora_ga" else True,
                          lora_ga_config=ga if method == "lora_ga" else None)

    def new_run(self, method: str, lr: float, seed: int) -> Run:
        import jax
        from jaxlora.config import RunConfig, TrainConfig
        from jaxlora.training import data as data_lib
        from jaxlora.training import optim
        from jaxlora.training.build import build_training
        from jaxlora.training.setup import lora_ga_batches
        a = self.args
        warmup = max(1, round(0.05 * a.steps))
        config = RunConfig(lora=self.lora_config(method), data=self.data_cfg,
                           optim=optim.OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=warmup,
                                                   max_grad_norm=1.0),
                           train=TrainConfig(seed=seed, micro_batch_size=a.batch, progress_bar=False))
        full = None
        if method == "full":
            full = {"lora": {}, "full": jax.tree.map(lambda x: x.astype("float32"), self.base_params)}
        ga = lora_ga_batches(config, self.train_data, self.tokenizer) if method == "lora_ga" else None
        self.model.params = self.base_params
        # tx built as before: all groups, so every (method, lr) state has the same layout across seeds
        tx = optim.make_optimizer(config.optim, a.steps)[0]
        training = build_training(self.model, config, total_steps=a.steps, trainable=full, lora_ga_batches=ga, tx=tx)
        params, state = training.params, training.state
        key = (method, lr)  # one jitted step per (method, lr): the seeds reuse its compilation (same shardings)
        step_fn = self.steps_cache.setdefault(key, training.train_step)
        loader = data_lib.BatchLoader(self.train_data, a.batch, (a.max_length,), self.pad, seed=seed)
        return Run(method, lr, seed, params, state, step_fn, loader)

    # -------------------------------------------------------------------------------------- running

    def held_out(self, params, trainable) -> float:
        from jaxlora.training.evaluation import evaluate
        return evaluate(self.eval_fn, params, trainable, self.eval_loader, self.mesh, None)

    def advance(self, run: Run, to_step: int, label: str) -> Run:
        from jaxlora.training import step as step_lib
        a = self.args
        t0 = time.perf_counter()
        while run.done < to_step:
            batch = step_lib.place_batch(run.loader.batch(run.done), self.mesh)
            run.state, metrics = run.step_fn(run.params, run.state, batch)
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise RuntimeError(f"{label}: loss {loss} at step {run.done + 1}")
            run.train_losses.append(loss)
            run.done += 1
            if run.done % a.eval_every == 0 or run.done == a.steps:
                run.evals.append([run.done, self.held_out(run.params, step_lib.adapters(run.state.trainable,
                                                                                        run.state.frozen))])
                print(f"  {label} step {run.done}: train {loss:.4f}, held-out {run.evals[-1][1]:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
        run.seconds += time.perf_counter() - t0
        return run

    def accuracy(self, params, lora) -> tuple[float, list]:
        from jaxlora.generation import generate
        a = self.args
        out = []
        for i in range(0, len(self.test_records), a.gen_batch):
            recs = self.test_records[i: i + a.gen_batch]
            texts = generate(self.model, params, self.tokenizer, [PROMPT.format(**r) for r in recs], lora=lora,
                             max_new_tokens=a.max_new_tokens)
            for r, t in zip(recs, texts):
                gold, pred = answer_number(r["answer"]), answer_number(t.split("Question:")[0])
                out.append({"gold": gold, "pred": pred, "correct": pred is not None and pred == gold})
        return sum(x["correct"] for x in out) / max(len(out), 1), out

    def finish(self, run: Run) -> Run:
        from jaxlora import lora as lora_lib
        from jaxlora.training import step as step_lib
        t0 = time.perf_counter()
        tr = step_lib.adapters(run.state.trainable, run.state.frozen)
        params = lora_lib.overlay(run.params, tr["full"])
        run.accuracy, run.answers = self.accuracy(params, tr["lora"] or None)
        print(f"  {LABELS[run.method]} lr {run.lr:g} seed {run.seed}: accuracy {run.accuracy:.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        run.state = run.params = None  # free the memory; the curves are kept
        return run


# ---------------------------------------------------------------------------------------------------- analysis


def trailing_mean(xs: list[float], w: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - w + 1): i + 1]) for i in range(len(xs))]


def band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    cols = list(zip(*curves))
    return [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def steps_to_reach(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, x in enumerate(curve) if x <= target), None)


def summarize(runs: dict[str, list[Run]], base: dict, smooth: int) -> dict:
    s = {}
    for m, rs in runs.items():
        sm = [trailing_mean(r.train_losses, smooth) for r in rs]
        mean, lo, hi = band(sm)
        ev = band([[e[1] for e in r.evals] for r in rs])
        s[m] = {"lr": rs[0].lr, "seeds": [r.seed for r in rs], "train_smoothed_mean": mean, "train_smoothed_min": lo,
                "train_smoothed_max": hi, "eval_steps": [0] + [e[0] for e in rs[0].evals],
                "eval_mean": [base["eval_loss"]] + ev[0], "eval_min": [base["eval_loss"]] + ev[1],
                "eval_max": [base["eval_loss"]] + ev[2], "final_train": mean[-1],
                "final_train_range": [lo[-1], hi[-1]], "final_eval": ev[0][-1],
                "final_eval_range": [ev[1][-1], ev[2][-1]],
                "accuracy": statistics.fmean(r.accuracy for r in rs), "accuracy_per_seed": [r.accuracy for r in rs],
                "seconds_per_run": statistics.fmean(r.seconds for r in rs)}
    if "lora" in s:
        target = s["lora"]["final_train"]
        for m in s:
            s[m]["steps_to_lora_final_per_seed"] = [steps_to_reach(trailing_mean(r.train_losses, smooth), target)
                                                    for r in runs[m]]
        add_speedups(s)
    return s


def add_speedups(s: dict) -> None:
    """Steps each method's seed-mean curve needs to reach plain LoRA's final training loss, and the speed-up: the
    steps LoRA itself first needs (its curve is noisy, so often fewer than its length) over the method's."""
    target = s["lora"]["final_train"]
    lora_steps = steps_to_reach(s["lora"]["train_smoothed_mean"], target)
    for m in s:
        n = steps_to_reach(s[m]["train_smoothed_mean"], target)
        s[m]["steps_to_lora_final"] = n
        s[m]["speedup_vs_lora"] = lora_steps / n if n else None


def plot(summary: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"lora": "tab:blue", "lora_ga": "tab:red", "full": "tab:gray"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, s in summary.items():
        x = list(range(1, len(s["train_smoothed_mean"]) + 1))
        ax1.plot(x, s["train_smoothed_mean"], color=colors[m], label=f"{LABELS[m]} (lr {s['lr']:g})")
        ax1.fill_between(x, s["train_smoothed_min"], s["train_smoothed_max"], color=colors[m], alpha=0.2)
        ax2.plot(s["eval_steps"], s["eval_mean"], "o-", color=colors[m], label=LABELS[m], markersize=3)
        ax2.fill_between(s["eval_steps"], s["eval_min"], s["eval_max"], color=colors[m], alpha=0.2)
    if "lora" in summary:
        ax1.axhline(summary["lora"]["final_train"], color=colors["lora"], ls=":", lw=1)
    ax1.set(xlabel="step", ylabel="training loss (trailing mean)", title="training loss")
    ax2.set(xlabel="step", ylabel="held-out loss", title="held-out loss (GSM8K test subset)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(json_path: pathlib.Path, out: pathlib.Path) -> dict:
    """The table and plot of a finished run from its JSON (speed-ups recomputed), without training anything."""
    res = json.loads(json_path.read_text())
    add_speedups(res["summary"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res["summary"], out / "convergence.png", f"{res['model']} on gsm_symbolic; batch {res['args']['batch']}, "
         f"seeds {res['args']['seeds']}; mean with min/max band")
    md = markdown(res)
    (out / "convergence.md").write_text(md)
    print(md)
    return res


def markdown(res: dict) -> str:
    a, s, m = res["args"], res["summary"], res["machine"]
    lines = [
        "# Convergence: LoRA vs LoRA-GA vs full fine-tuning", "",
        f"Model: {res['model']} ({a['dtype']}); training: {res['n_train']} gsm_symbolic problems of at most "
        f"{a['max_length']} tokens, batch {a['batch']}, {a['steps']} steps, seeds {a['seeds']}; held-out: first "
        f"{res['n_eval']} GSM8K test problems; accuracy: first {res['n_acc']} GSM8K test problems, greedy, "
        f"{a['max_new_tokens']} new tokens. LoRA / LoRA-GA: r=8, alpha 16, rsLoRA, dropout 0.05, all linear layers; "
        f"LoRA-GA stable scale (gamma 16), {a['ga_batches']} x 2 estimation examples. Learning rates picked on a grid "
        f"by the mean training loss of the last {res['grid_window']} of {a['grid_steps']} steps (seed "
        f"{a['seeds'].split(',')[0]}).",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), jax {res['versions']['jax']} on {res['backend']}; load average "
        f"{res['load_start'][0]:.2f} / {res['load_start'][1]:.2f} / {res['load_start'][2]:.2f} (1/5/15 min) at "
        f"start, {res['load_end'][0]:.2f} / {res['load_end'][1]:.2f} / {res['load_end'][2]:.2f} at end; "
        f"{res['date']}; wall {res['wall_s'] / 60:.1f} min.",
        f"Command: `{res['command']}`", "",
        "| method | lr (grid: final-window training loss) | final training loss (mean, min-max) | steps to reach "
        "LoRA's final training loss | speed-up vs LoRA | final held-out loss (mean, min-max) | GSM8K accuracy "
        "(mean; per seed) | s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for meth in METHODS:
        if meth not in s:
            continue
        x = s[meth]
        grid = ", ".join(f"{lr}: {v:.4f}" for lr, v in res["grid"][meth]["scores"].items())
        reach = x.get("steps_to_lora_final")
        per = x.get("steps_to_lora_final_per_seed") or []
        reach_s = (f"{reach}" if reach else f"not within {a['steps']}") + \
            (f" (per seed: {', '.join(str(p) if p else '-' for p in per)})" if len(per) > 1 else "")
        sp = x.get("speedup_vs_lora")
        lines.append(
            f"| {LABELS[meth]} | {x['lr']:g} ({grid}) | {x['final_train']:.4f} ({x['final_train_range'][0]:.4f}-"
            f"{x['final_train_range'][1]:.4f}) | {reach_s} | {f'{sp:.2f}x' if sp else '-'} | {x['final_eval']:.4f} "
            f"({x['final_eval_range'][0]:.4f}-{x['final_eval_range'][1]:.4f}) | {x['accuracy']:.3f}; "
            f"{', '.join(f'{v:.3f}' for v in x['accuracy_per_seed'])} | {x['seconds_per_run']:.0f} |")
    b = res["base"]
    lines.append(f"| {LABELS['base']} | - | - | - | - | {b['eval_loss']:.4f} | {b['accuracy']:.3f} | - |")
    lines += ["", f"Training losses are trailing means over {a['smooth']} steps (per-step losses are noisy at batch "
              f"{a['batch']}); \"steps to reach\" is the first step at which the seed-mean curve is at or below plain "
              f"LoRA's final value; the speed-up is LoRA's own such step over the method's (the paper reports LoRA-GA needing 2-4x fewer steps). Plot: convergence.png; all "
              f"curves: convergence.json."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct from the cache)")
    p.add_argument("--train-data", default=None, help="JSONL input/target (default: gsm_symbolic train)")
    p.add_argument("--test-data", default=None, help="JSONL question/answer/input/target (default: GSM8K test)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--grid-steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-train", type=int, default=None, help="training problems kept (default: all that fit)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--full-seeds", type=int, default=1, help="seeds for full fine-tuning (the first N of --seeds)")
    p.add_argument("--lora-lrs", default="1e-4,3e-4,1e-3")
    p.add_argument("--loraga-lrs", default="3e-5,1e-4,3e-4")
    p.add_argument("--full-lrs", default="1e-5,3e-5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ga-batches", type=int, default=16, help="LoRA-GA estimation batches of 2 examples")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--acc-examples", type=int, default=32)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--smooth", type=int, default=None, help="trailing-mean window (default: steps // 8, >= 1)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, a few steps (smoke test)")
    p.add_argument("--full", action="store_true", help="GPU-sized run (more steps, batch, length, evaluation)")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "convergence"))
    p.add_argument("--render", metavar="JSON", help="only re-render the table and plot of a finished run's "
                                                     "convergence.json (into --out-dir)")
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    preset = PRESETS["quick"] if args.quick else PRESETS["full"] if args.full else {}
    for k, v in preset.items():
        if getattr(args, k) == p.get_default(k):
            setattr(args, k, v)
    if args.smooth is None:
        args.smooth = max(1, args.steps // 8)
    if not 0 < args.grid_steps <= args.steps:
        p.error("need 0 < --grid-steps <= --steps")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return render(pathlib.Path(args.render), pathlib.Path(args.out_dir))
    load_start, t_start = list(os.getloadavg()), time.perf_counter()
    study = Study(args)
    seeds = [int(x) for x in args.seeds.split(",")]
    grids = {"lora": args.lora_lrs, "lora_ga": args.loraga_lrs, "full": args.full_lrs}
    methods = [m for m in args.methods.split(",") if m]
    window = max(1, min(5, args.grid_steps // 2))
    print(f"{study.model_name}: {study.n_train} training problems, {len(study.eval_data)} held-out, "
          f"{len(study.test_records)} for accuracy", flush=True)

    t0 = time.perf_counter()
    base_eval = study.held_out(study.base_params, {"lora": {}, "full": {}})
    base_acc, base_answers = study.accuracy(study.base_params, None)
    base = {"eval_loss": base_eval, "accuracy": base_acc, "answers": base_answers, "seconds": time.perf_counter() - t0}
    print(f"base: held-out {base_eval:.4f}, accuracy {base_acc:.3f}", flush=True)

    runs, grid = {}, {}
    for m in methods:
        lrs = [float(x) for x in grids[m].split(",")]
        scores, curves, best = {}, {}, None
        for lr in lrs:  # the grid: seed 0, the first grid_steps of the full schedule
            r = study.advance(study.new_run(m, lr, seeds[0]), args.grid_steps, f"{LABELS[m]} lr {lr:g} (grid)")
            scores[lr] = statistics.fmean(r.train_losses[-window:])
            curves[lr] = {"train_losses": list(r.train_losses), "evals": list(r.evals)}
            if best is None or scores[lr] < scores[best.lr]:
                best = r
        grid[m] = {"scores": {f"{k:g}": v for k, v in scores.items()},
                   "curves": {f"{k:g}": v for k, v in curves.items()}, "chosen": best.lr}
        print(f"{LABELS[m]}: lr {best.lr:g} chosen ({', '.join(f'{k:g}: {v:.4f}' for k, v in scores.items())})",
              flush=True)
        n_seeds = args.full_seeds if m == "full" else len(seeds)
        done = [study.finish(study.advance(best, args.steps, f"{LABELS[m]} lr {best.lr:g} seed {seeds[0]}"))]
        for s in seeds[1:n_seeds]:
            r = study.advance(study.new_run(m, best.lr, s), args.steps, f"{LABELS[m]} lr {best.lr:g} seed {s}")
            done.append(study.finish(r))
        runs[m] = done

    summary = summarize(runs, base, args.smooth)
    import jax
    res = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(
            [os.path.relpath(sys.argv[0], ROOT) if sys.argv and sys.argv[0].endswith(".py") else
             "scripts/convergence.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args), "model": study.model_name, "n_train": study.n_train, "n_eval": len(study.eval_data),
        "n_acc": len(study.test_records), "grid_window": window, "backend": jax.default_backend(),
        "machine": machine_info(), "versions": versions(("jax", "flax", "optax")),
        "load_start": load_start, "load_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t_start,
        "base": base, "grid": grid, "summary": summary,
        "runs": {m: [{"seed": r.seed, "lr": r.lr, "train_losses": r.train_losses, "evals": r.evals,
                      "accuracy": r.accuracy, "answers": r.answers, "seconds": r.seconds} for r in rs]
                 for m, rs in runs.items()},
    }
    out = pathlib.Path(args.out_dir)
    (out / "convergence.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(summary, out / "convergence.png", f"{study.model_name} on gsm_symbolic; batch {args.batch}, "
         f"seeds {args.seeds}; mean with min/max band")
    md = markdown(res)
    (out / "convergence.md").write_text(md)
    (out / "train_filtered.jsonl").unlink(missing_ok=True)
    print(md)
    return res


if __name__ == "__main__":
    main()
