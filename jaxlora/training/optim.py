"""The optimizer: one optax transformation over the trainable tree, with per-group learning rates.

The trainable tree is `{"lora": <LoRA tree>, "full": <modules_to_save params>}`; the frozen base is not in it, so
it has no optimizer state by construction. Each leaf gets a label and `optax.multi_transform` routes it:

    lora a -> "lora_a": AdamW(lr)
    lora b -> "lora_b": AdamW(lr * loraplus_lr_ratio)        (LoRA+, arXiv 2402.12354; ratio 1 = plain LoRA)
    full   -> "full":   AdamW(modules_to_save_lr or lr)

LoRA-GA's initial factors a0/b0 are not in the trainable tree (`TrainState.frozen`), so they have no state at all.

wrapped in global-norm gradient clipping. Schedules: linear warmup, then cosine, linear or constant.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

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
