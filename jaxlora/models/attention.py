"""Scaled dot-product attention for every family: grouped-query, masked, biased or soft-capped, with a backward
pass that recomputes the probabilities instead of storing them.

Why not `jax.nn.dot_product_attention`'s XLA path: it vmaps a per-group core over the query groups of a key head,
which on XLA:CPU lays the scores out group-major, so every layer transposes (T, S)-sized arrays forward and backward,
and autodiff keeps the (B, N, T, S) probabilities of every layer for the backward pass (the layer scan stacks them in
a zero-filled buffer). Measured on SmolLM2-135M, 2 packed rows of 512, one training step (`scripts/profile_step.py`,
2-core AMD EPYC): 7.1 s -> 6.0 s with this module.

Here each query head's scores are one (T, S) matrix (the K/V heads repeated to the N query heads, HF's repeat_kv:
(B, N, S, H) copies, small next to the scores), and a custom VJP keeps only the inputs, the output and the per-query
max and 1/sum of the softmax. The backward pass recomputes the scores key-major, (B, N, S, T), from one more
(S x H) @ (H x T) product, so that dV = P^T dO, dK = dS^T Q and dQ^T = K^T dS^T all read their (S, T) operand in the
order it was written: no (T, S) transposes. The math is HF's eager attention: scale * q.k (+ bias), optional
soft-capping cap * tanh(scores / cap), masked, softmax in float32, times v; a bias (T5's position bias) gets its
gradient, a mask none.

`implementation="cudnn"` goes to `jax.nn.dot_product_attention` (the fused GPU kernel; not with soft-capping, which
it lacks); None or "xla" runs this one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# jax.nn.dot_product_attention's masked score: large and finite, so a row with no visible key is uniform, not NaN
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          mask: jax.Array | None = None, *, bias: jax.Array | None = None,
                          scale: float | None = None, softcap: float | None = None,
                          implementation: str | None = None) -> jax.Array:
    """Attention output (B, T, N, H) in the inputs' dtype. Query head i reads key/value head i // (N / K) (HF's
    repeat_kv). `mask`: boolean, broadcastable to (B, N, T, S) with a head axis of 1 or N (True = attend);
    `bias`: added to the scaled scores, likewise broadcastable (BLOOM's ALiBi (B, N, 1, S)); `scale`: default
    1/sqrt(H); `softcap`: Gemma 2's cap * tanh(scores / cap), applied after the scale and bias."""
    h = q_BxTxNxH.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    if implementation not in (None, "xla") and softcap is None:  # cuDNN's kernel has no soft-capping
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias=bias, mask=mask, scale=scale,
                                            implementation=implementation)
    mask = None if mask is None else _heads(mask)
    bias = None if bias is None else _heads(bias)
    out = _attention(q_BxTxNxH.transpose(0, 2, 1, 3), k_BxSxKxH.transpose(0, 2, 1, 3),
                     v_BxSxKxH.transpose(0, 2, 1, 3), mask, bias, float(scale), softcap)
    return out.transpose(0, 2, 1, 3)


def _mm(a, b, contract_a: int, contract_b: int, out_dtype=None):
    """Batched (over the two leading axes) product of 4-D arrays contracting axis `contract_a` of a with
    `contract_b` of b; the result is (batch..., a's free axis, b's free axis)."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))),
                               preferred_element_type=out_dtype)


def _t(x_BxNxRxC: jax.Array) -> jax.Array:
    """(B, N, C, R), written out (a barrier keeps XLA from folding the transpose back into the product, whose
    kernels run a product with both contracted axes minor (A @ B^T) at ~2/3 of the rate of A @ B on XLA:CPU)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x_BxNxRxC, 2, 3))


def _scores(q, k, mask, bias, scale, softcap, transposed: bool):
    """float32 scores (B, N, T, S) (or (B, N, S, T) `transposed`, for the backward pass), scaled, biased,
    soft-capped and masked; also tanh(scores / cap) when soft-capped (its derivative's factor)."""
    if transposed:
        s = _mm(k, _t(q), 3, 2, jnp.float32)
        # materialized once per layer (a barrier): fused into the score fusion, every head re-read it strided
        mask = None if mask is None else jax.lax.optimization_barrier(jnp.swapaxes(mask, 2, 3))
        bias = None if bias is None else jnp.swapaxes(bias, 2, 3)
    else:
        s = _mm(q, _t(k), 3, 2, jnp.float32)
    s = s * jnp.float32(scale)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    tanh = None
    if softcap is not None:
        tanh = jnp.tanh(s / softcap)
        s = tanh * softcap
    if mask is not None:
        s = jnp.where(mask, s, _MASKED)
    return s, tanh, mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q, k, v, mask, bias, scale, softcap):
    return _attention_fwd(q, k, v, mask, bias, scale, softcap)[0]


