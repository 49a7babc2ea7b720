"""LoRA-GA initialization (Wang, Yu, Li, arXiv 2407.05000): adapters from the SVD of the full-weight gradient.

    1. estimate   G_K = mean over batches of dL/dK for every targeted kernel K (in, out)   (float32)
    2. factorize  G_K ~ U_K S V_K^T, top 2r triplets               ("exact" | "randomized" | "streaming")
    3. initialize a0 = U_K[:, A-slice] * c   (in, r)      b0 = V_K[:, B-slice]^T * c   (r, out)
    4. adapter    LoraWeights(a = a0, b = b0, frozen a0, b0): the update s*x@(a@b - a0@b0) is zero (to rounding) at step
                  0, so the model is unchanged; the base K stays the loaded one (never rewritten)

With direction ArB2r and the stable scale c = out^(1/4) / sqrt(gamma), the first SGD step of LoRA moves the effective
weight by -lr s^2 (a a^T G_K + G_K b^T b), proportional to the best rank-2r approximation of the full fine-tuning
step. `../shared/docs/loraga.md` (the design notes) has the algorithm and PEFT 0.21's departures from it;
`LoraGAConfig.singular_values_in_b` selects PEFT's variant.

    estimate.py    the jitted gradient / sketch steps, packing, checks of the statistic
    factorize.py   exact, randomized, streaming factorizations
    init.py        directions, scales, the LoRA tree with frozen a0/b0
    cache.py       the statistics and init, cached by their inputs

Factorization methods:
- "exact": jnp.linalg.svd of the accumulated gradient, vmapped over stacked layers.
- "randomized": svd_lowrank-style range finder on the accumulated gradient (q = 2r + oversampling columns,
  power iterations), as both reference implementations do.
- "streaming": never materializes a gradient. The sketches are themselves gradients of zero-effect LoRA branches:
  with a = 0, b = Omega^T the gradient w.r.t. a is G_K @ Omega (the forward is unchanged since a = 0); with a = Q,
  b = 0 the gradient w.r.t. b is Q^T G_K. A pass over the estimation batches is therefore a LoRA backward pass at the
  sketch rank q: range (Y = G Omega) -> Q = qr(Y) -> [power: Z = G^T Q, Y = G qr(Z)]* -> B = Q^T G -> svd(B).
  Passes: 2 + 2 * power_iterations. Peak memory is that of a LoRA training step at rank q.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
from flax import traverse_util

from jaxlora import lora as lora_lib
from jaxlora.lora.config import LoraGAConfig, LoraGAError
from jaxlora.lora.ga.cache import Cache, weights_fingerprint
from jaxlora.lora.ga.estimate import (BATCH_KEYS, check_statistic, check_targets, estimate_gradients, first_batches,
                                      is_expert_kernel, kernel_subtree, make_estimate_step, make_sketch_step,
                                      mean_loss, pack_batches, pack_factor, progress_bar, sketch_pass,
                                      sketch_shardings)
from jaxlora.lora.ga.factorize import factorize_gradient, orth, sketch_rank, streaming_factorize
from jaxlora.lora.ga.init import build_init, direction_indices, init_factors, lora_ga_template, place

log = logging.getLogger(__name__)

__all__ = ["BATCH_KEYS", "Cache", "build_init", "check_statistic", "check_targets", "direction_indices",
           "estimate_gradients", "factorize_gradient", "init_factors", "is_expert_kernel", "kernel_subtree",
           "lora_ga_init", "lora_ga_template", "make_estimate_step", "make_sketch_step", "mean_loss", "orth",
           "pack_batches", "pack_factor", "place", "progress_bar", "sketch_pass", "sketch_rank", "sketch_shardings",
           "streaming_factorize", "weights_fingerprint"]


def lora_ga_init(model, lora_config, batches: Iterable[Mapping[str, Any]], *, params=None,
                 progress: bool = True) -> dict:
    """LoRA-GA: estimate gradients on `batches`, factorize, initialize the adapters.

    Args:
      model: a `jaxlora.Model`.
      lora_config: a LoraConfig with init_lora_weights="lora_ga" and lora_ga_config=LoraGAConfig(...).
      batches: dicts of input_ids, attention_mask, labels (-100 where ignored), numpy (B, T); this process's rows.
        The first `lora_ga_config.num_batches` are used.
      params: the base params to estimate the gradient at (default model.params). They are never modified.
    Returns:
      The LoRA tree: a = a0, b = b0 initialized from the gradient's top singular vectors, and a0/b0 kept frozen. The
      model applies the update relative to the base, s*x@(a@b - a0@b0), so with this tree it equals the base model
      at step 0 (to float rounding), and several LoRA-GA adapters share one base.
    """
    if lora_config.init_lora_weights != "lora_ga":
        raise LoraGAError("lora_ga_init needs a LoraConfig with init_lora_weights='lora_ga'")
    ga = lora_config.lora_ga_config or LoraGAConfig()
    params = model.params if params is None else params
    targets = model.lora_targets(lora_config)
    check_targets(model, targets, ga)
    batches = first_batches(batches, ga, "LoRA-GA: no estimation batches were given")
    if len(batches) < ga.num_batches:
        log.warning("LoRA-GA: %d estimation batches were given, fewer than num_batches=%d; estimating the gradient "
                    "on those %d", len(batches), ga.num_batches, len(batches))
    cache = Cache(ga.cache_dir, model, lora_config, ga, batches, params) if ga.cache_dir else None
    if cache is not None and (lora := cache.load_init(targets, lora_config.lora_dropout)) is not None:
        log.info("LoRA-GA: init loaded from cache %s", cache.folder)
        return place(model, targets, lora, lora_config.lora_dropout)

    t0 = time.perf_counter()
    if ga.svd_method == "streaming":
        triplets = jax.block_until_ready(streaming_factorize(model, params, targets, batches, ga, progress))
        t_est = time.perf_counter() - t0  # the passes are dispatched asynchronously: time them to completion
        t_fact = 0.0
        for t in targets:
            names = lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)
            check_statistic(names, triplets[t.path][1], t.stacked)
    else:
        grads = estimate_gradients(model, params, targets, batches, progress)
        jax.block_until_ready(grads)
        t_est = time.perf_counter() - t0
        gflat = traverse_util.flatten_dict(grads)
        triplets = {}
        key = jax.random.key(ga.seed)
        for i, t in enumerate(targets):
            g = gflat[t.path + ("kernel",)]
            names = lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)
            check_statistic(names, g, t.stacked)
            q = sketch_rank(ga, t.rank, *g.shape[-2:])
            triplets[t.path] = factorize_gradient(g, ga.svd_method, q, ga.power_iters(), jax.random.fold_in(key, i))
        jax.block_until_ready(triplets)
        t_fact = time.perf_counter() - t0 - t_est
        if cache is not None:
            cache.save_stats(grads)
        del grads
    lora = build_init(model, params, targets, triplets, ga, lora_config.lora_dropout)
    log.info("LoRA-GA (%s): estimation %.1fs, factorization %.1fs, %d batches x %d, %d targets",
             ga.svd_method, t_est, t_fact, len(batches), batches[0]["input_ids"].shape[0], len(targets))
    if cache is not None:
        cache.save_init(lora)
    return lora
