"""One pass over real, variable-length instruction data: jaxlora (packed, bucketed) vs PEFT + transformers.

    python scripts/bench_throughput.py --real-data                  # SmolLM2-135M, GSM-style + BELLE-shaped data
    python scripts/bench_realdata.py --examples 96 --passes 2       # the same, directly
    python scripts/bench_realdata.py --quick                        # tiny random Llama (smoke test, ~1 min)

Users pick a fine-tuning library by how long an epoch over THEIR data takes, and their examples vary in length, so
padding decides much of it. Each variant trains one pass over the same N examples (same tokenization: jaxlora's
data pipeline, prompt masked, EOS appended), LoRA r=8 / alpha 16 / dropout 0 on all linear layers, AdamW, float32:

    jaxlora packed      data.packing: rows of max_length filled by best-fit decreasing, block-diagonal attention
    jaxlora bucketed    batches of B examples padded to the smallest bucket (64, 128, ..., max_length)
    PEFT padded         batches of B examples padded to the longest in the batch (DataCollatorForSeq2Seq, as the
                        reference recipe does)
    PEFT padding-free   the same batches flattened into one row with position_ids (DataCollatorWithFlattening:
                        no pad token computed; transformers builds the block-diagonal mask from position_ids)
    PEFT packed         jaxlora's packed rows, flattened with position_ids (TRL's packing + padding_free)

Every variant is its own long-lived subprocess (its memory is its own). Protocol: each one builds, compiles (jaxlora:
one step per distinct batch shape) and warms up; then the driver asks for timed passes in alternating order (ABBA:
load drift hits all alike). Labelled tokens/s = the tokens the loss is computed on (identical for every variant:
the same examples) / pass time, median over passes. Peak RSS = VmHWM of each worker (not ru_maxrss, which Linux
carries over from the driver). Check: the first step's loss of jaxlora bucketed equals PEFT padded's (same examples,
B = 0 at init), and jaxlora packed equals PEFT packed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from bench_common import (WorkerProcess, machine_info, maxrss_kb, reply, reset_peak, status_kb,  # noqa: E402
                          versions)

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("jaxlora_packed", "jaxlora_bucketed", "peft_padded", "peft_padding_free", "peft_packed")
# What was tried on the CPU gap (README, Performance: what each gave; none is a default): the fused chunked loss
# (model.loss_chunk 512) instead of the full (B, T, vocab) logits; XLA:CPU's oneDNN dot fusion (an experimental flag:
# +10-45% on single GEMMs in isolated measurements); the head only at the positions that predict a labelled token
# (model.logits_at_targets: the prompt's logits are never computed); glibc's malloc backing its large blocks with
# transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1: XLA:CPU allocates each step's ~2 GB of temporaries
# afresh, and the kernel faults them in 4 KB page by page otherwise), for jaxlora and for PEFT alike.
# "batches": the variant whose batches it trains on (default jaxlora_packed); "env": the worker's extra environment.
HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
EXPERIMENTS = {"jaxlora_packed_chunked_loss": dict(loss_chunk=512),
               "jaxlora_packed_onednn": dict(xla_flags="--xla_cpu_experimental_onednn_fusion_type=dot"),
               "jaxlora_packed_targets": dict(logits_at_targets=True),
               "jaxlora_packed_hugepages": dict(env=HUGE_PAGES),
               "jaxlora_packed_targets_hugepages": dict(logits_at_targets=True, env=HUGE_PAGES),
               "peft_padding_free_hugepages": dict(batches="peft_padding_free", env=HUGE_PAGES)}


def trained_on(name: str) -> str:
    """The variant whose batches `name` trains on: its own, or an experiment's (jaxlora_packed's by default)."""
    return EXPERIMENTS[name].get("batches", "jaxlora_packed") if name in EXPERIMENTS else name


TEMPLATES = {  # dataset -> (source records, prompt template, response template)
    "gsm": ("train", "Question: {input}\nAnswer: ", "{target}"),
    "belle": ("test", "Human: {instruction}\n\nAssistant: ", "{output}"),  # BELLE's field names and template
}


# ------------------------------------------------------------------------------------------ data


def prepare(args, workdir: pathlib.Path) -> dict:
    """Every variant's batches of one pass, as .npz files, and the model folder the workers load."""
    import numpy as np
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    import assets
    from jaxlora.training import data as data_lib
    if args.quick:
        model_path = str(_tiny_model(workdir))
    else:
        model_path = str(assets.smollm2_path())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    split, prompt, response = TEMPLATES[args.dataset]
    if args.quick:  # the tiny tokenizer's arithmetic records, some repeated to vary the lengths
        import tiny
        records = tiny.instruction_records(args.examples, seed=1)
        for i, r in enumerate(records):
            r["input"] = " ".join([r["input"]] * (1 + i % 4))
        path = tiny.write_jsonl(workdir / "quick.jsonl", records)
        prompt, response = TEMPLATES["gsm"][1:]
    else:
        path = pathlib.Path(assets.gsm_data_paths()[split])
    if args.dataset == "belle" and not args.quick:  # BELLE-shaped records (instruction / input / output) from GSM8K's questions
        records = [json.loads(line) for line in path.read_text().splitlines()[:args.examples]]
        path = workdir / "belle.jsonl"
        path.write_text("".join(json.dumps({"instruction": r["input"], "input": "", "output": r["target"]}) + "\n"
                                for r in records))
    cfg = data_lib.DataConfig(path=str(path), prompt_template=prompt, response_template=response,
                              max_length=args.max_length, max_examples=args.examples)
    data = data_lib.load_tokenized(cfg, tok, "train")
    buckets = data_lib.bucket_lengths(cfg)
    layouts = {}
    bucketed = data_lib.BatchLoader(data, args.batch, buckets, pad, shuffle=False)
    layouts["jaxlora_bucketed"] = [bucketed.batch(i) for i in range(bucketed.steps_per_epoch)]
    packed = data_lib.PackedLoader(data, args.packed_rows, buckets, pad, shuffle=False, drop_remainder=False)
    layouts["jaxlora_packed"] = [packed.batch(i) for i in range(packed.steps_per_epoch)]
    groups = [bucketed.global_rows(i) for i in range(bucketed.steps_per_epoch)]  # the examples of each batch
    features = [[{"input_ids": x.tolist(), "labels": y.tolist()} for x, y in zip(*data.rows(g))] for g in groups]
    seq2seq = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100, return_tensors="np")
    layouts["peft_padded"] = [dict(seq2seq(f)) for f in features]
    flatten = DataCollatorWithFlattening(return_tensors="np")
    layouts["peft_padding_free"] = [dict(flatten(f)) for f in features]
    layouts["peft_packed"] = [_flatten_packed(b) for b in layouts["jaxlora_packed"]]
    examples_seen = len(groups) * args.batch
    labelled = {name: sum(_labelled(b) for b in bs) for name, bs in layouts.items()}
    for name, bs in layouts.items():
        np.savez(workdir / f"{name}.npz", n=np.array(len(bs)),
                 **{f"{k}_{i}": np.asarray(v, dtype=np.int32) for i, b in enumerate(bs) for k, v in b.items()})
    return {"model_path": model_path, "examples": examples_seen, "packed_fill": packed.fill,
            "packed_rows_total": len(packed.bins), "labelled_tokens": labelled,
            "batches": {name: len(bs) for name, bs in layouts.items()},
            "computed_tokens": {name: sum(int(b["input_ids"].size) for b in bs) for name, bs in layouts.items()},
            "data": f"{path.name if args.dataset == 'gsm' else 'BELLE-shaped GSM8K test records'}: the first "
                    f"{args.examples} examples, max_length {args.max_length}"}


