"""`jaxlora plan`: will this run fit? Ahead-of-time compilation of the exact steps `jaxlora train` runs.

No weights and no accelerator are needed. The model is built from its HF config alone (abstract params), the
adapters, optimizer state and batch are `jax.ShapeDtypeStruct`s carrying the shardings the trainer would give them,
and the SAME jitted functions the trainer and LoRA-GA use (`step.jit_train_step(step.make_train_step(...))`,
`lora_ga.make_estimate_step`, `lora_ga.make_sketch_step`) are lowered and compiled for the target:

    target "v5p-32"      compile-only TPU devices from libtpu (`jax.experimental.topologies`), 16 chips
    target "v5:2x2x4"    the same, by topology name; num_slices=2 for two slices over DCN
    target "cpu8"        8 host CPU devices (works without libtpu)

The compiled program's `memory_analysis()` gives per-chip argument / output / alias / temporary bytes; a TPU
compile that would not fit fails with RESOURCE_EXHAUSTED, reported as "does not fit". The largest micro-batch per
chip that fits is found by compiling candidates (powers of two, then bisection). XLA's FLOP count is reported next to
the analytic one (`metrics.train_flops_per_token`): XLA counts the body of a scanned loop (the layers, the
gradient-accumulation micro-batches) once, so it undercounts by about the number of layers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlora import lora as lora_lib, sharding
from jaxlora.training import data as data_lib
from jaxlora.lora import ga as lora_ga
from jaxlora.training import optim
from jaxlora.training import step as step_lib
from jaxlora.config import RunConfig
from jaxlora.lora import LoraGAConfig
from jaxlora.lora.weights import LoraWeights
from jaxlora.training.metrics import train_flops_per_token

log = logging.getLogger(__name__)
GiB = 2 ** 30


class PlanError(ValueError):
    """A target, mesh or model that cannot be planned; the message says what to change."""


# ------------------------------------------------------------------------------------------------ targets

# Per chip kind: libtpu topology prefix, chip config, TensorCores per chip in the user-facing name, HBM per chip.
CHIPS = {
    "v4": ("v4", "megacore", 2, 32 * GiB),
    "v5p": ("v5", "megacore", 2, 95 * GiB),
    "v5e": ("v5e", "default", 1, 16 * GiB),
    "v6e": ("v6e", "default", 1, 32 * GiB),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}  # Cloud TPU names of v5e slices
TARGET_FORMS = ("v4-32, v5p-32, v5e-16 (or v5litepod-16), v6e-8: the Cloud TPU name (cores for v4/v5p, chips for "
                "v5e/v6e); v4:2x2x4, v5:2x2x4, v5e:4x4, v6e:2x4: a libtpu topology name; cpu8: 8 host CPU devices")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    platform: str  # "tpu" or "cpu"
    chip: str  # "v5p", ..., or "cpu"
    topology: str | None  # libtpu name, e.g. "v5:2x2x4"
    num_slices: int
    num_devices: int
    hbm_bytes: int  # per chip (per CPU device: its share of host memory)

    def describe(self) -> str:
        slices = f"{self.num_slices} x " if self.num_slices > 1 else ""
        where = f" ({self.topology})" if self.topology else ""
        return f"{slices}{self.name}{where}: {self.num_devices} devices, {self.hbm_bytes / GiB:.1f} GiB each"


def _grid(chips: int, ndim: int) -> list[int]:
    """Chip grid of a power-of-two slice as Cloud TPU lays it out: v5p-32 -> 2x2x4, v5e-16 -> 4x4."""
    dims = [1] * ndim
    while (n := math.prod(dims)) < chips:
        i = len(dims) - 1 - dims[::-1].index(min(dims))
        dims[i] *= 2
    if n != chips:
        raise PlanError(f"cannot lay out {chips} chips as a grid; give a topology name like v5:2x2x4 "
                        f"(valid forms: {TARGET_FORMS})")
    return sorted(dims)


def resolve_target(name: str, num_slices: int = 1) -> Target:
    """Parses a target name (see TARGET_FORMS) into chip kind, topology and HBM per chip."""
    if num_slices < 1:
        raise PlanError(f"num_slices must be >= 1, got {num_slices}")
    if m := re.fullmatch(r"cpu(\d*)", name):
        n = int(m.group(1) or 8)
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Target(name, "cpu", "cpu", None, 1, n, host // n)
    if m := re.fullmatch(r"(v\w+?)-(\d+)", name):  # Cloud TPU name
        chip = _ALIASES.get(m.group(1), m.group(1))
        if chip not in CHIPS:
            raise PlanError(f"unknown TPU target {name!r}; valid forms: {TARGET_FORMS}")
        prefix, _, cores, hbm = CHIPS[chip]
        count = int(m.group(2))
        if count % cores or count == 0:
            raise PlanError(f"{name}: {chip} slices count {cores} cores per chip, so the size must be a multiple "
                            f"of {cores}; valid forms: {TARGET_FORMS}")
        dims = _grid(count // cores, 3 if cores == 2 else 2)
        topology = f"{prefix}:{'x'.join(map(str, dims))}"
    elif m := re.fullmatch(r"(v\w+):(\d+(?:x\d+)+)", name):  # libtpu topology name
        chip = {"v4": "v4", "v5": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}.get(m.group(1))
        if chip is None:
            raise PlanError(f"unknown TPU topology {name!r}; valid forms: {TARGET_FORMS}")
        prefix, _, cores, hbm = CHIPS[chip]
        dims = [int(d) for d in m.group(2).split("x")]
        if len(dims) != (3 if cores == 2 else 2):
            raise PlanError(f"{name}: {chip} topologies have {3 if cores == 2 else 2} dimensions; "
                            f"valid forms: {TARGET_FORMS}")
        topology = f"{prefix}:{m.group(2)}"
    else:
        raise PlanError(f"unknown target {name!r}; valid forms: {TARGET_FORMS}")
    chips = math.prod(dims)
    return Target(name, "tpu", chip, topology, num_slices, chips * num_slices, hbm)


def _prepare_runtime(cpu_devices: int) -> None:
    """Before any backend starts: CPU as the default platform with enough host devices, and libtpu told that this
    is a compile-only host (no metadata server, no lockfile shared with other processes)."""
    from jax._src import xla_bridge
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8")):
        os.environ.setdefault(key, value)
    if not xla_bridge.backends_are_initialized():
        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
        if jax.config.jax_num_cpu_devices < cpu_devices and "device_count" not in os.environ.get("XLA_FLAGS", ""):
            jax.config.update("jax_num_cpu_devices", cpu_devices)


def target_devices(target: Target) -> list:
    """The target's devices: compile-only TPU devices from libtpu, or host CPU devices."""
    _prepare_runtime(target.num_devices if target.platform == "cpu" else 1)
    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.num_devices:
            raise PlanError(f"{target.name} needs {target.num_devices} CPU devices but jax has {len(devices)}: set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices} before jax starts")
        return devices[:target.num_devices]
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError(f"{target.name}: compiling for TPU needs libtpu: {LIBTPU_PIP}") from None
    from jax.experimental import topologies
    dims = [int(d) for d in target.topology.split(":")[1].split("x")]
    bounds = (2, 2, 1) if len(dims) == 3 else (min(2, dims[0]), min(2, dims[1]), 1)  # chips per host
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                            chip_config_name=CHIPS[target.chip][1], chips_per_host_bounds=bounds,
                                            num_slices=target.num_slices)
    except Exception as e:  # libtpu's own message names the problem (e.g. an impossible grid)
        raise PlanError(f"{target.name}: libtpu rejected topology {target.topology}: {e}; "
                        f"valid forms: {TARGET_FORMS}") from None
    return sorted(topo.devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id))


