"""Which kernels of a model are quantized, their abstract layout and shardings, and quantizing while loading.

Policy: the linear kernels of the scanned transformer blocks (params under the family's `stack_name`) are
quantized; embeddings, norms, biases and everything outside the blocks (lm_head, a classifier or pooler) keep the
param dtype. Each QArray part is sharded by its kernel's logical axes (`jaxlora.sharding` rules), with the fallback
to replication of a dim the mesh does not divide:

    codes      (..., in_pad/2 | in, out)  the kernel's axes            (e.g. P(None, "fsdp", "tensor"))
    scale      nf4 (..., in_pad/64, out)  the kernel's axes;  int8 (..., 1, out): its output axis only
    scale2     (..., n2), offset (...,)   the layer axis only (tiny)

Loading (`loader`): a stacked kernel is built layer by layer. Each layer's HF tensor goes from the memory-mapped
safetensors straight into its per-layer sharding as float32 (each device reads its slice) and is quantized there by
one jitted function; the quantized layers are then stacked (one jit: the quantized param is briefly held twice). At
no point is more than one layer's dense tensor resident, and never on one device: a 70B model loads in nf4 on chips
that could not hold it in bfloat16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlora import sharding
from jaxlora.quant.qarray import KINDS, QArray, quantize


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a frozen base is quantized: `kind` "int8" or "nf4"; `double_quant` (nf4 only) quantizes the block scales."""

    kind: str
    double_quant: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"quantization must be null or one of {KINDS}, got {self.kind!r}")
        if self.double_quant and self.kind != "nf4":
            raise ValueError(f"double_quant applies to nf4 only (quantization is {self.kind!r})")

    @classmethod
    def of(cls, quantization: "str | QuantConfig | None", double_quant: bool = False) -> "QuantConfig | None":
        if quantization is None or isinstance(quantization, QuantConfig):
            if double_quant and quantization is None:
                raise ValueError("double_quant needs quantization='nf4'")
            return quantization
        return cls(quantization, double_quant)


def quantized_paths(abstract_params, stack_name: str) -> list[tuple[str, ...]]:
    """Param paths of the kernels the policy quantizes: floating (..., in, out) kernels inside the layer stack."""
    flat = traverse_util.flatten_dict(abstract_params)
    return [p for p, x in flat.items() if p[-1] == "kernel" and stack_name in p and x.ndim >= 2
            and jnp.issubdtype(x.dtype, jnp.floating)]


def abstract_quantized(dense: jax.ShapeDtypeStruct, cfg: QuantConfig) -> QArray:
    """The QArray (of ShapeDtypeStructs) a dense kernel becomes."""
    return jax.eval_shape(lambda w: quantize(w, cfg.kind, cfg.double_quant, dense.dtype),
                          jax.ShapeDtypeStruct(dense.shape, jnp.float32))


def qarray_shardings(axes: tuple, q: QArray, mesh, rules=sharding.DEFAULT_RULES) -> QArray:
    """NamedShardings of a QArray's parts from its dense kernel's logical axes (see the module docstring)."""
    *lead, ax_in, ax_out = axes
    make = lambda names, x: sharding.named_sharding(names, x.shape, mesh, rules)
    return q.replace(codes=make(axes, q.codes),
                     scale=make((*lead, ax_in if q.kind == "nf4" else None, ax_out), q.scale),
                     scale2=None if q.scale2 is None else make((*lead, None), q.scale2),
                     offset=None if q.offset is None else make(tuple(lead), q.offset))


def quantized_layout(abstract_params, param_axes, shardings, mesh, rules, stack_name: str, cfg: QuantConfig):
    """(abstract params, their shardings, the quantized paths) of the quantized model: the dense kernels at the
    policy's paths replaced by QArrays. The other leaves and their shardings are the dense model's."""
    paths = quantized_paths(abstract_params, stack_name)
    flat = traverse_util.flatten_dict(abstract_params)
    axes = traverse_util.flatten_dict(param_axes, is_leaf=lambda _, x: isinstance(x, tuple))
    flat_sh = traverse_util.flatten_dict(shardings)
    for p in paths:
        flat[p] = abstract_quantized(flat[p], cfg)
        flat_sh[p] = qarray_shardings(axes[p], flat[p], mesh, rules)
    return traverse_util.unflatten_dict(flat), traverse_util.unflatten_dict(flat_sh), paths


def quantize_params(params: dict, paths, cfg: QuantConfig, shardings) -> dict:
    """A dense param tree with the kernels at `paths` quantized, in `shardings` (the quantized layout's); for
    random models and tests (a checkpoint is quantized while it loads, `loader`)."""
    paths = set(paths)

    def run(params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {p: quantize(x, cfg.kind, cfg.double_quant) if p in paths else x for p, x in flat.items()})
    return jax.jit(run, out_shardings=shardings)(params)


def _layer_sharding(s: NamedSharding) -> NamedSharding:
    return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]))


_FNS: dict = {}  # (config, shape, shardings) -> (jitted per-layer quantize, jitted stack)


def loader(cfg: QuantConfig, dense: jax.ShapeDtypeStruct, dense_sharding: NamedSharding, q_sharding: QArray,
           stacked: bool) -> Callable:
    """`place(keys, read) -> QArray` for one quantized param: `read(key, sharding)` puts HF tensor `key` (one layer,
    in our (in, out) layout) into `sharding` as float32; each layer is quantized where it lies (its dense tensor
    then freed), and the quantized layers are stacked into the param's shardings (see the module docstring)."""
    per_layer = _layer_sharding(dense_sharding) if stacked else dense_sharding
    q_sharding = q_sharding.replace(dtype_name="float32")  # the jits serve every dtype: it is only metadata
    q_layer = jax.tree.map(_layer_sharding, q_sharding) if stacked else q_sharding
    key = (cfg, tuple(dense.shape), per_layer, q_layer, q_sharding)
    if key not in _FNS:
        one = jax.jit(lambda w: quantize(w, cfg.kind, cfg.double_quant), out_shardings=q_layer)
        stack = jax.jit(lambda layers: jax.tree.map(lambda *xs: jnp.stack(xs), *layers), out_shardings=q_sharding)
        _FNS[key] = one, stack
    one, stack = _FNS[key]

    def place(keys, read) -> QArray:
        if not stacked:
            return one(read(keys[0], per_layer)).replace(dtype_name=jnp.dtype(dense.dtype).name)
        n = len(keys) // dense.shape[0]  # HF tensors per layer: 1, or one per expert (Mixtral's stacked experts)
        if n == 1:
            layer = lambda ks: read(ks[0], per_layer)
        else:  # the layer's (E, in, out) kernel from its E tensors, then quantized as one
            layer = lambda ks: jnp.stack([read(k, _layer_sharding(per_layer)) for k in ks])
        # each layer waited for, so its dense tensor is freed before the next one is read
        q = stack([jax.block_until_ready(one(layer(keys[i:i + n]))) for i in range(0, len(keys), n)])
        return q.replace(dtype_name=jnp.dtype(dense.dtype).name)
    return place
