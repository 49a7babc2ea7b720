"""One record -> one training example: templates or chat template, prompt masking, label words, seq2seq layout.

Causal LMs get one sequence, prompt + response (+ eos), with the prompt's labels set to IGNORE_INDEX unless
`train_on_inputs` (the alpaca-lora / BELLE recipe). Encoder-decoders (T5) get the seq2seq layout instead: the prompt
is the encoder's `input_ids`, the response (+ eos) the decoder's `labels`, each truncated to its own length.
Classification data can name its target by class id (`label_words`: record["label"] = 1 -> "positive"), as T5
casts GLUE. A missing field is a `DataError` naming it; the caller adds file and line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlora.losses import IGNORE_INDEX
from jaxlora.training.data.config import DataConfig, DataError, template_fields


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
    for field in template_fields(template, name):
        value = _field(record, field)
        if isinstance(value, (list, tuple, dict, Mapping)):
            kind = "an object" if isinstance(value, Mapping) else "a list"
            raise DataError(f"field {field!r} is {kind}, but DataConfig.{name} needs text there "
                            f"(a string or a number); got {str(value)[:80]}")
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
    return {f: "" for f in template_fields(cfg.prompt_template, "prompt_template") if f != cfg.label_field}


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