LIBTPU_PIP = f'pip install "jax[tpu]=={jax.__version__}"  (or: pip install --no-deps libtpu==0.0.42.1)'


# ------------------------------------------------------------------------------------------------ models

# Model shapes for planning without a download: HF config dicts (weights never needed).
_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
              tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10000.0)
SHAPES = {
    "llama-2-7b": dict(_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA, vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-3-70b": dict(_LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0,
                        max_position_embeddings=8192),
    "bloom-7b1": dict(architectures=["BloomForCausalLM"], model_type="bloom", vocab_size=250880, hidden_size=4096,
                      n_layer=30, n_head=32, layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False,
                      tie_word_embeddings=True),
}


# Hub ids of the same shapes, so the configs in configs/ plan offline.
_HUB_SHAPES = {"meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
               "meta-llama/Llama-2-13b-hf": "llama-2-13b", "meta-llama/Llama-2-13b-chat-hf": "llama-2-13b",
               "meta-llama/Meta-Llama-3-70B": "llama-3-70b", "meta-llama/Meta-Llama-3-70B-Instruct": "llama-3-70b",
               "bigscience/bloom-7b1": "bloom-7b1", "bigscience/bloomz-7b1-mt": "bloom-7b1"}


def hf_config_of(path: str) -> dict:
    """The HF config dict of `model.path`: a built-in shape (SHAPES), a local folder's config.json, or a hub id's
    config.json (only that file is downloaded)."""
    if path.lower() in SHAPES:
        return dict(SHAPES[path.lower()])
    folder = Path(path)
    if (folder / "config.json").exists():
        return json.loads((folder / "config.json").read_text())
    if folder.exists() or path.count("/") != 1:
        raise PlanError(f"model.path {path!r}: no config.json there; give a model folder, a hub id, or one of "
                        f"the built-in shapes {', '.join(SHAPES)}")
    try:
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
    except Exception as e:
        if path in _HUB_SHAPES:  # offline: the shape is known
            return dict(SHAPES[_HUB_SHAPES[path]])
        raise PlanError(f"model.path {path!r}: could not read its config.json from the hub ({e}); use a local "
                        f"folder or one of {', '.join(SHAPES)}") from None


