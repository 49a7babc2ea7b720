"""LoRA-GA initialization (Wang, Yu, Li, arXiv 2407.05000): adapters from the SVD of the full-weight gradient.

    1. estimate   G_K = mean over batches of dL/dK for every targeted kernel K (in, out)   (float32)
    2. factorize  G_K ~ U_K S V_K^T, top 2r triplets               ("exact" | "randomized" | "streaming")
    3. initialize a0 = U_K[:, A-slice] * c   (in, r)      b0 = V_K[:, B-slice]^T * c   (r, out)
    4. adapter    LoraWeights(a = a0, b = b0, frozen a0, b0): the update s*x@(a@b - a0@b0) is exactly zero at step
                  0, so the model is unchanged; the base K stays the loaded one (never rewritten)

With direction ArB2r and the stable scale c = out^(1/4) / sqrt(gamma), the first SGD step of LoRA moves the effective
weight by -lr s^2 (a a^T G_K + G_K b^T b), proportional to the best rank-2r approximation of the full fine-tuning
step. `../shared/docs/loraga.md` (the design notes) has the algorithm and PEFT 0.21's departures from it;
`LoraGAConfig.singular_values_in_b` selects PEFT's variant.

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

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora import lora as lora_lib, sharding
from jaxlora.losses import IGNORE_INDEX
from jaxlora.training import step as step_lib
from jaxlora.lora import LoraGAConfig, LoraGAError
from jaxlora.lora.weights import LoraWeights

log = logging.getLogger(__name__)

def sketch_rank(cfg: LoraGAConfig, r: int, d_in: int, d_out: int) -> int:
    """Sketch columns q = 2r + oversampling, capped by the kernel's smaller dimension."""
    default = 4 * r if cfg.svd_method == "streaming" else 2 * r
    extra = default if cfg.oversampling is None else cfg.oversampling
    return min(2 * r + extra, d_in, d_out)


# ---------------------------------------------------------------------------------------------- validation


def _check_targets(model, targets, ga: LoraGAConfig) -> None:
    flat = traverse_util.flatten_dict(model.abstract_params)
    for t in targets:
        kernel = flat[t.path + ("kernel",)]
        name = lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)[0]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise LoraGAError(f"LoRA-GA needs floating-point base weights; {name} is {kernel.dtype} "
                              f"(quantized or integer weights have no usable gradient)")
        d_in, d_out = kernel.shape[-2:]
        if 2 * t.rank > min(d_in, d_out):
            raise LoraGAError(f"LoRA-GA needs 2r <= min(in, out); {name} is {d_in}x{d_out} and r={t.rank}")


@functools.partial(jax.jit, static_argnums=1)
def _statistic_flags(value, stacked: bool):
    """(all finite, any nonzero) per layer (stacked) or for the whole array."""
    axes = tuple(range(1 if stacked else 0, value.ndim))
    return jnp.all(jnp.isfinite(value), axis=axes), jnp.any(value != 0, axis=axes)


def _check_statistic(names: list[str], value, stacked: bool) -> None:
    """Raises naming the first layer whose statistic (a gradient, or singular values) is non-finite or all zero.
    Checked per layer of a stacked target (on the device, so no full-size gradient is copied to the host)."""
    finite, nonzero = (np.atleast_1d(x) for x in jax.device_get(_statistic_flags(value, stacked)))
    for name, ok, nz in zip(names, finite, nonzero):
        if not ok:
            raise LoraGAError(f"LoRA-GA: the estimated gradient of {name} is not finite (NaN/inf); check the data "
                              f"and the model's dtype")
        if not nz:
            raise LoraGAError(f"LoRA-GA: the estimated gradient of {name} is all zero (is every label masked, or "
                              f"does the layer not affect the loss?)")


# ---------------------------------------------------------------------------------------------- estimation