def _flatten_packed(b: dict) -> dict:
    """A packed batch as TRL's padding-free packing feeds transformers: one row of the real tokens, position_ids."""
    real = b["attention_mask"] > 0
    return {"input_ids": b["input_ids"][real][None], "position_ids": b["positions"][real][None],
            "labels": b["labels"][real][None]}


def _labelled(b: dict) -> int:
    """Targets of HF's shifted loss: labels[:, 1:] != -100 (a packed segment's first label is -100 already)."""
    import numpy as np
    return int(np.count_nonzero(np.asarray(b["labels"])[:, 1:] != -100))


def _tiny_model(workdir: pathlib.Path) -> pathlib.Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny
    return tiny.tiny_model_dir(workdir / "model", vocab_size=128, tie_word_embeddings=True)


def _load(path) -> list[dict]:
    import numpy as np
    z = np.load(path)
    keys = sorted({k.rsplit("_", 1)[0] for k in z.files if k != "n"})
    return [{k: z[f"{k}_{i}"] for k in keys if f"{k}_{i}" in z.files} for i in range(int(z["n"]))]


# ------------------------------------------------------------------------------------------ workers


class JaxWorker:
    """jaxlora's trainer step (`build_training`), jitted once per distinct batch shape, one device."""

    def __init__(self, args, batches):
        import jax
        from jaxlora import sharding
        from jaxlora.backends import skip_tpu_backend_without_tpu
        from jaxlora.config import RunConfig
        from jaxlora.lora import LoraConfig
        from jaxlora.models.model import from_pretrained
        from jaxlora.training import optim
        from jaxlora.training import step as step_lib
        from jaxlora.training.build import build_training
        skip_tpu_backend_without_tpu()
        self.jax = jax
        mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
        model = from_pretrained(args.model_path, "float32", mesh=mesh, loss_chunk=args.loss_chunk)
        run = RunConfig(lora=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
                        optim=optim.OptimConfig(learning_rate=args.lr, schedule="constant"))
        training = build_training(model, run, total_steps=10**6)
        self.params, self.state, self.step = training.params, training.state, training.train_step
        if args.logits_at_targets:  # as a loader with model.logits_at_targets adds them: one K for the whole pass
            from jaxlora.training.data import IGNORE_INDEX, target_positions
            most = max(int((b["labels"][:, 1:] != IGNORE_INDEX).sum(axis=1).max()) for b in batches)
            batches = [dict(b, target_positions=target_positions(b["labels"], most)) for b in batches]
        self.batches = [step_lib.place_batch(b, mesh) for b in batches]
        t0 = time.perf_counter()
        self.compiled = {}
        for b in self.batches:  # compile every shape the pass meets (as the trainer does, once each)
            shape = b["input_ids"].shape
            if shape not in self.compiled:
                self.compiled[shape] = self.step.lower(self.params, self.state, b).compile()
        self.compile_s = time.perf_counter() - t0

    def run(self, batches=None) -> list[float]:
        out = []
        for b in batches or self.batches:
            self.state, m = self.compiled[b["input_ids"].shape](self.params, self.state, b)
            out.append(m["loss"])
        self.jax.block_until_ready(self.state)
        return [float(x) for x in out]


