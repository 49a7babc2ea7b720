"""The one masked cross entropy every objective uses, and `IGNORE_INDEX`, the label value it skips.

Objectives return (sum of per-target losses, number of targets) in float32, so gradient accumulation and LoRA-GA's
per-batch means divide once over the whole batch:

    causal LM      next_token_loss_sums     position t predicts label t+1 (HF's shift), labels -100 skipped
    seq2seq (T5)   masked_cross_entropy_sums(decoder logits, labels)   same positions, no shift
    classifier     masked_cross_entropy_sums(logits (B, C), class ids (B,))

`chunked_next_token_loss_sums` is the causal LM loss from the final hidden states and the head's weight, in chunks of
tokens, so the (B, T, vocab) logits never exist at once (`Model.loss_sums` uses it; `model.loss_chunk`);
`chunked_cross_entropy_sums` the same for hidden states already gathered at their targets (`model.logits_at_targets`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # label value the loss ignores (the PyTorch / Hugging Face convention)


def masked_cross_entropy_sums(logits_NxV: jax.Array, targets_N: jax.Array,
                              per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """Sum of -log softmax(logits)[target] over targets != IGNORE_INDEX, and their count (float32).

    `logits` (B, ..., V) and `targets` (B, ...) share their leading dims; with `per_row`, both sums are per row (B,).
    """
    logits = logits_NxV.astype(jnp.float32)
    valid = targets_N != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets_N, 0)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    axes = tuple(range(1, valid.ndim)) if per_row else None
    return jnp.sum(jnp.where(valid, logz - picked, 0.0), axis=axes), jnp.sum(valid, axis=axes).astype(jnp.float32)


def next_token_loss_sums(logits_BxTxV: jax.Array, labels_BxT: jax.Array,
                         per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """Causal LM: position t predicts label t+1; the last position predicts nothing (no copy of the logits)."""
    targets = jnp.pad(labels_BxT[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    return masked_cross_entropy_sums(logits_BxTxV, targets, per_row)


def chunked_next_token_loss_sums(hidden_BxTxD: jax.Array, weight: jax.Array, labels_BxT: jax.Array, *,
                                 vocab_major: bool, dtype, chunk: int, softcap: float | None = None,
                                 per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """`next_token_loss_sums(logits)` of logits = hidden @ head, without ever holding (B, T, vocab) logits.

    The head (`weight`: a tied embedding (vocab, D) with `vocab_major`, else a kernel (D, vocab)) is applied to
    `chunk` tokens at a time in a scan. When differentiated, each chunk's gradient w.r.t. the hidden states,
    (softmax - onehot) @ head^T, is computed right there in the forward pass (the fused "linear cross entropy"), so
    the backward neither keeps nor recomputes any logits and the FLOPs are those of the full logits' forward and
    backward. A gradient w.r.t. the head itself (modules_to_save lm_head, a trained tied embedding) is summed in the
    backward pass, which recomputes the logits chunk by chunk. Peak memory for the head is (B, chunk, vocab) instead
    of (B, T, vocab) in the compute dtype plus float32 copies for the softmax and its gradient (Llama-3-8B's
    128,256-token vocabulary at T 4096: 2 GiB per row in float32). Logits are computed in `dtype`, then float32,
    soft-capped (Gemma's final_logit_softcapping) and reduced as `masked_cross_entropy_sums` does.
    """
    targets = jnp.pad(labels_BxT[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    return chunked_cross_entropy_sums(hidden_BxTxD, weight, targets, vocab_major=vocab_major, dtype=dtype,
                                      chunk=chunk, softcap=softcap, per_row=per_row)


def chunked_cross_entropy_sums(hidden_BxTxD: jax.Array, weight: jax.Array, targets_BxT: jax.Array, *,
                               vocab_major: bool, dtype, chunk: int, softcap: float | None = None,
                               per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """`masked_cross_entropy_sums(hidden @ head, targets)` with targets aligned to the hidden states (no shift: the
    hidden states gathered at the positions that predict them, `Model.loss_sums` with target_positions), in chunks
    of tokens as `chunked_next_token_loss_sums`."""
    b, t, d = hidden_BxTxD.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    x_NxBxCxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    y_NxBxC = jnp.pad(targets_BxT, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    y_NxBxC = y_NxBxC.reshape(b, n, chunk).swapaxes(0, 1)
    sums, counts = _fused_cross_entropy(x_NxBxCxD, weight, y_NxBxC, (vocab_major, jnp.dtype(dtype).name, softcap))
    return (sums, counts) if per_row else (jnp.sum(sums), jnp.sum(counts))


def _head_chunks(x_NxBxCxD, weight, y_NxBxC, how, want_dx: bool, dw_cotangent_B=None):
    """Scan over token chunks: per-row loss sums and counts; with `want_dx`, each chunk's d(row sums)/dx; with
    `dw_cotangent_B` (the rows' loss-sum cotangents), the head weight's gradient."""
    vocab_major, dtype, softcap = how
    w = weight.astype(dtype)
    logits_of = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"

    def body(dw, xs):
        x, y = xs
        x = x.astype(dtype)
        raw = jnp.einsum(logits_of, x, w)
        capped = jnp.tanh(raw / softcap) if softcap is not None else None
        logits = (capped * softcap if softcap is not None else raw).astype(jnp.float32)
        valid = y != IGNORE_INDEX
        safe = jnp.where(valid, y, 0).astype(jnp.int32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        sums = jnp.sum(jnp.where(valid, logz - picked, 0.0), axis=-1)
        counts = jnp.sum(valid, axis=-1).astype(jnp.float32)
        if not want_dx and dw_cotangent_B is None:
            return dw, (sums, counts)
        g = jnp.exp(logits - logz[..., None]) - jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.float32)
        g = jnp.where(valid[..., None], g, 0.0)  # d(row sum)/d(logits)
        if softcap is not None:
            g = g * (1.0 - jnp.square(capped.astype(jnp.float32)))
        if dw_cotangent_B is not None:
            gw = (g * dw_cotangent_B[:, None, None]).astype(dtype)
            dw = dw + jnp.einsum("bcv,bcd->vd" if vocab_major else "bcv,bcd->dv", gw, x,
                                 preferred_element_type=jnp.float32)
        if not want_dx:
            return dw, (sums, counts)
        dx = jnp.einsum("bcv,vd->bcd" if vocab_major else "bcv,dv->bcd", g.astype(dtype), w)
        return dw, (sums, counts, dx)

    dw0 = jnp.zeros(weight.shape, jnp.float32) if dw_cotangent_B is not None else None
    dw, out = jax.lax.scan(body, dw0, (x_NxBxCxD, y_NxBxC))
    return dw, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_cross_entropy(x_NxBxCxD, weight, y_NxBxC, how):
    _, (sums, counts) = _head_chunks(x_NxBxCxD, weight, y_NxBxC, how, want_dx=False)
    return jnp.sum(sums, axis=0), jnp.sum(counts, axis=0)


def _fused_fwd(x, weight, y, how):
    want_dx = x.perturbed
    _, out = _head_chunks(x.value, weight.value, y.value, how, want_dx=want_dx)
    sums, counts = jnp.sum(out[0], axis=0), jnp.sum(out[1], axis=0)
    residuals = (out[2] if want_dx else None, x.value if weight.perturbed else None,
                 weight.value if weight.perturbed else None, y.value)
    return (sums, counts), residuals


def _fused_bwd(how, residuals, cotangents):
    dx_NxBxCxD, x, weight, y = residuals
    ct_sums = cotangents[0]
    if type(ct_sums) is jax.custom_derivatives.SymbolicZero:
        ct_sums = jnp.zeros(y.shape[1:2], jnp.float32)
    dx = None if dx_NxBxCxD is None else \
        (dx_NxBxCxD.astype(jnp.float32) * ct_sums[None, :, None, None]).astype(dx_NxBxCxD.dtype)
    dw = None
    if weight is not None:
        dw, _ = _head_chunks(x, weight, y, how, want_dx=False, dw_cotangent_B=ct_sums)
        dw = dw.astype(weight.dtype)
    return dx, dw, None


_fused_cross_entropy.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