def _mean_loss(model, params, lora, batch, groups: int = 1):
    """Sum over the batch's `groups` (its "group" row ids; all rows one group without) of each group's mean token
    loss, as training computes it per batch; and the token count."""
    if "group" not in batch:
        total, count = model.loss_sums(params, batch, lora)
        return total / jnp.maximum(count, 1.0), count
    total_r, count_r = model.loss_sums(params, batch, lora, per_row=True)
    total_g = jax.ops.segment_sum(total_r, batch["group"], groups)
    count_g = jax.ops.segment_sum(count_r, batch["group"], groups)
    return jnp.sum(total_g / jnp.maximum(count_g, 1.0)), jnp.sum(count_g)


BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def pack_factor(rows: int, divisor: int) -> int:
    """How many `rows`-row estimation batches one packed global batch holds: the fewest whose rows the mesh's
    batch axes (`divisor` = data x fsdp) divide."""
    return divisor // math.gcd(rows, divisor)


def pack_batches(batches: list[dict], divisor: int) -> tuple[list[dict], int]:
    """Estimation batches (this process's rows) -> packed batches the mesh divides, and the groups per packed batch.

    LoRA-GA's statistic is the mean over batches of each batch's mean-loss gradient (the official code samples
    2-example batches). A 2-row batch does not split over a pod slice's chips, so each chip would run it whole and
    hold all its activations. Packing k consecutive batches into one global batch (k = `pack_factor`) gives every
    chip rows / chips of it and leaves the statistic exactly the same: each row carries its batch's index ("group")
    and the loss is the sum over groups of each group's mean (gradients are linear). Batches of different lengths are
    right-padded to the longest (mask 0, labels -100: causal attention never sees them); the last packed batch is
    completed with empty groups (every label -100), which add nothing.
    """
    rows = batches[0]["input_ids"].shape[0]
    k = pack_factor(rows * jax.process_count(), divisor)
    if k == 1:
        return [{key: b[key] for key in BATCH_KEYS} for b in batches], 1
    packed = []
    for start in range(0, len(batches), k):
        chunk = batches[start:start + k]
        chunk = chunk + [{**chunk[0], "labels": np.full_like(chunk[0]["labels"], IGNORE_INDEX)}] \
            * (k - len(chunk))
        fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}

        def right_pad(key):  # (rows, T) arrays to the longest of the chunk (a seq2seq model's labels have their own
            arrays = [np.asarray(b[key]) for b in chunk]  # length); (rows,) labels (a classifier's) as they are
            if arrays[0].ndim != 2:
                return np.concatenate(arrays)
            t = max(x.shape[1] for x in arrays)
            return np.concatenate([np.pad(x, ((0, 0), (0, t - x.shape[1])), constant_values=fill[key])
                                   for x in arrays])
        packed.append({key: right_pad(key) for key in fill} | {"group": np.repeat(np.arange(k, dtype=np.int32), rows)})
    return packed, k


def _kernel_subtree(params, targets) -> dict:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({t.path + ("kernel",): flat[t.path + ("kernel",)] for t in targets})


def _steps(model) -> dict:
    """Jitted steps kept on the model, so a second init (another config, the error paths, every streaming pass)
    reuses their compilation instead of compiling the backward pass again."""
    return vars(model).setdefault("_lora_ga_steps", {})


def make_estimate_step(model, targets, rows: int, groups: int = 1):
    """jit(acc, count, params, batch) -> (acc + dL/dK, count + tokens) for `rows`-row global batches packing `groups`
    estimation batches: the exact estimation's one compiled step (float32 accumulators sharded like their kernels).
    `jaxlora.plan` compiles it."""
    kernel_sh = _kernel_subtree(model.param_shardings, targets)
    key = ("gradient", tuple(t.path for t in targets), rows, groups)

    def accumulate(acc, count, params, batch):
        def loss(kernels32):
            return _mean_loss(model, lora_lib.overlay(params, kernels32), None, batch, groups)
        kernels32 = jax.tree.map(lambda k: k.astype(jnp.float32), _kernel_subtree(params, targets))
        (_, n), g = jax.value_and_grad(loss, has_aux=True)(kernels32)
        return jax.tree.map(jnp.add, acc, g), count + n

    rep = sharding.replicated(model.mesh)
    if key not in _steps(model):
        _steps(model)[key] = jax.jit(accumulate, in_shardings=(kernel_sh, rep, model.param_shardings,
                                                               sharding.batch_sharding(model.mesh, batch_size=rows)),
                                     out_shardings=(kernel_sh, rep), donate_argnums=(0, 1))
    return _steps(model)[key]


