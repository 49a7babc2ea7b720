"""Scaled dot-product attention for every family: grouped-query, masked, biased or soft-capped, with a backward
pass that recomputes the probabilities instead of storing them.

Why not `jax.nn.dot_product_attention`'s XLA path: it vmaps a per-group core over the query groups of a key head,
which on XLA:CPU lays the scores out group-major, so every layer transposes (T, S)-sized arrays forward and backward,
and autodiff keeps the (B, N, T, S) probabilities of every layer for the backward pass (the layer scan stacks them in
a zero-filled buffer). Measured on SmolLM2-135M, one training step of 2 packed rows of 512, the old and the new
attention alternating in one process (2-core AMD EPYC): 7.22 s -> 5.79 s.

Here the query heads that share a key/value head (grouped-query attention: G = N / K of them) are the rows of one
product: (T * G, H) @ (H, S) per key head, row t * G + g for query t of head k * G + g, so no K/V head is repeated
(HF's repeat_kv) and each product is G times taller than one head's (XLA:CPU ran (384 x 64) @ (64 x 512) in 1.1 ms,
three (128 x 64) @ (64 x 512) in 1.9 ms); d_k and d_v sum a key head's query heads inside their products. A custom
VJP keeps only the inputs, the output and the per-query max and 1/sum of the softmax. The backward pass recomputes
the scores key-major, (S, T * G), from one more (S x H) @ (H x T * G) product, so that dV = P^T dO, dK = dS^T Q and
dQ^T = K^T dS^T all read their (S, T * G) operand in the order it was written: no (T, S) transposes. The math is
HF's eager attention: scale * q.k (+ bias), optional soft-capping cap * tanh(scores / cap), masked, softmax in
float32, times v; a bias (T5's position bias) gets its gradient, a mask none. Measured on SmolLM2-135M (9 query
heads, 3 key heads), the packed step below, one head per product vs a key head's three stacked, alternating in one
process: 5.18 -> 5.04 s (1.03x), the same losses.

Causal self-attention runs in blocks of queries (forward) and keys (backward) and computes only the score blocks a
query reads: none above the diagonal, and in packed rows (`data.packing`) none between examples either: each
query block starts at the first key block any real query of it sees, a traced index that picks one of a few
compiled branches (`lax.switch`), so the shapes stay static. Measured on the same step as above (2 packed rows of
512 GSM examples, 7-8 of the 10 causal blocks read; old and new alternating in one process, 2-core AMD EPYC):
5.71 -> 5.37 s (1.06x), the same losses to 1e-6.

`implementation="cudnn"` goes to `jax.nn.dot_product_attention` (the fused GPU kernel; not with soft-capping, which
it lacks); None or "xla" runs this one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# jax.nn.dot_product_attention's masked score: large and finite, so a row with no visible key is uniform, not NaN
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
# causal self-attention computes the scores in blocks of queries (forward) or keys (backward) and skips the blocks
# above the diagonal: at most _MOST_BLOCKS blocks of at least _BLOCK positions (4 blocks: 10 of 16 computed, 38%
# fewer score products and exponentials; 16 blocks would skip 47% at T = 2048 but doubled the compile time of a
# Llama-2-7B step, every block being its own ops in the layer)
_BLOCK = 128
_MOST_BLOCKS = 4


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          mask: jax.Array | None = None, *, bias: jax.Array | None = None,
                          scale: float | None = None, softcap: float | None = None,
                          causal: bool = False, implementation: str | None = None) -> jax.Array:
    """Attention output (B, T, N, H) in the inputs' dtype. Query head i reads key/value head i // (N / K) (HF's
    repeat_kv). `mask`: boolean, broadcastable to (B, N, T, S) with a head axis of 1 or N (True = attend);
    `bias`: added to the scaled scores, likewise broadcastable (BLOOM's ALiBi (B, N, 1, S)); `scale`: default
    1/sqrt(H); `softcap`: Gemma 2's cap * tanh(scores / cap), applied after the scale and bias.

    `causal`: the mask never lets query i see a key j > i, and a query the mask does not let see its own key is
    padding, whose output is never read (the caller's promises; the mask is still applied), so self-attention
    (T == S, T a multiple of 128, at least 256) skips the score blocks above the diagonal and those no real query
    reads (`_key_block_starts`). The output is the same for every real query; a padding query averages or weighs
    only the keys of the blocks computed for its block (a left-padding query that sees no key: their values)."""
    h = q_BxTxNxH.shape[-1]
    scale = h ** -0.5 if scale is None else scale
    if implementation not in (None, "xla") and softcap is None:  # cuDNN's kernel has no soft-capping
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, bias=bias, mask=mask, scale=scale,
                                            implementation=implementation)
    b, t, n, _ = q_BxTxNxH.shape
    s_len, kv, h_v = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2], v_BxSxKxH.shape[-1]
    groups = n // kv
    mask = None if mask is None else _heads(mask)
    bias = None if bias is None else _heads(bias)
    causal = causal and (bias is None or bias.shape[2] == 1)  # a bias with query rows: one block
    blocked = _blocked(t, s_len, causal)
    starts = _key_block_starts(mask, t, s_len, blocked)
    # (B, K, T * G, H): each key/value head's query heads stacked as the rows of one product, t-major
    q_rows = q_BxTxNxH.reshape(b, t, kv, groups, h).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * groups, h)
    out = _attention(q_rows, k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3),
                     _grouped(mask, kv), _grouped(bias, kv), starts, float(scale), softcap, blocked, groups)
    return out.reshape(b, kv, t, groups, h_v).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h_v)


def _grouped(x: jax.Array | None, kv: int) -> jax.Array | None:
    """A (B, 1 or N, T, S) mask or bias as (B, 1 or K, T, 1 or G, S): laid out like the scores' rows (query t of
    head k * G + g is row t * G + g of key head k's product), so that it broadcasts against their (T, G) view."""
    if x is None:
        return None
    bx, nx, tx, sx = x.shape
    if nx == 1:
        return x.reshape(bx, 1, tx, 1, sx)
    return x.reshape(bx, kv, nx // kv, tx, sx).transpose(0, 1, 3, 2, 4)


def _mm(a, b, contract_a: int, contract_b: int, out_dtype=None):
    """Batched (over the two leading axes) product of 4-D arrays contracting axis `contract_a` of a with
    `contract_b` of b; the result is (batch..., a's free axis, b's free axis)."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0, 1), (0, 1))),
                               preferred_element_type=out_dtype)


def _t(x_BxNxRxC: jax.Array) -> jax.Array:
    """(B, N, C, R), written out (a barrier keeps XLA from folding the transpose back into the product, whose
    kernels run a product with both contracted axes minor (A @ B^T) at ~2/3 of the rate of A @ B on XLA:CPU)."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x_BxNxRxC, 2, 3))


def _finish_scores(s, mask, bias, scale, softcap):
    """Raw float32 products q.k -> the scores the softmax reads: scaled, biased, soft-capped, masked; also
    tanh(scores / cap) when soft-capped (its derivative's factor). 5-D views of the scores and of the mask and
    bias parts (`_part`) that broadcast against them."""
    s = s * jnp.float32(scale)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    tanh = None
    if softcap is not None:
        tanh = jnp.tanh(s / softcap)
        s = tanh * softcap
    if mask is not None:
        s = jnp.where(mask, s, _MASKED)
    return s, tanh


def _part(x, first: slice, second: slice, axes: tuple[int, int]):
    """The `first` and `second` ranges along `axes` of a grouped mask or bias (`_grouped`, or its key-major
    transpose); an axis of 1 (broadcast) stays whole."""
    if x is None:
        return None
    index = [slice(None)] * x.ndim
    for axis, part in zip(axes, (first, second)):
        index[axis] = part if x.shape[axis] > 1 else slice(None)
    return x[tuple(index)]


def _blocked(t: int, s: int, causal: bool) -> bool:
    """Whether causal self-attention (T == S) is computed in blocks that skip the scores above the diagonal."""
    return causal and t == s and t % _BLOCK == 0 and t >= 2 * _BLOCK


def _blocks(length: int, blocked: bool) -> list[tuple[int, int]]:
    """[lo, hi) equal blocks (the queries forward, the keys backward), or the whole length."""
    if not blocked:
        return [(0, length)]
    size = length // min(length // _BLOCK, _MOST_BLOCKS)  # length is a multiple of _BLOCK (4 x 32): exact
    return [(lo, lo + size) for lo in range(0, length, size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k, v, mask, bias, starts, scale, softcap, blocked, groups):
    return _attention_fwd(q, k, v, mask, bias, starts, scale, softcap, blocked, groups)[0]


def _key_block_starts(mask, t: int, s_len: int, blocked: bool) -> jax.Array | None:
    """Packed rows: for each query block, the first key block that any query of it reads, (blocks,) int32,
    nondecreasing, so that the score blocks between segments are skipped too (None: every block from key 0).

    A query reads a key block if the mask lets it see a key there and it sees its own key: a query that does not
    (padding) is the caller's to ignore (`dot_product_attention`'s `causal`), so a right-padded row's padding does not
    pull its block back to key 0. Taken over the whole batch: every row runs the same blocks."""
    if not blocked or mask is None or mask.shape[2] != t or mask.shape[3] != s_len:
        return None
    blocks = _blocks(t, True)
    nb, size = len(blocks), blocks[0][1] - blocks[0][0]
    sees_BxTxS = mask.any(axis=1)
    real_BxT = jnp.diagonal(sees_BxTxS, axis1=1, axis2=2)
    reads = (sees_BxTxS & real_BxT[:, :, None]).reshape(-1, nb, size, nb, size).any(axis=(0, 2, 4))
    diagonal = jnp.arange(nb, dtype=jnp.int32)
    first = jnp.where(reads.any(axis=1), jnp.argmax(reads, axis=1).astype(jnp.int32), diagonal)
    # nondecreasing (each block then reads a contiguous run of key blocks ending on the diagonal, and each key
    # block is read by a contiguous run of query blocks starting on it): a later block never starts earlier
    return jax.lax.cummin(jnp.minimum(first, diagonal), reverse=True)


def _dynamic_range(index, options: list, compute):
    """compute(options[index]): under a trace, one branch per option (every branch of one output shape); eagerly,
    only the chosen one (op by op, like the rest of an un-jitted call); with one option, compute(options[0])."""
    if len(options) == 1:
        return compute(options[0])
    try:  # public errors, not an isinstance check on jax.core.Tracer (jax.core's API is being retired)
        chosen = options[int(index)]
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return jax.lax.switch(index, [functools.partial(compute, o) for o in options])
    return compute(chosen)


def _attention_fwd(q, k, v, mask, bias, starts, scale, softcap, blocked, groups):
    """q (B, K, T * G, H) (`dot_product_attention`'s rows), k and v (B, K, S, H), mask and bias grouped
    (`_grouped`); keeps the inputs, the output and the softmax's max and 1/sum (B, K, T * G), never the
    probabilities. Blocked: query block [lo, hi) reads keys [first, hi) only, where `first` is the start of the
    earliest key block its queries see (`starts`)."""
    b, kv, rows, _ = q.shape
    t, s_len = rows // groups, k.shape[2]
    k_t = _t(k)
    outs, tops, inv_totals = [], [], []
    blocks = _blocks(t, blocked)

    def query_block(lo, hi, first):
        keys = slice(first, hi if blocked else s_len)
        s = _mm(q[:, :, lo * groups:hi * groups], k_t[..., keys], 3, 2, jnp.float32)
        s, _ = _finish_scores(s.reshape(b, kv, hi - lo, groups, -1), _part(mask, slice(lo, hi), keys, (2, 4)),
                              _part(bias, slice(lo, hi), keys, (2, 4)), scale, softcap)
        # softmax as jax.nn.softmax computes it, exp(s - max) / sum; the backward pass recomputes the
        # probabilities from the (B, K, T * G) max and 1/sum (not from a log-sum-exp, which a row with every key
        # masked rounds to the masked score itself, giving probabilities 1 instead of 1/S)
        top = s.max(axis=-1, keepdims=True)
        unnormalized = jnp.exp(s - top)
        total = unnormalized.sum(axis=-1, keepdims=True)
        probs = (unnormalized / total).reshape(b, kv, (hi - lo) * groups, -1)
        out = _mm(probs.astype(v.dtype), v[:, :, keys], 3, 2)  # (B, K, (hi - lo) * G, H)
        return out, top.reshape(b, kv, -1), (1.0 / total).reshape(b, kv, -1)

    for i, (lo, hi) in enumerate(blocks):  # query blocks
        firsts = [0] if starts is None else [b_lo for b_lo, _ in blocks[:i + 1]]
        out, top, inv_total = _dynamic_range(None if starts is None else starts[i], firsts,
                                              functools.partial(query_block, lo, hi))
        outs.append(out)
        tops.append(top)
        inv_totals.append(inv_total)
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
    top, inv_total = (jnp.concatenate(x, axis=2) if len(x) > 1 else x[0] for x in (tops, inv_totals))
    return out, (q, k, v, mask, bias, starts, out, top, inv_total)


def _attention_bwd(scale, softcap, blocked, groups, res, d_out):
    """Recomputes the probabilities key-major, (B, K, S, T * G), so that every product of the backward pass reads
    its (S, T * G) operand in the order it was written: no (T, S) transposes and no stored probabilities; d_k and
    d_v sum each key head's query heads inside their products. Blocked: key block [lo, hi) is read by queries
    [lo, end) only, the query blocks whose forward read it."""
    q, k, v, mask, bias, starts, out, top, inv_total = res
    b, kv, rows, _ = q.shape
    t, s_len = rows // groups, k.shape[2]
    q_t, d_out_t, k_t = _t(q), _t(d_out), _t(k)
    # softmax's correction per query, rowsum(P * dP) = dO . O (flash attention's form: a key block alone cannot
    # sum over all of a query's keys)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, K, T * G)
    # the mask and bias key-major, (B, K, S, T, G), written out once (fused into each block's scores, each head
    # re-read them strided)
    key_major = lambda x: jnp.transpose(x, (0, 1, 4, 2, 3))
    mask_t = None if mask is None else jax.lax.optimization_barrier(key_major(mask))
    bias_t = None if bias is None else key_major(bias)
    blocks = _blocks(s_len, blocked)

    def key_block(lo, hi, end):
        """d_v and d_k of keys [lo, hi), the d_q^T they give queries [lo, T) (zero from `end` on), d_bias."""
        queries, keys = slice(lo if blocked else 0, end), slice(lo, hi)
        q_rows = slice(queries.start * groups, end * groups)
        five = lambda x: x.reshape(b, kv, hi - lo, end - queries.start, groups)
        four = lambda x: x.reshape(b, kv, hi - lo, (end - queries.start) * groups)
        mask_part, bias_part = (_part(x, keys, queries, (2, 3)) for x in (mask_t, bias_t))
        s_t, tanh = _finish_scores(five(_mm(k[:, :, keys], q_t[..., q_rows], 3, 2, jnp.float32)), mask_part,
                                   bias_part, scale, softcap)
        p_t = jnp.exp(four(s_t) - top[:, :, None, q_rows]) * inv_total[:, :, None, q_rows]
        d_v = _mm(p_t.astype(v.dtype), d_out[:, :, q_rows], 3, 2)  # (B, K, hi - lo, H)
        d_p_t = _mm(v[:, :, keys], d_out_t[..., q_rows], 3, 2, jnp.float32)
        d_s_t = five(p_t * (d_p_t - delta[:, :, None, q_rows]))
        if mask_t is not None:
            d_s_t = jnp.where(mask_part, d_s_t, 0.0)
        if tanh is not None:
            d_s_t = d_s_t * (1.0 - tanh * tanh)
        d_bias = None if bias is None else _reduce_to(d_s_t, bias_part.shape)
        d_s_t = four(d_s_t * jnp.float32(scale)).astype(q.dtype)
        d_k = _mm(d_s_t, q[:, :, q_rows], 3, 2)  # (B, K, hi - lo, H)
        d_q_t = _mm(k_t[..., keys], d_s_t, 3, 2)  # (B, K, H, (end - queries.start) * G)
        d_q_t = jnp.pad(d_q_t, ((0, 0), (0, 0), (0, 0), (0, (t - end) * groups)))
        return d_v, d_k, d_q_t, d_bias

    d_q_acc, d_ks, d_vs, d_bias_parts = None, [], [], []
    for j, (lo, hi) in enumerate(blocks):  # key blocks
        # the query blocks that read key block j are j .. end - 1: those whose forward started at or before it
        ends = [t] if starts is None else [q_hi for _, q_hi in blocks[j:]]
        index = None if starts is None else jnp.sum(starts <= j) - (j + 1)
        d_v, d_k, d_q_t, d_bias = _dynamic_range(index, ends, functools.partial(key_block, lo, hi))
        d_vs.append(d_v)
        d_ks.append(d_k)
        d_bias_parts.append(d_bias)
        d_q_acc = d_q_t if d_q_acc is None else d_q_acc.at[..., lo * groups:].add(d_q_t)
    join = lambda parts: jnp.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]
    d_q = jnp.swapaxes(d_q_acc, 2, 3).astype(q.dtype)
    d_bias = None
    if bias is not None:  # one part per key block (a bias with query rows is never blocked, see the caller)
        parts = join(d_bias_parts) if bias_t.shape[2] > 1 else sum(d_bias_parts[1:], d_bias_parts[0])
        d_bias = jnp.transpose(parts, (0, 1, 3, 4, 2)).astype(bias.dtype)
    return d_q, join(d_ks).astype(k.dtype), join(d_vs).astype(v.dtype), None, d_bias, None


def _reduce_to(x: jax.Array, shape: tuple) -> jax.Array:
    """x summed over the axes where `shape` (which x broadcasts from) has 1 (a bias's gradient)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


_attention.defvjp(_attention_fwd, _attention_bwd)


def _heads(x) -> jax.Array:
    """A mask or bias broadcastable to (B, N, T, S), as 4-D."""
    x = jnp.asarray(x)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)
