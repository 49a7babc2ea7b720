"""The one masked cross entropy every objective uses, and `IGNORE_INDEX`, the label value it skips.

Objectives return (sum of per-target losses, number of targets) in float32, so gradient accumulation and LoRA-GA's
per-batch means divide once over the whole batch:

    causal LM      next_token_loss_sums     position t predicts label t+1 (HF's shift), labels -100 skipped
    seq2seq (T5)   masked_cross_entropy_sums(decoder logits, labels)   same positions, no shift
    classifier     masked_cross_entropy_sums(logits (B, C), class ids (B,))
"""

from __future__ import annotations

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
