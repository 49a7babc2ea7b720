"""Inits beyond PEFT's random ones, besides LoRA-GA (`jaxlora.lora.ga`): from the weights, a gradient or activations.

    pissa.py        PiSSA: top-r singular triplets of W, sqrt(S/s) on each factor   ("pissa", "pissa_niter_K")
    olora.py        OLoRA: first r columns of W's QR factorization                  ("olora")
    lora_one.py     LoRA-One: one rank-r step along the estimated gradient          ("lora_one", needs batches)
    eva.py          EVA: a = top-r principal components of the layer's inputs, b = 0  ("eva", needs batches)
    corda.py        CorDA: r triplets of W times its inputs' covariance (ipm / kpm)  ("corda", needs batches)
    activations.py  the targeted layers' input statistics EVA and CorDA start from (one jitted forward per batch)

PiSSA, OLoRA and CorDA are relative to the base like LoRA-GA: a = a0, b = b0 with a0/b0 frozen, the update
s*(a@b - a0@b0), so the model is the base at step 0 (to rounding), the base is never rewritten, and the PEFT export is
the rank-2r adapter [a, a0], [b, -b0] on the original weights (what PEFT's own
`path_initial_model_for_weight_conversion` writes).
LoRA-One is a plain adapter (its step-0 change is the method), EVA one with b = 0. PiSSA and LoRA-One share LoRA-GA's
factorization code; EVA, CorDA, LoRA-One and LoRA-GA the estimation batches (`lora_ga_config.batch_size/num_batches`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlora import lora as lora_lib
from jaxlora.lora.config import RELATIVE_INITS, LoraConfigError, LoraGAError, pissa_niter
from jaxlora.lora.ga.init import place
from jaxlora.lora.inits.corda import corda_factors, corda_init
from jaxlora.lora.inits.eva import eva_components, eva_init
from jaxlora.lora.inits.lora_one import lora_one_init
from jaxlora.lora.inits.olora import olora_factors
from jaxlora.lora.inits.pissa import pissa_factors
from jaxlora.lora.weights import LoraWeights

__all__ = ["corda_factors", "corda_init", "eva_components", "eva_init", "init_template", "initial_tree",
           "is_weight_init", "lora_one_init", "olora_factors", "pissa_factors", "weight_init"]


def is_weight_init(method) -> bool:
    """PiSSA or OLoRA: computed from the base weights, relative to them (frozen offsets)."""
    return method in ("pissa", "olora") or pissa_niter(method) is not None


def weight_init(model, lora_config, *, params=None, seed: int = 0) -> dict:
    """PiSSA or OLoRA: the LoRA tree a = a0, b = b0 (frozen a0/b0) from each targeted kernel of `params`
    (default model.params; a quantized kernel is dequantized first). The model with it equals the base at step 0.

    Args:
      model: a `jaxlora.Model`.
      lora_config: init_lora_weights "pissa", "pissa_niter_K" or "olora".
      params: the base params (never modified).
      seed: the randomized SVD's sketch ("pissa_niter_K").
    """
    method = lora_config.init_lora_weights
    if not is_weight_init(method):
        raise LoraConfigError(f"weight_init needs init_lora_weights 'pissa', 'pissa_niter_K' or 'olora', got "
                              f"{method!r}")
    params = model.params if params is None else params
    targets = model.lora_targets(lora_config)
    flat = traverse_util.flatten_dict(params)
    dtype = jnp.dtype(lora_config.lora_dtype)
    key = jax.random.key(seed)
    out = {}
    for i, t in enumerate(targets):
        kernel = flat[t.path + ("kernel",)]
        if method == "olora":
            a, b = olora_factors(kernel, t.rank)
        else:
            a, b = pissa_factors(kernel, t.rank, t.scale, pissa_niter(method), jax.random.fold_in(key, i))
        out[t.path] = LoraWeights(a.astype(dtype), b.astype(dtype), scale=t.scale, dropout=lora_config.lora_dropout)
    return place(model, targets, traverse_util.unflatten_dict(out), lora_config.lora_dropout)


def init_template(model, lora_config) -> dict:
    """A tree shaped like this init's (zeros; with frozen a0/b0 for PiSSA/OLoRA/CorDA) in its shardings: the target
    structure for restoring a checkpoint (nothing is computed from the weights or the data)."""
    targets = model.lora_targets(lora_config)
    flat = traverse_util.flatten_dict(model.abstract_params)
    dtype = jnp.dtype(lora_config.lora_dtype)

    def make(t):
        *lead, d_in, d_out = flat[t.path + ("kernel",)].shape
        return LoraWeights(jnp.zeros((*lead, d_in, t.rank), dtype), jnp.zeros((*lead, t.rank, d_out), dtype),
                           scale=t.scale, dropout=lora_config.lora_dropout)
    tree = lora_lib.build_lora_tree(targets, make)
    if is_weight_init(lora_config.init_lora_weights) or lora_config.init_lora_weights in RELATIVE_INITS:
        return place(model, targets, tree, lora_config.lora_dropout)
    return jax.device_put(tree, model.lora_shardings(targets, lora_config))


def initial_tree(model, lora_config, *, batches=None, template: bool = False, progress: bool = False, seed: int = 0):
    """The tree of a PiSSA / OLoRA / LoRA-One / EVA / CorDA run (`jaxlora.training.build.initial_lora` calls this)."""
    if template:
        return init_template(model, lora_config)
    data_inits = {"lora_one": (lora_one_init, "the gradient it steps along"),
                  "eva": (eva_init, "the layer inputs it takes its components from"),
                  "corda": (corda_init, "the layer inputs whose covariance it decomposes with")}
    if lora_config.init_lora_weights in data_inits:
        init, what = data_inits[lora_config.init_lora_weights]
        if batches is None:
            raise LoraGAError(f"init_lora_weights={lora_config.init_lora_weights!r} needs estimation batches ({what})")
        return init(model, lora_config, batches, progress=progress)
    return weight_init(model, lora_config, seed=seed)
