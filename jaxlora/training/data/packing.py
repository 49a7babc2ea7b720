"""Packed sequences (`data.packing: true`): several examples per row, each attending only to itself.

Padding every example to its bucket wastes the compute of the pad tokens (a third of the demo's tokens). Packing
puts whole examples side by side in rows of `max_length`, chosen by best-fit decreasing over the tokenized lengths
(longest first, each into the fullest row it still fits), so rows come out nearly full. In a packed batch:

    input_ids       the examples one after another, then pad_id
    attention_mask  the segment id of each token: 1, 2, ... per example, 0 on padding; causal attention is
                    block-diagonal by segment (`jaxlora.models.common.causal_padding_mask`)
    positions       0.. again at the start of every example (rotary, learned and ALiBi positions alike)
    labels          as unpacked, with the first token of each example set to -100: unpacked, nothing predicts an
                    example's first token, packed, the previous example's last token would

so every example's logits and loss are those of the example alone (tests/test_packing.py), and the loss stays the
mean over the batch's labelled tokens. Rows are packed once (a pure function of the lengths) and their order is
shuffled per epoch with (seed, epoch), so `batch(step)` is a pure function of the step and resume stays exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from jaxlora.losses import IGNORE_INDEX
from jaxlora.training.data.config import DataError
from jaxlora.training.data.targets import target_positions
from jaxlora.training.data.tokenized import TokenizedData


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose lengths sum to at most `capacity`: longest first, each into the
    bin with the least room that still fits it (a new bin if none). Deterministic (ties keep index order)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise DataError(f"an example of length {int(lengths.max())} does not fit a packed row of {capacity}")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> bins with exactly that room
    has_room = np.zeros(capacity + 1, dtype=bool)
    for i in order:
        n = int(lengths[i])
        fits = np.flatnonzero(has_room[n:])
        if fits.size:
            room = n + int(fits[0])
            b = by_room[room].pop()
            has_room[room] = bool(by_room[room])
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(int(i))
        left = room - n
        if left > 0:
            by_room[left].append(b)
            has_room[left] = True
    return bins


def packed_arrays(data: TokenizedData, bins: Sequence[Sequence[int]], rows: int, length: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """The packed batch of `bins` (each a list of example indices) as `rows` rows of `length` (rows past the bins are
    empty: padding only, no labels)."""
    out = {"input_ids": np.full((rows, length), pad_id, dtype=np.int32),
           "attention_mask": np.zeros((rows, length), dtype=np.int32),
           "positions": np.zeros((rows, length), dtype=np.int32),
           "labels": np.full((rows, length), IGNORE_INDEX, dtype=np.int32)}
    ids, labels = data.rows([i for members in bins for i in members])  # one read for the whole batch
    examples = iter(zip(ids, labels))
    for r, members in enumerate(bins):
        start = 0
        for segment, (x, y) in zip(range(1, len(members) + 1), examples):
            end = start + len(x)
            out["input_ids"][r, start:end] = x
            out["attention_mask"][r, start:end] = segment
            out["positions"][r, start:end] = np.arange(len(x))
            out["labels"][r, start + 1:start + len(y)] = y[1:]
            start = end
    return out


def _bucket(lengths: Sequence[int], buckets: Sequence[int]) -> int:
    longest = max(lengths, default=1)
    return next(b for b in buckets if b >= longest)


class PackedLoader:
    """Deterministic, resumable batches of packed rows; each process reads its slice (as `BatchLoader`).

    ``batch(step)`` is a pure function of ``step``: the rows are packed once from the lengths, and each epoch visits
    them in an order seeded by ``(seed, epoch)``. A batch is padded to the smallest bucket that fits its fullest row
    (rows are nearly full, so mostly the largest bucket, `max_length`). With ``drop_remainder=False`` (evaluation)
    the last batch holds the rows left over, completed with empty rows, so every example is seen.
    """

    def __init__(self, data: TokenizedData, global_batch_size: int, bucket_lengths: Sequence[int], pad_id: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 drop_remainder: bool = True) -> None:
        if data.seq2seq:
            raise DataError("data.packing packs decoder-only sequences; seq2seq (encoder-decoder) data cannot be "
                            "packed: set data.packing: false")
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise DataError(f"global_batch_size={global_batch_size} must be > 0 and divisible by "
                            f"process_count={process_count}")
        if pad_id is None:
            raise DataError("pad_id is None; pass tokenizer.pad_token_id (or eos_token_id if it has no pad)")
        self.data, self.pad_id, self.seed, self.shuffle = data, int(pad_id), seed, shuffle
        self.bucket_lengths = tuple(int(b) for b in bucket_lengths)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index, self.process_count = process_index, process_count
        self.bins = best_fit_decreasing(data.lengths, self.bucket_lengths[-1])
        self._row_lengths = np.array([int(data.lengths[b].sum()) for b in self.bins], dtype=np.int64)
        full, rest = divmod(len(self.bins), global_batch_size)
        self.steps_per_epoch = full if drop_remainder else full + (rest > 0)
        if self.steps_per_epoch == 0:
            raise DataError(f"{data.source or 'data'}: {len(data)} examples pack into {len(self.bins)} rows of "
                            f"{self.bucket_lengths[-1]}, fewer than one batch of global_batch_size="
                            f"{global_batch_size}")
        self.target_most: int | None = None  # model.logits_at_targets: see BatchLoader
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def fill(self) -> float:
        """Real tokens / row capacity over all packed rows (1.0: no padding at all)."""
        return float(self._row_lengths.sum()) / (len(self.bins) * self.bucket_lengths[-1])

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.bins)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the packed batch at ``step``: int32 (rows, L) input_ids, attention_mask (segment
        ids), positions and labels (aligned with input_ids, not shifted)."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        epoch, offset = divmod(step, self.steps_per_epoch)
        rows = self._permutation(epoch)[offset * self.global_batch_size:(offset + 1) * self.global_batch_size]
        length = _bucket(self._row_lengths[rows], self.bucket_lengths)
        b = self.local_batch_size
        local = rows[self.process_index * b:(self.process_index + 1) * b]
        out = packed_arrays(self.data, [self.bins[r] for r in local], b, length, self.pad_id)
        if self.target_most is not None:  # model.logits_at_targets
            out["target_positions"] = target_positions(out["labels"], self.target_most)
        return out

    def examples_in(self, steps: int) -> int:
        """How many examples the first `steps` batches of epoch 0 hold."""
        rows = self._permutation(0)[:steps * self.global_batch_size]
        return sum(len(self.bins[r]) for r in rows)

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yields ``batch(s)`` for s from start_step, num_steps times (None: forever)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1


def pack_each_batch(data: TokenizedData, batches: Sequence[np.ndarray], bucket_lengths: Sequence[int], pad_id: int,
                    process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Each group of example indices packed on its own (LoRA-GA's estimation batches: the same examples per batch as
    unpacked, so each batch's mean loss, and the statistic, are unchanged), all with the row count of the group that
    needs the most rows (rounded up to the process count); this process's rows of each."""
    packed = [best_fit_decreasing(data.lengths[g], bucket_lengths[-1]) for g in batches]
    packed = [[[int(g[i]) for i in members] for members in bins] for g, bins in zip(batches, packed)]
    rows = -(-max(len(bins) for bins in packed) // process_count) * process_count
    local = rows // process_count
    out = []
    for bins in packed:
        length = _bucket([int(data.lengths[m].sum()) for m in bins], bucket_lengths)
        mine = bins[process_index * local:(process_index + 1) * local]
        out.append(packed_arrays(data, mine, local, length, pad_id))
    return out
