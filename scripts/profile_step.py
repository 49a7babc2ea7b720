"""Where one LoRA training step's time goes, op by op: jaxlora (XLA:CPU) next to PEFT + transformers (PyTorch).

    python scripts/profile_step.py                  # SmolLM2-135M, GSM-style data, 2 packed rows of 512, 3 steps
    python scripts/profile_step.py --xla-flags=--xla_cpu_experimental_onednn_fusion_type=dot   # an XLA:CPU variant
    python scripts/profile_step.py --quick          # tiny random Llama (smoke test)

The same packed rows (jaxlora's `data.packing`; PEFT gets them flattened with position_ids, as TRL's padding-free
packing feeds transformers), the same LoRA (r=8, alpha 16, dropout 0, all linear layers), AdamW, float32, and the
same step (`scripts/bench_realdata.py`'s workers, so the figures match its "packed" rows). Each framework is timed
by its own profiler over the same steps after a warm-up step:

  * jaxlora: `jax.profiler` with XLA:CPU's per-thunk trace events (`--xla_cpu_enable_xprof_traceme`); every event
    is matched to its instruction in the compiled HLO, which gives its kind (dot, fusion with a dot, reduction or
    elementwise fusion, copy/transpose, ...) and, for dots, the FLOPs; times are exclusive (a while loop's own time
    without the ops of its body, which run once per layer).
  * PEFT: `torch.profiler` self CPU time per aten op, FLOPs of the matrix multiplies from `with_flops`.

Both sides are sorted into the same few categories (GEMM; attention's softmax and masking; the loss; elementwise;
copies and layout; the optimizer; other) by op name: the split is approximate where one XLA fusion mixes kinds
(a fusion is counted by its heaviest member: a dot, else a reduction, else elementwise), but the GEMM line, which
decides most of the gap, is exact on both sides. The profilers add a little overhead per op; the untraced step time
of each framework is printed too. Writes a markdown table (--out) and the raw per-op rows (--json).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CATEGORIES = ("GEMM", "attention (softmax, mask)", "loss (log-softmax, NLL)", "elementwise and norms",
              "copies and layout", "optimizer", "other")

# ------------------------------------------------------------------------------------------ XLA's HLO


INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
SHAPE = re.compile(r"[a-z]\d*\[([\d,]*)\]")


def _dims(shape: str) -> list[int]:
    m = SHAPE.search(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(out_shape: str, rest: str, shapes: dict | None = None) -> float:
    """2 * |out| * |contracted| of a dot: the lhs shape printed with the operand, or looked up by its name in
    `shapes` (its computation's parameters and instructions), and lhs_contracting_dims."""
    first = rest.split(",")[0].strip()
    lhs = _dims(shapes[first.lstrip("%")]) if shapes and first.lstrip("%") in shapes else _dims(first)
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    k = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m and lhs else 1
    return 2.0 * math.prod(_dims(out_shape) or [1]) * k


def parse_hlo(text: str, vocab: int | None = None) -> dict:
    """{instruction name: (opcode, kind, flops)} for every instruction of the compiled module; a fusion's kind and
    FLOPs come from its fused computation (a dot inside makes it a GEMM; an array of the `vocab` size outside a dot,
    the loss; an exponential with a reduction, a softmax)."""
    comps, current, instrs, shapes = {}, None, {}, {}
    for line in text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s", line)
        if head and line.rstrip().endswith("{"):  # a computation's header (an instruction never ends with "{")
            current = comps.setdefault(head.group(1), [])
            shapes = dict(re.findall(r"([\w.\-]+): ([a-z]\d*\[[\d,]*\])", line))  # its parameters
            continue
        m = INSTR.match(line)
        if m and current is not None:
            name, shape, opcode, rest = m.groups()
            shapes[name] = shape
            calls = re.search(r"calls=%?([\w.\-]+)", rest)
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            instr = {"opcode": opcode, "shape": shape, "rest": rest, "calls": calls.group(1) if calls else None,
                     "target": target.group(1) if target else None, "shapes": shapes}
            current.append(instr)
            instrs[name] = instr

    def summary(ops: list[dict]) -> tuple[str, float]:
        flops = sum(_dot_flops(o["shape"], o["rest"], o["shapes"]) for o in ops
                    if o["opcode"] in ("dot", "convolution"))
        codes = {o["opcode"] for o in ops}
        vocab_sized = vocab and any(vocab in _dims(o["shape"]) for o in ops)
        kind = "dot" if flops else "loss" if vocab_sized else \
            "softmax" if {"exponential", "reduce"} <= codes else "reduce" if codes & {"reduce", "reduce-window"} else \
            "gather/scatter" if codes & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"} else \
            "layout" if codes <= {"parameter", "copy", "transpose", "bitcast", "reshape", "broadcast", "slice",
                                  "concatenate", "pad", "tuple", "get-tuple-element", "constant"} else "elementwise"
        return kind, flops

    out = {}
    for name, ins in instrs.items():
        if ins["opcode"] == "fusion" and ins["calls"] in comps:
            kind, flops = summary(comps[ins["calls"]])
        elif ins["opcode"] == "custom-call":
            kind = "dot" if re.search(r"onednn|matmul|dot|gemm", ins["target"] or "", re.I) else "other"
            flops = _dot_flops(ins["shape"], ins["rest"], ins["shapes"]) if kind == "dot" else 0.0
        else:
            kind, flops = summary([ins])
        out[name] = (ins["opcode"], kind, flops)
    return out


