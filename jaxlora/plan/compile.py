"""Compiling the steps: `Planner` lowers the train step and LoRA-GA's estimation steps; `compile_step` measures them.

`Planner` holds the abstract model, adapters and optimizer state of one (config, mesh, remat) and builds the SAME
jitted functions the trainer and LoRA-GA run, with `jax.ShapeDtypeStruct` arguments carrying the trainer's
shardings. `compile_step` compiles one of them for the target: XLA's `memory_analysis()` gives the per-chip bytes
(`Memory`), a TPU compile that would not fit fails with RESOURCE_EXHAUSTED and is reported as "does not fit"
(`StepPlan`), and `Planner.largest_micro_batch` searches the largest micro-batch per chip that fits.

With `model.quantization` (QLoRA: nf4 / int8, `jaxlora.quant`) the planned model is the quantized one the trainer
loads (`planned_model`): the block kernels are `QArray`s of their packed codes and scales with their own shardings,
so the compiled arguments are the quantized weights and the dequantization is inside the compiled matmuls. LoRA-GA's
exact estimation differentiates the dequantized kernels, so its accumulators take the dense kernels' shapes and
shardings (`model.dense_abstract_params`), as `lora_ga.estimate_gradients` does.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import threading
import time
from concurrent.futures import Future
from typing import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlora import lora as lora_lib, sharding
from jaxlora.training import data as data_lib
from jaxlora.lora import ga as lora_ga
from jaxlora.training.build import build_training
from jaxlora.config import RunConfig
from jaxlora.lora import LoraGAConfig
from jaxlora.lora.weights import LoraWeights
from jaxlora.training.metrics import train_flops_per_token
from jaxlora.plan import search
from jaxlora.plan.report import BatchSearch, Memory, StepPlan, fmt_fit
from jaxlora.plan.shapes import build_model
from jaxlora.plan.targets import GiB

log = logging.getLogger(__name__)


def planned_model(config: RunConfig, mesh, remat: str | None = None, hf_config: dict | None = None):
    """The model `jaxlora train` would load, from shapes (`shapes.build_model`): quantized as config.model says
    (model.quantization, model.double_quant), with the same QArray layout and shardings as a quantized load."""
    return build_model(config, mesh, remat, hf_config)


def _bytes(x, s) -> int:
    """Per-chip bytes of one array of a compiled program's inputs (its shard); `s` is its sharding, or a
    ShapeDtypeStruct carrying one."""
    s = s.sharding if isinstance(s, jax.ShapeDtypeStruct) else s
    shape = s.shard_shape(x.shape) if s is not None and hasattr(s, "shard_shape") else x.shape
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def _tree_bytes(tree, shardings) -> int:
    return sum(_bytes(x, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _gib_over(message: str) -> int:
    """Bytes over capacity from XLA's RESOURCE_EXHAUSTED message (0 if it names no sizes)."""
    unit = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": GiB, "T": 2 ** 40}
    size = lambda v, u: float(v) * unit[u.upper()]
    if m := re.search(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", message):
        return int(size(*m.group(1, 2)) - size(*m.group(3, 4)))
    if m := re.search(r"[Ee]xceeded hbm capacity by ([\d.]+)([KMGT]?)", message):
        return int(size(*m.group(1, 2)))
    return 0


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend has a cost model
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def compile_step(name: str, jitted, args: tuple, *, rows: int, per_chip: int, seq_len: int, flops: float,
                 hbm_bytes: int, parts: Callable[[tuple], dict[str, int]], options: dict | None = None) -> StepPlan:
    """Lowers and compiles `jitted` at `args` (ShapeDtypeStructs); RESOURCE_EXHAUSTED is "does not fit".

    `parts(input_shardings)` splits the per-chip input bytes by meaning, using the shardings the compiled program
    actually takes (jit may choose them for inputs without one); if it does not compile, the requested ones.
    `options`: XLA compile options (`compile_options`).
    """
    t0 = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile(compiler_options=options or None)
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        log.debug("%s: %s", name, e)
        return StepPlan(name, rows, per_chip, seq_len, False, None, parts(args), flops, None,
                        time.perf_counter() - t0, over_bytes=_gib_over(str(e)) or 1)
    dt = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    host_bytes = lambda k: getattr(ma, f"host_{k}_size_in_bytes", 0) or 0
    host = host_bytes("argument") + host_bytes("output") - host_bytes("alias") + host_bytes("temp")
    memory = Memory(ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                    ma.temp_size_in_bytes, ma.generated_code_size_in_bytes, host)
    in_shardings = compiled.input_shardings[0]
    split = parts(in_shardings)
    split["temporaries"] = memory.temp
    fits = memory.peak <= hbm_bytes
    return StepPlan(name, rows, per_chip, seq_len, fits, memory, split, flops, _xla_flops(compiled), dt,
                    over_bytes=max(0, memory.peak - hbm_bytes))


def compile_options(platform: str) -> dict:
    """XLA options for programs that are only measured, never run: on XLA:CPU and XLA:GPU, LLVM without
    optimization. Buffer assignment (all of memory_analysis) is settled before LLVM runs, so the bytes are the same
    (checked: tiny and SmolLM2 train steps on cpu8, SmolLM2's on 8 x H100) and a CPU compile is ~4x faster.
    libtpu ignores the option."""
    return {"xla_backend_optimization_level": 0} if platform in ("cpu", "gpu", "cuda") else {}


def _struct(tree, shardings):
    """ShapeDtypeStructs of `tree` with `shardings` (a None sharding leaves the choice to jit)."""
    return jax.tree.map(lambda s, x: x if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shardings, tree, is_leaf=lambda s: s is None)


def _batch(rows: int, seq_len: int, shard, groups: int = 1, config: RunConfig | None = None) -> dict:
    """A batch's shapes; with the run's `config`, the keys its loader adds: packed rows' positions, and target
    positions (model.logits_at_targets) at their widest (every position: their width depends on the data)."""
    keys = ["input_ids", "attention_mask", "labels"]
    if config is not None and config.data.packing:
        keys.append("positions")
    if config is not None and config.model.logits_at_targets:
        keys.append("target_positions")
    batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=shard) for k in keys}
    if groups > 1:  # LoRA-GA's packed estimation batches (lora_ga.pack_batches)
        batch["group"] = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=shard)
    return batch


