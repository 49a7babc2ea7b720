"""Instruction data for LoRA fine-tuning: load, tokenize, mask, bucket, batch.

Records are read through Hugging Face ``datasets`` (local json/jsonl/parquet/csv
files, ``save_to_disk`` folders, or hub names), rendered with prompt/response
templates or the tokenizer's chat template, and tokenized with the prompt
masked out of the loss (label -100), as in the alpaca-lora / BELLE recipes.

For an encoder-decoder (T5) the layout is seq2seq instead: the prompt is the
encoder's ``input_ids`` and the response (+ eos) the decoder's ``labels``, each
padded to its own buckets. Classification data can name its target by class id
(``label_words``: record["label"] = 1 -> "positive"), as T5 casts GLUE.

Batches are padded to one of a small, fixed set of lengths ("buckets") so a
jitted train step compiles only a bounded number of shapes. ``BatchLoader.batch``
is a pure function of the step number, so resuming from a checkpoint at step N
reproduces exactly the batches an uninterrupted run would have seen, and each
process materialises only its own slice of the global batch.

Bad user input raises ``DataError`` with one message naming the file, line or
record, and field, instead of a traceback from deep inside a library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from jaxlora.losses import IGNORE_INDEX  # noqa: E402  (label value the loss ignores)

_FORMATS = ("template", "chat")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
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


class DataError(ValueError):
    """Bad data or data config, with a message that names the culprit."""


# --------------------------------------------------------------------------- config


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
            _template_fields(self.prompt_template, "prompt_template")
            _template_fields(self.response_template, "response_template")

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


def _template_fields(template: str, name: str) -> list[str]:
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


# --------------------------------------------------------------------------- loading


def _looks_local(path: str) -> bool:
    """Whether a non-existent path was meant as a local file rather than a hub name."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or os.path.splitext(path)[1].lower() in _FILE_BUILDERS
    )