class PeftWorker:
    """PEFT + transformers, eager PyTorch on all cores, AdamW over the LoRA parameters, clip 1.0."""

    def __init__(self, args, batches):
        import torch
        import transformers
        from peft import LoraConfig, get_peft_model
        self.torch = torch
        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32,
                                                                  attn_implementation="sdpa")
        model.config.use_cache = False
        self.model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules="all-linear"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.0)
        self.batches = [{k: torch.from_numpy(v).long() for k, v in b.items()} for b in batches]
        self.compile_s = 0.0

    def run(self, batches=None) -> list[float]:
        torch, out = self.torch, []
        for b in batches or self.batches:
            loss = self.model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            out.append(float(loss.detach()))
        return out


def serve(args) -> None:
    import logging
    logging.basicConfig(level=logging.WARNING)

    batches = _load(args.batches_file)
    t0 = time.perf_counter()
    w = (JaxWorker if args.worker.startswith("jaxlora") else PeftWorker)(args, batches)
    first_loss = w.run(w.batches[:1])[0]  # the base model's loss on batch 0 (B = 0 at init): the cross-check
    w.run(w.batches[1:3])  # warm-up (allocator, threads)
    reply({"build_s": time.perf_counter() - t0, "compile_s": w.compile_s, "first_loss": first_loss})
    hwm = reset_peak()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "pass":
            t0 = time.perf_counter()
            losses = w.run()
            reply({"seconds": time.perf_counter() - t0, "mean_loss": sum(losses) / len(losses)})
        elif cmd["op"] == "finish":
            steady = status_kb("VmHWM") if hwm else None
            reply({"peak_rss_mb": maxrss_kb() / 1024, "steady_rss_mb": steady / 1024 if steady else None})
            return


class Worker(WorkerProcess):
    def __init__(self, name: str, args, workdir: pathlib.Path, model_path: str):
        experiment = EXPERIMENTS.get(name, {})
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name, "--batches-file",
               str(workdir / f"{trained_on(name)}.npz"), "--model-path", model_path, "--lr", str(args.lr),
               "--loss-chunk", str(experiment.get("loss_chunk", args.loss_chunk))] + \
            (["--logits-at-targets"] if experiment.get("logits_at_targets") else [])
        env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                                     if "force_host_platform_device_count" not in f]
                                    + experiment.get("xla_flags", "").split())
        env.update(experiment.get("env", {}))
        super().__init__(name, cmd, env, workdir)


# ------------------------------------------------------------------------------------------ driver