# ------------------------------------------------------------------------------------------------ the steps


class Planner:
    """The abstract model, adapters and optimizer state of one (config, mesh, remat), and the steps to compile."""

    def __init__(self, config: RunConfig, mesh, remat: str | None, hbm_bytes: int, hf_config: dict | None = None):
        self.config, self.mesh, self.hbm = config, mesh, hbm_bytes
        self.model = planned_model(config, mesh, remat, hf_config)
        self.seq_len = max(data_lib.bucket_lengths(config.data))
        self.divisor = sharding.batch_divisor(mesh)
        self.options = compile_options(mesh.devices.flat[0].platform)
        self.params = _struct(self.model.abstract_params, self.model.param_shardings)
        self._train_plans: dict[int, Future] = {}  # per micro-batch; a compile in flight is waited for, not redone
        self._lock = threading.Lock()
        self._train_fn = None

    # ---- LoRA training: exactly trainer.train's objects, built from shapes
    def _build_train(self):
        """`jaxlora train`'s own training build (`build_training`), from shapes: nothing is allocated."""
        cfg = self.config
        training = build_training(self.model, cfg, total_steps=cfg.train.max_steps or 1000, abstract=True)
        self.state, self._train_fn = training.state, training.train_step

    def train(self, per_chip: int) -> StepPlan:
        """The train step at `per_chip` micro-batch rows per data shard (compiled once; safe from several threads,
        so `jaxlora.plan.command` compiles the search's first batches while the requested one compiles)."""
        with self._lock:
            if self._train_fn is None:
                self._build_train()
            pending, mine = self._train_plans.get(per_chip), per_chip not in self._train_plans
            if mine:
                pending = self._train_plans[per_chip] = Future()
        if mine:
            try:
                pending.set_result(self._compile_train(per_chip))
            except BaseException as e:
                pending.set_exception(e)
        return pending.result()

    def _compile_train(self, per_chip: int) -> StepPlan:
        accum = self.config.train.grad_accum_steps
        rows = per_chip * self.divisor * accum
        batch = _batch(rows, self.seq_len, sharding.batch_sharding(self.mesh), config=self.config)

        def parts(sh):
            params_sh, state_sh, batch_sh = sh
            return {"weights": _tree_bytes(self.params, params_sh),
                    "adapters": _tree_bytes(self.state.trainable, state_sh.trainable)
                    + _tree_bytes(self.state.frozen, state_sh.frozen),  # LoRA-GA's a0/b0
                    ("optimizer (host)" if self.config.optim.offload_state else "optimizer"):
                        _tree_bytes(self.state.opt_state, state_sh.opt_state),
                    "batch": _tree_bytes(batch, batch_sh)}

        flops = rows * self.seq_len * train_flops_per_token(self.model, self.seq_len)
        plan = compile_step("train", self._train_fn, (self.params, self.state, batch), rows=rows,
                            per_chip=per_chip, seq_len=self.seq_len, flops=flops, hbm_bytes=self.hbm, parts=parts,
                            options=self.options)
        log.info("  train  micro-batch %d/chip: %s (%.1fs)", per_chip, fmt_fit(plan), plan.compile_s)
        return plan

    def largest_micro_batch(self, cap: int = 256, exhaustive: bool = False) \
            -> tuple[StepPlan | None, StepPlan, BatchSearch]:
        """(the plan at the largest per-chip micro-batch that fits, or None; the plan at 1 per chip; how it was
        found). Predicted from compiled memory and confirmed by a compile (`jaxlora.plan.search`), or exhaustive."""
        found = (search.exhaustive if exhaustive else search.predicted)(self.train, self.hbm, cap)
        return (self.train(found.largest) if found.largest else None), self.train(1), found

    # ---- LoRA-GA estimation: the steps lora_ga.lora_ga_init runs
    @functools.cached_property
    def _ga(self):
        """The config, targets, global rows and groups of LoRA-GA's packed estimation batches (as lora_ga_init). The
        targets are those LoRA-GA estimates: stacked expert kernels (Mixtral's), which it refuses, are left out
        (said once per plan, however many estimation steps are planned)."""
        ga = self.config.lora.lora_ga_config or LoraGAConfig()
        groups = lora_ga.pack_factor(ga.batch_size, self.divisor)
        targets = self.model.lora_targets(self.config.lora)
        estimable = [t for t in targets if not lora_ga.is_expert_kernel(self.model, t)]
        if len(estimable) < len(targets):
            log.info("  LoRA-GA estimation planned for %d of %d targets (expert kernels left out: LoRA-GA refuses "
                     "them)", len(estimable), len(targets))
        return ga, estimable, ga.batch_size * groups, groups

    def lora_ga_exact(self) -> StepPlan | None:
        """lora_ga.estimate_gradients' step: float32 gradient accumulators for every targeted kernel (w.r.t. the
        dequantized kernel on a quantized base: dense shapes and shardings); None when no target can be estimated."""
        ga, targets, rows, groups = self._ga
        if not targets:
            return None
        model = self.model
        kernels = lora_ga.kernel_subtree(model.dense_abstract_params, targets)
        acc = _struct(jax.tree.map(lambda k: jax.ShapeDtypeStruct(k.shape, jnp.float32), kernels),
                      lora_ga.kernel_subtree(model.dense_param_shardings, targets))
        count = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(self.mesh))  # also the loss scale
        batch = _batch(rows, self.seq_len, sharding.batch_sharding(self.mesh, batch_size=rows), groups)

        def parts(sh):
            return {"weights": _tree_bytes(self.params, sh[2]), "accumulators": _tree_bytes(acc, sh[0]),
                    "batch": _tree_bytes(batch, sh[3])}

        flops = rows * self.seq_len * train_flops_per_token(model, self.seq_len, full_finetune=True)
        plan = compile_step("lora_ga_exact", lora_ga.make_estimate_step(model, targets, rows, groups),
                            (acc, count, self.params, batch, count), rows=rows, per_chip=rows // self.divisor,
                            seq_len=self.seq_len, flops=flops, hbm_bytes=self.hbm, parts=parts,
                            options=self.options)
        log.info("  LoRA-GA exact estimation, batch %d: %s (%.1fs)", rows, fmt_fit(plan), plan.compile_s)
        return plan

    def lora_ga_streaming(self) -> StepPlan | None:
        """lora_ga.streaming_factorize's sketch step (same jit, same shardings): a LoRA backward at the sketch rank
        q = 2r + oversampling; None when no target can be estimated."""
        ga, targets, rows, groups = self._ga
        if not targets:
            return None
        ga = dataclasses.replace(ga, svd_method="streaming")  # its sketch rank, whatever the config's method
        model = self.model
        flat = traverse_util.flatten_dict(model.abstract_params)

        def sketch(t):
            *lead, d_in, d_out = flat[t.path + ("kernel",)].shape
            q = lora_ga.sketch_rank(ga, t.rank, d_in, d_out)
            return LoraWeights(jax.ShapeDtypeStruct((*lead, d_in, q), jnp.float32),
                               jax.ShapeDtypeStruct((*lead, q, d_out), jnp.float32), scale=1.0)
        lora = _struct(lora_lib.build_lora_tree(targets, sketch), lora_ga.sketch_shardings(model, targets))
        batch = _batch(rows, self.seq_len, sharding.batch_sharding(self.mesh, batch_size=rows), groups)

        def parts(sh):
            return {"weights": _tree_bytes(self.params, sh[1]),
                    "sketches": _tree_bytes(lora, sh[0]) + _tree_bytes(lora, sh[2]),
                    "batch": _tree_bytes(batch, sh[3])}

        flops = rows * self.seq_len * train_flops_per_token(model, self.seq_len)
        plan = compile_step("lora_ga_streaming", lora_ga.make_sketch_step(model, targets, rows, groups),
                            (lora, self.params, lora, batch), rows=rows, per_chip=rows // self.divisor,
                            seq_len=self.seq_len, flops=flops, hbm_bytes=self.hbm, parts=parts,
                            options=self.options)
        log.info("  LoRA-GA streaming estimation, batch %d: %s (%.1fs)", rows, fmt_fit(plan), plan.compile_s)
        return plan