def _repeat_kv(k_BxKxSxH, heads: int) -> jax.Array:
    """HF's repeat_kv: query head i reads key/value head i // (N / K). The copies are (B, N, S, H), small next to
    the (B, N, T, S) scores, and keep every score matrix one head's, so no product reads one transposed."""
    return jnp.repeat(k_BxKxSxH, heads // k_BxKxSxH.shape[1], axis=1)


def _sum_groups(d_BxNxSxH, kv: int) -> jax.Array:
    """The gradient of `_repeat_kv`: each K/V head's query heads summed."""
    d_BxNxSxH = jax.lax.optimization_barrier(d_BxNxSxH)  # fused into the product, the sum slowed it
    b, n, s, h = d_BxNxSxH.shape
    return d_BxNxSxH.reshape(b, kv, n // kv, s, h).sum(axis=2)


def _attention_fwd(q, k, v, mask, bias, scale, softcap):
    """q (B, N, T, H), k and v (B, K, S, H); keeps the inputs, the output and the softmax's max and 1/sum
    (B, N, T), never the (B, N, T, S) probabilities."""
    n = q.shape[1]
    s, _, _ = _scores(q, _repeat_kv(k, n), mask, bias, scale, softcap, transposed=False)
    # softmax as jax.nn.softmax computes it, exp(s - max) / sum; the backward pass recomputes the probabilities
    # from the (B, N, T) max and 1/sum (not from a log-sum-exp, which a row with every key masked rounds to the
    # masked score itself, giving probabilities 1 instead of 1/S)
    top = s.max(axis=-1, keepdims=True)
    unnormalized = jnp.exp(s - top)
    total = unnormalized.sum(axis=-1, keepdims=True)
    probs = (unnormalized / total).astype(v.dtype)
    out = _mm(probs, _repeat_kv(v, n), 3, 2)  # (B, N, T, H)
    return out, (q, k, v, mask, bias, out, top[..., 0], 1.0 / total[..., 0])


def _attention_bwd(scale, softcap, res, d_out):
    """Recomputes the probabilities key-major, (B, N, S, T), so that every product of the backward pass reads
    its (S, T) operand in the order it was written: no (T, S) transposes and no stored probabilities."""
    q, k_kv, v_kv, mask, bias, out, top, inv_total = res
    n, kv = q.shape[1], k_kv.shape[1]
    k, v = _repeat_kv(k_kv, n), _repeat_kv(v_kv, n)
    sT, tanh, maskT = _scores(q, k, mask, bias, scale, softcap, transposed=True)
    pT = jnp.exp(sT - top[:, :, None, :]) * inv_total[:, :, None, :]
    d_v = _sum_groups(_mm(pT.astype(v.dtype), d_out, 3, 2), kv).astype(v.dtype)  # (B, K, S, H)
    d_pT = _mm(v, _t(d_out), 3, 2, jnp.float32)  # (B, N, S, T)
    d_sT = pT * (d_pT - jnp.sum(pT * d_pT, axis=2, keepdims=True))
    if maskT is not None:
        d_sT = jnp.where(maskT, d_sT, 0.0)
    if tanh is not None:
        d_sT = d_sT * (1.0 - tanh * tanh)
    d_bias = None
    if bias is not None:  # summed over the axes the bias broadcasts along, then back to (., ., T, S)
        d_bias = jnp.swapaxes(_reduce_to(d_sT, jnp.swapaxes(bias, 2, 3).shape), 2, 3).astype(bias.dtype)
    d_sT = (d_sT * jnp.float32(scale)).astype(q.dtype)
    d_k = _sum_groups(_mm(d_sT, q, 3, 2), kv).astype(k.dtype)
    d_q = _mm(_t(k), d_sT, 3, 2).astype(q.dtype)  # (B, N, H, T)
    return jnp.swapaxes(d_q, 2, 3), d_k, d_v, None, d_bias


def _reduce_to(x: jax.Array, shape: tuple) -> jax.Array:
    """x summed over the axes where `shape` (which x broadcasts from) has 1 (a bias's gradient)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


_attention.defvjp(_attention_fwd, _attention_bwd)


def _heads(x) -> jax.Array:
    """A mask or bias broadcastable to (B, N, T, S), as 4-D."""
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)