def xla_category(name: str, kind: str) -> str:
    if kind == "dot":
        return CATEGORIES[0]
    if kind == "loss":
        return CATEGORIES[2]
    if kind == "softmax":
        return CATEGORIES[1]
    if kind in ("layout", "gather/scatter"):
        return CATEGORIES[4]
    if kind in ("elementwise", "reduce"):
        return CATEGORIES[3]
    return CATEGORIES[6]


def exclusive_events(events: list[dict], names: set[str]) -> list[tuple[str, float]]:
    """(instruction name, exclusive microseconds) of every traced HLO op: nested ops (a while loop's body) are
    subtracted from the op that encloses them on the same thread."""
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("name") in names),
                 key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e.get("dur", 0)))
    out, stack = [], []  # open ops: [thread, end, name, exclusive us]
    for e in ops:
        key, start, end = (e.get("pid"), e.get("tid")), e["ts"], e["ts"] + e.get("dur", 0)
        while stack and (stack[-1][0] != key or stack[-1][1] <= start):
            _, _, name, us = stack.pop()
            out.append((name, us))
        if stack:
            stack[-1][3] -= e.get("dur", 0)
        stack.append([key, end, e["name"], float(e.get("dur", 0))])
    out += [(s[2], s[3]) for s in stack]
    return out


def profile_jaxlora(args, batches, steps: int) -> dict:
    import jax
    from bench_realdata import JaxWorker
    vocab = json.loads((pathlib.Path(args.model_path) / "config.json").read_text())["vocab_size"]
    w = JaxWorker(args, batches[: steps + 1])
    w.run(w.batches[:1])  # warm-up
    t0 = time.perf_counter()
    w.run(w.batches[1:])
    untraced = (time.perf_counter() - t0) / steps
    hlo = {}
    for compiled in w.compiled.values():
        hlo.update(parse_hlo(compiled.as_text(), vocab=vocab))
    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    w.run(w.batches[1:])
    traced = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    trace = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))[-1]
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    rows = collections.defaultdict(lambda: {"us": 0.0, "calls": 0, "flops": 0.0, "kind": ""})
    for name, us in exclusive_events(events, set(hlo)):
        opcode, kind, flops = hlo[name]
        r = rows[name]
        r["us"] += us
        r["calls"] += 1
        r["flops"] += flops
        r["kind"], r["category"] = f"{opcode}/{kind}", xla_category(name, kind)
    return {"step_s": untraced, "traced_step_s": traced, "ops": dict(rows)}


