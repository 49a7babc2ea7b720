"""`jaxlora.models.attention.dot_product_attention` against references: the output against a float64 numpy version of
HF's eager attention (repeat_kv, scale, bias, soft-capping, mask, softmax), the gradients (its own backward pass, which
recomputes the probabilities) against autodiff of the straightforward formulation, and what it keeps for the
backward pass (no (B, N, T, S) array). The families' parity tests cover it inside every model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.attention import dot_product_attention
from jaxlora.models.common import causal_padding_mask

B, T, N, KV, H = 2, 24, 6, 2, 8
ATOL = 1e-5  # float32


def _inputs(seed=0, s=T):
    r = np.random.RandomState(seed)
    q = r.normal(size=(B, T, N, H)).astype(np.float32)
    k = r.normal(size=(B, s, KV, H)).astype(np.float32)
    v = r.normal(size=(B, s, KV, H)).astype(np.float32)
    d_out = r.normal(size=(B, T, N, H)).astype(np.float32)
    return q, k, v, d_out


def _packed_mask(window=None):
    """Row 0: two packed examples and right padding; row 1: one full example (segment ids, as the loaders make)."""
    seg = np.array([[1] * 9 + [2] * 10 + [0] * 5, [1] * T], np.int32)
    return causal_padding_mask(jnp.asarray(seg), window)


def _numpy_attention(q, k, v, mask, bias, scale, softcap):
    """HF's eager attention in float64: repeat_kv, scale * q.k (+ bias), cap * tanh(./cap), masked, softmax, @ v."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    if mask is not None:
        s = np.where(np.asarray(mask), s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _jnp_attention(q, k, v, mask, bias, scale, softcap):
    """The same in jnp float32, differentiated by JAX's autodiff (the reference for the gradients)."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        s = s + bias
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    if mask is not None:
        s = jnp.where(mask, s, -0.7 * jnp.finfo(jnp.float32).max)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v)


CASES = {
    "causal_packed": dict(mask=_packed_mask(), bias=None, scale=H ** -0.5, softcap=None),
    "sliding_window": dict(mask=_packed_mask(window=4), bias=None, scale=H ** -0.5, softcap=None),
    "softcap": dict(mask=_packed_mask(), bias=None, scale=0.3, softcap=2.0),  # Gemma 2
    "alibi_bias": dict(mask=_packed_mask(), scale=H ** -0.5, softcap=None,  # BLOOM: (B, N, 1, S)
                       bias=np.broadcast_to(-0.25 * np.arange(1, N + 1)[None, :, None, None]
                                            * np.arange(T)[None, None, None, :], (B, N, 1, T)).astype(np.float32)),
    "no_mask": dict(mask=None, bias=None, scale=1.0, softcap=None),  # BERT-like, unscaled (T5)
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_equals_float64_reference_and_gradients_equal_autodiff(case):
    c = CASES[case]
    q, k, v, d_out = _inputs()
    out = dot_product_attention(q, k, v, c["mask"], bias=c["bias"], scale=c["scale"], softcap=c["softcap"])
    assert out.shape == (B, T, N, H) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, c["mask"], c["bias"], c["scale"],
                                                                 c["softcap"]), atol=ATOL, rtol=0)

    def ours(q, k, v):
        return dot_product_attention(q, k, v, c["mask"], bias=c["bias"], scale=c["scale"], softcap=c["softcap"])

    def ref(q, k, v):
        return _jnp_attention(q, k, v, c["mask"], c["bias"], c["scale"], c["softcap"])

    got = jax.vjp(ours, q, k, v)[1](d_out)
    want = jax.vjp(ref, q, k, v)[1](d_out)
    for name, x, y in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("shape", [(1, N, T, T), (B, N, 1, T)], ids=["t5_full_bias", "alibi"])
def test_bias_gradient_equals_autodiff(shape):
    """T5's relative position bias is a parameter: its gradient flows through the attention's backward pass."""
    q, k, v, d_out = _inputs(1)
    bias = np.random.RandomState(2).normal(size=shape).astype(np.float32)
    mask = _packed_mask()
    got = jax.vjp(lambda b_: dot_product_attention(q, k, v, mask, bias=b_, scale=1.0), bias)[1](d_out)[0]
    want = jax.vjp(lambda b_: _jnp_attention(q, k, v, mask, b_, 1.0, None), bias)[1](d_out)[0]
    assert got.shape == shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)


def test_decoding_shape_one_query_many_keys():
    """Generation: one new query against a cache of S keys (the mask hides the empty slots)."""
    s = 40
    q, k, v, _ = _inputs(3, s=s)
    q = q[:, :1]
    mask = np.zeros((B, 1, 1, s), bool)
    mask[..., :17] = True
    out = dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, mask, None, H ** -0.5, None),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_gradients_more_keys_than_queries(causal):
    """T5's cross-attention: T = 24 decoder queries over S = 40 encoder keys (a padding mask on the keys), output and
    gradients against the references; `causal` is ignored when T != S."""
    s = 40
    q, k, v, d_out = _inputs(9, s=s)
    mask = np.ones((B, 1, 1, s), bool)
    mask[1, ..., 31:] = False
    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask, scale=1.0, causal=causal), q, k, v)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, mask, None, 1.0, None), atol=ATOL, rtol=0)
    want = jax.vjp(lambda q, k, v: _jnp_attention(q, k, v, mask, None, 1.0, None), q, k, v)[1](d_out)
    for name, x, y in zip("qkv", vjp(d_out), want):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=0, err_msg=f"d{name}")


def test_keeps_no_score_sized_array_for_the_backward_pass():
    """The residuals of the vjp are the inputs, the output and the softmax's (B, N, T) max and 1/sum: nothing
    (B, N, T, S)-sized, where jax.nn.dot_product_attention's XLA path keeps the probabilities (which this test also
    checks, so that it can tell the two apart)."""
    q, k, v, _ = _inputs()
    mask = _packed_mask()
    score_size = B * N * T * T

    def largest_residual(f):
        _, vjp = jax.vjp(f, q, k, v)
        return max(np.size(x) for x in jax.tree.leaves(vjp) if hasattr(x, "shape"))

    assert largest_residual(lambda q, k, v: dot_product_attention(q, k, v, mask)) < score_size
    g = N // KV
    assert largest_residual(lambda q, k, v: jax.nn.dot_product_attention(
        q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), mask=mask)) >= score_size


def test_grouped_query_heads_share_their_key_head_without_copies():
    """Grouped-query attention (N = 6 query heads on K = 2 key/value heads) runs each key head's 3 query heads as the
    rows of one product: the compiled forward and backward hold no key or value repeated to the N query heads
    (HF's repeat_kv, (B, N, S, H) or (B, S, N, H); S = 40 differs from T = 24, so no query-shaped array matches)."""
    s = 40
    q, k, v, d_out = _inputs(12, s=s)
    mask = np.ones((B, 1, 1, s), bool)

    def step(q, k, v, d):
        out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v)
        return (out,) + vjp(d)

    hlo = jax.jit(step).lower(q, k, v, d_out).compile().as_text()
    assert f"f32[{B},{KV},{s},{H}]" in hlo or f"f32[{B},{s},{KV},{H}]" in hlo  # the key heads themselves are there
    for repeated in (f"f32[{B},{N},{s},{H}]", f"f32[{B},{s},{N},{H}]"):
        assert repeated not in hlo, repeated


