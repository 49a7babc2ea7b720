"""GLUE as text-to-text for T5 (the LoRA-GA paper's T5 setting): each class is a label word, decoded as text.

An example's input is T5's task prefix + fields ("sst2 sentence: it's a charming journey ."), its target the label
word's tokens ("positive</s>"). `class_probs` scores every class by the decoder's probability of its label tokens
given the input and normalizes over the classes: p(c | x) = p(tokens_c | x) / sum_k p(tokens_k | x).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.losses import IGNORE_INDEX

# task -> (input template over the dataset's fields, label words by class id), as in T5's GLUE preprocessing
TASKS = {
    "sst2": ("sst2 sentence: {sentence}", ("negative", "positive")),
    "cola": ("cola sentence: {sentence}", ("unacceptable", "acceptable")),
    "mrpc": ("mrpc sentence1: {sentence1} sentence2: {sentence2}", ("not_equivalent", "equivalent")),
    "qnli": ("qnli question: {question} sentence: {sentence}", ("entailment", "not_entailment")),
    "rte": ("rte sentence1: {sentence1} sentence2: {sentence2}", ("entailment", "not_entailment")),
    "mnli": ("mnli hypothesis: {hypothesis} premise: {premise}", ("entailment", "neutral", "contradiction")),
}


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[list[int]]:
    """Each label word's target tokens (T5's tokenizer appends </s>, as in training targets)."""
    ids = [list(tokenizer(word).input_ids) for word in label_words]
    if len({tuple(x) for x in ids}) != len(ids):
        raise ValueError(f"label words {list(label_words)} do not tokenize to distinct targets: {ids}")
    return ids


def label_matrix(label_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """(C, L) int32 decoder targets, one row per class, right-padded with -100."""
    if not label_ids or any(len(x) == 0 for x in label_ids):
        raise ValueError(f"every class needs at least one label token, got {label_ids}")
    out = np.full((len(label_ids), max(len(x) for x in label_ids)), IGNORE_INDEX, np.int32)
    for c, ids in enumerate(label_ids):
        out[c, :len(ids)] = ids
    return out


def class_log_scores(model, params, input_ids, attention_mask, label_ids: Sequence[Sequence[int]],
                     lora=None) -> jax.Array:
    """(B, C) log p(label tokens of class c | row's input) under the decoder: all classes in one call."""
    labels_CxL = jnp.asarray(label_matrix(label_ids))
    n_cls = labels_CxL.shape[0]
    ids, mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    b = ids.shape[0]
    batch = {"input_ids": jnp.repeat(ids, n_cls, axis=0), "attention_mask": jnp.repeat(mask, n_cls, axis=0),
             "labels": jnp.tile(labels_CxL, (b, 1))}  # row i * C + c: input i, class c
    nll, _ = model.loss_sums(params, batch, lora, per_row=True)
    return -nll.reshape(b, n_cls)


def class_probs(model, params, input_ids, attention_mask, label_ids: Sequence[Sequence[int]],
                lora=None) -> np.ndarray:
    """(B, C) class probabilities: the label tokens' probabilities normalized over the classes."""
    return np.asarray(jax.nn.softmax(class_log_scores(model, params, input_ids, attention_mask, label_ids, lora),
                                     axis=-1))


def make_accuracy_step(model, label_ids: Sequence[Sequence[int]]):
    """`(params, trainable, batch) -> (correct, counted)` for `jax.jit`: the training loop's held-out accuracy.

    `trainable` is the train state's {"lora", "full"}; `batch` holds input_ids, attention_mask and "class" ((B,) gold
    class ids, -1 for rows not to count).
    """
    from jaxlora.lora import overlay

    def accuracy_step(params, trainable, batch):
        scores = class_log_scores(model, overlay(params, trainable["full"]), batch["input_ids"],
                                  batch["attention_mask"], label_ids, trainable["lora"])
        counted = batch["class"] >= 0
        correct = jnp.sum((jnp.argmax(scores, axis=-1) == batch["class"]) & counted)
        return correct.astype(jnp.float32), jnp.sum(counted).astype(jnp.float32)
    return accuracy_step


def classes_of_labels(labels_BxL: np.ndarray, label_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """(B,) the class whose label tokens each row of decoder targets (-100 padded) spells; ValueError naming the row
    when it spells none (a target cut by max_target_length, or data not made from these label words)."""
    by_tokens = {tuple(ids): c for c, ids in enumerate(label_ids)}
    out = np.empty(len(labels_BxL), np.int32)
    for i, row in enumerate(np.asarray(labels_BxL)):
        tokens = tuple(int(t) for t in row if t != IGNORE_INDEX)
        if tokens not in by_tokens:
            raise ValueError(f"row {i}: target tokens {list(tokens)} are none of the label words' {list(label_ids)}")
        out[i] = by_tokens[tokens]
    return out


def evaluate(model, params, batches, label_ids: Sequence[Sequence[int]], lora=None) -> dict:
    """Class probabilities and accuracy over `batches` of input_ids, attention_mask and "class" ((B,) gold ids).

    Returns {"probs": (N, C), "predictions": (N,), "accuracy": float}.
    """
    scores = jax.jit(lambda p, ids, mask, lo: class_log_scores(model, p, ids, mask, label_ids, lo))  # per shape
    probs, gold = [], []
    for batch in batches:
        log_scores = scores(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), lora)
        probs.append(np.asarray(jax.nn.softmax(log_scores, axis=-1)))
        gold.append(np.asarray(batch["class"]))
    probs_NxC, gold_N = np.concatenate(probs), np.concatenate(gold)
    if gold_N.min() < 0 or gold_N.max() >= probs_NxC.shape[1]:
        raise ValueError(f"gold classes range over [{gold_N.min()}, {gold_N.max()}] but there are "
                         f"{probs_NxC.shape[1]} label words")
    predictions = probs_NxC.argmax(-1)
    return {"probs": probs_NxC, "predictions": predictions, "accuracy": float((predictions == gold_N).mean())}


def encode(tokenizer, task: str, records: Sequence[dict], max_length: int = 128) -> dict:
    """A GLUE task's records as T5 inputs: {"input_ids", "attention_mask"} (right-padded, int32) and "class"."""
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(TASKS)}")
    template, _ = TASKS[task]
    texts = [template.format(**r) for r in records]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
            "class": np.asarray([r["label"] for r in records], np.int32)}