def build_model(config: RunConfig, mesh, remat: str | None = None, hf_config: dict | None = None):
    """The model `jaxlora train` would load, without its weights (abstract params and their shardings)."""
    from jaxlora.models.model import Model
    m = config.model
    return Model._build(hf_config or hf_config_of(m.path), m.dtype, m.param_dtype, mesh, where=m.path,
                        remat=remat or m.remat, attention_impl=m.attention_impl)


# ------------------------------------------------------------------------------------------------ compiling


@dataclasses.dataclass
class Memory:
    """Per-chip bytes of one compiled program (XLA's memory_analysis)."""

    argument: int
    output: int
    alias: int  # outputs written into donated arguments
    temp: int  # activations, gradients and every other temporary
    code: int
    host: int = 0  # arguments, outputs and temporaries in pinned host memory (optim.offload_state), not in peak

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code


@dataclasses.dataclass
class StepPlan:
    """One compiled step at one batch size: does it fit, how much memory per chip, how many FLOPs."""

    name: str  # "train", "lora_ga_exact" or "lora_ga_streaming"
    rows: int  # global rows per call (train: micro-batch x grad_accum_steps)
    per_chip: int  # micro-batch rows per data shard (per chip when there is no tensor parallelism)
    seq_len: int
    fits: bool
    memory: Memory | None  # None when the compile ran out of memory
    parts: dict[str, int]  # per-chip bytes of the inputs by what they hold (weights, adapters, ...)
    flops: float  # analytic FLOPs of one call (all chips)
    flops_xla: float | None  # XLA's count for one chip (loops counted once)
    compile_s: float
    over_bytes: int = 0  # how far over the per-chip HBM when it does not fit

    @property
    def peak(self) -> int | None:
        return self.memory.peak if self.memory else None


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
                 hbm_bytes: int, parts: Callable[[tuple], dict[str, int]]) -> StepPlan:
    """Lowers and compiles `jitted` at `args` (ShapeDtypeStructs); RESOURCE_EXHAUSTED is "does not fit".

    `parts(input_shardings)` splits the per-chip input bytes by meaning, using the shardings the compiled program
    actually takes (jit may choose them for inputs without one); if it does not compile, the requested ones.
    """
    t0 = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
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


