"""The one training build: everything a run trains with, from a model and a run config.

    training = build_training(model, run_config, total_steps=1000)             # concrete: arrays in their shardings
    state, metrics = training.train_step(training.params, training.state, batch)
    loss_sum, count = training.eval_step(training.params, training.adapters(state), batch)

    plan = build_training(model, run_config, total_steps=1000, abstract=True)  # ShapeDtypeStructs, nothing allocated
    plan.train_step.lower(plan.params, plan.state, batch_struct).compile()

`jaxlora train`, `jaxlora plan`, the scripts and the tests all call `build_training`, so the planner compiles what
the trainer runs by construction. It resolves the LoRA targets, builds the trainable tree (LoRA factors + float32
copies of `modules_to_save`) and LoRA-GA's frozen offsets, the optimizer (`jaxlora.training.optim`), the shardings
of every part of the state (optimizer moments sharded like their parameters; in pinned host memory with
`optim.offload_state`), and jits the step (`jaxlora.training.step`) with explicit in/out shardings and the state
donated. The frozen base is `model.params`, untouched: LoRA-GA's update is relative to it (`jaxlora.lora.weights`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxlora import lora as lora_lib, quant, sharding
from jaxlora.lora.inits.dora import add_magnitudes, magnitude_sharding
from jaxlora.training import optim
from jaxlora.training import step as step_lib
from jaxlora.training.step import TrainState


class Training(NamedTuple):
    """What a run trains with. `state` and `params` are arrays, or ShapeDtypeStructs with shardings (abstract)."""

    params: Any  # the frozen base (model.params, never modified)
    state: TrainState
    state_shardings: TrainState
    train_step: Callable  # jitted (params, state, batch) -> (state, metrics); the state is donated
    eval_step: Callable  # jitted (params, adapters, batch) -> (loss sum, target count)
    targets: list  # the adapted kernels (jaxlora.lora.Target)
    tx: optax.GradientTransformation
    schedule: optax.Schedule

    def adapters(self, state: TrainState | None = None) -> dict:
        """{"lora": the LoRA tree to apply or export (a0/b0 joined), "full": modules_to_save} of `state`."""
        state = self.state if state is None else state
        return step_lib.adapters(state.trainable, state.frozen)


def initial_lora(model, config, rng, *, lora_ga_batches=None, template: bool = False, progress: bool = False):
    """The LoRA tree a run starts from: PEFT's init, LoRA-GA's or LoRA-One's (estimated on `lora_ga_batches`), PiSSA's
    or OLoRA's (from the weights), with DoRA's magnitudes if `lora.use_dora`; with `template` a tree of that shape to
    restore a checkpoint into (nothing is estimated)."""
    lc = config.lora
    if lc.init_lora_weights in (True, False, "gaussian"):  # DoRA's magnitudes added here: a template has no weights
        lora = lora_lib.init_lora(model, dataclasses.replace(lc, use_dora=False), rng)
        return add_magnitudes(model, lora, template=template) if lc.use_dora else lora
    if lc.init_lora_weights != "lora_ga":  # PiSSA, OLoRA, LoRA-One (jaxlora.lora.inits)
        from jaxlora.lora import inits
        lora = inits.initial_tree(model, lc, batches=lora_ga_batches, template=template, progress=progress,
                                  seed=config.train.seed)
        return add_magnitudes(model, lora, template=True) if lc.use_dora and template else lora  # LoRA-One + DoRA
    from jaxlora.lora import ga as lora_ga
    if template:
        return lora_ga.lora_ga_template(model, lc)
    if lora_ga_batches is None:
        raise lora_lib.LoraGAError("init_lora_weights='lora_ga' needs estimation batches (lora_ga_batches)")
    return lora_ga.lora_ga_init(model, lc, lora_ga_batches, progress=progress)


def modules_to_save(model, config, params=None) -> dict:
    """Float32 (lora_dtype) copies of the modules trained fully (`lora.modules_to_save`)."""
    params = model.params if params is None else params
    full = lora_lib.split_modules_to_save(params, config.lora.modules_to_save)
    if quant.has_quantized(full):
        raise ValueError(f"modules_to_save {list(config.lora.modules_to_save)} selects quantized kernels "
                         f"({model.quantization.kind}), which stay frozen: adapt them with LoRA, or train modules "
                         f"outside the transformer blocks (e.g. lm_head, embed_tokens)")
    dtype = jnp.dtype(config.lora.lora_dtype)
    cast = lambda x: (jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype))
    return jax.tree.map(cast, full)


def tree_targets(model, lora) -> list:
    """The targets (path, rank, scale) a LoRA tree adapts, read from the tree itself."""
    stack = model.names.stack_name
    return [lora_lib.Target(p, w.rank, w.scale, stacked=stack in p) for p, w in lora_lib.lora_items(lora)]


def trainable_shardings(model, trainable) -> dict:
    """{"lora": a/b shardings of the tree's targets (a follows its kernel's input dim, b its output dim), "full": the
    modules_to_save params' own shardings}, with each LoRA leaf's static scale and dropout as in `trainable`."""
    flat_sh = traverse_util.flatten_dict(model.param_shardings)
    full_tree = trainable["full"]
    full_sh = traverse_util.unflatten_dict({p: flat_sh[p] for p in traverse_util.flatten_dict(full_tree)}) \
        if full_tree else {}
    items = lora_lib.lora_items(trainable["lora"])
    sh = dict(lora_lib.lora_items(model.lora_shardings(tree_targets(model, trainable["lora"]), lora_lib.LoraConfig())))
    lora_sh = traverse_util.unflatten_dict({p: lora_lib.LoraWeights(
        sh[p].a, sh[p].b, m=None if w.m is None else magnitude_sharding(sh[p].b, w.b.ndim), scale=w.scale,
        dropout=w.dropout) for p, w in items})
    return {"lora": lora_sh, "full": full_sh}


def frozen_shardings(lora_shardings, frozen) -> dict:
    """Shardings of the frozen offsets: a0 like a, b0 like b."""
    if not frozen:
        return {}
    by_path = dict(lora_lib.lora_items(lora_shardings))
    return {"lora": traverse_util.unflatten_dict({p: by_path[p] for p, _ in lora_lib.lora_items(frozen["lora"])})}


def opt_state_shardings(opt_state_abstract, trainable_shardings_, mesh) -> Any:
    """Optimizer moments take their parameter's sharding (matched by key-path suffix); counters are replicated."""
    by_path = {tuple(map(str, p)): s for p, s in jax.tree_util.tree_leaves_with_path(trainable_shardings_)}

    def pick(path, leaf):
        keys = tuple(map(str, path))
        for i in range(len(keys)):
            s = by_path.get(keys[i:])
            if s is not None and len(s.spec) <= leaf.ndim:
                return s
        return sharding.replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, opt_state_abstract)