def estimate_gradients(model, params, targets, batches: list[dict], progress: bool = True):
    """float32 mean over batches of dL/dK for the targeted kernels only (nothing else is differentiated)."""
    kernel_sh = _kernel_subtree(model.param_shardings, targets)
    n_batches = len(batches)
    batches, groups = pack_batches(batches, sharding.batch_divisor(model.mesh))
    rows = batches[0]["input_ids"].shape[0] * jax.process_count()
    step = make_estimate_step(model, targets, rows, groups)
    zeros = jax.jit(lambda: jax.tree.map(lambda k: jnp.zeros(k.shape, jnp.float32),
                                         _kernel_subtree(model.abstract_params, targets)),
                    out_shardings=kernel_sh)
    acc, count = zeros(), jnp.zeros((), jnp.float32)
    for batch in _progress(batches, "LoRA-GA gradients", progress):
        acc, count = step(acc, count, params, step_lib.place_batch(batch, model.mesh))
    if float(count) == 0:
        raise LoraGAError("LoRA-GA: every label of the estimation batches is masked (-100); no gradient")
    return jax.tree.map(lambda g: g / n_batches, acc)


def _lora_tree(targets, make) -> dict:
    return lora_lib.build_lora_tree(targets, make)


def _sketch_shardings(model, targets) -> dict:
    """Shardings of the scale-1 sketch branches: a follows its kernel's input dim, b its output dim (as LoRA)."""
    sh = model.lora_shardings(targets, lora_lib.LoraConfig())
    return jax.tree.map(lambda w: dataclasses.replace(w, scale=1.0), sh, is_leaf=lambda x: isinstance(x, LoraWeights))


def make_sketch_step(model, targets=None, rows: int | None = None, groups: int = 1):
    """jit(acc, params, lora, batch) -> acc + dLoss/dlora: one compilation serves every sketch pass.

    With `targets` and `rows` (the global batch rows, packing `groups` estimation batches) every input and output has
    a fixed sharding; without, the jit is keyed on whatever shardings its arguments carry, and an uncommitted first
    accumulator, the committed accumulators of later batches and the range/co-range factors each cost another
    compilation (6 for 4 passes)."""
    def accumulate(acc, params, lora, batch):
        grads = jax.grad(lambda lora: _mean_loss(model, params, lora, batch, groups)[0])(lora)
        return jax.tree.map(jnp.add, acc, grads)
    if targets is None:
        key, shardings = ("sketch", groups), {}
    else:
        sh = _sketch_shardings(model, targets)
        key = ("sketch", tuple(t.path for t in targets), rows, groups)
        batch_sh = sharding.batch_sharding(model.mesh, batch_size=rows)
        shardings = dict(in_shardings=(sh, model.param_shardings, sh, batch_sh), out_shardings=sh)
    if key not in _steps(model):
        _steps(model)[key] = jax.jit(accumulate, donate_argnums=(0,), **shardings)
    return _steps(model)[key]