def load_records(path: str, split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """Loads raw records from a local file, a save_to_disk folder or the hub.

    Args:
        path: ``.json`` (JSON lines or one JSON array), ``.jsonl``, ``.parquet``
            or ``.csv`` file; a ``datasets.save_to_disk`` folder; or a hub
            dataset name.
        split: split to take from a hub dataset or a saved ``DatasetDict``.
        cache_dir: passed to ``datasets.load_dataset`` (where it keeps the
            Arrow conversion of files); None = datasets' default.

    Returns:
        The records as a ``datasets.Dataset``.

    Raises:
        DataError: missing file, unsupported extension, malformed JSON
            (naming file and line), unknown split, or a failed hub load.
    """
    if not path:
        raise DataError("no data path given (DataConfig.path is empty)")
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return _load_from_disk(local, split)
    if os.path.isfile(local):
        return _load_file(local, cache_dir)
    if _looks_local(path):
        raise DataError(f"{path}: no such file or directory")
    try:  # Hub dataset name; not reachable from tests (no network there).
        return datasets.load_dataset(path, split=split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise DataError(f"could not load dataset {path!r} (split {split!r}) from the hub: {err}") from err


def _load_from_disk(path: str, split: str) -> datasets.Dataset:
    """Loads a save_to_disk folder, picking ``split`` from a DatasetDict."""
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a datasets.save_to_disk folder: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; splits are {sorted(loaded)}")
        return loaded[split]
    return loaded


def _load_file(path: str, cache_dir: str | None) -> datasets.Dataset:
    """Loads one local data file with the datasets builder for its extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise DataError(f"{path}: unsupported file type {ext!r}; use one of {sorted(_FILE_BUILDERS)}")
    try:
        return datasets.load_dataset(
            _FILE_BUILDERS[ext], data_files=path, split="train", cache_dir=cache_dir
        )
    except Exception as err:  # noqa: BLE001
        if _FILE_BUILDERS[ext] == "json":
            _raise_json_error(path)  # datasets' own message hides the line; find it ourselves
        raise DataError(f"{path}: could not load as {ext[1:]}: {err}") from err


def _raise_json_error(path: str) -> None:
    """Scans a JSON / JSON-lines file and raises DataError at the first bad line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: array element {i}: expected a JSON object, got {type(rec).__name__}")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON: {err}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")


def _jsonl_line_of(path: str, record_index: int) -> int | None:
    """1-based line of the ``record_index``-th (0-based) non-blank line of a JSON-lines file."""
    seen = -1
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == record_index:
                    return lineno
    return None


def _where(path: str, record_index: int) -> str:
    """``file:line`` for JSON-lines files, else ``file: record N`` (1-based)."""
    local = os.path.expanduser(path)
    if os.path.isfile(local) and local.lower().endswith((".jsonl", ".json")):
        with open(local, encoding="utf-8") as f:
            is_array = f.read(4096).lstrip().startswith("[")
        if not is_array:
            line = _jsonl_line_of(local, record_index)
            if line is not None:
                return f"{path}:{line}"
    return f"{path}: record {record_index + 1}"


# --------------------------------------------------------------------------- tokenizing


def _field(record: Mapping[str, Any], name: str) -> Any:
    """record[name], or DataError naming the field and the fields present."""
    value = record.get(name)
    if value is None:
        # datasets fills keys absent from some JSON lines with None, so None means "missing".
        present = sorted(k for k, v in record.items() if v is not None)
        raise DataError(f"missing field {name!r} (fields present: {', '.join(present) or 'none'})")
    return value


def _render(template: str, record: Mapping[str, Any], name: str) -> str:
    """Formats ``template`` over the record, checking the fields it uses exist."""
    for field in _template_fields(template, name):
        _field(record, field)
    try:
        return template.format(**record)
    except (KeyError, IndexError, AttributeError, ValueError, TypeError) as err:
        raise DataError(f"DataConfig.{name} {template!r} could not be applied: {err!r}") from None


def _token_ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text`` as a plain list."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _template_parts(record: Mapping[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids with the tokenizer's default special tokens, response ids without)."""
    prompt = _render(cfg.prompt_template, record, "prompt_template")
    response = _label_word(record, cfg) if cfg.label_words else _render(cfg.response_template, record,
                                                                         "response_template")
    return _token_ids(tokenizer, prompt, True), _token_ids(tokenizer, response, False)


def _label_word(record: Mapping[str, Any], cfg: DataConfig) -> str:
    """label_words[record[label_field]], or DataError naming the field, its value and the classes."""
    value = _field(record, cfg.label_field)
    n = len(cfg.label_words)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise DataError(f"field {cfg.label_field!r} is {value!r}, not a class id in [0, {n}) "
                        f"(label_words: {', '.join(cfg.label_words)})")
    return cfg.label_words[int(value)]


def _chat_messages(record: Mapping[str, Any], cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(messages before the last assistant turn, conversation through it)."""
    messages = _field(record, cfg.messages_field)
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
    ):
        raise DataError(f"field {cfg.messages_field!r} must be a list of {{'role', 'content'}} objects")
    # Arrow may add keys from other rows as None; keep only what chat templates expect.
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"field {cfg.messages_field!r} has no message with role 'assistant'")
    return messages[:last], messages[: last + 1]


def _chat_parts(record: Mapping[str, Any], cfg: DataConfig, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) from the tokenizer's chat template."""
    prompt_msgs, full_msgs = _chat_messages(record, cfg)
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(full_msgs, tokenize=False)
    # Chat templates write their own BOS/markers into the text, so no extra special tokens.
    prompt_ids = _token_ids(tokenizer, prompt_text, False)
    full_ids = _token_ids(tokenizer, full_text, False)
    n = len(prompt_ids)
    # Normally the prompt's tokens are a prefix of the conversation's; if a merge
    # across the boundary breaks that, still mask the first len(prompt) tokens.
    # Either way the split point is n, so slicing full_ids covers both cases.
    return full_ids[:n], full_ids[n:]


def tokenize_example(record: Mapping[str, Any], cfg: DataConfig, tokenizer: Any) -> dict[str, Any]:
    """Tokenizes one record into a prompt-masked training sequence.

    Args:
        record: one data record (a mapping of field name to value).
        cfg: data config (format, templates, masking, truncation, eos).
        tokenizer: a Hugging Face tokenizer.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated": bool}``;
        labels equal input_ids except -100 on prompt tokens (unless
        ``cfg.train_on_inputs``). Labels are not shifted. Sequences longer than
        ``cfg.max_length`` keep their beginning and have ``truncated=True``.
        With ``cfg.seq2seq``, input_ids is the prompt alone and labels the
        response (+ eos), each with its own length limit.

    Raises:
        DataError: a field the templates need is missing (the message names it
            and lists the fields present; the caller adds file and line).
    """
    parts = _chat_parts if cfg.format == "chat" else _template_parts
    prompt_ids, response_ids = parts(record, cfg, tokenizer)
    eos = tokenizer.eos_token_id
    # Chat templates often end the turn with eos already; don't train on two.
    if cfg.add_eos and eos is not None and not (response_ids and response_ids[-1] == eos):
        response_ids = response_ids + [eos]
    if cfg.seq2seq:
        return _seq2seq_example(prompt_ids, response_ids, cfg, eos)
    input_ids = prompt_ids + response_ids
    prompt_labels = prompt_ids if cfg.train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    labels = prompt_labels + response_ids
    truncated = len(input_ids) > cfg.max_length
    return {
        "input_ids": input_ids[: cfg.max_length],
        "labels": labels[: cfg.max_length],
        "truncated": truncated,
    }


def label_word_ids(cfg: DataConfig, tokenizer: Any) -> list[list[int]]:
    """The decoder targets ``tokenize_example`` gives each of ``cfg.label_words`` (class order), for scoring."""
    if not cfg.label_words:
        raise DataError("DataConfig.label_words is empty")
    as_targets = dataclasses.replace(cfg, seq2seq=True, train_on_inputs=False)
    return [tokenize_example({cfg.label_field: c, **_placeholders(cfg)}, as_targets, tokenizer)["labels"]
            for c in range(len(cfg.label_words))]


def _placeholders(cfg: DataConfig) -> dict[str, str]:
    """An empty value for every field the prompt template reads (label_word_ids only needs the response)."""
    return {f: "" for f in _template_fields(cfg.prompt_template, "prompt_template") if f != cfg.label_field}


def _seq2seq_example(prompt_ids: list[int], response_ids: list[int], cfg: DataConfig, eos: int | None) -> dict:
    """Encoder input = the prompt (its tokenizer's eos kept last when cut), decoder labels = the response."""
    input_ids = prompt_ids[: cfg.max_length]
    if len(prompt_ids) > cfg.max_length and eos is not None and prompt_ids[-1] == eos:
        input_ids[-1] = eos  # T5's tokenizer ends every input with </s>; truncation keeps it, as HF's does
    return {
        "input_ids": input_ids,
        "labels": response_ids[: cfg.target_length],
        "truncated": len(prompt_ids) > cfg.max_length or len(response_ids) > cfg.target_length,
    }


# --------------------------------------------------------------------------- tokenized data


@dataclasses.dataclass(frozen=True)
class TokenizedData:
    """Tokenized examples backed by an Arrow ``datasets.Dataset`` (memory-mapped).

    Attributes:
        dataset: columns ``input_ids``, ``labels`` (int32 lists) and ``length``.
        num_examples: examples kept (== ``len(self)``).
        num_truncated: examples of this part cut to max_length (kept or dropped).
        num_dropped: examples dropped because no label survived truncation.
        source: where the data came from, for messages.
        seq2seq: labels are decoder targets of their own length (``label_length`` column), not aligned with input_ids.
    """

    dataset: datasets.Dataset
    num_examples: int
    num_truncated: int = 0
    num_dropped: int = 0
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
        columns = ("input_ids", "labels", "length", "label_length")
        ds = datasets.Dataset.from_dict(
            {
                "input_ids": [list(map(int, x)) for x in input_ids],
                "labels": [list(map(int, y)) for y in labels],
                "length": [len(x) for x in input_ids],
                "label_length": [len(y) for y in labels],
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
            raise DataError(f"{_where(path, index)}: {err}") from None
        out["length"] = len(out["input_ids"])
        out["label_length"] = len(out["labels"])
        out["num_trained"] = sum(1 for y in out["labels"] if y != IGNORE_INDEX)
        return out

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
    if not use_eval_path and cfg.eval_fraction > 0.0:
        train_idx, eval_idx = _eval_split(len(tokenized), cfg.eval_fraction)
        tokenized = tokenized.select(eval_idx if split == "eval" else train_idx)
    return _drop_untrainable(tokenized, path, bool(cfg.seq2seq))


def _drop_untrainable(tokenized: datasets.Dataset, path: str, seq2seq: bool = False) -> TokenizedData:
    """Drops examples with no trained label (would give a 0/0 loss) and counts."""
    cols = tokenized.with_format("numpy")
    num_trained = np.asarray(cols["num_trained"])
    num_truncated = int(np.asarray(cols["truncated"]).sum()) if len(tokenized) else 0
    keep = np.flatnonzero(num_trained > 0)
    num_dropped = len(tokenized) - len(keep)
    if num_dropped:
        tokenized = tokenized.select(keep)
    return TokenizedData(
        dataset=tokenized.select_columns(["input_ids", "labels", "length", "label_length"]),
        num_examples=len(tokenized),
        num_truncated=num_truncated,
        num_dropped=num_dropped,
        source=path,
        seq2seq=seq2seq,
    )


# --------------------------------------------------------------------------- batching


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
        return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yields ``batch(s)`` for s from start_step, num_steps times (None: forever)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1


def count_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Number of non-pad tokens in a batch (for tokens/s)."""
    return int(np.asarray(batch["attention_mask"]).sum())
