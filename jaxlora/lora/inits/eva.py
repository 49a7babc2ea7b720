"""EVA, Explained Variance Adaptation (Paischer et al., arXiv 2410.07170): a starts as the top-r principal components
of the layer's inputs, b = 0.

PEFT (`init_lora_weights="eva"`, `initialize_lora_eva_weights`), per targeted layer with inputs X (tokens, in):

    lora_A = top-r right singular vectors of X - mean(X)  (r, in)   [/ sqrt(singular values) with whiten]
    lora_B = 0                                            (out, r)

so the model is the base at step 0 and the adapter only learns in the directions the data excites most. In jaxlora's
layout a = lora_A^T (in, r), b = 0 (r, out): a plain adapter, no frozen offsets, exported as PEFT's.

How it is computed: PEFT runs an incremental PCA (one low-rank SVD per batch, `peft.utils.incremental_pca`) until the
components' cosine similarity between batches reaches `tau`. Here the exact PCA of the same tokens: the kept tokens'
scatter sum x x^T and sum x are accumulated over the batches in float32 in one jitted forward
(`jaxlora.lora.inits.activations`), the centered scatter C = sum x x^T - n mu mu^T is eigendecomposed (float32,
one layer at a time on one device), and its top-r eigenvectors are the components (PEFT's singular values are
sqrt(eig)). PEFT's result converges to this one as its incremental PCA does; from one batch (or its batches
concatenated) it is this one, up to its float32 SVD rounding (PEFT as shipped uses torch.svd_lowrank per batch, whose
own error is larger). Signs follow PEFT's `svd_flip` (each component's largest entry positive). Tokens:
attention_mask > 0, and label != label_mask_value with use_label_mask (PEFT's defaults).

Rank redistribution (`rho` > 1) gives layers of one stack different ranks, which jaxlora's scanned layers cannot hold
(one rank per stacked kernel): `EvaConfig` accepts rho = 1 only, so `adjust_scaling_factors` has nothing to adjust.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora import lora as lora_lib
from jaxlora.lora.config import EvaConfig, LoraGAConfig, LoraGAError
from jaxlora.lora.ga.estimate import first_batches
from jaxlora.lora.inits.activations import input_statistics, per_layer
from jaxlora.lora.weights import LoraWeights

log = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("rank", "whiten"))
def _components_one(gram, total, n, *, rank: int, whiten: bool):
    """Top-`rank` principal components (in, rank) of one layer's inputs from their scatter and sum, and the
    explained variance ratio of each."""
    mean = total / n
    scatter = gram - n * jnp.outer(mean, mean)
    scatter = (scatter + scatter.T) / 2  # symmetric to rounding, as eigh assumes
    evals, evecs = jnp.linalg.eigh(scatter)  # ascending
    evals, comps = jnp.maximum(evals[::-1][:rank], 0.0), evecs[:, ::-1][:, :rank]
    big = jnp.argmax(jnp.abs(comps), axis=0)  # PEFT's svd_flip(u_based_decision=False): largest entry positive
    comps = comps * jnp.sign(comps[big, jnp.arange(rank)])[None, :]
    if whiten:  # PEFT: components / sqrt(singular values), singular values of the centered X = sqrt(eigenvalues)
        comps = comps / jnp.sqrt(jnp.sqrt(evals))[None, :]
    return comps, evals / jnp.maximum(jnp.trace(scatter), 1e-30)


def eva_components(gram, total, n: float, *, rank: int, whiten: bool = False, stacked: bool = False):
    """(components (..., in, rank), explained variance ratios (..., rank)), numpy float32, of a target's accumulated
    inputs: the scatter sum x x^T (..., in, in), the sum x (..., in) and the count n of its tokens."""
    fn = lambda g, t: _components_one(g, t, np.float32(n), rank=rank, whiten=whiten)
    return per_layer(fn, stacked, gram, total)


def eva_init(model, lora_config, batches, *, params=None, progress: bool = False) -> dict:
    """EVA: a = the top-r principal components of each target's inputs over `batches`, b = 0.

    Args:
      model: a `jaxlora.Model` (a quantized base works as it is: only the inputs are used).
      lora_config: a LoraConfig with init_lora_weights="eva" (eva_config: whiten, use_label_mask, label_mask_value;
        lora_ga_config.num_batches: how many of `batches` are used).
      batches: dicts of input_ids, attention_mask, labels (-100 where ignored), numpy (B, T): this process's rows.
      params: the base params (default model.params), never modified.
    Returns:
      The LoRA tree (no frozen offsets; with DoRA's magnitudes if lora_config.use_dora): the model equals the base.
    """
    if lora_config.init_lora_weights != "eva":
        raise LoraGAError("eva_init needs a LoraConfig with init_lora_weights='eva'")
    eva = lora_config.eva_config or EvaConfig()
    ga = lora_config.lora_ga_config or LoraGAConfig()
    params = model.params if params is None else params
    targets = model.lora_targets(lora_config)  # r <= min(in, out): the targets' own check
    batches = first_batches(batches, ga, "EVA needs batches (the layer inputs it takes its components from); none "
                                         "were given")
    t0 = time.perf_counter()
    stats, tokens, _ = input_statistics(model, params, targets, batches, "moments", progress=progress,
                                        label_mask_value=eva.label_mask_value if eva.use_label_mask else None)
    if tokens <= max(t.rank for t in targets):
        raise LoraGAError(f"EVA: {int(tokens)} tokens were kept (attention_mask, and labels != "
                          f"{eva.label_mask_value} with use_label_mask), too few for r={max(t.rank for t in targets)}"
                          f" components; give more batches or set eva_config.use_label_mask=false")
    dtype = jnp.dtype(lora_config.lora_dtype)
    flat = {}
    for t in targets:
        names = lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)
        comps, _ = eva_components(*stats[t.path], tokens, rank=t.rank, whiten=eva.whiten, stacked=t.stacked)
        finite = np.atleast_1d(np.all(np.isfinite(comps), axis=(-2, -1)))
        if not finite.all():
            raise LoraGAError(f"EVA: the components of {names[int(np.argmin(finite))]} are not finite (NaN/inf in "
                              f"its inputs); check the data and the model's dtype")
        lead = comps.shape[:-2]
        d_out = traverse_util.flatten_dict(model.dense_abstract_params)[t.path + ("kernel",)].shape[-1]
        flat[t.path] = LoraWeights(comps.astype(dtype), jnp.zeros((*lead, t.rank, d_out), dtype), scale=t.scale,
                                   dropout=lora_config.lora_dropout)
    del stats
    lora = jax.device_put(traverse_util.unflatten_dict(flat), model.lora_shardings(targets, lora_config))
    if lora_config.use_dora:  # b = 0: the magnitudes are ||W||_c and the model is the base
        from jaxlora.lora.inits.dora import add_magnitudes
        lora = add_magnitudes(model, lora, params=params)
    log.info("EVA: %.1fs, %d batches, %d tokens, %d targets", time.perf_counter() - t0, len(batches), int(tokens),
             len(targets))
    return lora