def test_bfloat16_inputs_keep_their_dtype():
    q, k, v, d_out = (x.astype(jnp.bfloat16) for x in _inputs())
    mask = _packed_mask()
    out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in vjp(d_out))
    ref = _numpy_attention(*(np.asarray(x, np.float32) for x in (q, k, v)), mask, None, H ** -0.5, None)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05, rtol=0)  # bf16 inputs' precision


def _long_packed_mask(t, left_pad=0):
    """Two packed examples, right padding (and `left_pad` padding positions first), rows of length t."""
    seg = np.zeros((B, t), np.int32)
    seg[0, left_pad:left_pad + 100], seg[0, left_pad + 100:t - 30] = 1, 2
    seg[1, left_pad:] = 1
    return seg, causal_padding_mask(jnp.asarray(seg), None)


@pytest.mark.parametrize("t,bias", [(384, False), (384, True), (640, False)], ids=["plain", "alibi", "4_blocks_of_160"])
def test_causal_blocks_equal_the_full_computation(t, bias):
    """causal=True skips the score blocks above the diagonal (T = 384: 3 blocks of 128; T = 640: 4 of 160): the output
    equals the float64 reference, and the gradients equal autodiff of the full formulation, with packed segments,
    padding and ALiBi."""
    q, k, v, d_out = _inputs(4, s=t)
    q = np.random.RandomState(5).normal(size=(B, t, N, H)).astype(np.float32)
    d_out = np.random.RandomState(6).normal(size=(B, t, N, H)).astype(np.float32)
    _, mask = _long_packed_mask(t)
    b_ = (-0.1 * np.arange(1, N + 1)[None, :, None, None] * np.arange(t)[None, None, None, :]
          * np.ones((B, 1, 1, 1))).astype(np.float32) if bias else None

    def ours(q, k, v):
        return dot_product_attention(q, k, v, mask, bias=b_, causal=True)

    out = ours(q, k, v)
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, mask, b_, H ** -0.5, None), atol=ATOL,
                               rtol=0)
    got = jax.vjp(ours, q, k, v)[1](d_out)
    want = jax.vjp(lambda q, k, v: _jnp_attention(q, k, v, mask, b_, H ** -0.5, None), q, k, v)[1](d_out)
    for name, x, y in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=0, err_msg=f"d{name}")
    # the blocked and the unblocked computation agree as closely as two float32 orders of the same sums
    full = dot_product_attention(q, k, v, mask, bias=b_)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=ATOL, rtol=0)


