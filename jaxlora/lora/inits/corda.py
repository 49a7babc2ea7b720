"""CorDA, context-oriented decomposition adaptation (Yang et al., arXiv 2406.05223): the adapter starts as r singular
triplets of the weight times the covariance of its inputs.

PEFT (`init_lora_weights="corda"`, `preprocess_corda`), per targeted layer W (out, in) with inputs X_s (tokens, in) of
each sample s (batch 1, no mask):

    C  = mean_s X_s^T X_s / max(X_s)^2                                   the inputs' covariance, each sample scaled
    C' = C + damp * mean(diag C) * I, damp = 0.01, doubled until ||C' C'^-1 - I||_F < 0.05
    W C' = U S V^T,  V_C = C'^-1 V                                     so U S V_C^T = W over all min(out, in) triplets
    ipm (instruction-previewed): the LARGEST r triplets     kpm (knowledge-preserved): the SMALLEST r
    lora_A = sqrt(S_r / s) V_C,r^T  (r, in)    lora_B = U_r sqrt(S_r / s)  (out, r)    W <- W - s * lora_B @ lora_A

In jaxlora's layout a = lora_A^T (in, r), b = lora_B^T (r, out). As for PiSSA (`jaxlora.lora.inits.pissa`) the base is
never rewritten: a = a0, b = b0 with a0/b0 frozen and the update s*(a@b - a0@b0), which is PEFT's residual model
W0 - s*a0@b0 + s*a@b on the untouched W0; the model is the base at step 0 (to rounding) and the PEFT export is the
rank-2r adapter [a, a0], [b, -b0].

The covariance comes from `jaxlora.lora.inits.activations` ("row_gram": each batch row is a sample, its real tokens
only, scaled by its own max as PEFT scales a sample), accumulated in float32 over the estimation batches in one jitted
forward, divided by the number of rows. The damping loop, inverse and SVD are PEFT's, in float32, one layer at a time
on one device (`activations.per_layer`); a quantized kernel is dequantized first (PEFT asks for a float base).
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
from jaxlora.lora.config import CordaConfig, LoraGAConfig, LoraGAError
from jaxlora.lora.ga.estimate import first_batches
from jaxlora.lora.ga.init import place
from jaxlora.lora.inits.activations import input_statistics, per_layer
from jaxlora.lora.weights import LoraWeights

log = logging.getLogger(__name__)

DAMP, INV_TOL, MAX_DOUBLINGS = 0.01, 0.05, 40  # PEFT's first damping and inverse tolerance; a bound on the loop


def _damped(cov, damp):
    """(C + damp * mean(diag C) I, its inverse, ||C' C'^-1 - I||_F)."""
    eye = jnp.eye(cov.shape[-1], dtype=cov.dtype)
    fixed = cov + eye * (jnp.mean(jnp.diag(cov)) * damp)
    inv = jnp.linalg.inv(fixed)
    return fixed, inv, jnp.linalg.norm(fixed @ inv - eye)


@functools.partial(jax.jit, static_argnames=("rank", "mode"))
def _factors_one(kernel_IxO, cov_IxI, scale, *, rank: int, mode: str):
    """(a (in, r), b (r, out), damping doublings) of one layer: PEFT's collect_eigens_for_layer + corda_init."""
    def cond(state):
        i, damp = state
        return (i < MAX_DOUBLINGS) & (_damped(cov_IxI, damp)[2] >= INV_TOL)
    doublings, damp = jax.lax.while_loop(cond, lambda s: (s[0] + 1, s[1] * 2), (jnp.int32(0), jnp.float32(DAMP)))
    fixed, inv, _ = _damped(cov_IxI, damp)
    u_OxK, s_K, vh_KxI = jnp.linalg.svd(kernel_IxO.T @ fixed, full_matrices=False)  # W C' (torch layout W = K^T)
    v_IxK = (vh_KxI @ inv).T
    pick = slice(0, rank) if mode == "ipm" else slice(s_K.shape[0] - rank, s_K.shape[0])
    root = jnp.sqrt(s_K[pick] / scale)  # PEFT: S /= scaling, sqrt(S) on each factor
    return v_IxK[:, pick] * root[None, :], root[:, None] * u_OxK[:, pick].T, doublings


def corda_factors(kernel, cov, scale: float, *, rank: int, mode: str, stacked: bool = False):
    """(a (..., in, r), b (..., r, out), damping doublings (...)), numpy float32, from a kernel (..., in, out) (dense
    or quantized) and its inputs' covariance (..., in, in)."""
    kernel = kernel.astype(jnp.float32)  # a quantized kernel (QArray) is dequantized by astype
    fn = lambda k, c: _factors_one(k, c, np.float32(scale), rank=rank, mode=mode)
    return per_layer(fn, stacked, kernel, cov)


def corda_init(model, lora_config, batches, *, params=None, progress: bool = False) -> dict:
    """CorDA: adapters from the SVD of each kernel times its inputs' covariance over `batches`, relative to the base.

    Args:
      model: a `jaxlora.Model` (a quantized kernel is dequantized for the SVD; the base is never rewritten).
      lora_config: a LoraConfig with init_lora_weights="corda" (corda_config.corda_method "ipm" or "kpm";
        lora_ga_config.num_batches: how many of `batches` are used).
      batches: dicts of input_ids, attention_mask, labels, numpy (B, T): this process's rows, each row a sample.
      params: the base params (default model.params), never modified.
    Returns:
      The LoRA tree a = a0, b = b0 with a0/b0 frozen: the model equals the base at step 0 (to rounding).
    """
    if lora_config.init_lora_weights != "corda":
        raise LoraGAError("corda_init needs a LoraConfig with init_lora_weights='corda'")
    corda = lora_config.corda_config or CordaConfig()
    ga = lora_config.lora_ga_config or LoraGAConfig()
    params = model.params if params is None else params
    targets = model.lora_targets(lora_config)  # r <= min(in, out): the targets' own check
    batches = first_batches(batches, ga, "CorDA needs batches (the layer inputs whose covariance it decomposes with); "
                                         "none were given")
    t0 = time.perf_counter()
    stats, _, rows = input_statistics(model, params, targets, batches, "row_gram", progress=progress)
    if rows == 0:
        raise LoraGAError("CorDA: no batch row has a real token (attention_mask is all 0)")
    flat_params = traverse_util.flatten_dict(params)
    dtype = jnp.dtype(lora_config.lora_dtype)
    flat = {}
    for t in targets:
        names = lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)
        cov = stats[t.path][0] / rows
        a, b, doublings = corda_factors(flat_params[t.path + ("kernel",)], cov, t.scale, rank=t.rank,
                                        mode=corda.corda_method, stacked=t.stacked)
        doublings = np.atleast_1d(doublings)
        finite = np.atleast_1d(np.all(np.isfinite(a), axis=(-2, -1)) & np.all(np.isfinite(b), axis=(-2, -1)))
        for name, ok, d in zip(names, finite, doublings):
            if not ok or d >= MAX_DOUBLINGS:
                raise LoraGAError(f"CorDA: the covariance of {name}'s inputs is not invertible after damping or its "
                                  f"factors are not finite (NaN/inf in its inputs?); check the data and the dtype")
        flat[t.path] = LoraWeights(a.astype(dtype), b.astype(dtype), scale=t.scale, dropout=lora_config.lora_dropout)
    del stats
    lora = place(model, targets, traverse_util.unflatten_dict(flat), lora_config.lora_dropout)
    log.info("CorDA (%s): %.1fs, %d batches, %d rows, %d targets", corda.corda_method, time.perf_counter() - t0,
             len(batches), int(rows), len(targets))
    return lora