# ------------------------------------------------------------------------------------------ PyTorch

TORCH_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


TORCH_LAYOUT = {"copy_", "clone", "contiguous", "transpose", "permute", "view", "_unsafe_view", "reshape", "expand",
                "cat", "index", "index_select", "slice", "select", "embedding", "embedding_dense_backward", "t",
                "empty", "empty_like", "zero_", "zeros", "zeros_like", "fill_", "unsqueeze", "squeeze", "as_strided",
                "detach", "to", "_to_copy", "split", "split_with_sizes", "stack", "narrow", "new_zeros", "flatten",
                "index_put_", "_index_put_impl_", "scatter_add_", "gather", "unbind", "resize_", "set_"}


def torch_category(name: str) -> str:
    op = name.lower().split("::")[-1]
    if name in TORCH_GEMM:
        return CATEGORIES[0]
    if "scaled_dot_product" in op or op in ("softmax", "_softmax", "_softmax_backward_data", "masked_fill",
                                             "masked_fill_", "where"):
        return CATEGORIES[1]
    if "log_softmax" in op or "nll_loss" in op or "cross_entropy" in op:
        return CATEGORIES[2]
    if op.startswith("_foreach") or "adam" in op or op in ("lerp_", "addcdiv_", "addcmul_", "clamp_max",
                                                          "linalg_vector_norm", "_fused_adamw_"):
        return CATEGORIES[5]
    if op in TORCH_LAYOUT:
        return CATEGORIES[4]
    if name.startswith("aten::"):
        return CATEGORIES[3]
    return CATEGORIES[6]


