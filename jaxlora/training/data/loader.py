"""Bucketed, deterministic, resumable batches: `BatchLoader`, and `count_tokens` for tokens/s.

Each batch is padded to the smallest bucket that fits its longest sequence, so the train step compiles one program
per bucket. `BatchLoader.batch(step)` is a pure function of the step (the epoch's order is seeded by seed and
epoch), so resuming at step N reproduces the batches of an uninterrupted run; the bucket is chosen from the GLOBAL
batch so all processes agree on the shape, and each process materialises only its own rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from jaxlora.losses import IGNORE_INDEX
from jaxlora.training.data.config import DataError
from jaxlora.training.data.targets import target_positions
from jaxlora.training.data.tokenized import TokenizedData


class BatchLoader:
    """Deterministic, resumable, bucketed batches; each process reads its slice.

    ``batch(step)`` is a pure function of ``step``: the epoch's order is a
    permutation seeded by ``(seed, epoch)``, so restarting at any step gives
    the same batches. The padded length is chosen from the GLOBAL batch, so all
    processes agree on the shape; each then reads only its own rows.
    """

    def __init__(
        self,
        data: TokenizedData,
        global_batch_size: int,
        bucket_lengths: Sequence[int],
        pad_id: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool = True,
        label_bucket_lengths: Sequence[int] | None = None,
    ) -> None:
        """Creates the loader.

        Args:
            data: tokenized examples (all sequences must fit the largest bucket).
            global_batch_size: rows per step over all processes.
            bucket_lengths: strictly increasing padded lengths.
            pad_id: token id used for padding input_ids.
            seed: shuffling seed.
            process_index: this process (e.g. ``jax.process_index()``).
            process_count: number of processes (e.g. ``jax.process_count()``).
            shuffle: False keeps the data's order in every epoch (LoRA-GA's gradient estimation takes the first
                examples, as the official code does).
            label_bucket_lengths: seq2seq data: the padded decoder-target lengths (`target_bucket_lengths`).

        Raises:
            DataError: inconsistent sizes, or too few examples for one batch.
        """
        if global_batch_size <= 0:
            raise DataError(f"global_batch_size must be > 0, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise DataError(f"bad process_index={process_index} / process_count={process_count}")
        if global_batch_size % process_count:
            raise DataError(
                f"global_batch_size={global_batch_size} must be divisible by process_count={process_count}"
            )
        if pad_id is None:
            raise DataError("pad_id is None; pass tokenizer.pad_token_id (or eos_token_id if it has no pad)")
        buckets = tuple(int(b) for b in bucket_lengths)
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
            raise DataError(f"bucket_lengths must be strictly increasing positive ints, got {bucket_lengths}")
        self.data = data
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.bucket_lengths = buckets
        self.label_bucket_lengths = None
        if data.seq2seq:
            if not label_bucket_lengths:
                raise DataError("seq2seq data needs label_bucket_lengths (data.target_bucket_lengths)")
            self.label_bucket_lengths = tuple(int(b) for b in label_bucket_lengths)
        self.pad_id = int(pad_id)
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.steps_per_epoch = len(data) // global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{data.source or 'data'}: {len(data)} examples is fewer than one batch of "
                f"global_batch_size={global_batch_size}"
            )
        self._lengths = data.lengths
        longest = int(self._lengths.max())
        if longest > buckets[-1]:
            raise DataError(
                f"{data.source or 'data'}: a sequence of length {longest} exceeds the largest bucket {buckets[-1]}"
            )
        longest_target = int(data.label_lengths.max())
        if self.label_bucket_lengths and longest_target > self.label_bucket_lengths[-1]:
            raise DataError(f"{data.source or 'data'}: a target of length {longest_target} exceeds "
                            f"the largest target bucket {self.label_bucket_lengths[-1]}")
        self.shuffle = shuffle
        # model.logits_at_targets: the most labelled tokens a row holds; batches then carry target_positions
        self.target_most: int | None = None
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        """This epoch's example order (memoized; a pure function of seed and epoch)."""
        if self._perm_epoch != epoch:
            n = len(self.data)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def global_rows(self, step: int) -> np.ndarray:
        """Example indices of the whole (all-process) batch at ``step``."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.global_batch_size
        return self._permutation(epoch)[start : start + self.global_batch_size]

    def padded_length(self, rows: np.ndarray) -> int:
        """Smallest bucket that fits the longest of ``rows``."""
        longest = int(self._lengths[rows].max())
        return next(b for b in self.bucket_lengths if b >= longest)

    def padded_label_length(self, rows: np.ndarray) -> int:
        """Smallest target bucket that fits the longest target of ``rows`` (seq2seq); the input length otherwise."""
        if self.label_bucket_lengths is None:
            return self.padded_length(rows)
        longest = int(self.data.label_lengths[rows].max())
        return next(b for b in self.label_bucket_lengths if b >= longest)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the batch at ``step``.

        Args:
            step: global training step (0-based); epochs wrap around.

        Returns:
            int32 arrays of shape (global_batch_size // process_count, L), L a
            bucket length: ``input_ids`` (right-padded with pad_id),
            ``attention_mask`` (1 real, 0 pad) and ``labels`` (-100 on padding
            and masked prompt; aligned with input_ids, not shifted). For
            seq2seq data labels are the decoder targets, (rows, target bucket).
        """
        rows = self.global_rows(step)
        length = self.padded_length(rows)
        b = self.local_batch_size
        local = rows[self.process_index * b : (self.process_index + 1) * b]
        ids, labels = self.data.rows(local)
        out_ids = np.full((b, length), self.pad_id, dtype=np.int32)
        out_mask = np.zeros((b, length), dtype=np.int32)
        out_labels = np.full((b, self.padded_label_length(rows)), IGNORE_INDEX, dtype=np.int32)
        for i, (x, y) in enumerate(zip(ids, labels)):
            out_ids[i, : len(x)] = x
            out_mask[i, : len(x)] = 1
            out_labels[i, : len(y)] = y
        out = {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}
        if self.target_most is not None:  # model.logits_at_targets
            out["target_positions"] = target_positions(out_labels, self.target_most)
        return out

    def examples_in(self, steps: int) -> int:
        """How many examples the first `steps` batches hold."""
        return min(steps, self.steps_per_epoch) * self.global_batch_size

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yields ``batch(s)`` for s from start_step, num_steps times (None: forever)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Number of non-pad tokens in a batch (for tokens/s); a packed batch's mask holds segment ids (0 = pad)."""
    return int(np.count_nonzero(np.asarray(batch["attention_mask"])))

