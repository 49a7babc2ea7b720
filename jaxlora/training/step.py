"""The pure training step: `train_step(params, state, batch) -> (state, metrics)`, jitted once per batch shape.

    params   frozen base (an argument, never donated, never differentiated, never updated)
    state    TrainState(step, trainable={"lora": ..., "full": ...}, opt_state, rng)   -- donated
    batch    {"input_ids", "attention_mask", "labels"}: (accum * micro, T), sharded over (data, fsdp)

Gradient accumulation is a `lax.scan` over micro-batches inside the one compiled step. The loss is the mean
next-token cross entropy over tokens whose label is not -100 (prompt and padding), taken over the whole accumulated
batch. Only the trainable tree is differentiated, so the frozen kernels get no weight-gradient computation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlora import lora as lora_lib, sharding
from jaxlora.losses import IGNORE_INDEX, next_token_loss_sums as token_loss_sums  # noqa: F401



class TrainState(struct.PyTreeNode):
    step: jax.Array
    trainable: Any  # {"lora": LoRA tree, "full": modules_to_save params}
    opt_state: Any
    rng: jax.Array


def make_loss_fn(model) -> Callable:
    def loss_sums(trainable, params, batch, rng, deterministic: bool):
        effective = lora_lib.overlay(params, trainable["full"])
        return model.loss_sums(effective, batch, trainable["lora"], deterministic=deterministic, dropout_rng=rng)
    return loss_sums


def make_train_step(model, tx: optax.GradientTransformation, schedule, grad_accum_steps: int,
                    offloaded_opt_shardings=None) -> Callable:
    """The un-jitted step; see `jit_train_step` for shardings and donation. With `offloaded_opt_shardings` (the
    optimizer state's pinned-host shardings, `state_shardings(..., offload=True).opt_state`) the state is brought
    to the device for the update and sent back after it."""
    loss_sums = make_loss_fn(model)
    to_device = to_host = lambda tree: tree
    if offloaded_opt_shardings is not None:
        on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), offloaded_opt_shardings)
        to_device = lambda tree: jax.device_put(tree, on_device)
        to_host = lambda tree: jax.device_put(tree, offloaded_opt_shardings)

    def train_step(params, state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def accumulate(carry, xs):
            grads, loss_sum, count = carry
            mb, i = xs
            (ls, n), g = jax.value_and_grad(loss_sums, has_aux=True)(
                state.trainable, params, mb, jax.random.fold_in(step_rng, i), False)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + ls, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (grads, loss_sum, count), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(grad_accum_steps)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, to_device(state.opt_state), state.trainable)
        opt_state = to_host(opt_state)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng), metrics

    return train_step


def make_eval_step(model) -> Callable:
    loss_sums = make_loss_fn(model)

    def eval_step(params, trainable, batch):
        return loss_sums(trainable, params, batch, None, True)
    return eval_step


# ------------------------------------------------------------------------------------------------ shardings


def opt_state_shardings(opt_state_abstract, trainable_shardings, mesh) -> Any:
    """Optimizer moments take their parameter's sharding (matched by key-path suffix); counters are replicated."""
    by_path = {tuple(map(str, p)): s for p, s in jax.tree_util.tree_leaves_with_path(trainable_shardings)}

    def pick(path, leaf):
        keys = tuple(map(str, path))
        for i in range(len(keys)):
            s = by_path.get(keys[i:])
            if s is not None and len(s.spec) <= leaf.ndim:
                return s
        return sharding.replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, opt_state_abstract)


def state_shardings(state_abstract: TrainState, trainable_shardings, mesh, offload: bool = False) -> TrainState:
    """Shardings of the TrainState; with `offload`, the optimizer state's are in pinned host memory."""
    rep = sharding.replicated(mesh)
    opt = opt_state_shardings(state_abstract.opt_state, trainable_shardings, mesh)
    if offload:
        opt = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt)
    return TrainState(step=rep, trainable=trainable_shardings, opt_state=opt, rng=rep)


def _state_maker(tx: optax.GradientTransformation) -> Callable:
    def make(trainable, rng):
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable), rng=rng)
    return make


def init_state(trainable, tx: optax.GradientTransformation, rng: jax.Array, trainable_shardings, mesh,
               offload: bool = False):
    """TrainState placed in its shardings (optimizer moments sharded like their parameters; in pinned host memory
    with `offload`)."""
    make = _state_maker(tx)
    abstract = jax.eval_shape(make, trainable, rng)
    shardings = state_shardings(abstract, trainable_shardings, mesh, offload)
    on_device = state_shardings(abstract, trainable_shardings, mesh)
    state = jax.jit(make, out_shardings=on_device)(trainable, rng)
    return (jax.device_put(state, shardings) if offload else state), shardings


def abstract_state(trainable, tx: optax.GradientTransformation, rng, trainable_shardings, mesh,
                   offload: bool = False):
    """The TrainState `init_state` would build, as ShapeDtypeStructs carrying their shardings, and the shardings:
    what ahead-of-time compilation (`jaxlora.plan`) lowers the train step with. Nothing is allocated."""
    abstract = jax.eval_shape(_state_maker(tx), trainable, rng)
    shardings = state_shardings(abstract, trainable_shardings, mesh, offload)
    # A None sharding (LoRA-GA's a0/b0 get none from `trainable_shardings_for`) leaves the choice to jit.
    structs = jax.tree.map(lambda s, x: x if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           shardings, abstract, is_leaf=lambda s: s is None)
    return structs, shardings


def jit_train_step(step_fn, param_shardings, state_sharding, mesh) -> Callable:
    """jit with explicit in/out shardings; the state is donated (updated in place), the base is not."""
    batch = sharding.batch_sharding(mesh)
    rep = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(param_shardings, state_sharding, batch),
                   out_shardings=(state_sharding, rep), donate_argnums=(1,))


def jit_eval_step(eval_fn, param_shardings, trainable_shardings, mesh) -> Callable:
    return jax.jit(eval_fn, in_shardings=(param_shardings, trainable_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def place_batch(batch: dict, mesh) -> dict:
    """This process's rows -> global arrays sharded over (data, fsdp) (replicated if the mesh does not divide them)."""
    rows = next(iter(batch.values())).shape[0] * jax.process_count()
    shard = sharding.batch_sharding(mesh, batch_size=rows)
    return {k: jax.make_array_from_process_local_data(shard, v) for k, v in batch.items()}


def trainable_shardings_for(model, targets, lora_config, full_tree) -> dict:
    from flax import traverse_util
    flat_sh = traverse_util.flatten_dict(model.param_shardings)
    full_sh = traverse_util.unflatten_dict({p: flat_sh[p] for p in traverse_util.flatten_dict(full_tree)}) \
        if full_tree else {}
    return {"lora": model.lora_shardings(targets, lora_config), "full": full_sh}
