"""`QArray`: a quantized frozen kernel, standing in the param tree exactly where its dense kernel (..., in, out) stood.

    params["model"]["layers"]["mlp"]["up_proj"]["kernel"] = QArray(codes, scale, ..., kind="nf4")

It is a pytree (its arrays are the leaves, so it is jitted, sharded, sliced per layer by the scan and vmapped like
any param) that reads like the dense kernel it replaces: `.shape`, `.ndim`, `.size` and `.dtype` are the dense
kernel's, and `.astype(dtype)` dequantizes. So code that only looks at kernels' shapes (LoRA targets and shardings,
LoRA-GA's checks, FLOP counts) or casts them (merge, LoRA-GA's weight fingerprint) works unchanged, and a merge of
adapters into a quantized base yields dense, dequantized kernels. `LoraDense` dequantizes it inside the jitted
matmul. It is never trained: the base is an argument of the step, not a differentiated leaf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxlora.quant import int8, nf4

KINDS = ("int8", "nf4")


@struct.dataclass
class QArray:
    codes: Any  # int8 (..., in, out) | nf4: uint8 (..., in_pad/2, out), two codes a byte
    scale: Any  # int8: absmax (..., 1, out) | nf4: absmax (..., in_pad/64, out) f32, or its 8-bit codes (uint8)
    scale2: Any = None  # nf4 with double quantization: f32 (..., n2), the absmax of each 256 block of scale
    offset: Any = None  # nf4 with double quantization: f32 (...,), the mean absmax subtracted before it
    kind: str = struct.field(pytree_node=False, default="nf4")
    in_features: int = struct.field(pytree_node=False, default=0)  # the dense kernel's input dim (before padding)
    dtype_name: str = struct.field(pytree_node=False, default="float32")  # the dense kernel's dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-2], self.in_features, self.codes.shape[-1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    @property
    def double_quant(self) -> bool:
        return self.scale2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes held (codes and scales): what the quantized kernel costs in memory."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    def astype(self, dtype) -> jax.Array:
        """The dequantized kernel in `dtype`."""
        return dequantize(self, dtype)


def is_quantized(x) -> bool:
    return isinstance(x, QArray)


def quantize(w, kind: str, double_quant: bool = False, dtype=None) -> QArray:
    """A float kernel (..., in, out) as a QArray; `dtype` is the dense dtype it stands for (default: w's)."""
    if kind not in KINDS:
        raise ValueError(f"quantization must be one of {KINDS}, got {kind!r}")
    if double_quant and kind != "nf4":
        raise ValueError("double quantization applies to nf4 only")
    if w.ndim < 2:
        raise ValueError(f"only kernels (..., in, out) are quantized, got shape {tuple(w.shape)}")
    parts = nf4.quantize(w, double_quant) if kind == "nf4" else int8.quantize(w)
    return QArray(**parts, kind=kind, in_features=w.shape[-2], dtype_name=jnp.dtype(dtype or w.dtype).name)


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """The dense kernel (..., in, out) in `dtype` (default: the dtype it stands for)."""
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    if q.kind == "int8":
        return int8.dequantize(q.codes, q.scale, dtype)
    absmax = q.scale if q.scale2 is None else nf4.dequantize_absmax(q.scale, q.scale2, q.offset)
    return nf4.dequantize(q.codes, absmax, q.in_features, dtype)


def dequantize_tree(tree, dtype=None):
    """`tree` with every QArray replaced by its dense kernel (its own dtype, or `dtype`); other leaves as they are."""
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def has_quantized(tree) -> bool:
    return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))
