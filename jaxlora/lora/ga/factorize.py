"""LoRA-GA's factorizations: the top singular triplets of each target's gradient.

- "exact": jnp.linalg.svd of the accumulated gradient, vmapped over stacked layers.
- "randomized": svd_lowrank-style range finder on the accumulated gradient (q = 2r + oversampling columns, power
  iterations), as both reference implementations do.
- "streaming": never materializes a gradient: range (Y = G Omega) -> Q = qr(Y) -> [power: Z = G^T Q, Y = G qr(Z)]*
  -> B = Q^T G -> svd(B), every product with G a sketch pass (`estimate.sketch_pass`). Passes: 2 + 2 * power
  iterations; peak memory that of a LoRA training step at rank q.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora import sharding
from jaxlora.lora.config import LoraGAConfig
from jaxlora.lora.ga.estimate import make_sketch_step, pack_batches, sketch_pass


def sketch_rank(cfg: LoraGAConfig, r: int, d_in: int, d_out: int) -> int:
    """Sketch columns q = 2r + oversampling, capped by the kernel's smaller dimension."""
    default = 4 * r if cfg.svd_method == "streaming" else 2 * r
    extra = default if cfg.oversampling is None else cfg.oversampling
    return min(2 * r + extra, d_in, d_out)


def orth(y):  # (..., n, q) -> orthonormal basis of its columns
    return jnp.linalg.qr(y)[0]


def _svd_randomized(g, key, q: int, power_iters: int):
    """Range finder (Halko et al.) on g (in, out), like torch.svd_lowrank(niter=power_iters)."""
    omega = jax.random.normal(key, (g.shape[1], q), g.dtype)
    qm = orth(g @ omega)
    for _ in range(power_iters):
        qm = orth(g @ orth(g.T @ qm))
    ub, s, vt = jnp.linalg.svd(qm.T @ g, full_matrices=False)
    return qm @ ub, s, vt


@functools.lru_cache(maxsize=None)
def _factorizer(method: str, q: int, power_iters: int, n_lead: int):
    """One jitted (and vmapped over n_lead stacked axes) factorization per configuration: targets of the same
    shape share one compilation."""
    def one(g, k):
        if method == "exact":
            return jnp.linalg.svd(g, full_matrices=False)
        return _svd_randomized(g, k, q, power_iters)
    for _ in range(n_lead):
        one = jax.vmap(one)
    return jax.jit(one)


def factorize_gradient(g, method: str, q: int, power_iters: int, key):
    """Top singular triplets (U (.., in, k), S (.., k), Vt (.., k, out)) of g (..., in, out), vmapped over leading
    (stacked layer) axes; "exact" is a full SVD, "randomized" a range finder with q columns."""
    lead = g.shape[:-2]
    keys = jax.random.split(key, int(np.prod(lead, dtype=int))).reshape(lead) if lead else key
    return _factorizer(method, q if method != "exact" else 0, power_iters, len(lead))(g, keys)


def streaming_factorize(model, params, targets, batches, ga: LoraGAConfig, progress: bool = True):
    """Top singular triplets of every target's gradient from sketches alone (2 + 2 * power passes)."""
    flat = traverse_util.flatten_dict(model.abstract_params)
    key = jax.random.key(ga.seed)
    n_batches = len(batches)
    batches, groups = pack_batches(batches, sharding.batch_divisor(model.mesh))
    step = make_sketch_step(model, targets, batches[0]["input_ids"].shape[0] * jax.process_count(), groups)
    shapes, omegas = {}, {}
    for i, t in enumerate(targets):
        shape = flat[t.path + ("kernel",)].shape
        *lead, d_in, d_out = shape
        q = sketch_rank(ga, t.rank, d_in, d_out)
        shapes[t.path] = (tuple(lead), d_in, d_out, q)
        omegas[t.path] = jax.random.normal(jax.random.fold_in(key, i), (*lead, q, d_out), jnp.float32)

    def range_pass(b_rows):  # Y = G_K @ b^T per target, with a = 0
        factors = {p: (jnp.zeros((*lead, d_in, q), jnp.float32), b_rows[p])
                   for p, (lead, d_in, _, q) in shapes.items()}
        return sketch_pass(model, params, targets, batches, factors, "a", progress, step, n_batches)

    def corange_pass(a_cols):  # Q^T G_K per target, with b = 0
        factors = {p: (a_cols[p], jnp.zeros((*lead, q, d_out), jnp.float32))
                   for p, (lead, _, d_out, q) in shapes.items()}
        return sketch_pass(model, params, targets, batches, factors, "b", progress, step, n_batches)

    qs = {p: orth(y) for p, y in range_pass(omegas).items()}
    for _ in range(ga.power_iters()):
        z = corange_pass(qs)  # (q, out) = Q^T G
        qs = {p: orth(y) for p, y in range_pass({p: jnp.swapaxes(orth(jnp.swapaxes(zz, -1, -2)), -1, -2)
                                                    for p, zz in z.items()}).items()}
    bmat = corange_pass(qs)
    out = {}
    for p, bm in bmat.items():
        ub, s, vt = jnp.linalg.svd(bm, full_matrices=False)
        out[p] = (qs[p] @ ub, s, vt)
    return out
