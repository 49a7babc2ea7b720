"""DoRA (Liu et al., arXiv 2402.09353): weight-decomposed LoRA, a trained magnitude per output channel times the
normalized direction W + s*a@b, as PEFT computes it (`use_dora=True`).

    W' = m * (W + s*a@b) / ||W + s*a@b||_c          ||.||_c: the norm of each output channel (a kernel column)

    LoraWeights(a (.., in, r), b (.., r, out), m (.., out))       m starts at ||W + s*a0@b0||_c, so W' = W at step 0
                                                                   for b = 0 (PEFT: DoraLinearLayer.update_layer)

The forward (`LoraDense`) is PEFT's DoraLinearVariant: with g = m / ||W + s*a@b||_c (the norm detached, DoRA §4.3),

    y = x@W + (g - 1) * (x_d@W) + g * s * (x_d@a)@b          x_d = dropout(x); x_d@W is x@W when dropout is off

and the norm comes from `jaxlora.lora.weights.dora_norm`, which never forms the (in, out) matrix W + s*a@b. Merging
folds g into the kernel columns: W' above. Unsupported, each one clear error: quantized base kernels (the norm needs
the dense weight), inits relative to the base (LoRA-GA, PiSSA, OLoRA: `LoraConfig`), stacked experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora import lora as lora_lib
from jaxlora.lora.config import LoraConfigError
from jaxlora.lora.weights import dora_norm
from jaxlora.quant import is_quantized


def magnitude_sharding(b_sharding: NamedSharding, b_ndim: int) -> NamedSharding:
    """m (..., out) is sharded like b (..., r, out) without its rank axis."""
    spec = tuple(b_sharding.spec) + (None,) * (b_ndim - len(b_sharding.spec))
    return NamedSharding(b_sharding.mesh, PartitionSpec(*spec[:-2], spec[-1]))


def check_dora_targets(model, lora, params=None) -> None:
    """One clear error for a target DoRA cannot adapt: a quantized kernel, an init relative to the base, experts."""
    flat = traverse_util.flatten_dict(model.params if params is None else params)
    for path, w in lora_lib.lora_items(lora):
        kernel = flat[path + ("kernel",)]
        name = "/".join(path)
        if is_quantized(kernel) or not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise LoraConfigError(f"DoRA needs a dense floating-point base: {name} is quantized ({kernel.dtype}); "
                                  f"use plain LoRA (use_dora: false) on a quantized model")
        if w.relative_to_base:
            raise LoraConfigError(f"DoRA on an adapter relative to the base (frozen a0/b0: LoRA-GA, PiSSA, OLoRA) is "
                                  f"not supported ({name})")
        if w.a.ndim > 2 + (model.names.stack_name in path):
            raise LoraConfigError(f"DoRA on stacked experts is not supported ({name}, kernel {kernel.shape})")


def add_magnitudes(model, lora, *, params=None, template: bool = False) -> dict:
    """The LoRA tree with DoRA's magnitude m = ||W + s*a@b||_c (float32, the factors' dtype) on every target, in
    b's sharding without the rank axis. `template`: ones of that shape (a checkpoint's values replace them)."""
    params = model.params if params is None else params
    if not template:
        check_dora_targets(model, lora, params)
    flat = traverse_util.flatten_dict(params) if not template else None
    items = lora_lib.lora_items(lora)
    norm = jax.jit(dora_norm, static_argnums=3)
    out = {}
    for path, w in items:
        if template:  # may be traced (an abstract build): placed by the train state's shardings
            m = jnp.ones(w.b.shape[:-2] + w.b.shape[-1:], w.b.dtype)
        else:
            m = norm(flat[path + ("kernel",)], w.a, w.b, w.scale).astype(w.b.dtype)
            if isinstance(w.b.sharding, NamedSharding):
                m = jax.device_put(m, magnitude_sharding(w.b.sharding, w.b.ndim))
        out[path] = w.replace(m=m)
    return traverse_util.unflatten_dict(out)
