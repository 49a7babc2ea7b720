"""The pure training step: `train_step(params, state, batch) -> (state, metrics)`, jitted once per batch shape.

    params   frozen base (an argument, never donated, never differentiated, never updated)
    state    TrainState(step, trainable={"lora": ..., "full": ...}, frozen, opt_state, rng, loss_scale) -- donated
    batch    {"input_ids", "attention_mask", "labels"}: (accum * micro, T), sharded over (data, fsdp)

Gradient accumulation is a `lax.scan` over micro-batches inside the one compiled step. The loss is the model
family's objective (`jaxlora.losses`), a mean over the labelled targets of the whole accumulated batch. Only the
trainable tree is differentiated: the frozen kernels get no weight-gradient computation, and `state.frozen` (LoRA-GA's
initial factors a0/b0, joined to the adapters for the forward) gets neither gradients nor optimizer state.

With fp16 compute (`loss_scale`: the run's OptimConfig) each micro-batch's mean loss is multiplied by the dynamic
loss scale (`state.loss_scale`, `jaxlora.training.optim.LossScale`) before the backward pass and its gradient
unscaled in float32 as it is accumulated; a step with non-finite gradients leaves the adapters and the optimizer
state as they were, and the metrics say so: "loss_scale" (the scale this step used), "skipped" (1.0 or 0.0),
"loss_scale_exhausted" (1.0: an overflow at the minimum scale, where the trainer stops). Without fp16
`loss_scale` is None and a checkpoint of the state has the layout it had before loss scaling existed.

`jaxlora.training.build.build_training` jits these with their shardings; nothing else builds a step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import serialization, struct

from jaxlora import lora as lora_lib
from jaxlora.training import optim
from jaxlora.sharding import place_batch  # noqa: F401  (the batch placement steps are called with)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    trainable: Any  # {"lora": LoRA tree (a, b), "full": modules_to_save params}: differentiated, optimized
    frozen: Any  # {"lora": offsets a0/b0 of inits relative to the base (LoRA-GA)} or {}: checkpointed, never trained
    opt_state: Any
    rng: jax.Array
    loss_scale: Any = None  # fp16: the dynamic loss scale (optim.LossScale), checkpointed; None otherwise


def _state_to_dict(state: TrainState) -> dict:
    out = {f.name: serialization.to_state_dict(getattr(state, f.name)) for f in dataclasses.fields(state)}
    if state.loss_scale is None:  # without fp16 a checkpoint keeps the layout it had before loss scaling existed
        del out["loss_scale"]
    return out


def _state_from_dict(target: TrainState, state: dict) -> TrainState:
    values = {}
    for f in dataclasses.fields(target):
        if f.name == "loss_scale" and target.loss_scale is None:
            continue
        if f.name not in state:
            raise ValueError(f"Missing field {f.name} in state dict while restoring an instance of TrainState")
        values[f.name] = serialization.from_state_dict(getattr(target, f.name), state[f.name], name=f.name)
    return target.replace(**values)


serialization.register_serialization_state(TrainState, _state_to_dict, _state_from_dict, override=True)


def adapters(trainable, frozen) -> dict:
    """{"lora": the LoRA tree the model applies (trainable a, b joined with frozen a0, b0), "full": ...}."""
    offsets = frozen.get("lora") if frozen else None
    return {"lora": lora_lib.with_offsets(trainable["lora"], offsets), "full": trainable["full"]}


def adapter_loss(model) -> Callable:
    """(adapters, params, batch, rng, deterministic) -> (loss sum, target count) of the model with those adapters."""
    def loss_sums(adapters_, params, batch, rng, deterministic: bool):
        effective = lora_lib.overlay(params, adapters_["full"])
        return model.loss_sums(effective, batch, adapters_["lora"], deterministic=deterministic, dropout_rng=rng)
    return loss_sums


def make_train_step(model, tx: optax.GradientTransformation, schedule, grad_accum_steps: int,
                    offloaded_opt_shardings=None, loss_scale: optim.OptimConfig | None = None) -> Callable:
    """The un-jitted step (`build_training` jits it). With `offloaded_opt_shardings` (the optimizer state's
    pinned-host shardings) the state is brought to the device for the update and sent back after it. With
    `loss_scale` (the OptimConfig whose loss_scale_* fields apply) the step scales the loss dynamically (fp16)."""
    loss_sums = adapter_loss(model)
    to_device = to_host = lambda tree: tree
    if offloaded_opt_shardings is not None:
        on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), offloaded_opt_shardings)
        to_device = lambda tree: jax.device_put(tree, on_device)
        to_host = lambda tree: jax.device_put(tree, offloaded_opt_shardings)

    def train_step(params, state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        scale = state.loss_scale.scale if loss_scale is not None else None

        def micro_loss(trainable, mb, rng_i):
            ls, n = loss_sums(adapters(trainable, state.frozen), params, mb, rng_i, False)
            if scale is None:
                return ls, (ls, n)
            return ls * (scale / jnp.maximum(n, 1.0)), (ls, n)  # the scaled mean: its backward runs in fp16

        def accumulate(carry, xs):
            grads, loss_sum, count = carry
            mb, i = xs
            (_, (ls, n)), g = jax.value_and_grad(micro_loss, has_aux=True)(
                state.trainable, mb, jax.random.fold_in(step_rng, i))
            if scale is not None:  # back to the gradient of the loss sum, in float32
                g = jax.tree.map(lambda x: x * (jnp.maximum(n, 1.0) / scale), g)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + ls, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (grads, loss_sum, count), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(grad_accum_steps)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        old_opt_state = to_device(state.opt_state)
        updates, opt_state = tx.update(grads, old_opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state.step)}
        new_scale = None
        if loss_scale is not None:
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            trainable, opt_state = keep(trainable, state.trainable), keep(opt_state, old_opt_state)
            new_scale, exhausted = optim.update_loss_scale(state.loss_scale, finite, loss_scale)
            metrics |= {"loss_scale": scale, "skipped": 1.0 - finite.astype(jnp.float32),
                        "loss_scale_exhausted": exhausted.astype(jnp.float32)}
        opt_state = to_host(opt_state)
        return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng,
                             loss_scale=new_scale), metrics

    return train_step


def make_eval_step(model) -> Callable:
    """(params, adapters, batch) -> (loss sum, target count), dropout off; `adapters` as `adapters()` joins them."""
    loss_sums = adapter_loss(model)

    def eval_step(params, adapters_, batch):
        return loss_sums(adapters_, params, batch, None, True)
    return eval_step
