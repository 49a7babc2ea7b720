"""Convergence on real data: LoRA and its inits (LoRA-GA, PiSSA, OLoRA, LoRA-One, EVA, CorDA; full fine-tuning on
request) on SmolLM2-135M-Instruct and GSM8K-style worked solutions (training: reasoning-gym gsm_symbolic; held-out
loss and, on request, greedy accuracy: the real GSM8K test set), under either of two protocols.

    python scripts/convergence.py --protocol shared  # the LoRA-GA paper's: every method at one rate (2e-5)
    python scripts/convergence.py --protocol tuned   # each method at its best rate on a small grid
    python scripts/convergence.py --methods lora,lora_ga,full --lora-lrs 1e-4,3e-4,1e-3 --no-packing --batch 4 \
        --steps 40 --grid-steps 12 --eval-every 10 --acc-examples 32 --out-dir docs/convergence/first_study
    python scripts/convergence.py --full          # GPU-sized: longer, bigger batches, more evaluation, accuracy
    python scripts/convergence.py --quick         # tiny random Llama, a few steps, every method (smoke test)

Why two protocols: the LoRA-GA paper (arXiv 2407.05000) trains every method at one shared learning rate and reports
LoRA-GA converging 2-4x faster than LoRA; an init that starts with large or gradient-aligned adapters moves further
per step at a small rate, so that protocol measures the init and the rate together. The tuned protocol gives each
method its best rate on a grid first, which is how a user would run it.

Setup (the paper's, scaled down to about half an hour per protocol on an idle 2-core CPU):
  * Every LoRA method: r=8, alpha 16, rsLoRA (scale alpha/sqrt(r)), q/k/v/o/gate/up/down, dropout 0.05; LoRA-GA with
    the stable scale (gamma 16), ArB2r, randomized SVD; LoRA-GA, LoRA-One, EVA and CorDA (ipm) estimated on the first
    --ga-batches x 2 training examples; PiSSA exact SVD; OLoRA QR. Every init but plain LoRA's depends on the weights
    and the data only: it is computed once per method and reused by its rates and seeds (its time is reported).
  * Full fine-tuning (`--methods ...,full`) trains every base parameter: `jaxlora.training.step`'s trainable tree
    {"lora": {}, "full": all params}, the same step and optimizer.
  * Every run: AdamW (weight decay 0), warmup then cosine decay over --steps, global-norm clipping 1.0; --batch rows of
    --max-length tokens, packed (data.packing) unless --no-packing; longer training problems are left out rather than
    cut before their answer; prompt "Question: {input}\nAnswer: " masked. Runs of one seed see the same batches in
    the same order. The rate lives in the optimizer state, so each method compiles its step once.
  * --protocol tuned: a grid per method (GRIDS below, or --grid METHOD=LRS), each rate run at seed --seeds[0] for
    --grid-steps steps of the full schedule; the lowest mean training loss over the grid's last steps wins, that run
    is continued to --steps (so the grid costs only its losers), then the other seeds run at that rate.
    --protocol shared: every method at --shared-lr for every seed, no grid.
  * Held-out loss: the first --eval-examples GSM8K test problems (truncated to --max-length), every --eval-every
    steps. Accuracy (--acc-examples > 0): greedy decoding of the first test problems (same prompt), the answer after
    "####" or else the last number, compared with GSM8K's "#### N".

Outputs in --out-dir (default docs/convergence/<protocol>): convergence.png (training and held-out loss vs step, mean
over seeds with min/max band; the training curve is a trailing mean over --smooth steps), convergence.json (every
curve, grid and setting) and convergence.md (the table: steps each method needs to reach plain LoRA's final training
loss, the speed-up, final held-out loss per method, plus the machine and its load average).
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
METHODS = ("lora", "lora_ga", "pissa", "olora", "lora_one", "eva", "corda", "full")
INITS = {"lora": True, "lora_ga": "lora_ga", "pissa": "pissa", "olora": "olora", "lora_one": "lora_one", "eva": "eva",
         "corda": "corda"}  # method -> LoraConfig.init_lora_weights
DATA_DRIVEN = ("lora_ga", "lora_one", "eva", "corda")  # estimated on the first ga_batches x 2 training examples
LABELS = {"lora": "LoRA", "lora_ga": "LoRA-GA", "pissa": "PiSSA", "olora": "OLoRA", "lora_one": "LoRA-One",
          "eva": "EVA", "corda": "CorDA (ipm)", "full": "full fine-tuning", "base": "base model (no training)"}
# Each method's learning-rate grid for the tuned protocol: half-decade steps around the rates its paper or PEFT's
# examples use (the weight-driven inits start with large adapters and take smaller rates, as LoRA-GA)
GRIDS = {"lora": "3e-4,1e-3,3e-3", "lora_ga": "3e-5,1e-4,3e-4", "pissa": "1e-5,3e-5,1e-4", "olora": "1e-5,3e-5,1e-4",
         "lora_one": "3e-5,1e-4,3e-4", "eva": "3e-4,1e-3,3e-3", "corda": "1e-5,3e-5,1e-4", "full": "1e-5,3e-5"}
PAPER_LR = 2e-5  # the LoRA-GA paper trains every method (LoRA, PiSSA, LoRA-GA, full ...) at this one rate
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)

PRESETS = {  # what --quick / --full change (explicit flags win)
    "quick": dict(steps=6, grid_steps=3, batch=2, max_length=128, seeds="0,1", eval_every=3, eval_examples=4,
                  eval_batch=4, acc_examples=4, max_new_tokens=8, ga_batches=2, max_train=64,
                  methods=",".join(METHODS), grid=["lora=3e-4,1e-3", "lora_ga=1e-4", "pissa=3e-5", "olora=3e-5",
                                                   "lora_one=1e-4", "eva=1e-3", "corda=3e-5", "full=1e-4"]),
    "full": dict(steps=300, grid_steps=100, batch=16, gen_batch=64, max_length=512, eval_every=25, eval_examples=256,
                 eval_batch=32, acc_examples=250, max_new_tokens=320, ga_batches=64, max_train=None,
                 methods=",".join(METHODS), full_lrs="1e-5,2e-5,5e-5"),
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


def scaled_optimizer(optim_config, steps: int, lr: float):
    """The run's optimizer (`jaxlora.training.optim`, all groups: the same state layout for every method) at peak rate
    1, then scaled by `lr` held in the optimizer state (optax.inject_hyperparams), so the compiled step does not
    depend on the rate: AdamW's update is linear in its rate and the warmup/cosine schedule is proportional to its
    peak (weight decay is 0 here, which would otherwise be scaled by the rate as well)."""
    import optax
    from jaxlora.training import optim
    if optim_config.weight_decay:
        raise ValueError("scaled_optimizer needs weight_decay 0")
    unit = optim.make_optimizer(dataclasses.replace(optim_config, learning_rate=1.0), steps)[0]
    return optax.chain(unit, optax.inject_hyperparams(optax.scale)(step_size=lr))


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
            max_examples=None, packing=args.packing)
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
        self.inits: dict = {}  # method -> its initial LoRA tree (see initial_lora)
        self.init_seconds: dict = {}

    # -------------------------------------------------------------------------------------- building runs

    def lora_config(self, method: str):
        from jaxlora.lora import LoraConfig, LoraGAConfig
        a = self.args
        ga = LoraGAConfig(batch_size=2, num_batches=a.ga_batches, direction="ArB2r", scale="stable",
                          stable_gamma=16, svd_method="randomized", seed=0,
                          cache_dir=None if a.quick else str(ROOT / ".cache" / "jaxlora" / "loraga"))
        return LoraConfig(r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.05, target_modules=ALL_LINEAR,
                          init_lora_weights=INITS.get(method, True), lora_ga_config=ga if method in DATA_DRIVEN else None)

    def initial_lora(self, method: str, config, ga_batches):
        """The method's initial LoRA tree, computed once: every init here but plain LoRA's is a function of the
        weights and the estimation batches only (PiSSA exact, the randomized SVDs seeded by lora_ga_config.seed), so
        all its runs (grid rates, seeds) start from the same adapters. None for plain LoRA (seeded per run)."""
        if method in ("lora", "full"):
            return None
        if method not in self.inits:
            from jaxlora.training.build import initial_lora
            t0 = time.perf_counter()
            lora = initial_lora(self.model, config, None, lora_ga_batches=ga_batches)
            self.jax.block_until_ready(lora)
            self.inits[method] = lora
            self.init_seconds[method] = time.perf_counter() - t0
            print(f"  {LABELS[method]} init: {self.init_seconds[method]:.1f}s", flush=True)
        return self.inits[method]

    def new_run(self, method: str, lr: float, seed: int) -> Run:
        import jax
        from jaxlora.config import RunConfig, TrainConfig
        from jaxlora.training import optim
        from jaxlora.training.build import build_training
        from jaxlora.training.setup import lora_ga_batches, make_loader
        a = self.args
        warmup = max(1, round(0.05 * a.steps))
        config = RunConfig(lora=self.lora_config(method), data=self.data_cfg,
                           optim=optim.OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=warmup,
                                                   max_grad_norm=1.0),
                           train=TrainConfig(seed=seed, micro_batch_size=a.batch, progress_bar=False))
        full = None
        if method == "full":
            full = {"lora": {}, "full": jax.tree.map(lambda x: x.astype("float32"), self.base_params)}
        self.model.params = self.base_params
        ga = lora_ga_batches(config, self.train_data, self.tokenizer) \
            if method in DATA_DRIVEN and method not in self.inits else None
        lora = self.initial_lora(method, config, ga)
        tx = scaled_optimizer(config.optim, a.steps, lr)
        training = build_training(self.model, config, total_steps=a.steps, trainable=full, lora=lora, tx=tx)
        params, state = training.params, training.state
        # one jitted step per method: the rate is in the optimizer state, so every rate and seed reuses its compile
        step_fn = self.steps_cache.setdefault(method, training.train_step)
        loader = make_loader(config, self.train_data, self.tokenizer, a.batch, seed=seed)
        return Run(method, lr, seed, params, state, step_fn, loader)

    def examples_per_step(self) -> float:
        """Training examples in one step on average (packed rows hold several)."""
        from jaxlora.training.setup import make_loader
        if not self.args.packing:
            return float(self.args.batch)
        from jaxlora.config import RunConfig
        loader = make_loader(RunConfig(data=self.data_cfg), self.train_data, self.tokenizer, self.args.batch)
        return len(self.train_data) / len(loader.bins) * self.args.batch

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

    def accuracy(self, params, lora) -> tuple[float | None, list]:
        """Greedy GSM8K accuracy on the first --acc-examples test problems (None with 0 problems)."""
        from jaxlora.generation import generate
        a = self.args
        if not self.test_records:
            return None, []
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
        if run.accuracy is not None:
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
        acc = [r.accuracy for r in rs]
        s[m] = {"lr": rs[0].lr, "seeds": [r.seed for r in rs], "train_smoothed_mean": mean, "train_smoothed_min": lo,
                "train_smoothed_max": hi, "eval_steps": [0] + [e[0] for e in rs[0].evals],
                "eval_mean": [base["eval_loss"]] + ev[0], "eval_min": [base["eval_loss"]] + ev[1],
                "eval_max": [base["eval_loss"]] + ev[2], "final_train": mean[-1],
                "final_train_range": [lo[-1], hi[-1]], "final_eval": ev[0][-1],
                "final_eval_range": [ev[1][-1], ev[2][-1]],
                "mean_train": statistics.fmean(statistics.fmean(r.train_losses) for r in rs),
                "accuracy": None if None in acc else statistics.fmean(acc), "accuracy_per_seed": acc,
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
    if "lora" not in s:
        return
    target = s["lora"]["final_train"]
    lora_steps = steps_to_reach(s["lora"]["train_smoothed_mean"], target)
    for m in s:
        n = steps_to_reach(s[m]["train_smoothed_mean"], target)
        s[m]["steps_to_lora_final"] = n
        s[m]["speedup_vs_lora"] = lora_steps / n if n else None
    # the same on the held-out curve (seed means at the evaluation steps): far less noisy than one batch's loss
    target, lora_eval = s["lora"]["final_eval"], s["lora"]
    lora_steps = eval_steps_to_reach(lora_eval["eval_steps"], lora_eval["eval_mean"], target)
    for m in s:
        n = eval_steps_to_reach(s[m]["eval_steps"], s[m]["eval_mean"], target)
        s[m]["eval_steps_to_lora_final"] = n
        s[m]["eval_speedup_vs_lora"] = lora_steps / n if n and lora_steps else None


def eval_steps_to_reach(steps: list[int], curve: list[float], target: float) -> int | None:
    """The first evaluation step (after step 0) whose held-out loss is at or below `target`."""
    return next((st for st, x in zip(steps, curve) if st > 0 and x <= target + 1e-12), None)


COLORS = {"lora": "tab:blue", "lora_ga": "tab:red", "pissa": "tab:green", "olora": "tab:olive", "lora_one": "tab:purple",
          "eva": "tab:cyan", "corda": "tab:orange", "full": "tab:gray"}


def plot(summary: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    for m, s in summary.items():
        x = list(range(1, len(s["train_smoothed_mean"]) + 1))
        ax1.plot(x, s["train_smoothed_mean"], color=COLORS[m], label=f"{LABELS[m]} (lr {s['lr']:g})")
        ax1.fill_between(x, s["train_smoothed_min"], s["train_smoothed_max"], color=COLORS[m], alpha=0.12)
        ax2.plot(s["eval_steps"], s["eval_mean"], "o-", color=COLORS[m], label=LABELS[m], markersize=3)
        ax2.fill_between(s["eval_steps"], s["eval_min"], s["eval_max"], color=COLORS[m], alpha=0.12)
    if "lora" in summary:
        ax1.axhline(summary["lora"]["final_train"], color=COLORS["lora"], ls=":", lw=1)
    ax1.set(xlabel="step", ylabel="training loss (trailing mean)", title="training loss")
    ax2.set(xlabel="step", ylabel="held-out loss", title="held-out loss (GSM8K test subset)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_title(res: dict) -> str:
    a = res["args"]
    protocol = a.get("protocol", "tuned")
    rates = f"shared rate {a['shared_lr']:g} (the paper's protocol)" if protocol == "shared" else "tuned rates"
    rows = f"{a['batch']} packed row{'s' if a['batch'] > 1 else ''} of {a['max_length']}/step" if a.get("packing") \
        else f"batch {a['batch']}"
    return f"{res['model']}, gsm_symbolic: {rates}; {rows}; seeds {a['seeds']}; mean, min/max band"


def write_outputs(res: dict, out: pathlib.Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res["summary"], out / "convergence.png", plot_title(res))
    md = markdown(res)
    (out / "convergence.md").write_text(md)
    return md


def render(json_path: pathlib.Path, out: pathlib.Path) -> dict:
    """The table and plot of a finished run from its JSON (speed-ups recomputed), without training anything."""
    res = json.loads(json_path.read_text())
    add_speedups(res["summary"])
    print(write_outputs(res, out))
    return res


PROTOCOLS = {"tuned": "each method at its own rate (picked on a grid)",
             "shared": "every method at one shared rate (the LoRA-GA paper's protocol)"}


def held_out_reach(x: dict, steps: int) -> str:
    n, sp = x.get("eval_steps_to_lora_final"), x.get("eval_speedup_vs_lora")
    if "eval_steps_to_lora_final" not in x:
        return "-"
    return f"{n} ({sp:.2f}x)" if n and sp else f"not within {steps}"


def fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    a, s, m = res["args"], res["summary"], res["machine"]
    protocol = a.get("protocol", "tuned")
    data = (f"{a['batch']} packed row{'s' if a['batch'] > 1 else ''} of {a['max_length']} tokens per step ({res.get('examples_per_step', 0):.1f} "
            f"examples on average)" if a.get("packing") else f"batch {a['batch']}")
    rates = (f"Learning rates picked on a grid by the mean training loss of the last {res['grid_window']} of "
             f"{a['grid_steps']} steps (seed {a['seeds'].split(',')[0]})." if protocol == "tuned" else
             f"Every method trained at the one rate {a['shared_lr']:g} (the paper's protocol: one rate for all).")
    accuracy = res["n_acc"] > 0
    lines = [
        f"# Convergence: LoRA inits, {PROTOCOLS[protocol]}", "",
        f"Model: {res['model']} ({a['dtype']}); training: {res['n_train']} gsm_symbolic problems of at most "
        f"{a['max_length']} tokens, {data}, {a['steps']} steps, seeds {a['seeds']}; held-out: first "
        f"{res['n_eval']} GSM8K test problems" + (f"; accuracy: first {res['n_acc']} GSM8K test problems, greedy, "
                                                  f"{a['max_new_tokens']} new tokens" if accuracy else "") +
        ". Every LoRA method: r=8, alpha 16, rsLoRA, dropout 0.05, all linear layers; LoRA-GA stable scale (gamma 16); "
        f"the data-driven inits (LoRA-GA, LoRA-One, EVA, CorDA) estimated on the first {a['ga_batches']} x 2 training "
        f"examples; PiSSA exact SVD; CorDA instruction-previewed (ipm). " + rates,
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), jax {res['versions']['jax']} on {res['backend']}; load average "
        f"{res['load_start'][0]:.2f} / {res['load_start'][1]:.2f} / {res['load_start'][2]:.2f} (1/5/15 min) at "
        f"start, {res['load_end'][0]:.2f} / {res['load_end'][1]:.2f} / {res['load_end'][2]:.2f} at end; "
        f"{res['date']}; wall {res['wall_s'] / 60:.1f} min.",
        f"Command: `{res['command']}`", "",
        "| method | lr" + (" (grid: final-window training loss)" if protocol == "tuned" else "") +
        " | final training loss (mean, min-max) | mean training loss over the run | steps to reach LoRA's final "
        "training loss | speed-up vs LoRA | final held-out loss (mean, min-max) | held-out: steps to LoRA's final "
        "(speed-up) |" +
        (" GSM8K accuracy (mean; per seed) |" if accuracy else "") + " init s | s / run |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if accuracy else "") + "---|---|",
    ]
    for meth in METHODS:
        if meth not in s:
            continue
        x = s[meth]
        scores = res["grid"][meth]["scores"]
        grid = f" ({', '.join(f'{lr}: {v:.4f}' for lr, v in scores.items())})" if protocol == "tuned" else ""
        reach = x.get("steps_to_lora_final")
        per = x.get("steps_to_lora_final_per_seed") or []
        reach_s = (f"{reach}" if reach else f"not within {a['steps']}") + \
            (f" (per seed: {', '.join(str(p) if p else '-' for p in per)})" if len(per) > 1 else "")
        sp = x.get("speedup_vs_lora")
        acc = (f" {x['accuracy']:.3f}; {', '.join(f'{v:.3f}' for v in x['accuracy_per_seed'])} |"
               if accuracy else "")
        init_s = res.get("init_seconds", {}).get(meth)
        lines.append(
            f"| {LABELS[meth]} | {x['lr']:g}{grid} | {x['final_train']:.4f} ({x['final_train_range'][0]:.4f}-"
            f"{x['final_train_range'][1]:.4f}) | {fmt(x.get('mean_train'))} | {reach_s} | {f'{sp:.2f}x' if sp else '-'} | "
            f"{x['final_eval']:.4f} ({x['final_eval_range'][0]:.4f}-{x['final_eval_range'][1]:.4f}) | "
            f"{held_out_reach(x, a['steps'])} |{acc} "
            f"{f'{init_s:.0f}' if init_s is not None else '-'} | {x['seconds_per_run']:.0f} |")
    b = res["base"]
    lines.append(f"| {LABELS['base']} | - | - | - | - | - | {b['eval_loss']:.4f} | - |" +
                 (f" {b['accuracy']:.3f} |" if accuracy else "") + " - | - |")
    lines += ["", f"Training losses are trailing means over {a['smooth']} steps (per-step losses are noisy); \"steps "
              f"to reach\" is the first step at which the seed-mean curve is at or below plain LoRA's final value; the "
              f"speed-up is LoRA's own such step over the method's (the paper reports LoRA-GA needing 2-4x fewer "
              f"steps); the held-out column does the same on the seed-mean held-out loss at the evaluation steps (every "
              f"{a['eval_every']}), which one batch's noise does not move; \"mean training loss over the run\" is the area under "
              f"the curve (lower: faster). \"init s\" is "
              f"the init's own time (estimation and factorization, once per method). Plot: convergence.png; all "
              f"curves: convergence.json."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct from the cache)")
    p.add_argument("--train-data", default=None, help="JSONL input/target (default: gsm_symbolic train)")
    p.add_argument("--test-data", default=None, help="JSONL question/answer/input/target (default: GSM8K test)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="tuned",
                   help="tuned: each method's rate picked on its grid; shared: every method at --shared-lr")
    p.add_argument("--shared-lr", type=float, default=PAPER_LR, help="the one rate of --protocol shared")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--grid-steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="rows per step (packed rows with --packing)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                   help="pack examples into rows of --max-length tokens (data.packing)")
    p.add_argument("--max-train", type=int, default=None, help="training problems kept (default: all that fit)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--full-seeds", type=int, default=1, help="seeds for full fine-tuning (the first N of --seeds)")
    p.add_argument("--grid", action="append", default=[], metavar="METHOD=LRS",
                   help="a method's rate grid, e.g. --grid pissa=1e-5,3e-5 (defaults: " +
                        "; ".join(f"{k} {v}" for k, v in GRIDS.items()) + ")")
    p.add_argument("--lora-lrs", default=None, help="same as --grid lora=LRS")
    p.add_argument("--loraga-lrs", default=None, help="same as --grid lora_ga=LRS")
    p.add_argument("--full-lrs", default=None, help="same as --grid full=LRS")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "full"),
                   help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--ga-batches", type=int, default=16, help="estimation batches of 2 examples (data-driven inits)")
    p.add_argument("--eval-every", type=int, default=6)
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--acc-examples", type=int, default=0, help="GSM8K problems decoded greedily per run (0: none)")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--smooth", type=int, default=None, help="trailing-mean window (default: steps // 8, >= 1)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, a few steps (smoke test)")
    p.add_argument("--full", action="store_true", help="GPU-sized run (more steps, batch, length, evaluation)")
    p.add_argument("--out-dir", default=None, help="default: docs/convergence/<protocol>")
    p.add_argument("--render", metavar="JSON", help="only re-render the table and plot of a finished run's "
                                                     "convergence.json (into --out-dir)")
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    preset = PRESETS["quick"] if args.quick else PRESETS["full"] if args.full else {}
    words = sys.argv[1:] if argv is None else list(argv)
    given = {a.dest for a in p._actions for w in words for o in a.option_strings if w == o or w.startswith(o + "=")}
    for k, v in preset.items():
        if k not in given:  # flags given on the command line win over the preset
            setattr(args, k, v)
    if args.smooth is None:
        args.smooth = max(1, args.steps // 8)
    if not 0 < args.grid_steps <= args.steps:
        p.error("need 0 < --grid-steps <= --steps")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods: unknown {unknown or 'none given'}; choose from {', '.join(METHODS)}")
    grids = dict(GRIDS)
    for flag, m in ((args.lora_lrs, "lora"), (args.loraga_lrs, "lora_ga"), (args.full_lrs, "full")):
        if flag:
            grids[m] = flag
    for g in args.grid:
        m, _, lrs = g.partition("=")
        if m not in METHODS or not lrs:
            p.error(f"--grid {g!r}: expected METHOD=LR[,LR...] with METHOD one of {', '.join(METHODS)}")
        grids[m] = lrs
    try:
        args.grids = {m: [float(x) for x in grids[m].split(",")] for m in methods}
    except ValueError as e:
        p.error(f"a learning-rate grid: {e}")
    args.out_dir = args.out_dir or str(ROOT / "docs" / "convergence" / args.protocol)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        return render(pathlib.Path(args.render), pathlib.Path(args.out_dir))
    load_start, t_start = list(os.getloadavg()), time.perf_counter()
    study = Study(args)
    seeds = [int(x) for x in args.seeds.split(",")]
    methods = list(args.grids)
    window = max(1, min(5, args.grid_steps // 2))
    print(f"{study.model_name}: {study.n_train} training problems, {len(study.eval_data)} held-out, "
          f"{len(study.test_records)} for accuracy; protocol: {PROTOCOLS[args.protocol]}", flush=True)

    t0 = time.perf_counter()
    base_eval = study.held_out(study.base_params, {"lora": {}, "full": {}})
    base_acc, base_answers = study.accuracy(study.base_params, None)
    base = {"eval_loss": base_eval, "accuracy": base_acc, "answers": base_answers, "seconds": time.perf_counter() - t0}
    print(f"base: held-out {base_eval:.4f}" + (f", accuracy {base_acc:.3f}" if base_acc is not None else ""),
          flush=True)

    runs, grid = {}, {}
    for m in methods:
        if args.protocol == "shared":  # no grid: every seed at the one rate
            best, grid[m] = study.new_run(m, args.shared_lr, seeds[0]), {"scores": {}, "curves": {},
                                                                         "chosen": args.shared_lr}
        else:
            scores, curves, best = {}, {}, None
            for lr in args.grids[m]:  # the grid: seed 0, the first grid_steps of the full schedule
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
        "args": {k: v for k, v in vars(args).items() if k != "grids"}, "grids": args.grids,
        "model": study.model_name, "n_train": study.n_train, "n_eval": len(study.eval_data),
        "n_acc": len(study.test_records), "grid_window": window, "backend": jax.default_backend(),
        "examples_per_step": study.examples_per_step(), "init_seconds": study.init_seconds,
        "machine": machine_info(), "versions": versions(("jax", "flax", "optax")),
        "load_start": load_start, "load_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t_start,
        "base": base, "grid": grid, "summary": summary,
        "runs": {m: [{"seed": r.seed, "lr": r.lr, "train_losses": r.train_losses, "evals": r.evals,
                      "accuracy": r.accuracy, "answers": r.answers, "seconds": r.seconds} for r in rs]
                 for m, rs in runs.items()},
    }
    md = write_outputs(res, pathlib.Path(args.out_dir))
    (pathlib.Path(args.out_dir) / "train_filtered.jsonl").unlink(missing_ok=True)
    print(md)
    return res


if __name__ == "__main__":
    main()