def _struct(tree, shardings):
    """ShapeDtypeStructs of `tree` with `shardings` (a None sharding leaves the choice to jit)."""
    return jax.tree.map(lambda s, x: x if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shardings, tree, is_leaf=lambda s: s is None)


def _batch(rows: int, seq_len: int, shard, groups: int = 1) -> dict:
    batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=shard)
             for k in ("input_ids", "attention_mask", "labels")}
    if groups > 1:  # LoRA-GA's packed estimation batches (lora_ga.pack_batches)
        batch["group"] = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=shard)
    return batch


# ------------------------------------------------------------------------------------------------ the steps


class _Planner:
    """The abstract model, adapters and optimizer state of one (config, mesh, remat), and the steps to compile."""

    def __init__(self, config: RunConfig, mesh, remat: str | None, hbm_bytes: int, hf_config: dict | None = None):
        self.config, self.mesh, self.hbm = config, mesh, hbm_bytes
        self.model = build_model(config, mesh, remat, hf_config)
        self.seq_len = max(data_lib.bucket_lengths(config.data))
        self.divisor = sharding.batch_divisor(mesh)
        self.params = _struct(self.model.abstract_params, self.model.param_shardings)
        self._train_cache: dict[int, StepPlan] = {}
        self._train_fn = None

    # ---- LoRA training: exactly trainer.train's objects, built from shapes
    def _build_train(self):
        model, cfg = self.model, self.config
        lc = cfg.lora
        targets = model.lora_targets(lc)
        if lc.init_lora_weights == "lora_ga":
            lora = jax.eval_shape(lambda: lora_ga.lora_ga_template(model, lc))
        else:
            lora = jax.eval_shape(lambda rng: lora_lib.init_lora(model, lc, rng), jax.random.PRNGKey(0))
        full = jax.eval_shape(lambda p: jax.tree.map(lambda x: x.astype(jnp.dtype(lc.lora_dtype)),
                                                     lora_lib.split_modules_to_save(p, lc.modules_to_save)),
                              model.abstract_params)
        trainable = {"lora": lora, "full": full}
        tx, schedule = optim.make_optimizer(cfg.optim, cfg.train.max_steps or 1000, trainable)
        trainable_sh = step_lib.trainable_shardings_for(model, targets, lc, full)
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)  # jax.random.PRNGKey
        offload = cfg.optim.offload_state
        self.state, state_sh = step_lib.abstract_state(trainable, tx, rng, trainable_sh, self.mesh, offload)
        self._train_fn = step_lib.jit_train_step(
            step_lib.make_train_step(model, tx, schedule, cfg.train.grad_accum_steps,
                                     state_sh.opt_state if offload else None), model.param_shardings,
            state_sh, self.mesh)

    def train(self, per_chip: int) -> StepPlan:
        """The train step at `per_chip` micro-batch rows per data shard."""
        if per_chip in self._train_cache:
            return self._train_cache[per_chip]
        if self._train_fn is None:
            self._build_train()
        accum = self.config.train.grad_accum_steps
        rows = per_chip * self.divisor * accum
        batch = _batch(rows, self.seq_len, sharding.batch_sharding(self.mesh))

        def parts(sh):
            params_sh, state_sh, batch_sh = sh
            return {"weights": _tree_bytes(self.params, params_sh),
                    "adapters": _tree_bytes(self.state.trainable, state_sh.trainable),
                    ("optimizer (host)" if self.config.optim.offload_state else "optimizer"):
                        _tree_bytes(self.state.opt_state, state_sh.opt_state),
                    "batch": _tree_bytes(batch, batch_sh)}

        flops = rows * self.seq_len * train_flops_per_token(self.model, self.seq_len)
        plan = compile_step("train", self._train_fn, (self.params, self.state, batch), rows=rows,
                            per_chip=per_chip, seq_len=self.seq_len, flops=flops, hbm_bytes=self.hbm, parts=parts)
        log.info("  train  micro-batch %d/chip: %s (%.1fs)", per_chip, _fmt_fit(plan), plan.compile_s)
        self._train_cache[per_chip] = plan
        return plan

    def largest_micro_batch(self, cap: int = 256) -> tuple[StepPlan | None, StepPlan]:
        """(the plan at the largest per-chip micro-batch that fits, or None; the plan at 1 per chip)."""
        first = self.train(1)
        if not first.fits:
            return None, first
        best, fail, m = first, None, 2
        while m <= cap:
            p = self.train(m)
            if not p.fits:
                fail = m
                break
            best, m = p, m * 2
        lo, hi = best.per_chip, fail
        while hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            p = self.train(mid)
            if p.fits:
                best, lo = p, mid
            else:
                hi = mid
        return best, first

    # ---- LoRA-GA estimation: the steps lora_ga.lora_ga_init runs
    def _ga(self):
        """The config, targets, global rows and groups of LoRA-GA's packed estimation batches (as lora_ga_init)."""
        ga = self.config.lora.lora_ga_config or LoraGAConfig()
        groups = lora_ga.pack_factor(ga.batch_size, self.divisor)
        return ga, self.model.lora_targets(self.config.lora), ga.batch_size * groups, groups

    def lora_ga_exact(self) -> StepPlan:
        """lora_ga.estimate_gradients' step: float32 gradient accumulators for every targeted kernel."""
        ga, targets, rows, groups = self._ga()
        model = self.model
        kernels = lora_ga._kernel_subtree(model.abstract_params, targets)
        acc = _struct(jax.tree.map(lambda k: jax.ShapeDtypeStruct(k.shape, jnp.float32), kernels),
                      lora_ga._kernel_subtree(model.param_shardings, targets))
        count = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(self.mesh))
        batch = _batch(rows, self.seq_len, sharding.batch_sharding(self.mesh, batch_size=rows), groups)

        def parts(sh):
            return {"weights": _tree_bytes(self.params, sh[2]), "accumulators": _tree_bytes(acc, sh[0]),
                    "batch": _tree_bytes(batch, sh[3])}

        flops = rows * self.seq_len * train_flops_per_token(model, self.seq_len, full_finetune=True)
        plan = compile_step("lora_ga_exact", lora_ga.make_estimate_step(model, targets, rows, groups),
                            (acc, count, self.params, batch), rows=rows, per_chip=rows // self.divisor,
                            seq_len=self.seq_len, flops=flops, hbm_bytes=self.hbm, parts=parts)
        log.info("  LoRA-GA exact estimation, batch %d: %s (%.1fs)", rows, _fmt_fit(plan), plan.compile_s)
        return plan

    def lora_ga_streaming(self) -> StepPlan:
        """lora_ga.streaming_factorize's sketch step (same jit, same shardings): a LoRA backward at the sketch rank
        q = 2r + oversampling."""
        ga, targets, rows, groups = self._ga()
        ga = dataclasses.replace(ga, svd_method="streaming")  # its sketch rank, whatever the config's method
        model = self.model
        flat = traverse_util.flatten_dict(model.abstract_params)

        def sketch(t):
            *lead, d_in, d_out = flat[t.path + ("kernel",)].shape
            q = lora_ga.sketch_rank(ga, t.rank, d_in, d_out)
            return LoraWeights(jax.ShapeDtypeStruct((*lead, d_in, q), jnp.float32),
                               jax.ShapeDtypeStruct((*lead, q, d_out), jnp.float32), scale=1.0)
        lora = _struct(lora_lib.build_lora_tree(targets, sketch), lora_ga._sketch_shardings(model, targets))
        batch = _batch(rows, self.seq_len, sharding.batch_sharding(self.mesh, batch_size=rows), groups)

        def parts(sh):
            return {"weights": _tree_bytes(self.params, sh[1]),
                    "sketches": _tree_bytes(lora, sh[0]) + _tree_bytes(lora, sh[2]),
                    "batch": _tree_bytes(batch, sh[3])}

        flops = rows * self.seq_len * train_flops_per_token(model, self.seq_len)
        plan = compile_step("lora_ga_streaming", lora_ga.make_sketch_step(model, targets, rows, groups),
                            (lora, self.params, lora, batch), rows=rows, per_chip=rows // self.divisor,
                            seq_len=self.seq_len, flops=flops, hbm_bytes=self.hbm, parts=parts)
        log.info("  LoRA-GA streaming estimation, batch %d: %s (%.1fs)", rows, _fmt_fit(plan), plan.compile_s)
        return plan


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_fit(p: StepPlan) -> str:
    if p.fits:
        return f"fits, {fmt_bytes(p.peak)}/chip"
    peak = f"{fmt_bytes(p.peak)}/chip, " if p.peak else ""
    return f"does not fit ({peak}{fmt_bytes(p.over_bytes)} over)"


