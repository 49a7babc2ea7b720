"""Tokenized examples (`TokenizedData`) and how a config's records become them: `load_tokenized`.

Records are tokenized once through `datasets.map` into an Arrow cache file keyed by everything that changes the
output (config fields, the tokenizer's full serialization, the source file's stat), so a rerun reuses it and any
change gets a new file. The eval split is carved off after tokenizing (seeded, so every process agrees), and
examples with no trained label left after truncation are dropped and counted, as they would give a 0/0 loss.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np

from jaxlora.losses import IGNORE_INDEX
from jaxlora.training.data.config import DataConfig, DataError
from jaxlora.training.data.records import load_records, where
from jaxlora.training.data.tokenize import tokenize_example

_CACHE_VERSION = "2"  # bump when tokenize_example's output changes meaning

# datasets>=4 spells a list feature List; 3.x only has Sequence (pyproject allows >=3.0).
_ListFeature = getattr(datasets, "List", datasets.Sequence)

# Output schema of the tokenize map; int32 halves the cache size vs int64.
_TOKENIZED_FEATURES = datasets.Features(
    {
        "input_ids": _ListFeature(datasets.Value("int32")),
        "labels": _ListFeature(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "label_length": datasets.Value("int32"),
        "num_trained": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
    }
)


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Tokenized examples backed by an Arrow ``datasets.Dataset`` (memory-mapped).

    Attributes:
        dataset: columns ``input_ids``, ``labels`` (int32 lists) and ``length``.
        num_examples: examples kept (== ``len(self)``).
        num_truncated: examples of this part cut to max_length (kept or dropped).
        num_truncated_kept: of those, the ones kept (a labelled token survived the cut).
        num_dropped: examples dropped because no label survived truncation.
        dropped: where the first dropped examples are (``file:line``), for the warning that names them.
        source: where the data came from, for messages.
        seq2seq: labels are decoder targets of their own length (``label_length`` column), not aligned with input_ids.
    """

    dataset: datasets.Dataset
    num_examples: int
    num_truncated: int = 0
    num_truncated_kept: int = 0
    num_dropped: int = 0
    dropped: tuple[str, ...] = ()
    source: str = ""
    seq2seq: bool = False

    def __len__(self) -> int:
        return self.num_examples

    @property
    def lengths(self) -> np.ndarray:
        """Sequence length of every example (int32), cached on first use."""
        return self._int_column("length")

    @property
    def label_lengths(self) -> np.ndarray:
        """Decoder-target length of every example (seq2seq; == lengths otherwise), cached on first use."""
        return self._int_column("label_length" if self.seq2seq else "length")

    @property
    def num_trained(self) -> np.ndarray:
        """Labelled tokens (labels != -100) of every example, cached on first use."""
        return self._int_column("num_trained")

    def _int_column(self, name: str) -> np.ndarray:
        """A per-example int column as an int32 array, read once."""
        cached = self.__dict__.get("_" + name)
        if cached is None:
            cached = np.asarray(self.dataset.with_format("numpy")[name], dtype=np.int32)
            object.__setattr__(self, "_" + name, cached)
        return cached

    def rows(self, indices: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(input_ids, labels) of the given examples, in the given order."""
        if len(indices) == 0:
            return [], []
        picked = self.dataset[[int(i) for i in indices]]
        ids = [np.asarray(x, dtype=np.int32) for x in picked["input_ids"]]
        labels = [np.asarray(x, dtype=np.int32) for x in picked["labels"]]
        return ids, labels

    @classmethod
    def from_lists(
        cls, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], source: str = "<memory>",
        seq2seq: bool = False,
    ) -> TokenizedData:
        """Builds in-memory data from token lists (handy for tests and small evals)."""
        if len(input_ids) != len(labels):
            raise DataError(f"{source}: {len(input_ids)} input_ids rows but {len(labels)} labels rows")
        for i, (x, y) in enumerate(zip(input_ids, labels)):
            if len(x) != len(y) and not seq2seq:
                raise DataError(f"{source}: example {i}: {len(x)} input_ids but {len(y)} labels")
        columns = ("input_ids", "labels", "length", "label_length", "num_trained")
        ds = datasets.Dataset.from_dict(
            {
                "input_ids": [list(map(int, x)) for x in input_ids],
                "labels": [list(map(int, y)) for y in labels],
                "length": [len(x) for x in input_ids],
                "label_length": [len(y) for y in labels],
                "num_trained": [sum(1 for v in y if v != IGNORE_INDEX) for y in labels],
            },
            features=datasets.Features({c: _TOKENIZED_FEATURES[c] for c in columns}),
        )
        return cls(dataset=ds, num_examples=len(ds), source=source, seq2seq=seq2seq)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies a tokenizer well enough to key a cache on it."""
    parts = [
        type(tokenizer).__name__,
        str(getattr(tokenizer, "name_or_path", "")),
        str(len(tokenizer)),
        str(tokenizer.bos_token_id),
        str(tokenizer.eos_token_id),
        str(getattr(tokenizer, "chat_template", None)),
    ]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The full serialized tokenizer: catches same-name tokenizers with different vocabularies.
        parts.append(hashlib.sha256(backend.to_str().encode()).hexdigest())
    return "|".join(parts)


def _source_fingerprint(path: str, records: datasets.Dataset) -> str:
    """Identifies the loaded records: path, file stat and datasets' fingerprint."""
    local = os.path.expanduser(path)
    stat = ""
    if os.path.isfile(local):
        st = os.stat(local)
        stat = f"{st.st_size}:{st.st_mtime_ns}"
    return f"{os.path.abspath(local) if os.path.exists(local) else path}|{stat}|{getattr(records, '_fingerprint', '')}"


def _cache_key(cfg: DataConfig, tokenizer: Any, path: str, records: datasets.Dataset) -> str:
    """Hash of everything that changes tokenize_example's output for these records."""
    relevant = {
        f: getattr(cfg, f)
        for f in (
            "format", "prompt_template", "response_template", "messages_field",
            "train_on_inputs", "max_length", "add_eos", "max_examples", "split",
            "seq2seq", "max_target_length", "label_words", "label_field",
        )
    }
    blob = json.dumps(
        [_CACHE_VERSION, relevant, _tokenizer_fingerprint(tokenizer), _source_fingerprint(path, records)],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenize_records(
    records: datasets.Dataset, cfg: DataConfig, tokenizer: Any, path: str
) -> datasets.Dataset:
    """Maps tokenize_example over records through datasets' (cached) map."""
    key = _cache_key(cfg, tokenizer, path, records)
    cache_file = None
    if cfg.cache_dir is not None:
        os.makedirs(cfg.cache_dir, exist_ok=True)
        cache_file = os.path.join(cfg.cache_dir, f"jaxlora-tokenized-{key}.arrow")

    def encode(record: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            out = tokenize_example(record, cfg, tokenizer)
        except DataError as err:
            raise DataError(f"{where(path, index)}: {err}") from None
        out["length"] = len(out["input_ids"])
        out["label_length"] = len(out["labels"])
        out["num_trained"] = sum(1 for y in out["labels"] if y != IGNORE_INDEX)
        return out

    try:
        return _map(records, encode, cache_file, key, path)
    except OSError as err:
        if err.errno == errno.ENOSPC or "No space left" in str(err):  # name the cache, not what pyarrow said
            raise OSError(errno.ENOSPC, "No space left on device", cache_file or cfg.cache_dir or path) from None
        raise


def _map(records: datasets.Dataset, encode, cache_file: str | None, key: str, path: str) -> datasets.Dataset:
    return records.map(
        encode,
        with_indices=True,
        remove_columns=records.column_names,
        features=_TOKENIZED_FEATURES,
        cache_file_name=cache_file,
        # Our own key: datasets would otherwise try to hash the tokenizer inside the closure.
        new_fingerprint=key,
        desc=f"Tokenizing {os.path.basename(path) or path}",
    )


def _eval_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices), seeded with 0 so every run/process agrees."""
    n_eval = max(1, int(round(n * fraction)))
    if n_eval >= n:
        raise DataError(
            f"eval_fraction={fraction} of {n} examples leaves no training data; "
            "use more data, a smaller eval_fraction, or eval_path"
        )
    perm = np.random.default_rng(0).permutation(n)
    # Sorted so reads stay in file order (the BatchLoader shuffles anyway).
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def load_tokenized(cfg: DataConfig, tokenizer: Any, split: str = "train") -> TokenizedData:
    """Loads, tokenizes (cached) and filters the training or eval examples.

    Args:
        cfg: data config.
        tokenizer: a Hugging Face tokenizer (fast or slow).
        split: "train" or "eval". "eval" reads ``cfg.eval_path`` if set, else
            the seeded ``cfg.eval_fraction`` part of ``cfg.path``.

    Returns:
        TokenizedData; examples with no trained label after truncation are
        dropped and counted in ``num_dropped``.

    Raises:
        DataError: bad split, no eval data configured, unreadable data, or a
            record missing a field (naming file, line/record and field).
    """
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.add_eos and tokenizer.eos_token_id is None:
        raise DataError("DataConfig.add_eos is True but the tokenizer has no eos_token_id")
    use_eval_path = split == "eval" and cfg.eval_path is not None
    if split == "eval" and not use_eval_path and cfg.eval_fraction == 0.0:
        raise DataError("no eval data: set DataConfig.eval_path or DataConfig.eval_fraction > 0")
    path = cfg.eval_path if use_eval_path else cfg.path
    split_name = (cfg.eval_split or cfg.split) if use_eval_path else cfg.split

    records = load_records(path, split_name, cache_dir=cfg.cache_dir)
    if cfg.max_examples is not None and cfg.max_examples < len(records):
        records = records.select(range(cfg.max_examples))
    # Tokenize before splitting off eval: record indices in errors match the file,
    # and train and eval share one cache file.
    tokenized = _tokenize_records(records, dataclasses.replace(cfg, split=split_name), tokenizer, path)
    record_index = np.arange(len(tokenized))  # position in the file of each example kept so far, for messages
    if not use_eval_path and cfg.eval_fraction > 0.0:
        train_idx, eval_idx = _eval_split(len(tokenized), cfg.eval_fraction)
        record_index = eval_idx if split == "eval" else train_idx
        tokenized = tokenized.select(record_index)
    data = _drop_untrainable(tokenized, path, record_index, bool(cfg.seq2seq))
    if data.num_examples == 0 and data.num_dropped:
        raise DataError(f"{path}: all {data.num_dropped} {split} examples were dropped: none keeps a labelled token "
                        f"within data.max_length={cfg.max_length} (the prompt fills it). Raise data.max_length or "
                        f"shorten the prompts; dropped: {', '.join(data.dropped)}")
    return data


_NAMED_DROPS = 5  # how many dropped examples a message names


def _drop_untrainable(tokenized: datasets.Dataset, path: str, record_index: np.ndarray,
                      seq2seq: bool = False) -> TokenizedData:
    """Drops examples with no trained label (would give a 0/0 loss), counts them and names the first few."""
    cols = tokenized.with_format("numpy")
    num_trained = np.asarray(cols["num_trained"])
    truncated = np.asarray(cols["truncated"], dtype=bool) if len(tokenized) else np.zeros(0, bool)
    keep = np.flatnonzero(num_trained > 0)
    num_dropped = len(tokenized) - len(keep)
    dropped: tuple[str, ...] = ()
    if num_dropped:
        first = np.flatnonzero(num_trained <= 0)[:_NAMED_DROPS]
        dropped = tuple(where(path, int(record_index[i])) for i in first)
        if num_dropped > len(first):
            dropped += (f"... ({num_dropped - len(first)} more)",)
        tokenized = tokenized.select(keep)
    return TokenizedData(
        dataset=tokenized.select_columns(["input_ids", "labels", "length", "label_length", "num_trained"]),
        num_examples=len(tokenized),
        num_truncated=int(truncated.sum()),
        num_truncated_kept=int(truncated[keep].sum()),
        num_dropped=num_dropped,
        dropped=dropped,
        source=path,
        seq2seq=seq2seq,
    )
