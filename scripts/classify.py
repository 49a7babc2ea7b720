"""Sequence classification with LoRA vs LoRA-GA: all-MiniLM-L6-v2 (BERT) on news-headline sarcasm, held-out accuracy.

    python scripts/classify.py            # the CPU default: a few minutes on a 2-core machine
    python scripts/classify.py --quick    # tiny random BERT with MiniLM's tokenizer, a few steps (smoke test)

Protocol: the same train examples in the same order, the same r and targets for both methods; the head
(`classifier` and `pooler`, LoraConfig.modules_to_save) is trained fully in every run. Methods:
  * head:     no adapters, only the head trains (the base encoder frozen), as a floor;
  * lora:     LoRA (PEFT's init: a kaiming-uniform, b = 0) on --targets;
  * lora_ga:  LoRA-GA (jaxlora.lora_ga_init: exact SVD of the gradient estimated through the classifier loss on the
              first --ga-batches training batches, ArB2r, stable scale) on the same targets.
AdamW with --lr for the LoRA factors and --head-lr for the head, warmup 5% then cosine to 0, clipping 1.0. Held-out
accuracy on --n-test headlines disjoint from the --n-train training headlines (assets.prepare_sarcasm_data).
Writes --out-dir/classify.json (settings, per-method accuracy, loss curve, wall times) and classify.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

METHODS = ("head", "lora", "lora_ga")
LABELS = {"head": "head only (frozen encoder)", "lora": "LoRA", "lora_ga": "LoRA-GA"}
TINY_BERT = dict(architectures=["BertForSequenceClassification"], model_type="bert", hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                 hidden_act="gelu", num_labels=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--max-length", type=int, default=32, help="tokens per headline (99%% of them fit in 27)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="query,value", help='comma-separated PEFT module names, or "all-linear"')
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA factors")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the fully trained head")
    p.add_argument("--ga-batches", type=int, default=8, help="LoRA-GA estimation batches of --batch examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(ROOT / "docs"))
    p.add_argument("--quick", action="store_true", help="tiny random BERT, 64 examples, 6 steps: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.steps, args.batch, args.ga_batches, args.r = 64, 32, 6, 8, 2, 4
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


def load_model(args):
    """(model, tokenizer): all-MiniLM-L6-v2 with a fresh 2-class head, or (--quick) a tiny random BERT."""
    import transformers
    import jaxlora
    import assets
    folder = assets.minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if args.quick:
        model = jaxlora.Model.random({**TINY_BERT, "vocab_size": tokenizer.vocab_size}, seed=args.seed)
        tmp = tempfile.mkdtemp(prefix="classify-quick-")
        model.save_pretrained(pathlib.Path(tmp) / "model")  # load it back: the path the real run takes
        return jaxlora.from_pretrained(pathlib.Path(tmp) / "model"), tokenizer
    return jaxlora.from_pretrained(folder, num_labels=2, seed=args.seed), tokenizer


def load_data(args, model, tokenizer) -> dict:
    import assets
    from jaxlora.tasks import classify
    paths = assets.prepare_sarcasm_data(n_train=max(args.n_train, 4000), n_test=max(args.n_test, 1000))
    out = {}
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        records = [json.loads(line) for line in paths[split].read_text().splitlines()[:n]]
        out[split] = classify.encode(tokenizer, [r["text"] for r in records], [r["label"] for r in records],
                                     max_length=args.max_length, num_labels=model.config.num_labels)
    return out


def lora_config(args, method: str):
    from jaxlora.lora import LoraConfig, LoraGAConfig
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    ga = LoraGAConfig(batch_size=args.batch, num_batches=args.ga_batches, svd_method="exact", seed=args.seed)
    return LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets,
                      modules_to_save=["classifier", "pooler"], init_lora_weights="lora_ga" if method == "lora_ga"
                      else True, lora_ga_config=ga if method == "lora_ga" else None)


def run(args, method: str, model, data) -> dict:
    """Trains one method from the pretrained weights; returns its accuracy, losses and timings."""
    import jax
    from tqdm import tqdm
    from jaxlora.config import RunConfig
    from jaxlora.lora import ga as lora_ga
    from jaxlora.tasks import classify
    from jaxlora.training import optim
    from jaxlora.training import step as step_lib
    from jaxlora.training.build import build_training
    t0 = time.perf_counter()
    cfg = lora_config(args, method)
    t_init = 0.0
    if method == "head":
        lora = {}
    elif method == "lora":
        lora = None  # build_training initializes it (PEFT's init) from cfg
    else:
        ga_batches = classify.batches(data["train"], args.batch, seed=args.seed + 1)
        lora = lora_ga.lora_ga_init(model, cfg, ga_batches, progress=False)
        t_init = time.perf_counter() - t0
    warmup = max(1, round(0.05 * args.steps))
    run = RunConfig(lora=cfg, optim=optim.OptimConfig(learning_rate=args.lr, modules_to_save_lr=args.head_lr,
                                                      warmup_steps=warmup, max_grad_norm=1.0))
    training = build_training(model, run, total_steps=args.steps, lora=lora,
                              rngs=(jax.random.key(args.seed), jax.random.key(args.seed + 2)))
    params, state, train_step = training.params, training.state, training.train_step
    losses, batches = [], classify.batches(data["train"], args.batch, seed=args.seed)
    bar = tqdm(range(args.steps), desc=LABELS[method], unit="step", dynamic_ncols=True, mininterval=1.0)
    for _ in bar:
        state, metrics = train_step(params, state, step_lib.place_batch(next(batches), model.mesh))
        losses.append(float(metrics["loss"]))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    t_train = time.perf_counter() - t0 - t_init
    acc = classify.accuracy(model, params, training.adapters(state), data["test"])
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(state.trainable))  # LoRA-GA's a0/b0 are in state.frozen
    return {"method": method, "accuracy": acc, "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "losses": losses, "trainable_params": n_trainable, "init_seconds": round(t_init, 1),
            "train_seconds": round(t_train, 1), "total_seconds": round(time.perf_counter() - t0, 1)}


def write_outputs(args, results: list[dict], test_labels, wall: float) -> None:
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the end" if load else ""
    source = "tiny random BERT (--quick)" if args.quick else "all-MiniLM-L6-v2"
    majority = max(float(test_labels.mean()), 1.0 - float(test_labels.mean()))
    (out / "classify.json").write_text(json.dumps({"model": source, "settings": settings, "wall_seconds": round(wall),
                                                   "machine": machine, "majority_class_accuracy": majority,
                                                   "results": results}, indent=1) + "\n")
    lines = [f"# Sequence classification: LoRA vs LoRA-GA ({source}, news-headline sarcasm)", "",
             f"`python scripts/classify.py{' --quick' if args.quick else ''}`: {args.n_train} training headlines, "
             f"{args.n_test} held out, {args.steps} steps of batch {args.batch}, max length {args.max_length}, "
             f"r={args.r}, alpha={args.alpha:g} on `{args.targets}`, head (classifier + pooler) trained fully, "
             f"lr {args.lr:g} (head {args.head_lr:g}), seed {args.seed}. Wall time {wall:.0f} s ({machine}).", "",
             "| method | held-out accuracy | final train loss (mean of last 20 steps) | trainable params | "
             "init s | train s |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {LABELS[r['method']]} | {r['accuracy']:.3f} | {r['final_train_loss']:.3f} | "
                     f"{r['trainable_params']:,} | {r['init_seconds']:.1f} | {r['train_seconds']:.1f} |")
    lines += ["", f"Majority class: {majority:.3f} of the held-out set. One seed and one learning rate: differences "
              f"below about 0.02 (the binomial standard error of {args.n_test} held-out examples) are not "
              f"significant. Details and loss curves: classify.json."]
    (out / "classify.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args)
    data = load_data(args, model, tokenizer)
    results = []
    for method in args.methods:
        results.append(run(args, method, model, data))
        r = results[-1]
        print(f"{LABELS[method]}: held-out accuracy {r['accuracy']:.3f}, train loss {r['final_train_loss']:.3f} "
              f"({r['total_seconds']:.0f} s)", flush=True)
    write_outputs(args, results, data["test"]["labels"], time.perf_counter() - t0)
    return results


if __name__ == "__main__":
    main()