def sketch_pass(model, params, targets, batches, factors: dict, wrt: str, progress: bool = True,
                step=None, n_batches: int | None = None) -> dict:
    """Mean over batches of the gradient w.r.t. `wrt` ("a" or "b") of zero-effect LoRA branches `factors`.

    `factors[path] = (a, b)` with a = 0 (wrt "a": returns G_K @ b^T) or b = 0 (wrt "b": returns a^T @ G_K).
    The model's output is unchanged by such a branch; the pass costs one LoRA backward per batch at rank q.
    """
    rows = batches[0]["input_ids"].shape[0] * jax.process_count()
    step = step or make_sketch_step(model, targets, rows)
    sh = _sketch_shardings(model, targets)  # committed like the step's outputs, so no pass recompiles
    lora = jax.device_put(_lora_tree(targets, lambda t: LoraWeights(*factors[t.path], scale=1.0)), sh)
    acc = jax.device_put(jax.tree.map(jnp.zeros_like, lora), sh)
    for batch in _progress(batches, f"LoRA-GA sketch ({wrt})", progress):
        acc = step(acc, params, lora, step_lib.place_batch(batch, model.mesh))
    return {p: (getattr(w, wrt) / (n_batches or len(batches))) for p, w in lora_lib.lora_items(acc)}


# ---------------------------------------------------------------------------------------------- factorization


def _orth(y):  # (..., n, q) -> orthonormal basis of its columns
    return jnp.linalg.qr(y)[0]


def _svd_randomized(g, key, q: int, power_iters: int):
    """Range finder (Halko et al.) on g (in, out), like torch.svd_lowrank(niter=power_iters)."""
    omega = jax.random.normal(key, (g.shape[1], q), g.dtype)
    qm = _orth(g @ omega)
    for _ in range(power_iters):
        qm = _orth(g @ _orth(g.T @ qm))
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

    qs = {p: _orth(y) for p, y in range_pass(omegas).items()}
    for _ in range(ga.power_iters()):
        z = corange_pass(qs)  # (q, out) = Q^T G
        qs = {p: _orth(y) for p, y in range_pass({p: jnp.swapaxes(_orth(jnp.swapaxes(zz, -1, -2)), -1, -2)
                                                    for p, zz in z.items()}).items()}
    bmat = corange_pass(qs)
    out = {}
    for p, bm in bmat.items():
        ub, s, vt = jnp.linalg.svd(bm, full_matrices=False)
        out[p] = (qs[p] @ ub, s, vt)
    return out


# ---------------------------------------------------------------------------------------------- initialization


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


def _build_init(model, params, targets, triplets, ga: LoraGAConfig, dropout: float):
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
    return _place(model, targets, traverse_util.unflatten_dict(lora_flat), dropout)


def _place(model, targets, lora, dropout):
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
    return _place(model, targets, lora_lib.build_lora_tree(targets, make), lora_config.lora_dropout)


