"""The leaf of a LoRA tree: one adapted kernel's factors, with its scale carried as static metadata.

A LoRA tree mirrors the base params down to each targeted module and holds a `LoraWeights` there:

    params["model"]["layers"]["self_attn"]["q_proj"] = {"kernel": (L, in, out)}
    lora  ["model"]["layers"]["self_attn"]["q_proj"] = LoraWeights(a=(L, in, r), b=(L, r, out), scale=s)

Only `a` and `b` are pytree leaves (trained, checkpointed, given optimizer state); `scale` (alpha/r or
alpha/sqrt(r)) and `dropout` are static, so every model call knows how to apply the adapter with no config at hand
and a jit recompiles if they change.

`a0`/`b0` are set only by base-modifying inits (LoRA-GA): the initial factors, whose product s*a0@b0 was subtracted
from the frozen kernel. They stay frozen (the optimizer routes them to `set_to_zero`, the forward never reads them)
and let an adapter be exported relative to the ORIGINAL base: a' = [a, a0], b' = [b, -b0].
"""

from __future__ import annotations

from typing import Any

from flax import struct


@struct.dataclass
class LoraWeights:
    a: Any  # (..., in, r)
    b: Any  # (..., r, out)
    a0: Any = None  # (..., in, r) initial a of a base-modifying init, frozen; None otherwise
    b0: Any = None  # (..., r, out) initial b, frozen
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def modifies_base(self) -> bool:
        """True when the frozen kernel holds W0 - s*a0@b0 instead of W0."""
        return self.a0 is not None


def is_lora_leaf(x) -> bool:
    return isinstance(x, LoraWeights)
