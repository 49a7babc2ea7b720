"""The pure training step: `train_step(params, state, batch) -> (state, metrics)`, jitted once per batch shape.

    params   frozen base (an argument, never donated, never differentiated, never updated)
    state    TrainState(step, trainable={"lora": ..., "full": ...}, frozen, opt_state, rng)   -- donated
    batch    {"input_ids", "attention_mask", "labels"}: (accum * micro, T), sharded over (data, fsdp)

Gradient accumulation is a `lax.scan` over micro-batches inside the one compiled step. The loss is the model
family's objective (`jaxlora.losses`), a mean over the labelled targets of the whole accumulated batch. Only the
trainable tree is differentiated: the frozen kernels get no weight-gradient computation, and `state.frozen` (LoRA-GA's
initial factors a0/b0, joined to the adapters for the forward) gets neither gradients nor optimizer state.

`jaxlora.training.build.build_training` jits these with their shardings; nothing else builds a step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxlora import lora as lora_lib
from jaxlora.sharding import place_batch  # noqa: F401  (the batch placement steps are called with)


class TrainState(struct.PyTreeNode):
    step: jax.Array
    trainable: Any  # {"lora": LoRA tree (a, b), "full": modules_to_save params}: differentiated, optimized
    frozen: Any  # {"lora": offsets a0/b0 of inits relative to the base (LoRA-GA)} or {}: checkpointed, never trained
    opt_state: Any
    rng: jax.Array


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
                    offloaded_opt_shardings=None) -> Callable:
    """The un-jitted step (`build_training` jits it). With `offloaded_opt_shardings` (the optimizer state's
    pinned-host shardings) the state is brought to the device for the update and sent back after it."""
    loss_sums = adapter_loss(model)
    to_device = to_host = lambda tree: tree
    if offloaded_opt_shardings is not None:
        on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), offloaded_opt_shardings)
        to_device = lambda tree: jax.device_put(tree, on_device)
        to_host = lambda tree: jax.device_put(tree, offloaded_opt_shardings)

    def train_step(params, state: TrainState, batch):
        rng, step_rng = jax.random.split(state.rng)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def micro_loss(trainable, mb, rng_i):
            return loss_sums(adapters(trainable, state.frozen), params, mb, rng_i, False)

        def accumulate(carry, xs):
            grads, loss_sum, count = carry
            mb, i = xs
            (ls, n), g = jax.value_and_grad(micro_loss, has_aux=True)(
                state.trainable, mb, jax.random.fold_in(step_rng, i))
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
    """(params, adapters, batch) -> (loss sum, target count), dropout off; `adapters` as `adapters()` joins them."""
    loss_sums = adapter_loss(model)

    def eval_step(params, adapters_, batch):
        return loss_sums(adapters_, params, batch, None, True)
    return eval_step
