"""LoRA-GA's adapters from the gradient's top singular triplets: which vectors go to a and b, their scale, and the
LoRA tree (a = a0, b = b0, with a0/b0 kept frozen) placed in its shardings.

Flax layout: a = A^T (in, r), b = B^T (r, out) with torch's A = V^T[idx] (= U_K^T) and B = U[:, idx] (= V_K).
The update the model applies is s*x@(a@b - a0@b0): zero at step 0, on the untouched base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora import lora as lora_lib
from jaxlora.lora.config import LoraGAConfig
from jaxlora.lora.weights import LoraWeights


def direction_indices(direction: str, r: int, rng: np.random.Generator, same_indices: bool):
    """(indices into the top-2r triplets for a, for b)."""
    if direction == "ArB2r":
        return np.arange(r), np.arange(r, 2 * r)
    if direction == "A2rBr":
        return np.arange(r, 2 * r), np.arange(r)
    if direction == "ArBr":
        return np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2)
    perm = rng.permutation(2 * r)
    if same_indices:  # PEFT 0.21: one random half for both
        return perm[:r], perm[:r]
    return perm[r:], perm[:r]  # official: B takes a random half, A the other half


def init_factors(u, s, vt, weight, ga: LoraGAConfig, r: int, scale_s: float, idx_a, idx_b):
    """a0 (in, r), b0 (r, out) for ONE kernel from its gradient's top triplets (u (in,k), s (k,), vt (k,out)).

    Flax layout: a = A^T, b = B^T with torch's A = V^T[idx] (= U_K^T) and B = U[:, idx] (= V_K).
    """
    a = u[:, idx_a]
    b = vt[idx_b, :]
    d_out = vt.shape[-1]
    if ga.singular_values_in_b:
        s_b = s[idx_b]
        b = s_b[:, None] * b
        if ga.scale == "stable":
            b = b * (d_out ** 0.25 / ga.stable_gamma ** 0.5)
        elif ga.scale == "weight_svd":
            s_w = jnp.linalg.svd(weight.astype(jnp.float32), compute_uv=False)[0]
            b = jnp.where(s_b[0] > 0, b * (s_w / s_b[0]), b)
        elif ga.scale == "gd_scale":
            a, b = a / scale_s, b / scale_s
        return a, b
    if ga.scale == "stable":
        c = d_out ** 0.25 / ga.stable_gamma ** 0.5
        a, b = a * c, b * c
    elif ga.scale == "weight_svd":
        s_w = jnp.linalg.svd(weight.astype(jnp.float32), compute_uv=False)[:r] / scale_s
        c = jnp.mean(jnp.sqrt(s_w))
        a, b = a * c, b * c
    elif ga.scale == "gd_scale":
        a, b = a / scale_s, b / scale_s
    return a, b


def build_init(model, params, targets, triplets, ga: LoraGAConfig, dropout: float):
    """The LoRA tree: a = a0, b = b0 from each target's triplets, with a0/b0 kept (frozen) as the offsets."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(ga.seed)
    dtype = jnp.dtype(ga.factors_dtype)
    lora_flat = {}
    for t in targets:
        kernel = flat[t.path + ("kernel",)]
        u, s, vt = triplets[t.path]
        stacked = kernel.ndim == 3
        n = kernel.shape[0] if stacked else 1
        idx = [direction_indices(ga.direction, t.rank, rng, ga.singular_values_in_b) for _ in range(n)]
        ia, ib = np.stack([i[0] for i in idx]), np.stack([i[1] for i in idx])
        one = lambda u, s, vt, w, ia, ib: init_factors(u[:, :2 * t.rank], s[:2 * t.rank], vt[:2 * t.rank],
                                                        w, ga, t.rank, t.scale, ia, ib)
        if stacked:
            a0, b0 = jax.jit(jax.vmap(one))(u, s, vt, kernel, ia, ib)
        else:
            a0, b0 = jax.jit(one)(u, s, vt, kernel, ia[0], ib[0])
        if ga.singular_values_in_b:  # PEFT: factors in the base dtype before the offset, adapters upcast later
            a0, b0 = a0.astype(kernel.dtype), b0.astype(kernel.dtype)
        lora_flat[t.path] = LoraWeights(a=a0.astype(dtype), b=b0.astype(dtype), scale=t.scale, dropout=dropout)
    return place(model, targets, traverse_util.unflatten_dict(lora_flat), dropout)


def place(model, targets, lora, dropout):
    """`lora` (a = a0, b = b0) in the LoRA shardings, with a0/b0 set to copies of a/b in the same shardings (distinct
    buffers: a train state donates a and b but keeps a0 and b0)."""
    sh = model.lora_shardings(targets, lora_lib.LoraConfig(lora_dropout=dropout))
    placed = jax.device_put(jax.tree.map(lambda w: w.replace(a0=None, b0=None), lora,
                                         is_leaf=lambda x: isinstance(x, LoraWeights)), sh)
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=sh)
    return jax.tree.map(lambda w, c: w.replace(a0=c.a, b0=c.b), placed, copy(placed),
                        is_leaf=lambda x: isinstance(x, LoraWeights))


def lora_ga_template(model, lora_config) -> dict:
    """A LoRA-GA-shaped tree (zeros, with a0/b0) in its shardings: the target structure for restoring checkpoints."""
    targets = model.lora_targets(lora_config)
    flat = traverse_util.flatten_dict(model.abstract_params)
    dtype = jnp.dtype((lora_config.lora_ga_config or LoraGAConfig()).factors_dtype)

    def make(t):
        *lead, d_in, d_out = flat[t.path + ("kernel",)].shape
        a, b = jnp.zeros((*lead, d_in, t.rank), dtype), jnp.zeros((*lead, t.rank, d_out), dtype)
        return LoraWeights(a=a, b=b, scale=t.scale, dropout=lora_config.lora_dropout)
    return place(model, targets, lora_lib.build_lora_tree(targets, make), lora_config.lora_dropout)
