"""`plan()`: one config on one target; the remat / mesh search; the README table; `jaxlora plan`'s arguments.

`plan` resolves the target, builds the mesh and a `Planner`, compiles the train step at the requested micro-batch
(and, unless told not to, the largest that fits and LoRA-GA's estimation steps, two compiles at a time) and returns a
`PlanReport`. `table` runs it for the README's models and TPU targets; `add_plan_arguments` / `run_plan_command` are
the CLI's side.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import jax

from jaxlora import lora as lora_lib, sharding
from jaxlora.config import RunConfig
from jaxlora.plan.compile import Planner
from jaxlora.plan.report import PlanReport, StepPlan, fmt_bytes
from jaxlora.plan.shapes import SHAPES
from jaxlora.plan.targets import TARGET_FORMS, GiB, PlanError, Target, resolve_target, target_devices

log = logging.getLogger(__name__)


def plan(config: RunConfig, target: str, *, num_slices: int = 1, micro_batch: int | None = None,
         search: bool = True, remat: str | None = None, mesh: sharding.MeshConfig | None = None,
         lora_ga_steps: bool = True, search_remat: bool = False, search_mesh: bool = False,
         hbm_bytes: int | None = None, max_micro_batch: int = 256, hf_config: dict | None = None,
         exhaustive_search: bool = False) -> PlanReport:
    """Compiles the train step (and LoRA-GA's estimation steps) of `config` for `target`; reports memory and fit.

    Args:
      config: the run config `jaxlora train` would use (model.path may be a folder, a hub id or a SHAPES name).
      target: "v5p-32", "v5:2x2x4", "cpu8", ... (see TARGET_FORMS).
      num_slices: TPU slices joined over DCN (the devices of all slices form the mesh, as on a multislice pod).
      micro_batch: micro-batch rows per chip (per data shard); default config.train.micro_batch_size / (data x fsdp).
      search: also find the largest micro-batch per chip that fits: predicted from the compiled memory of 1 and 2
        rows/chip and confirmed by compiling it (`jaxlora.plan.search`); when the requested micro-batch does not
        fit, the largest below it is searched anyway.
      remat: override config.model.remat ("none", "save_matmuls", "full").
      mesh: override config.mesh.
      lora_ga_steps: also compile LoRA-GA's exact and streaming estimation steps (config.lora.lora_ga_config or the
        defaults).
      search_remat / search_mesh: also search the remat policies / (fsdp, tensor) splits for the largest micro-batch.
      hbm_bytes: per-chip memory budget (default: the chip's HBM; a CPU device's share of host memory).
      max_micro_batch: the search's upper bound per chip.
      hf_config: the model's HF config dict (default: read from config.model.path).
      exhaustive_search: search by compiling powers of two and bisecting instead (every candidate a compile).
    Returns:
      A PlanReport (`.format()` for the text, `.to_dict()` for JSON).
    """
    tgt = resolve_target(target, num_slices)
    devices = target_devices(tgt)
    mesh_cfg = mesh or config.mesh
    jmesh = _make_mesh(mesh_cfg, devices, tgt)
    budget = hbm_bytes or tgt.hbm_bytes
    planner = Planner(config, jmesh, remat, budget, hf_config)
    model = planner.model
    log.info("planning %s on %s, mesh %s", config.model.path, tgt.describe(), dict(jmesh.shape))
    if micro_batch is None:
        global_mb = config.train.micro_batch_size
        if global_mb % planner.divisor:
            raise PlanError(f"train.micro_batch_size={global_mb} is not a multiple of the mesh's data x fsdp = "
                            f"{planner.divisor} (mesh {dict(jmesh.shape)}); pass a micro-batch per chip "
                            f"(--micro-batch) or set train.micro_batch_size to a multiple of {planner.divisor}")
        micro_batch = global_mb // planner.divisor
    # One compile in a second thread, one here (a compile keeps about one core busy): the search's second batch,
    # then LoRA-GA's steps, overlap the requested batch and the search's own compiles.
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        if search and max_micro_batch > 1:
            pool.submit(planner.train, 2 if micro_batch == 1 else 1)
        ga = [pool.submit(planner.lora_ga_exact), pool.submit(planner.lora_ga_streaming)] if lora_ga_steps else []
        train = planner.train(micro_batch)
        largest, found, message = None, None, ""
        if search or not train.fits:
            cap = max_micro_batch if train.fits else min(max_micro_batch, max(1, micro_batch - 1))
            largest, first, found = planner.largest_micro_batch(cap, exhaustive=exhaustive_search)
            if largest is None:
                need = f"{fmt_bytes(first.peak)}/chip, " if first.peak else ""
                message = (f"does not fit: micro-batch 1 per chip needs {need}{fmt_bytes(first.over_bytes)} over "
                           f"the {fmt_bytes(budget)} per chip of {tgt.name}; use more chips or slices, a larger "
                           f"fsdp split, model.remat: full, or a shorter data.max_length")
        report = PlanReport(tgt, config.model.path, model.config.num_params, dict(jmesh.shape), model.module.remat,
                            planner.seq_len, budget, train, largest, largest_search=found, message=message,
                            base=base_description(config))
        if ga:
            report.lora_ga_exact, report.lora_ga_streaming = (f.result() for f in ga)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # fail now; a compile already running ends on its own
        raise
    pool.shutdown()  # nothing left running behind the caller
    if search_remat or search_mesh:
        report.search = _search(config, devices, tgt, budget, mesh_cfg, remat or config.model.remat, search_remat,
                                search_mesh, max_micro_batch, hf_config, exhaustive_search)
    return report


def base_description(config: RunConfig) -> str:
    """How the frozen base is held: "nf4 (double quant)", "int8" (QLoRA), or its dtype."""
    m = config.model
    if m.quantization:
        return m.quantization + (" (double quant)" if m.double_quant else "")
    return str(m.param_dtype or m.dtype)


def _make_mesh(mesh_cfg: sharding.MeshConfig, devices, tgt: Target):
    try:
        return sharding.make_mesh(mesh_cfg, devices)
    except ValueError as e:
        raise PlanError(f"{e} on {tgt.describe()}; choose mesh sizes whose product is {len(devices)} "
                        f"(or set one of them to -1)") from None


def _search(config, devices, tgt, budget, mesh_cfg, remat, search_remat, search_mesh, cap, hf_config,
            exhaustive) -> list:
    remats = ("none", "save_matmuls", "full") if search_remat else (remat,)
    meshes = [mesh_cfg]
    if search_mesh:
        per_slice = len(devices) // tgt.num_slices
        meshes = [sharding.MeshConfig(data=tgt.num_slices, fsdp=-1, tensor=t) for t in (1, 2, 4, 8)
                  if per_slice % t == 0 and per_slice // t >= 1]
        meshes.append(sharding.MeshConfig(data=-1, fsdp=1, tensor=1))
    results = []
    for r in remats:
        for m in meshes:
            jmesh = _make_mesh(m, devices, tgt)
            best, _, _ = Planner(config, jmesh, r, budget, hf_config).largest_micro_batch(cap, exhaustive)
            results.append({"remat": r, "mesh": dict(jmesh.shape), "largest": best.per_chip if best else 0,
                            "peak_gib": best.peak / GiB if best else None})
    return sorted(results, key=lambda d: -d["largest"])


# ------------------------------------------------------------------------------------------------ README table

TABLE_MODELS = ("llama-2-7b", "llama-2-13b", "llama-3-70b")
TABLE_TARGETS = (("v4-32", 1), ("v5e-16", 1), ("v5p-32", 1), ("v5p-32", 2))


def table_config(shape: str, num_slices: int = 1, quantization: str | None = None,
                 double_quant: bool = False, remat: str = "save_matmuls") -> RunConfig:
    """The table's run: bf16 base (or, with `quantization`, its block kernels in nf4 / int8: QLoRA), LoRA r=16
    (alpha 32) on all linear layers, sequence 2048, remat save_matmuls (or `remat`), FSDP over the chips of a slice
    and data parallelism across slices; LoRA-GA with its defaults (2 x 2048 batches, packed one row per chip; streaming sketch
    rank 6r = 96)."""
    from jaxlora.config import ModelConfig, TrainConfig
    from jaxlora.training.data import DataConfig
    return RunConfig(model=ModelConfig(path=shape, dtype="bfloat16", param_dtype="bfloat16", remat=remat,
                                       quantization=quantization, double_quant=double_quant),
                     lora=lora_lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                     data=DataConfig(max_length=2048, bucket_lengths=(2048,)),
                     train=TrainConfig(micro_batch_size=num_slices), mesh=sharding.MeshConfig(data=num_slices, fsdp=-1))


def _cell(p: StepPlan | None) -> str:
    if p is None:
        return "-"
    if p.fits:
        return f"{p.peak / GiB:.1f}"
    return f"**does not fit** (+{p.over_bytes / GiB:.1f})" if p.over_bytes else "**does not fit**"


def table(models=TABLE_MODELS, targets=TABLE_TARGETS, max_micro_batch: int = 256,
          progress: Callable[[str], None] = print) -> str:
    """The README table: one plan per (model, target), as Markdown. Every number is from a TPU compile."""
    rows, t0 = [], time.perf_counter()
    for shape in models:
        for name, slices in targets:
            t = time.perf_counter()
            r = plan(table_config(shape, slices), name, num_slices=slices, micro_batch=1,
                     max_micro_batch=max_micro_batch)
            capped = "+" if r.largest and r.largest.per_chip >= max_micro_batch else ""  # the search's cap fits
            largest = f"{r.largest.per_chip}{capped} ({r.largest.peak / GiB:.1f})" if r.largest else "none fits"
            w = r.train.parts
            state = (w.get("adapters", 0) + w.get("optimizer", 0)) / GiB
            rows.append(f"| {shape} | {'2 x ' if slices > 1 else ''}{name} | {r.hbm_bytes / GiB:.0f} "
                        f"| {w.get('weights', 0) / GiB:.2f} / {state:.2f} | {_cell(r.train)} | {largest} "
                        f"| {_cell(r.lora_ga_exact)} | {_cell(r.lora_ga_streaming)} |")
            progress(f"{rows[-1]}  <- {time.perf_counter() - t:.0f}s")
    header = ("| model | target | HBM/chip | weights / adapters+Adam per chip | LoRA train, micro-batch 1/chip "
              "| largest micro-batch/chip (GiB) | LoRA-GA exact estimation | LoRA-GA streaming estimation |\n"
              "|---|---|---|---|---|---|---|---|")
    note = (f"GiB per chip (XLA memory_analysis: arguments + outputs - aliased + temporaries + code) of the compiled "
            f"TPU programs; sequence 2048, bf16 base, LoRA r=16 on all linear layers (fp32 adapters, AdamW), remat "
            f"save_matmuls, FSDP over each slice's chips, data-parallel across slices. LoRA-GA: its default 2 x 2048 "
            f"estimation batches, packed so each chip computes 1 row (`lora_ga.pack_batches`), exact = fp32 "
            f"gradient accumulators for every adapted kernel, streaming = sketch step at rank 6r = 96. (+x) = GiB "
            f"over HBM; n+ = the search's cap (--max-micro-batch {max_micro_batch}) fits. Generated by `jaxlora plan "
            f"--table --max-micro-batch {max_micro_batch}` in {time.perf_counter() - t0:.0f}s with jax "
            f"{jax.__version__}.")
    return header + "\n" + "\n".join(rows) + "\n\n" + note + "\n"


# (model, target, search the largest micro-batch): the QLoRA cases; each row also planned with a bf16 base.
QLORA_ROWS = (("llama-2-7b", "v5e-1", True), ("llama-2-13b", "v5e-16", False), ("llama-3-70b", "v4-32", False),
              ("llama-3-70b", "v5e-16", False))
QLORA_BASES = ((None, False), ("nf4", True))  # bf16, then QLoRA's nf4 with double quantization


def qlora_table(rows=QLORA_ROWS, bases=QLORA_BASES, max_micro_batch: int = 8, remat: str = "full",
                progress: Callable[[str], None] = print) -> str:
    """The README's QLoRA table: each (model, target) planned with a bf16 base and with an nf4 (double quant) base,
    as Markdown; remat full (QLoRA's gradient checkpointing: with save_matmuls, measured, the nf4 7B on one v5e chip
    is 0.3 GiB and the nf4 13B on v5e-16 1.5 GiB over, from saved activations). The largest micro-batch is searched
    where the row says so."""
    lines, t0 = [], time.perf_counter()
    for shape, name, search in rows:
        for quantization, double_quant in bases:
            t = time.perf_counter()
            config = table_config(shape, quantization=quantization, double_quant=double_quant, remat=remat)
            r = plan(config, name, micro_batch=1, search=search, max_micro_batch=max_micro_batch)
            capped = "+" if r.largest and r.largest.per_chip >= max_micro_batch else ""
            largest = (f"{r.largest.per_chip}{capped} ({r.largest.peak / GiB:.1f})" if r.largest else
                       "none fits" if search or not r.train.fits else "not searched")
            w = r.train.parts
            lines.append(f"| {shape} | {name} | {r.hbm_bytes / GiB:.0f} | {r.base} | {w.get('weights', 0) / GiB:.2f} "
                         f"| {_cell(r.train)} | {largest} | {_cell(r.lora_ga_exact)} | {_cell(r.lora_ga_streaming)} |")
            progress(f"{lines[-1]}  <- {time.perf_counter() - t:.0f}s")
    header = ("| model | target | HBM/chip | base | weights/chip | LoRA train, micro-batch 1/chip "
              "| largest micro-batch/chip (GiB) | LoRA-GA exact estimation | LoRA-GA streaming estimation |\n"
              "|---|---|---|---|---|---|---|---|---|")
    note = (f"GiB per chip (XLA memory_analysis) of the compiled TPU programs: sequence 2048, LoRA r=16 on all "
            f"linear layers, fp32 adapters and AdamW, remat {remat}, FSDP over the chips, the base in bf16 or in nf4 "
            f"with double quantization (the blocks' linear kernels; embeddings, norms and lm_head stay bf16). "
            f"LoRA-GA's exact estimation holds fp32 gradients of the (dequantized) kernels. (+x) = GiB over HBM; n+ = "
            f"the search's cap (--max-micro-batch {max_micro_batch}) fits. Generated by `jaxlora plan --qlora-table "
            f"--max-micro-batch {max_micro_batch}` in {time.perf_counter() - t0:.0f}s with jax {jax.__version__}.")
    return header + "\n" + "\n".join(lines) + "\n\n" + note + "\n"


def add_plan_arguments(c) -> None:
    """`jaxlora plan`'s arguments (an argparse parser)."""
    c.add_argument("--config", help="YAML run config (see configs/); model.path may be a folder, a hub id or one "
                                    f"of {', '.join(SHAPES)}")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    c.add_argument("--target", default="v5p-32", help=f"where to compile for: {TARGET_FORMS}")
    c.add_argument("--slices", type=int, default=1, help="TPU slices (multislice over DCN)")
    c.add_argument("--micro-batch", type=int, default=None,
                   help="micro-batch rows per chip (default: train.micro_batch_size / (data x fsdp))")
    c.add_argument("--no-search", action="store_true", help="skip the largest-micro-batch search")
    c.add_argument("--max-micro-batch", type=int, default=256, help="upper bound of the search, per chip")
    c.add_argument("--exhaustive-search", action="store_true",
                   help="search by compiling powers of two, then bisecting (default: predict from two compiles, "
                        "confirm with one)")
    c.add_argument("--remat", choices=("none", "save_matmuls", "full"), default=None, help="override model.remat")
    c.add_argument("--search-remat", action="store_true", help="also search the remat policies")
    c.add_argument("--search-mesh", action="store_true", help="also search (fsdp, tensor) splits")
    c.add_argument("--no-lora-ga", action="store_true", help="skip LoRA-GA's estimation steps")
    c.add_argument("--hbm-gib", type=float, default=None,
                   help="per-chip memory budget (default: the chip's HBM; a GPU's: XLA's pool, "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION (0.75) of its memory)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--table", action="store_true", help="compute the README table (7B/13B/70B on v4-32, v5e-16, "
                                                       "v5p-32, 2 x v5p-32) and write it to --out")
    c.add_argument("--qlora-table", action="store_true",
                   help="compute the QLoRA table (bf16 vs nf4 bases, remat full: 7B on one v5e chip, 13B on "
                        "v5e-16, 70B on v4-32 and v5e-16) and write it to --out")
    c.add_argument("--out", default=None,
                   help="where --table / --qlora-table write (default docs/plan_table.md / docs/plan_qlora.md)")
    c.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_plan_command(args) -> int:
    """0 when the run fits, 1 when it does not; bad input raises (the CLI prints one line and exits 2)."""
    if args.table or args.qlora_table:
        which = "--table" if args.table else "--qlora-table"
        text = (table if args.table else qlora_table)(max_micro_batch=args.max_micro_batch)
        out = Path(args.out or ("docs/plan_table.md" if args.table else "docs/plan_qlora.md"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# `jaxlora plan {which}`\n\n" + text)
        print(text + f"\nwritten to {out}")
        return 0
    if not args.config:
        raise PlanError("jaxlora plan needs --config (or --table, --qlora-table)")
    from jaxlora.config import load_run_config
    config = load_run_config(args.config, args.overrides)
    report = plan(config, args.target, num_slices=args.slices, micro_batch=args.micro_batch,
                  search=not args.no_search, remat=args.remat, lora_ga_steps=not args.no_lora_ga,
                  search_remat=args.search_remat, search_mesh=args.search_mesh,
                  hbm_bytes=int(args.hbm_gib * GiB) if args.hbm_gib else None,
                  max_micro_batch=args.max_micro_batch, exhaustive_search=args.exhaustive_search)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.format())
    return 0 if report.fits else 1