def test_causal_blocks_with_left_padding_differ_only_where_no_key_is_seen():
    t = 256
    q, k, v, _ = _inputs(7, s=t)
    q = np.random.RandomState(8).normal(size=(B, t, N, H)).astype(np.float32)
    seg, mask = _long_packed_mask(t, left_pad=6)
    sees_a_key = np.asarray(mask).any(axis=-1)[:, 0]  # (B, T)
    assert not sees_a_key.all()
    out = np.asarray(dot_product_attention(q, k, v, mask, causal=True))
    ref = _numpy_attention(q, k, v, mask, None, H ** -0.5, None)
    np.testing.assert_allclose(out[sees_a_key], ref[sees_a_key], atol=ATOL, rtol=0)


def _segments(rows, t):
    """Segment ids (B, t) from each row's example lengths (1, 2, ... in order, then right padding 0)."""
    seg = np.zeros((len(rows), t), np.int32)
    for b, lengths in enumerate(rows):
        ends = np.cumsum(lengths)
        for i, (lo, hi) in enumerate(zip(ends - lengths, ends)):
            seg[b, lo:hi] = i + 1
    return seg


_PADDING_BETWEEN = np.array([[1] * 100 + [0] * 200 + [1] * 212] * 2, np.int32)  # not a loader's layout
SKIP_CASES = {  # segment ids (B, 512), the first key block of each of the 4 query blocks
    "short": (_segments([[100, 100, 100, 100, 90], [120, 120, 120, 120]], 512), [0, 0, 1, 2]),  # 7 of 10 blocks
    "one_long": (_segments([[300, 80, 100], [512]], 512), [0, 0, 0, 0]),  # one row a single example: all 10
    # row 1's padding from 220 on sees every real key before it, but only real queries count: not [0, 0, 0, 0]
    "padding": (_segments([[130, 300], [140, 40, 40]], 512), [0, 0, 1, 1]),
    # block 1 holds only padding (its own diagonal alone), block 2 reads from block 0: block 1 starts at 0 too
    "monotone": (_PADDING_BETWEEN, [0, 0, 0, 0]),
}


@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_packed_rows_skip_the_blocks_between_examples(case):
    """Packed rows of T = 512 (4 query blocks of 128): each query block reads its keys from the first block any of
    its real queries sees (`_key_block_starts`, nondecreasing), and the skipped blocks change nothing: under jit (one
    compiled branch per start) and eagerly, the output at every real query equals the float64 reference and the
    gradients equal autodiff of the full formulation (padding queries' outputs are padding's: their cotangent is
    zero, as under a masked loss)."""
    from jaxlora.models import attention
    t, n, kv, h = 512, 4, 2, 8
    seg, starts = SKIP_CASES[case]
    mask = causal_padding_mask(jnp.asarray(seg), None)
    got_starts = attention._key_block_starts(attention._heads(mask), t, t, True)
    assert np.asarray(got_starts).tolist() == starts
    r = np.random.RandomState(11)
    q, k, v, d_out = (r.normal(size=(len(seg), t, m, h)).astype(np.float32) for m in (n, kv, kv, n))
    real = seg > 0
    d_out = d_out * real[:, :, None, None]

    def ours(q, k, v):
        return dot_product_attention(q, k, v, mask, causal=True)

    ref_out = _numpy_attention(q, k, v, mask, None, h ** -0.5, None)
    want = jax.vjp(lambda q, k, v: _jnp_attention(q, k, v, mask, None, h ** -0.5, None), q, k, v)[1](d_out)
    for how, f in (("jit", jax.jit(lambda q, k, v, d: jax.vjp(ours, q, k, v)[1](d) + (ours(q, k, v),))),
                   ("eager", lambda q, k, v, d: jax.vjp(ours, q, k, v)[1](d) + (ours(q, k, v),))):
        *grads, out = f(q, k, v, d_out)
        np.testing.assert_allclose(np.asarray(out)[real], ref_out[real], atol=ATOL, rtol=0, err_msg=how)
        for name, x, y in zip("qkv", grads, want):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=0, err_msg=f"{how} d{name}")
