"""LoRA-One (Zhang, Liu, Chen, arXiv 2502.01235, ICML 2025): the adapter starts as one rank-r step of full fine-tuning.

    1. estimate   G_K = mean over batches of dL/dK for every targeted kernel K (in, out)     (LoRA-GA's estimation)
    2. factorize  -G_K ~ U S V^T, top r triplets                  ("exact" | "randomized" | "streaming", as LoRA-GA)
    3. initialize a = U_r sqrt(S_r / (gamma S_1)) (in, r)     b = sqrt(S_r / (gamma S_1)) V_r^T (r, out)

so at step 0 the model is W0 + s*a@b = W0 - (s / gamma) [G_K]_r / S_1: the best rank-r approximation of one full
fine-tuning gradient step, normalized by the gradient's top singular value S_1 (so every layer's step has spectral
norm s/gamma), its singular values split evenly over a and b (a^T a = b b^T = S_r / (gamma S_1)). This is the
official code's "LoRA-One" direction with its "stable" scale (github.com/YuanheZ/LoRA-One, `reinit_lora_modules`:
B = U_r sqrt(S_r) / sqrt(S_1) / sqrt(gamma), A likewise, SVD of -G); its README runs stable_gamma=64, the default. Unlike LoRA-GA and PiSSA nothing
is subtracted: that step is the point, so the tree has no frozen offsets and exports as a plain adapter. gamma is
`lora_ga_config.lora_one_gamma`; the estimation options (batch_size, num_batches, svd_method, power_iterations,
oversampling, seed) are LoRA-GA's. The paper's preconditioned optimizer is not part of the init.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlora import lora as lora_lib
from jaxlora.lora.config import LoraGAConfig, LoraGAError
from jaxlora.lora.ga.estimate import check_statistic, estimate_gradients, first_batches
from jaxlora.lora.ga.factorize import factorize_gradient, sketch_rank, streaming_factorize
from jaxlora.lora.weights import LoraWeights

log = logging.getLogger(__name__)


def check_floating_targets(model, targets) -> None:
    flat = traverse_util.flatten_dict(model.abstract_params)
    for t in targets:
        kernel = flat[t.path + ("kernel",)]
        name = lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)[0]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise LoraGAError(f"LoRA-One needs floating-point base weights; {name} is {kernel.dtype} "
                              f"(quantized or integer weights have no usable gradient)")


@jax.jit
def _split(u, s, vt, gamma):
    root = jnp.sqrt(s / (gamma * s[..., :1]))  # s[..., :1]: the top singular value (of each stacked layer)
    return u * root[..., None, :], -(root[..., :, None] * vt)  # the minus: the SVD is of G, the step is along -G


def lora_one_init(model, lora_config, batches, *, params=None, progress: bool = True) -> dict:
    """LoRA-One: estimate gradients on `batches`, take their top-r triplets, initialize the adapters as one step.

    Args:
      model: a `jaxlora.Model`.
      lora_config: a LoraConfig with init_lora_weights="lora_one" (lora_ga_config: estimation options, gamma).
      batches: dicts of input_ids, attention_mask, labels (-100 where ignored), numpy (B, T); the first
        `lora_ga_config.num_batches` are used.
      params: the base params to estimate the gradient at (default model.params), never modified.
    Returns:
      The LoRA tree (no frozen offsets; with DoRA's magnitudes if lora_config.use_dora): with it the model is
      W0 - (s/gamma) [G]_r / S_1 at step 0.
    """
    if lora_config.init_lora_weights != "lora_one":
        raise LoraGAError("lora_one_init needs a LoraConfig with init_lora_weights='lora_one'")
    ga = lora_config.lora_ga_config or LoraGAConfig()
    params = model.params if params is None else params
    targets = model.lora_targets(lora_config)
    check_floating_targets(model, targets)  # r <= min(in, out): the targets' own check
    batches = first_batches(batches, ga, "LoRA-One needs estimation batches (the gradient it steps along); none were "
                                         "given")
    t0 = time.perf_counter()
    names = {t.path: lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)
             for t in targets}
    if ga.svd_method == "streaming":
        triplets = streaming_factorize(model, params, targets, batches, ga, progress)
        for t in targets:
            check_statistic(names[t.path], triplets[t.path][1], t.stacked)
    else:
        grads = traverse_util.flatten_dict(estimate_gradients(model, params, targets, batches, progress))
        key = jax.random.key(ga.seed)
        triplets = {}
        for i, t in enumerate(targets):
            g = grads[t.path + ("kernel",)]
            check_statistic(names[t.path], g, t.stacked)
            q = sketch_rank(ga, t.rank, *g.shape[-2:])
            triplets[t.path] = factorize_gradient(g, ga.svd_method, q, ga.power_iters(), jax.random.fold_in(key, i))
        del grads
    dtype = jnp.dtype(lora_config.lora_dtype)
    flat = {}
    for t in targets:
        u, s, vt = triplets[t.path]
        a, b = _split(u[..., :, :t.rank], s[..., :t.rank], vt[..., :t.rank, :], ga.lora_one_gamma)
        flat[t.path] = LoraWeights(a.astype(dtype), b.astype(dtype), scale=t.scale, dropout=lora_config.lora_dropout)
    lora = jax.device_put(traverse_util.unflatten_dict(flat), model.lora_shardings(targets, lora_config))
    if lora_config.use_dora:  # magnitudes ||W0 + s*a@b||_c: DoRA's model at step 0 is the same one-step model
        from jaxlora.lora.inits.dora import add_magnitudes
        lora = add_magnitudes(model, lora, params=params)
    log.info("LoRA-One (%s): %.1fs, %d batches, %d targets", ga.svd_method, time.perf_counter() - t0, len(batches),
             len(targets))
    return lora
