"""The leaf of a LoRA tree: one adapted kernel's factors, with its scale carried as static metadata.

A LoRA tree mirrors the base params down to each targeted module and holds a `LoraWeights` there:

    params["model"]["layers"]["self_attn"]["q_proj"] = {"kernel": (L, in, out)}
    lora  ["model"]["layers"]["self_attn"]["q_proj"] = LoraWeights(a=(L, in, r), b=(L, r, out), scale=s)

Only `a` and `b` are pytree leaves (trained, checkpointed, given optimizer state); `scale` (alpha/r or
alpha/sqrt(r)) and `dropout` are static, so every model call knows how to apply the adapter with no config at hand
and a jit recompiles if they change.

`a0`/`b0` are set only by inits relative to the base (LoRA-GA, PiSSA, OLoRA): the initial factors, frozen. The frozen
kernel stays the loaded W0 and the branch computes the update relative to it, s*x@(a@b - a0@b0), which is zero (to
rounding) at step 0 (a = a0, b = b0). So several such adapters share one base, the model at step 0 is the base in any
dtype, dropout needs no special case, and resume, merge and export need no residual. In a train state they sit outside
the trainable tree (`TrainState.frozen`, no gradient, no optimizer state; `jaxlora.lora.split_offsets`), and the adapter
exports to PEFT on the original weights as a' = [a, a0], b' = [b, -b0].

`m` is set only for DoRA (`jaxlora.lora.inits.dora`): a trained magnitude per output channel; the branch then rescales
the whole layer, m * (W + s*a@b) / ||W + s*a@b||_c, with the norm from `dora_norm` (never the (in, out) matrix).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class LoraWeights:
    a: Any  # (..., in, r)
    b: Any  # (..., r, out)
    a0: Any = None  # (..., in, r) initial a of an init relative to the base (LoRA-GA), frozen; None otherwise
    b0: Any = None  # (..., r, out) initial b, frozen
    m: Any = None  # (..., out) DoRA's magnitude vector, trained (`jaxlora.lora.inits.dora`); None for plain LoRA
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def relative_to_base(self) -> bool:
        """True when the update is s*(a@b - a0@b0): an init relative to the base (LoRA-GA)."""
        return self.a0 is not None


    @property
    def dora(self) -> bool:
        """True for a DoRA adapter: the output is (m / ||W + s*a@b||_c) * x@(W + s*a@b) (`jaxlora.lora.inits.dora`)."""
        return self.m is not None


def dora_norm(kernel, a, b, scale: float):
    """||W + s*a@b||_c, DoRA's norm of each output channel (column of the kernel (..., in, out)), float32 (..., out),
    without forming the (in, out) matrix W + s*a@b:

        ||W_j + s (ab)_j||^2 = ||W_j||^2 + 2s <a^T W, b>_j + s^2 <(a^T a) b, b>_j

    (a^T W is (r, out), a^T a (r, r)). Costs r*in*out multiply-adds, as forming a@b would, with no (in, out)
    temporary besides the kernel itself; the squared kernel columns are a fused reduction.
    """
    hi = jax.lax.Precision.HIGHEST
    k, a, b = (t.astype(jnp.float32) for t in (kernel, a, b))
    a_t = jnp.swapaxes(a, -1, -2)
    colsq = jnp.sum(k * k, axis=-2)
    cross = jnp.sum(b * jnp.matmul(a_t, k, precision=hi), axis=-2)
    low = jnp.sum(b * jnp.matmul(jnp.matmul(a_t, a, precision=hi), b, precision=hi), axis=-2)
    return jnp.sqrt(jnp.maximum(colsq + (2.0 * scale) * cross + (scale * scale) * low, 0.0))


def is_lora_leaf(x) -> bool:
    return isinstance(x, LoraWeights)


def low_rank_matmul(x, a, b):
    """(x @ a) @ b for activations x (..., in), a (in, r), b (r, out): the LoRA branch, without its scale.

    On XLA:CPU through `low_rank_matmul_cpu` (a custom backward, measured faster there); elsewhere plain autodiff,
    which XLA's GPU and TPU dot emitters lay out themselves (the custom backward was never measured faster there).
    """
    if jax.default_backend() == "cpu":
        return low_rank_matmul_cpu(x, a, b)
    return (x @ a) @ b


@jax.custom_vjp
def low_rank_matmul_cpu(x, a, b):
    """(x @ a) @ b with a backward laid out for XLA:CPU.

    Same math as the two dots; the custom backward only fixes how the weight gradients are laid out. Left to
    autodiff, db = (x a)^T dy contracts the (batch, seq) dims of the small x a with those of the large cotangent
    dy (..., out), and XLA:CPU materializes dy transposed ((out, B*T), one strided copy per adapted kernel and
    step) for that dot: ~40% of a LoRA layer's backward on CPU (measured, SmolLM2 MLP shapes). Here the small
    operand is the one transposed ((r, B*T)), behind an optimization barrier so XLA does not fold it back, and
    da is formed (r, in) behind another (XLA folded its transpose into the product, reading x transposed: 1.01x on
    the packed SmolLM2 step, the same losses). `python scripts/bench_low_rank.py` times it against plain autodiff;
    `tests/test_lora.py` checks its gradients and the compiled layout.
    """
    return (x @ a) @ b


def _low_rank_fwd(x, a, b):
    xa = x @ a
    return xa @ b, (x, a, b, xa)


def _low_rank_bwd(res, dy):
    x, a, b, xa = res
    dxa = dy @ b.T  # (..., r)
    rows = lambda t: t.reshape(-1, t.shape[-1])  # (B*T, features)
    xa_t, dxa_t = jax.lax.optimization_barrier((rows(xa).T, rows(dxa).T))  # (r, B*T): small
    db = xa_t @ rows(dy)  # (r, out)
    # (r, in), kept so: XLA folds a transpose of the product into it, x^T @ dxa, whose x read column-wise ran ~9x
    # slower (2.7 ms vs 0.3 ms for x (1024, 1536)); the (in, r) transpose of the small result is nothing
    da_t = jax.lax.optimization_barrier(dxa_t @ rows(x))
    return dxa @ a.T, da_t.T.astype(a.dtype), db.astype(b.dtype)


low_rank_matmul_cpu.defvjp(_low_rank_fwd, _low_rank_bwd)