def run(args) -> dict:
    load_start = list(os.getloadavg())
    t_start = time.perf_counter()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_realdata_"))
    prep = prepare(args, workdir)
    for name in EXPERIMENTS:  # they train on another variant's batches
        for key in ("labelled_tokens", "computed_tokens", "batches"):
            prep[key][name] = prep[key][trained_on(name)]
    print(f"data: {prep['data']}; {prep['examples']} examples; packed into {prep['packed_rows_total']} rows "
          f"({100 * prep['packed_fill']:.1f}% real tokens); batches {prep['batches']}", flush=True)
    workers, ready, passes = {}, {}, {name: [] for name in args.variants}
    try:
        for name in args.variants:  # built one after the other, not competing for the cores
            workers[name] = Worker(name, args, workdir, prep["model_path"])
            ready[name] = workers[name].read()
            print(f"{name}: ready in {ready[name]['build_s']:.1f}s (compile {ready[name]['compile_s']:.1f}s), "
                  f"first loss {ready[name]['first_loss']:.5f}", flush=True)
        for p in range(args.passes):
            for name in (args.variants if p % 2 == 0 else tuple(reversed(args.variants))):
                res = workers[name].ask(op="pass")
                passes[name].append(res)
                tps = prep["labelled_tokens"][name] / res["seconds"]
                print(f"pass {p + 1} {name}: {res['seconds']:.1f}s, {tps:.0f} labelled tokens/s, mean loss "
                      f"{res['mean_loss']:.4f}", flush=True)
        final = {name: w.ask(op="finish") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    out = {}
    for name in args.variants:
        secs = statistics.median(r["seconds"] for r in passes[name])
        out[name] = {"pass_s": secs, "labelled_tokens_per_s": prep["labelled_tokens"][name] / secs,
                     "computed_tokens": prep["computed_tokens"][name], "batches": prep["batches"][name],
                     "passes_s": [r["seconds"] for r in passes[name]], **ready[name], **final[name]}
    peft = [n for n in args.variants if n.startswith("peft")]
    best = max(peft, key=lambda n: out[n]["labelled_tokens_per_s"]) if peft else None
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
            "versions": versions(), "load_start": load_start, "load_end": list(os.getloadavg()),
            "wall_s": time.perf_counter() - t_start, "args": vars(args) | {"variants": list(args.variants)},
            "prep": {k: v for k, v in prep.items() if k != "model_path"}, "best_peft": best, **out}


def table(res: dict) -> str:
    a, m, p = res["args"], res["machine"], res["prep"]
    best = res["best_peft"]
    lines = [f"# One pass over real data: jaxlora vs PEFT ({'tiny random Llama' if a['quick'] else 'SmolLM2-135M'}, "
             f"float32, LoRA r=8 all-linear)", "",
             f"Data: {p['data']}; {p['examples']} examples, {p['labelled_tokens'][a['variants'][0]]:,} labelled "
             f"tokens; packed: {p['packed_rows_total']} rows, {100 * p['packed_fill']:.1f}% real tokens. Batch "
             f"{a['batch']} examples (padded variants), {a['packed_rows']} rows of {a['max_length']} (packed).",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}); load {res['load_start'][0]:.2f} at start, "
             f"{res['load_end'][0]:.2f} at end; {res['date']}; {a['passes']} alternating passes per variant, "
             f"median; wall {res['wall_s']:.0f}s.", "",
             "| variant | pass s | labelled tokens/s | vs best PEFT | tokens computed | steps | peak RSS MB | "
             "compile s | first loss |", "|---|---|---|---|---|---|---|---|---|"]
    for name in a["variants"]:
        x = res[name]
        ratio = x["labelled_tokens_per_s"] / res[best]["labelled_tokens_per_s"] if best else float("nan")
        lines.append(f"| {name.replace('_', ' ')} | {x['pass_s']:.1f} | {x['labelled_tokens_per_s']:.0f} | "
                     f"{ratio:.2f} | {x['computed_tokens']:,} | {x['batches']} | {x['peak_rss_mb']:.0f} | "
                     f"{x['compile_s']:.1f} | {x['first_loss']:.5f} |")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, few examples (smoke test)")
    ap.add_argument("--dataset", choices=tuple(TEMPLATES), default="gsm")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8, help="examples per step (padded variants)")
    ap.add_argument("--packed-rows", type=int, default=4, help="rows of max_length per step (packed variants)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--loss-chunk", type=int, default=0, help="jaxlora: model.loss_chunk (0: full logits, the default)")
    ap.add_argument("--logits-at-targets", action="store_true", help="jaxlora: model.logits_at_targets")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS + tuple(EXPERIMENTS), default=list(VARIANTS),
                    help=f"default: the five; also {', '.join(EXPERIMENTS)} (the CPU-gap experiments)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--batches-file", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.examples, args.max_length, args.batch, args.packed_rows = min(args.examples, 32), 64, 4, 2
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.worker:
        serve(args)
        return None
    res = run(args)
    print(table(res))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