# ------------------------------------------------------------------------------------------------ the report


@dataclasses.dataclass
class PlanReport:
    target: Target
    model: str
    num_params: int
    mesh: dict[str, int]
    remat: str
    seq_len: int
    hbm_bytes: int  # per-chip budget the plan was checked against
    train: StepPlan  # at the requested micro-batch
    largest: StepPlan | None  # at the largest micro-batch per chip that fits (None: not searched or none fits)
    lora_ga_exact: StepPlan | None = None
    lora_ga_streaming: StepPlan | None = None
    search: list[dict] = dataclasses.field(default_factory=list)  # remat / mesh search, best first
    message: str = ""  # why nothing fits, when nothing does

    @property
    def fits(self) -> bool:
        return self.train.fits

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target"] = self.target.describe()
        return d

    def format(self) -> str:
        lines = [f"plan: {self.model} ({self.num_params / 1e9:.2f}B params), seq {self.seq_len}, remat {self.remat}",
                 f"target: {self.target.describe()}; mesh {self.mesh}; budget {self.hbm_bytes / GiB:.1f} GiB/chip"]
        for p in (self.train, self.largest, self.lora_ga_exact, self.lora_ga_streaming):
            if p is None or (p is self.largest and p.per_chip == self.train.per_chip):
                continue
            title = {"train": f"LoRA train step, micro-batch {p.per_chip}/chip ({p.rows} rows x {p.seq_len})",
                     "lora_ga_exact": f"LoRA-GA exact estimation step, packed batch {p.per_chip}/chip "
                                      f"({p.rows} rows x {p.seq_len})",
                     "lora_ga_streaming": f"LoRA-GA streaming (sketch) step, packed batch {p.per_chip}/chip "
                                          f"({p.rows} rows x {p.seq_len})"}[p.name]
            if p is self.largest:
                title = "largest that fits: " + title
            lines.append(f"{title}: {_fmt_fit(p)}, compiled in {p.compile_s:.1f}s")
            if p.parts:
                lines.append("    per chip: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.parts.items())
                             + (f"; total {fmt_bytes(p.peak)}" if p.memory else "; temporaries: over HBM")
                             + (f"; in pinned host memory: {fmt_bytes(p.memory.host)}"
                                if p.memory and p.memory.host else ""))
            if p.memory:
                xla = f"{p.flops_xla:.3g}/chip (scans counted once)" if p.flops_xla else "n/a"
                lines.append(f"    FLOPs/step: {p.flops:.3g} analytic (all chips); XLA {xla}")
        for r in self.search:
            lines.append(f"search: remat {r['remat']}, mesh {r['mesh']}: largest micro-batch/chip "
                         f"{r['largest'] or 'none fits'}" + (f" ({r['peak_gib']:.2f} GiB)" if r['largest'] else ""))
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)


