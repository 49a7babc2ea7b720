"""The optimizer: one optax transformation over the trainable tree, with per-group learning rates.

The trainable tree is `{"lora": <LoRA tree>, "full": <modules_to_save params>}`; the frozen base is not in it, so
it has no optimizer state by construction. Each leaf gets a label and `optax.multi_transform` routes it:

    lora a -> "lora_a": AdamW(lr)
    lora b -> "lora_b": AdamW(lr * loraplus_lr_ratio)        (LoRA+, arXiv 2402.12354; ratio 1 = plain LoRA)
    full   -> "full":   AdamW(modules_to_save_lr or lr)

LoRA-GA's initial factors a0/b0 are not in the trainable tree (`TrainState.frozen`), so they have no state at all.

wrapped in global-norm gradient clipping. Schedules: linear warmup, then cosine, linear or constant.

fp16 (model.dtype float16) trains with dynamic loss scaling, DeepSpeed's `DynamicLossScaler` as its fp16 config sets
it (initial_scale_power 16, loss_scale_window 1000, hysteresis 2, min_loss_scale 1): `LossScale` is part of the train
state (checkpointed, so a resume continues with the same scale), `update_loss_scale` its rule. A step whose
gradients are not finite is skipped (no update; the optimizer state, and so the schedule's count, unchanged); after
`hysteresis` such steps the scale halves (not below the minimum), and after `window` iterations without one it
doubles. An overflow with the scale already at the minimum and no hysteresis left is where DeepSpeed raises
("Current loss scale already at minimum"): the step reports it as `loss_scale_exhausted` and the trainer stops.
optax offers `apply_if_finite` (skips non-finite updates, counts them) but no scale, hysteresis or growth window,
and jmp (last release 0.0.4, January 2023) has a DynamicLossScale without hysteresis; the rule is a dozen lines.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import struct

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 2e-4  # peak learning rate of the LoRA factors
    schedule: str = "cosine"  # decay after warmup: cosine, linear or constant
    warmup_steps: int = 0  # linear warmup from 0; if 0, warmup_ratio * total steps is used
    warmup_ratio: float = 0.0  # warmup as a fraction of the total steps (used when warmup_steps is 0)
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables
    loraplus_lr_ratio: float = 1.0  # LoRA+: b's learning rate = learning_rate * this ratio
    modules_to_save_lr: float | None = None  # learning rate of fully trained modules (default: learning_rate)
    offload_state: bool = False  # keep the optimizer state in pinned host memory between steps (ZeRO-offload's
    #                              saving, via memory kinds); it visits the device for each update
    # fp16 dynamic loss scaling (used when model.dtype is float16; DeepSpeed's fp16 config names in brackets)
    loss_scale_init: float = 2.0 ** 16  # the first scale (2 ** initial_scale_power)
    loss_scale_window: int = 1000  # iterations without an overflow before the scale doubles (loss_scale_window)
    loss_scale_hysteresis: int = 2  # overflows before the scale halves (hysteresis)
    loss_scale_min: float = 1.0  # the scale never goes below this (min_loss_scale)

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.loraplus_lr_ratio <= 0:
            raise ValueError(f"loraplus_lr_ratio must be positive, got {self.loraplus_lr_ratio}")
        if not 0 < self.loss_scale_min <= self.loss_scale_init:
            raise ValueError(f"loss_scale_min must be positive and at most loss_scale_init, got {self.loss_scale_min} "
                             f"and {self.loss_scale_init}")
        for name in ("loss_scale_window", "loss_scale_hysteresis"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def make_schedule(cfg: OptimConfig, total_steps: int, peak: float) -> optax.Schedule:
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def param_labels(trainable) -> dict:
    """'lora_a' / 'lora_b' / 'full' for every leaf of the trainable tree."""
    def label(path, _):
        if path[0].key == "full":
            return "full"
        name = getattr(path[-1], "name", None)
        return "lora_b" if name == "b" else "lora_a"
    return jax.tree_util.tree_map_with_path(label, trainable)


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   trainable=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer over the trainable tree, and the base learning-rate schedule (for logging).

    With `trainable`, only the groups its leaves use are built, so a run carries no state (nor checkpoint entries)
    for groups it has no parameters in (e.g. "full" without modules_to_save).
    """
    def adamw(peak):
        return optax.adamw(make_schedule(cfg, total_steps, peak), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay)
    lr = cfg.learning_rate
    groups = {"lora_a": lambda: adamw(lr), "lora_b": lambda: adamw(lr * cfg.loraplus_lr_ratio),
              "full": lambda: adamw(cfg.modules_to_save_lr or lr)}
    used = set(jax.tree.leaves(param_labels(trainable))) if trainable is not None else set(groups)
    groups = {name: make() for name, make in groups.items() if name in used}
    tx = optax.multi_transform(groups, param_labels)
    if cfg.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    return tx, make_schedule(cfg, total_steps, lr)


class LossScale(struct.PyTreeNode):
    """fp16's dynamic loss scale: part of the train state (`TrainState.loss_scale`), so it is checkpointed."""

    scale: jax.Array  # float32: the loss is multiplied by this before the backward pass, the gradients divided
    since_overflow: jax.Array  # int32: iterations since the last overflow, counting this one (DeepSpeed's
    #                            cur_iter - last_overflow_iter; 1 at the first step)
    hysteresis: jax.Array  # int32: overflows still tolerated before the scale halves
    skipped: jax.Array  # int32: steps skipped so far (non-finite gradients)


def init_loss_scale(cfg: OptimConfig) -> LossScale:
    return LossScale(scale=jnp.float32(cfg.loss_scale_init), since_overflow=jnp.int32(1),
                     hysteresis=jnp.int32(cfg.loss_scale_hysteresis), skipped=jnp.int32(0))


def update_loss_scale(ls: LossScale, finite: jax.Array, cfg: OptimConfig) -> tuple[LossScale, jax.Array]:
    """(the scale state after a step whose gradients were `finite` or not, whether the scale is exhausted: an
    overflow that should halve a scale already at its minimum). DeepSpeed's DynamicLossScaler.update_scale with
    delayed_shift = hysteresis and consecutive_hysteresis off: hysteresis is restored only when the scale grows."""
    halve = ~finite & (ls.hysteresis <= 1)
    exhausted = halve & (ls.scale <= cfg.loss_scale_min)
    grow = finite & (ls.since_overflow % cfg.loss_scale_window == 0)
    scale = jnp.where(halve, jnp.maximum(ls.scale / 2, jnp.float32(cfg.loss_scale_min)),
                      jnp.where(grow, ls.scale * 2, ls.scale))
    hysteresis = jnp.where(grow, jnp.int32(cfg.loss_scale_hysteresis),
                           jnp.where(finite | halve, ls.hysteresis, ls.hysteresis - 1))
    return LossScale(scale=scale, since_overflow=jnp.where(finite, ls.since_overflow + 1, jnp.int32(1)),
                     hysteresis=hysteresis, skipped=ls.skipped + (~finite).astype(jnp.int32)), exhausted
