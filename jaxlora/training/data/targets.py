"""The positions whose logits a causal LM's loss needs (`model.logits_at_targets`), added to every batch.

The loss at position t is -log p(labels[t + 1]); a position whose next label is -100 (the masked prompt, padding, a
packed segment's last token) adds nothing, yet the head spends a vocabulary-sized matmul, softmax and its gradient
on it: on instruction data half the positions are prompt, and SmolLM2's 49,152-word head is a fifth of a step's
FLOPs. The loaders add `target_positions` (B, K): each row's positions t with labels[t + 1] != -100, in order, then
-1; `Model.loss_sums` gathers the final hidden states there before the head, so the loss and its gradients are those
of the full logits (tested), computed on K positions per row instead of T.

K is fixed for a loader (`capacity`): the most labelled tokens any row of its data can hold (an example, or a packed
row's examples together), rounded up to a multiple of 16 and at most the row's length, so a run still compiles one
program per bucket length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlora.losses import IGNORE_INDEX
from jaxlora.training.data.tokenized import TokenizedData

MULTIPLE = 16  # K is rounded up to this


def most_targets(data: TokenizedData, rows: Sequence[Sequence[int]] | None = None) -> int:
    """The most labelled tokens in one row: of one example, or with `rows` (packed rows' example indices) of the
    examples one row holds together. Labelled tokens bound the targets (a first token labelled predicts nothing)."""
    counts = data.num_trained
    if rows is None:
        return int(counts.max()) if len(counts) else 0
    return max((int(counts[list(r)].sum()) for r in rows), default=0)


def capacity(most: int, length: int) -> int:
    """K for rows of `length`: `most` rounded up to a multiple of 16, at most `length`, at least 1."""
    return max(1, min(length, -(-most // MULTIPLE) * MULTIPLE))


def target_positions(labels_BxT: np.ndarray, most: int) -> np.ndarray:
    """(B, K) int32: each row's positions t with labels[t + 1] != -100, in order, -1 after them; K =
    capacity(most, T). A row with more targets than K (`most` understated) is an error, never a silent cut."""
    labels = np.asarray(labels_BxT)
    b, t = labels.shape
    k = capacity(most, t)
    out = np.full((b, k), -1, dtype=np.int32)
    for i in range(b):
        pos = np.flatnonzero(labels[i, 1:] != IGNORE_INDEX)
        if len(pos) > k:
            raise ValueError(f"row {i} has {len(pos)} labelled targets, more than the capacity {k} "
                             f"(most_targets={most})")
        out[i, :len(pos)] = pos
    return out