def plan(config: RunConfig, target: str, *, num_slices: int = 1, micro_batch: int | None = None,
         search: bool = True, remat: str | None = None, mesh: sharding.MeshConfig | None = None,
         lora_ga_steps: bool = True, search_remat: bool = False, search_mesh: bool = False,
         hbm_bytes: int | None = None, max_micro_batch: int = 256, hf_config: dict | None = None) -> PlanReport:
    """Compiles the train step (and LoRA-GA's estimation steps) of `config` for `target`; reports memory and fit.

    Args:
      config: the run config `jaxlora train` would use (model.path may be a folder, a hub id or a SHAPES name).
      target: "v5p-32", "v5:2x2x4", "cpu8", ... (see TARGET_FORMS).
      num_slices: TPU slices joined over DCN (the devices of all slices form the mesh, as on a multislice pod).
      micro_batch: micro-batch rows per chip (per data shard); default config.train.micro_batch_size / (data x fsdp).
      search: also find the largest micro-batch per chip that fits (compiling each candidate).
      remat: override config.model.remat ("none", "save_matmuls", "full").
      mesh: override config.mesh.
      lora_ga_steps: also compile LoRA-GA's exact and streaming estimation steps (config.lora.lora_ga_config or the
        defaults).
      search_remat / search_mesh: also search the remat policies / (fsdp, tensor) splits for the largest micro-batch.
      hbm_bytes: per-chip memory budget (default: the chip's HBM; a CPU device's share of host memory).
      max_micro_batch: the search's upper bound per chip.
      hf_config: the model's HF config dict (default: read from config.model.path).
    Returns:
      A PlanReport (`.format()` for the text, `.to_dict()` for JSON).
    """
    tgt = resolve_target(target, num_slices)
    devices = target_devices(tgt)
    mesh_cfg = mesh or config.mesh
    jmesh = _make_mesh(mesh_cfg, devices, tgt)
    budget = hbm_bytes or tgt.hbm_bytes
    planner = _Planner(config, jmesh, remat, budget, hf_config)
    model = planner.model
    log.info("planning %s on %s, mesh %s", config.model.path, tgt.describe(), dict(jmesh.shape))
    if micro_batch is None:
        global_mb = config.train.micro_batch_size
        if global_mb % planner.divisor:
            raise PlanError(f"train.micro_batch_size={global_mb} is not a multiple of the mesh's data x fsdp = "
                            f"{planner.divisor} (mesh {dict(jmesh.shape)}); pass a micro-batch per chip "
                            f"(--micro-batch) or set train.micro_batch_size to a multiple of {planner.divisor}")
        micro_batch = global_mb // planner.divisor
    train = planner.train(micro_batch)
    largest, message = None, ""
    if search or not train.fits:
        largest, first = planner.largest_micro_batch(max_micro_batch)
        if largest is None:
            need = f"{fmt_bytes(first.peak)}/chip, " if first.peak else ""
            message = (f"does not fit: micro-batch 1 per chip needs {need}{fmt_bytes(first.over_bytes)} over "
                       f"the {fmt_bytes(budget)} per chip of {tgt.name}; use more chips or slices, a larger "
                       f"fsdp split, model.remat: full, or a shorter data.max_length")
    report = PlanReport(tgt, config.model.path, model.config.num_params, dict(jmesh.shape), model.module.remat,
                        planner.seq_len, budget, train, largest, message=message)
    if lora_ga_steps:
        report.lora_ga_exact = planner.lora_ga_exact()
        report.lora_ga_streaming = planner.lora_ga_streaming()
    if search_remat or search_mesh:
        report.search = _search(config, devices, tgt, budget, mesh_cfg, remat or config.model.remat, search_remat,
                                search_mesh, max_micro_batch, hf_config)
    return report