def profile_peft(args, batches, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from bench_realdata import PeftWorker
    w = PeftWorker(args, batches[: steps + 1])
    w.run(w.batches[:1])
    t0 = time.perf_counter()
    w.run(w.batches[1:])
    untraced = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        w.run(w.batches[1:])
        traced = (time.perf_counter() - t0) / steps
    rows = {}
    for ev in prof.key_averages():
        if ev.self_cpu_time_total <= 0 or ev.key.startswith("ProfilerStep") or ev.key.startswith("Optimizer."):
            continue
        rows[ev.key] = {"us": float(ev.self_cpu_time_total), "calls": int(ev.count), "flops": float(ev.flops or 0),
                        "kind": "aten", "category": torch_category(ev.key)}
    del torch
    return {"step_s": untraced, "traced_step_s": traced, "ops": rows}


# ------------------------------------------------------------------------------------------ report


def by_category(side: dict, steps: int) -> dict:
    cats = {c: {"ms": 0.0, "flops": 0.0} for c in CATEGORIES}
    for r in side["ops"].values():
        cats[r["category"]]["ms"] += r["us"] / 1e3 / steps
        cats[r["category"]]["flops"] += r["flops"] / steps
    return cats


def table(res: dict) -> str:
    a, m = res["args"], res["machine"]
    j, p = res["jaxlora"], res["peft"]
    cj, cp = res["categories"]["jaxlora"], res["categories"]["peft"]
    lines = [f"# One training step op by op: jaxlora (XLA:CPU) vs PEFT (PyTorch), "
             f"{'tiny random Llama' if a['quick'] else 'SmolLM2-135M'}, float32", "",
             f"{a['packed_rows']} packed rows of {a['max_length']} tokens per step ({res['tokens_per_step']} real "
             f"tokens), LoRA r=8 all-linear, AdamW; {res['steps']} profiled steps after a warm-up. XLA_FLAGS: "
             f"`{res['xla_flags'] or '(none)'}`; jaxlora model.logits_at_targets: {a['logits_at_targets']}.",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}); load {res['load_start'][0]:.2f} at start, "
             f"{res['load_end'][0]:.2f} at end; {res['date']}.", "",
             f"Step time untraced: jaxlora {1e3 * j['step_s']:.0f} ms, PEFT {1e3 * p['step_s']:.0f} ms "
             f"(jaxlora / PEFT {j['step_s'] / p['step_s']:.2f}); traced: {1e3 * j['traced_step_s']:.0f} / "
             f"{1e3 * p['traced_step_s']:.0f} ms.", "",
             "| category | jaxlora ms/step | PEFT ms/step | jaxlora - PEFT ms | jaxlora GFLOP/s | PEFT GFLOP/s |",
             "|---|---|---|---|---|---|"]
    for c in CATEGORIES:
        x, y = cj[c], cp[c]
        rate = lambda z: f"{z['flops'] / z['ms'] / 1e6:.0f}" if z["flops"] and z["ms"] else "-"
        lines.append(f"| {c} | {x['ms']:.0f} | {y['ms']:.0f} | {x['ms'] - y['ms']:+.0f} | {rate(x)} | {rate(y)} |")
    tj, tp = sum(v["ms"] for v in cj.values()), sum(v["ms"] for v in cp.values())
    lines.append(f"| sum of ops | {tj:.0f} | {tp:.0f} | {tj - tp:+.0f} | | |")
    for name, side in (("jaxlora", j), ("PEFT", p)):
        top = sorted(side["ops"].items(), key=lambda kv: -kv[1]["us"])[:12]
        lines += ["", f"Heaviest {name} ops (ms/step, calls/step, GFLOP/s):", ""]
        lines += [f"- `{k}` ({v['kind']}, {v['category']}): {v['us'] / 1e3 / res['steps']:.1f} ms, "
                  f"{v['calls'] / res['steps']:.0f} calls" +
                  (f", {v['flops'] / v['us'] / 1e3:.0f} GFLOP/s" if v["flops"] and v["us"] else "") for k, v in top]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama (smoke test)")
    ap.add_argument("--dataset", choices=("gsm", "belle"), default="gsm")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--packed-rows", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for jaxlora's side (e.g. an XLA:CPU variant)")
    ap.add_argument("--logits-at-targets", action="store_true", help="jaxlora: model.logits_at_targets")
    ap.add_argument("--out", default=None, help="markdown table (default: print only)")
    ap.add_argument("--json", default=None, help="every op's row")
    args = ap.parse_args(argv)
    args.batch, args.lr, args.loss_chunk = args.packed_rows * 2, 1e-4, 0
    if args.quick:
        args.examples, args.max_length, args.steps = min(args.examples, 16), 64, 2
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + ["--xla_cpu_enable_xprof_traceme=true"] + args.xla_flags.split())
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from bench_common import machine_info
    from bench_realdata import _load, prepare
    from jaxlora.backends import skip_tpu_backend_without_tpu
    skip_tpu_backend_without_tpu()
    load_start = list(os.getloadavg())
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="profile_step_data_"))
    prep = prepare(argparse.Namespace(**vars(args)), workdir)
    args.model_path = prep["model_path"]
    jb, pb = _load(workdir / "jaxlora_packed.npz"), _load(workdir / "peft_packed.npz")
    steps = min(args.steps, len(jb) - 1)
    if steps < 1:
        raise SystemExit(f"profile_step: {len(jb)} packed batches from {args.examples} examples; need at least 2 "
                         f"(raise --examples)")
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
           "load_start": load_start, "args": {k: v for k, v in vars(args).items() if k != "model_path"},
           "steps": steps, "xla_flags": args.xla_flags,
           "tokens_per_step": int(sum(int((b["attention_mask"] > 0).sum()) for b in jb[1: steps + 1]) / steps)}
    res["jaxlora"] = profile_jaxlora(args, jb, steps)
    res["peft"] = profile_peft(args, pb, steps)
    res["load_end"] = list(os.getloadavg())
    res["categories"] = {"jaxlora": by_category(res["jaxlora"], steps), "peft": by_category(res["peft"], steps)}
    md = table(res)
    print(md)
    if args.out:
        pathlib.Path(args.out).write_text(md)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