# ---------------------------------------------------------------------------------------------- entry point


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
      exactly at step 0, and several LoRA-GA adapters share one base.
    """
    if lora_config.init_lora_weights != "lora_ga":
        raise LoraGAError("lora_ga_init needs a LoraConfig with init_lora_weights='lora_ga'")
    ga = lora_config.lora_ga_config or LoraGAConfig()
    params = model.params if params is None else params
    targets = model.lora_targets(lora_config)
    _check_targets(model, targets, ga)
    batches = [dict(b) for _, b in zip(range(ga.num_batches), batches)]
    if not batches:
        raise LoraGAError("LoRA-GA: no estimation batches were given")
    if len(batches) < ga.num_batches:
        log.warning("LoRA-GA: %d estimation batches were given, fewer than num_batches=%d; estimating the gradient "
                    "on those %d", len(batches), ga.num_batches, len(batches))
    cache = _Cache(ga.cache_dir, model, lora_config, ga, batches, params) if ga.cache_dir else None
    if cache is not None and (lora := cache.load_init(targets, lora_config.lora_dropout)) is not None:
        log.info("LoRA-GA: init loaded from cache %s", cache.folder)
        return _place(model, targets, lora, lora_config.lora_dropout)

    t0 = time.perf_counter()
    if ga.svd_method == "streaming":
        triplets = jax.block_until_ready(streaming_factorize(model, params, targets, batches, ga, progress))
        t_est = time.perf_counter() - t0  # the passes are dispatched asynchronously: time them to completion
        t_fact = 0.0
        for t in targets:
            names = lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)
            _check_statistic(names, triplets[t.path][1], t.stacked)
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
            _check_statistic(names, g, t.stacked)
            q = sketch_rank(ga, t.rank, *g.shape[-2:])
            triplets[t.path] = factorize_gradient(g, ga.svd_method, q, ga.power_iters(), jax.random.fold_in(key, i))
        jax.block_until_ready(triplets)
        t_fact = time.perf_counter() - t0 - t_est
        if cache is not None:
            cache.save_stats(grads)
        del grads
    lora = _build_init(model, params, targets, triplets, ga, lora_config.lora_dropout)
    log.info("LoRA-GA (%s): estimation %.1fs, factorization %.1fs, %d batches x %d, %d targets",
             ga.svd_method, t_est, t_fact, len(batches), batches[0]["input_ids"].shape[0], len(targets))
    if cache is not None:
        cache.save_init(lora)
    return lora


def _progress(items, desc: str, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="batch", leave=False)


def weights_fingerprint(params) -> list:
    """Three moments of every weight (sum, sum of squares, sum weighted by the position along the last axis), to 6
    significant digits: a changed checkpoint under the same path changes the cache key, while the reduction order of
    another mesh does not. One jitted pass over the weights, read where they lie."""
    def moments(x):
        x = x.astype(jnp.float32)
        ramp = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1) / max(x.shape[-1], 1) if x.ndim else 1.0
        return jnp.stack([jnp.sum(x), jnp.sum(x * x), jnp.sum(x * ramp)])
    flat = traverse_util.flatten_dict(params)
    values = jax.device_get(jax.jit(lambda f: {"/".join(k): moments(v) for k, v in f.items()})(flat))
    return [(name, [f"{float(m):.6e}" for m in values[name]]) for name in sorted(values)]


class _Cache:
    """Estimated statistics and the resulting init, keyed by everything they depend on."""

    def __init__(self, folder, model, lora_config, ga, batches, params):
        h = hashlib.sha256()
        h.update(json.dumps([str(model.source), repr(model.config), repr(lora_config), repr(ga),
                             weights_fingerprint(params)], default=str).encode())
        for b in batches:
            for k in ("input_ids", "attention_mask", "labels"):
                h.update(np.ascontiguousarray(b[k]).tobytes())
        self.folder = Path(folder) / h.hexdigest()[:20]

    def load_init(self, targets, dropout: float):
        path = self.folder / "init.safetensors"
        if not path.exists():
            return None
        from safetensors.numpy import load_file
        arrays = load_file(str(path))
        tree = {}
        for t in targets:
            key = "/".join(t.path)
            a0, b0 = jnp.asarray(arrays[key + "/a0"]), jnp.asarray(arrays[key + "/b0"])
            tree[t.path] = LoraWeights(a=a0, b=b0, scale=t.scale, dropout=dropout)
        return traverse_util.unflatten_dict(tree)

    def save_init(self, lora):
        arrays = {}
        for path, w in lora_lib.lora_items(lora):
            arrays["/".join(path) + "/a0"] = np.asarray(jax.device_get(w.a0))
            arrays["/".join(path) + "/b0"] = np.asarray(jax.device_get(w.b0))
        self._write("init.safetensors", arrays)

    def save_stats(self, grads):
        arrays = {"/".join(p): np.asarray(jax.device_get(g)) for p, g in traverse_util.flatten_dict(grads).items()}
        self._write("gradients.safetensors", arrays)

    def _write(self, name, arrays):
        if jax.process_index() != 0:
            return
        from safetensors.numpy import save_file
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / (name + ".tmp")
        save_file(arrays, str(tmp))
        tmp.rename(self.folder / name)
