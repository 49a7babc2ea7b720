"""What data to read and how to shape it: `DataConfig`, `DataError` and the bucket ladders.

The config is checked once, when it is built, so a bad template, bucket list or fraction fails with a
`DataError` naming the field before any file is read. `bucket_lengths` / `target_bucket_lengths` give the small,
fixed set of padded lengths batches may have, so a jitted train step compiles only a bounded number of shapes.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

_FORMATS = ("template", "chat")


class DataError(ValueError):
    """Bad data or data config, with a message that names the culprit."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What data to read and how to turn it into training sequences."""

    # Local .json/.jsonl/.parquet/.csv file, a datasets.save_to_disk folder, or a hub dataset name.
    path: str = ""
    # Split to read from a hub dataset / DatasetDict folder.
    split: str = "train"
    # Held-out data (same kinds as path); None: split eval_fraction off the training data.
    eval_path: str | None = None
    # Fraction of training examples held out when eval_path is None (seeded).
    eval_fraction: float = 0.0
    # "template": prompt/response templates over record fields; "chat": tokenizer chat template.
    format: str = "template"
    # Python str.format template over record fields, e.g. "Human: {input}\n\nAssistant: ".
    prompt_template: str = "{input}"
    # Template for the trained-on part.
    response_template: str = "{target}"
    # format="chat": field with a list of {"role","content"}; the LAST assistant message is the response.
    messages_field: str = "messages"
    # False: prompt tokens get label -100 (alpaca-lora / BELLE recipe default).
    train_on_inputs: bool = False
    # Longer sequences are truncated (and counted), never an error.
    max_length: int = 512
    # Padded sequence lengths; () = powers of two from 64 up to max_length (max_length always included).
    bucket_lengths: tuple[int, ...] = ()
    # Pack several examples into each row of max_length (block-diagonal attention, positions per example; causal LMs
    # only): no compute spent on padding. Batches are padded to the smallest bucket that fits their fullest row.
    packing: bool = False
    # Append tokenizer.eos_token_id to the response.
    add_eos: bool = True
    # Keep only the first N records (after loading, before shuffling).
    max_examples: int | None = None
    # Where tokenized datasets are cached (datasets' map cache); None = datasets default.
    cache_dir: str | None = None
    # Split of eval_path to read (hub dataset / DatasetDict folder); None = `split`.
    eval_split: str | None = None
    # Layout: False = one causal-LM sequence (prompt + response); True = prompt -> encoder input_ids, response ->
    # decoder labels (encoder-decoders); None = follow the model (the trainer resolves it).
    seq2seq: bool | None = None
    # seq2seq: longest decoder target (longer ones are truncated); None = max_length.
    max_target_length: int | None = None
    # seq2seq: padded target lengths; () = powers of two from 8 up to max_target_length.
    target_bucket_lengths: tuple[int, ...] = ()
    # Classification: the response is label_words[record[label_field]] (class id -> word, T5's GLUE casting); the
    # trainer then also reports held-out accuracy by scoring every label word (jaxlora.tasks.t5_glue).
    label_words: tuple[str, ...] = ()
    label_field: str = "label"

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML/JSON configs) but store a hashable tuple.
        object.__setattr__(self, "bucket_lengths", tuple(self.bucket_lengths))
        object.__setattr__(self, "target_bucket_lengths", tuple(self.target_bucket_lengths))
        object.__setattr__(self, "label_words", tuple(self.label_words))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise DataError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.format not in _FORMATS:
            raise DataError(f"DataConfig.format must be one of {_FORMATS}, got {self.format!r}")
        if self.max_length <= 0:
            raise DataError(f"DataConfig.max_length must be > 0, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 0:
            raise DataError(f"DataConfig.max_examples must be >= 0 or None, got {self.max_examples}")
        _check_buckets(self.bucket_lengths, self.max_length)
        if self.max_target_length is not None and self.max_target_length <= 0:
            raise DataError(f"DataConfig.max_target_length must be > 0 or None, got {self.max_target_length}")
        _check_buckets(self.target_bucket_lengths, self.target_length, "target_bucket_lengths", "max_target_length")
        if self.seq2seq and self.train_on_inputs:
            raise DataError("DataConfig.train_on_inputs has no meaning with seq2seq: the prompt is the encoder's input, "
                            "never a target")
        if self.label_words:
            if self.format != "template":
                raise DataError("DataConfig.label_words needs format 'template' (the response is the class's word)")
            if self.response_template != "{target}":
                raise DataError("DataConfig.label_words sets the response (label_words[record[label_field]]); "
                                "leave response_template at its default")
            if len(set(self.label_words)) != len(self.label_words) or not all(self.label_words):
                raise DataError(f"DataConfig.label_words must be distinct, non-empty words, got {self.label_words}")
        if self.format == "template":
            template_fields(self.prompt_template, "prompt_template")
            template_fields(self.response_template, "response_template")

    @property
    def target_length(self) -> int:
        """The longest decoder target of the seq2seq layout."""
        return self.max_target_length or self.max_length


def _check_buckets(buckets: tuple[int, ...], max_length: int, name: str = "bucket_lengths",
                   max_name: str = "max_length") -> None:
    """Raises DataError unless buckets are strictly increasing ints in (0, max_length]."""
    for b in buckets:
        if not isinstance(b, (int, np.integer)) or b <= 0:
            raise DataError(f"DataConfig.{name} must be positive ints, got {buckets}")
    if list(buckets) != sorted(set(buckets)):
        raise DataError(f"DataConfig.{name} must be strictly increasing, got {buckets}")
    if buckets and buckets[-1] > max_length:
        raise DataError(f"DataConfig.{name} must be <= {max_name}={max_length}, got {buckets}")


def template_fields(template: str, name: str) -> list[str]:
    """Returns the record fields a str.format template uses (base names only)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise DataError(f"DataConfig.{name} {template!r} is not a valid format string: {err}")
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        # "{a.b}" / "{a[0]}" look up field "a"; "{}" / "{0}" are positional and can't name a field.
        base = field.split(".")[0].split("[")[0]
        if base == "" or base.isdigit():
            raise DataError(
                f"DataConfig.{name} {template!r} uses a positional field {{{field}}}; "
                "name a record field instead, e.g. {input}"
            )
        fields.append(base)
    return fields


def bucket_lengths(cfg: DataConfig) -> tuple[int, ...]:
    """The padded sequence lengths batches may have.

    Args:
        cfg: data config.

    Returns:
        Strictly increasing lengths whose last element is ``cfg.max_length``;
        ``cfg.bucket_lengths`` if given, else powers of two from 64 below
        ``max_length``, always followed by ``max_length`` itself so every
        (truncated) sequence fits some bucket.
    """
    return _ladder(cfg.bucket_lengths, cfg.max_length, 64)


def target_bucket_lengths(cfg: DataConfig) -> tuple[int, ...]:
    """The padded decoder-target lengths of seq2seq batches: ``cfg.target_bucket_lengths`` if given, else powers of
    two from 8 below ``cfg.target_length``, always followed by ``cfg.target_length`` itself."""
    return _ladder(cfg.target_bucket_lengths, cfg.target_length, 8)


def _ladder(given: tuple[int, ...], longest: int, first: int) -> tuple[int, ...]:
    """``given``, or powers of two from ``first`` below ``longest``; ``longest`` always last."""
    if given:
        buckets = list(given)
    else:
        buckets, b = [], first
        while b < longest:
            buckets.append(b)
            b *= 2
    if not buckets or buckets[-1] != longest:
        buckets.append(longest)
    return tuple(int(b) for b in buckets)
