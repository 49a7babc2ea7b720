"""Sequence classification data and evaluation for classifier models (BERT): texts + class ids -> padded batches of
{"input_ids", "attention_mask", "labels" (B,)}, the batch format `Model.loss_sums`, `jaxlora.training.step` and
`jaxlora.lora_ga_init` take, and held-out accuracy.

    data = encode(tokenizer, texts, labels, max_length=32, num_labels=model.config.num_labels)
    for batch in batches(data, 16, seed=0): ...                    # shuffled epochs, full batches only
    acc = accuracy(model, params, trainable, test_data)            # trainable = {"lora": ..., "full": ...}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import lora as lora_lib
from jaxlora.models.bert import check_labels


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], *, max_length: int,
           num_labels: int) -> dict[str, np.ndarray]:
    """Tokenized rows padded/truncated to max_length (int32) and their labels, checked against the head's classes."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    labels = np.asarray(labels)
    check_labels(labels, num_labels)
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
            "labels": labels.astype(np.int32)}


def batches(data: dict[str, np.ndarray], batch_size: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless full batches, reshuffled every epoch (the same seed gives the same order)."""
    n = len(data["labels"])
    if n < batch_size:
        raise ValueError(f"{n} examples are fewer than one batch of {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield {k: v[order[i:i + batch_size]] for k, v in data.items()}


def predict(model, params, trainable, data: dict[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Argmax class per row (numpy), with the LoRA tree and fully trained modules of `trainable` applied."""
    cache = vars(model).setdefault("_classify_predict", {})
    if "fn" not in cache:  # one compiled forward per model (and batch shape)
        def fn(params, trainable, ids, mask):
            logits = model.apply(lora_lib.overlay(params, trainable["full"]), ids, mask, lora=trainable["lora"])
            return jnp.argmax(logits, axis=-1)
        cache["fn"] = jax.jit(fn)
    n, out = len(data["labels"]), []
    for i in range(0, n, batch_size):
        ids, mask = data["input_ids"][i:i + batch_size], data["attention_mask"][i:i + batch_size]
        pad = batch_size - len(ids)  # the last batch is padded to the same shape: no second compilation
        ids, mask = (np.pad(x, ((0, pad), (0, 0))) for x in (ids, mask))
        out.append(np.asarray(cache["fn"](params, trainable, ids, mask))[:batch_size - pad])
    return np.concatenate(out)


def accuracy(model, params, trainable, data: dict[str, np.ndarray], batch_size: int = 64) -> float:
    """Fraction of rows whose argmax class equals the label."""
    return float(np.mean(predict(model, params, trainable, data, batch_size) == data["labels"]))