def _make_mesh(mesh_cfg: sharding.MeshConfig, devices, tgt: Target):
    try:
        return sharding.make_mesh(mesh_cfg, devices)
    except ValueError as e:
        raise PlanError(f"{e} on {tgt.describe()}; choose mesh sizes whose product is {len(devices)} "
                        f"(or set one of them to -1)") from None


def _search(config, devices, tgt, budget, mesh_cfg, remat, search_remat, search_mesh, cap, hf_config) -> list:
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
            best, _ = _Planner(config, jmesh, r, budget, hf_config).largest_micro_batch(cap)
            results.append({"remat": r, "mesh": dict(jmesh.shape), "largest": best.per_chip if best else 0,
                            "peak_gib": best.peak / GiB if best else None})
    return sorted(results, key=lambda d: -d["largest"])


# ------------------------------------------------------------------------------------------------ README table

TABLE_MODELS = ("llama-2-7b", "llama-2-13b", "llama-3-70b")
TABLE_TARGETS = (("v4-32", 1), ("v5e-16", 1), ("v5p-32", 1), ("v5p-32", 2))


def table_config(shape: str, num_slices: int = 1) -> RunConfig:
    """The table's run: bf16 base, LoRA r=16 (alpha 32) on all linear layers, sequence 2048, remat save_matmuls,
    FSDP over the chips of a slice and data parallelism across slices; LoRA-GA with its defaults (2 x 2048 batches,
    packed one row per chip; streaming sketch rank 6r = 96)."""
    from jaxlora.config import ModelConfig, TrainConfig
    from jaxlora.training.data import DataConfig
    return RunConfig(model=ModelConfig(path=shape, dtype="bfloat16", param_dtype="bfloat16", remat="save_matmuls"),
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


# ------------------------------------------------------------------------------------------------ command line


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
    c.add_argument("--remat", choices=("none", "save_matmuls", "full"), default=None, help="override model.remat")
    c.add_argument("--search-remat", action="store_true", help="also search the remat policies")
    c.add_argument("--search-mesh", action="store_true", help="also search (fsdp, tensor) splits")
    c.add_argument("--no-lora-ga", action="store_true", help="skip LoRA-GA's estimation steps")
    c.add_argument("--hbm-gib", type=float, default=None, help="per-chip memory budget (default: the chip's HBM)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--table", action="store_true", help="compute the README table (7B/13B/70B on v4-32, v5e-16, "
                                                       "v5p-32, 2 x v5p-32) and write it to --out")
    c.add_argument("--out", default="docs/plan_table.md", help="where --table writes")
    c.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_plan_command(args) -> int:
    """0 when the run fits, 1 when it does not; bad input raises (the CLI prints one line and exits 2)."""
    if args.table:
        text = table(max_micro_batch=args.max_micro_batch)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# `jaxlora plan --table`\n\n" + text)
        print(text + f"\nwritten to {args.out}")
        return 0
    if not args.config:
        raise PlanError("jaxlora plan needs --config (or --table)")
    from jaxlora.config import load_run_config
    config = load_run_config(args.config, args.overrides)
    report = plan(config, args.target, num_slices=args.slices, micro_batch=args.micro_batch,
                  search=not args.no_search, remat=args.remat, lora_ga_steps=not args.no_lora_ga,
                  search_remat=args.search_remat, search_mesh=args.search_mesh,
                  hbm_bytes=int(args.hbm_gib * GiB) if args.hbm_gib else None,
                  max_micro_batch=args.max_micro_batch)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.format())
    return 0 if report.fits else 1