def state_shardings(state_abstract: TrainState, trainable_sh, frozen_sh, mesh, offload: bool = False) -> TrainState:
    """Shardings of the TrainState; with `offload`, the optimizer state's are in pinned host memory."""
    rep = sharding.replicated(mesh)
    opt = opt_state_shardings(state_abstract.opt_state, trainable_sh, mesh)
    if offload:
        opt = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt)
    return TrainState(step=rep, trainable=trainable_sh, frozen=frozen_sh, opt_state=opt, rng=rep,
                      loss_scale=jax.tree.map(lambda _: rep, state_abstract.loss_scale))


def _struct(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build_training(model, config, *, total_steps: int, rngs: tuple | None = None, lora=None, lora_ga_batches=None,
                   trainable: dict | None = None, template: bool = False, abstract: bool = False,
                   tx: optax.GradientTransformation | None = None, progress: bool = False,
                   batch_rows: int | None = None) -> Training:
    """Params, state, shardings, the jitted train and eval steps, the targets and the optimizer of one run.

    Args:
      model: a `jaxlora.Model` (with `abstract`, its params may be None: only shapes are used).
      config: a `RunConfig` (its lora, optim and train.grad_accum_steps / train.seed sections are read).
      total_steps: the schedule's length.
      rngs: (init key, state key); default: split(PRNGKey(config.train.seed)), as `jaxlora train`.
      lora: a LoRA tree to train instead of a fresh init (e.g. from `lora_ga_init` or `import_peft`).
      lora_ga_batches: LoRA-GA's estimation batches, for a config with init_lora_weights="lora_ga".
      trainable: a whole {"lora", "full"} tree to train instead (e.g. full fine-tuning: {"lora": {}, "full": params}).
      template: shape a LoRA-GA tree without estimating (its values come from the checkpoint being restored).
      abstract: ShapeDtypeStructs carrying their shardings instead of arrays (for AOT compilation, `jaxlora plan`).
      tx: an optimizer instead of `config.optim`'s (its schedule is still the one logged).
      batch_rows: the global batch rows, when the mesh's batch axes may not divide them (then batches are
        replicated, as `sharding.batch_sharding` does); default: sharded over (data, fsdp).
    """
    tc = config.train
    init_rng, state_rng = rngs if rngs is not None else jax.random.split(jax.random.PRNGKey(tc.seed))
    if abstract and (lora is not None or trainable is not None):  # given as shape structs: nothing to trace
        trainable_, frozen = _initial_trainable(model, config, model.abstract_params, init_rng, lora, None,
                                                trainable, True, progress)
    elif abstract:
        build = lambda params, rng: _initial_trainable(model, config, params, rng, None, None, None, True, progress)
        trainable_, frozen = jax.eval_shape(build, model.abstract_params, init_rng)
    else:
        trainable_, frozen = _initial_trainable(model, config, model.params, init_rng, lora, lora_ga_batches,
                                                trainable, template, progress)
    default_tx, schedule = optim.make_optimizer(config.optim, total_steps, trainable_)
    tx = tx or default_tx
    targets = tree_targets(model, trainable_["lora"])
    trainable_sh = trainable_shardings(model, trainable_)
    frozen_sh = frozen_shardings(trainable_sh["lora"], frozen)
    offload = config.optim.offload_state
    fp16 = jnp.dtype(model.module.dtype) == jnp.float16  # fp16 compute: dynamic loss scaling (optim.LossScale)

    def make(trainable_tree, frozen_tree, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable_tree, frozen=frozen_tree,
                          opt_state=tx.init(trainable_tree), rng=rng,
                          loss_scale=optim.init_loss_scale(config.optim) if fp16 else None)

    state_abstract = jax.eval_shape(make, trainable_, frozen, state_rng)
    state_sh = state_shardings(state_abstract, trainable_sh, frozen_sh, model.mesh, offload)
    if abstract:
        state = _struct(state_abstract, state_sh)
        params = _struct(model.abstract_params, model.param_shardings)
    else:
        on_device = state_shardings(state_abstract, trainable_sh, frozen_sh, model.mesh)
        state = jax.jit(make, out_shardings=on_device)(trainable_, frozen, state_rng)
        state = jax.device_put(state, state_sh) if offload else state
        params = model.params
    step_fn = step_lib.make_train_step(model, tx, schedule, tc.grad_accum_steps,
                                       state_sh.opt_state if offload else None,
                                       loss_scale=config.optim if fp16 else None)
    batch_sh, rep = sharding.batch_sharding(model.mesh, batch_size=batch_rows), sharding.replicated(model.mesh)
    train_step = jax.jit(step_fn, in_shardings=(model.param_shardings, state_sh, batch_sh),
                         out_shardings=(state_sh, rep), donate_argnums=(1,))
    adapter_sh = step_lib.adapters(trainable_sh, frozen_sh)
    eval_step = jax.jit(step_lib.make_eval_step(model), in_shardings=(model.param_shardings, adapter_sh, batch_sh),
                        out_shardings=rep)
    return Training(params, state, state_sh, train_step, eval_step, targets, tx, schedule)


def _initial_trainable(model, config, params, rng, lora, lora_ga_batches, trainable, template, progress):
    """(trainable {"lora": a/b, "full": modules_to_save}, frozen {"lora": a0/b0} or {})."""
    if trainable is None:
        if lora is None:
            lora = initial_lora(model, config, rng, lora_ga_batches=lora_ga_batches, template=template,
                                progress=progress)
        trainable = {"lora": lora, "full": modules_to_save(model, config, params)}
    lora_ab, offsets = lora_lib.split_offsets(trainable["lora"])
    return {"lora": lora_ab, "full": trainable["full"]}, ({"lora": offsets} if offsets else {})
