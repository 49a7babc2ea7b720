"""The leaf of a LoRA tree: one adapted kernel's factors, with its scale carried as static metadata.

A LoRA tree mirrors the base params down to each targeted module and holds a `LoraWeights` there:

    params["model"]["layers"]["self_attn"]["q_proj"] = {"kernel": (L, in, out)}
    lora  ["model"]["layers"]["self_attn"]["q_proj"] = LoraWeights(a=(L, in, r), b=(L, r, out), scale=s)

Only `a` and `b` are pytree leaves (trained, checkpointed, given optimizer state); `scale` (alpha/r or
alpha/sqrt(r)) and `dropout` are static, so every model call knows how to apply the adapter with no config at hand
and a jit recompiles if they change. `a0`/`b0` (the initial factors of a base-modifying init such as LoRA-GA,
frozen) are optional leaves used when exporting relative to the original base.
"""

from __future__ import annotations

from typing import Any

from flax import struct


@struct.dataclass
class LoraWeights:
    a: Any  # (..., in, r)
    b: Any  # (..., r, out)
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


def is_lora_leaf(x) -> bool:
    return isinstance(x, LoraWeights)
