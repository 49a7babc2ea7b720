"""What every command that runs a model on a run's data needs first: the model, the data, the batches.

`jaxlora train`, `eval` and `export` all start here: the base model loaded into its shardings, the data layout the
model needs (seq2seq for an encoder-decoder), the tokenized training and held-out data, the bucketed loader, and
LoRA-GA's estimation batches. `TrainingError` is the one error type for a run that cannot go on (a ValueError
would do for bad input; a RuntimeError names the run's own failures, both end in one line on the CLI).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

from jaxlora.config import RunConfig
from jaxlora.models.model import Model, from_pretrained
from jaxlora.training import data as data_lib

log = logging.getLogger("jaxlora")


class TrainingError(RuntimeError):
    pass


def maybe_initialize_distributed(cfg) -> None:
    """jax.distributed.initialize for multi-process runs (explicit coordinator, or automatic on TPU pods)."""
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    if cfg.coordinator_address:
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def load_model(config: RunConfig, mesh) -> Model:
    """The base model of a run, in its shardings (quantized while loading with model.quantization)."""
    m = config.model
    if m.dtype == "float16" and jax.default_backend() == "cpu":
        raise TrainingError("model.dtype: float16 does not run on CPU (XLA:CPU has no float16 x float16 -> float32 "
                            "dot for attention); use float32 or bfloat16 here, float16 on GPUs without bfloat16")
    return from_pretrained(m.path, m.dtype, param_dtype=m.param_dtype, mesh=mesh, remat=m.remat,
                           attention_impl=m.attention_impl, quantization=m.quantization,
                           double_quant=m.double_quant, loss_chunk=m.loss_chunk)


def resolve_data_layout(config: RunConfig, model: Model) -> RunConfig:
    """`config` with data.seq2seq set to what the model needs (an encoder-decoder reads prompt -> input_ids,
    response -> labels); an explicit setting that contradicts the model is an error naming both."""
    want, got = model.is_encoder_decoder, config.data.seq2seq
    kind = "an encoder-decoder" if want else "a decoder-only model"
    if got is not None and got != want:
        raise TrainingError(f"data.seq2seq={got} but {config.model.path} is {kind} "
                            f"({model.config.architecture}); leave data.seq2seq unset to follow the model")
    if config.data.label_words and not want:
        raise TrainingError(f"data.label_words scores label words as decoder targets, which needs an encoder-decoder "
                            f"(T5); {config.model.path} is {kind} ({model.config.architecture})")
    if config.data.packing and not model.family.causal_lm:
        what = "an encoder-decoder" if want else "a classifier"
        raise TrainingError(f"data.packing packs causal-LM sequences; {config.model.path} is {what} "
                            f"({model.config.architecture}): set data.packing: false")
    if config.model.logits_at_targets and (not model.family.causal_lm or model.family.embedding_path is None):
        raise TrainingError(f"model.logits_at_targets selects a causal LM's head positions; {config.model.path} "
                            f"({model.config.architecture}) has no such head: set model.logits_at_targets: false")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, seq2seq=want))


def load_data(config: RunConfig, tokenizer):
    train_data = data_lib.load_tokenized(config.data, tokenizer, "train")
    eval_data = None
    if config.data.eval_path or config.data.eval_fraction > 0:
        eval_data = data_lib.load_tokenized(config.data, tokenizer, "eval")
    return train_data, eval_data


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def make_loader(config: RunConfig, data, tokenizer, batch_size: int, shuffle: bool = True,
                seed: int | None = None, evaluation: bool = False):
    """The run's batches: a `PackedLoader` with data.packing (for `evaluation`, its last batch keeps the rows left
    over so every held-out example counts), else a bucketed `BatchLoader`. With model.logits_at_targets, its batches
    carry `target_positions` (`jaxlora.training.data.targets`)."""
    pad = pad_id(tokenizer)
    if config.data.packing:
        loader = data_lib.PackedLoader(data, batch_size, data_lib.bucket_lengths(config.data), pad,
                                       seed=config.train.seed if seed is None else seed,
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       shuffle=shuffle, drop_remainder=not evaluation)
    else:
        targets = data_lib.target_bucket_lengths(config.data) if data.seq2seq else None
        loader = data_lib.BatchLoader(data, batch_size, data_lib.bucket_lengths(config.data), pad,
                                      seed=config.train.seed if seed is None else seed,
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      shuffle=shuffle, label_bucket_lengths=targets)
    if config.model.logits_at_targets and not data.seq2seq:
        loader.target_most = data_lib.most_targets(data, loader.bins if config.data.packing else None)
    return loader


def report_dropped(part: str, data, max_length: int) -> None:
    """Says how many examples were cut to max_length and which ones were dropped (no labelled token left)."""
    kept_cut = data.num_truncated_kept
    if kept_cut:
        log.warning("%d %s examples were longer than data.max_length=%d and were truncated (kept)", kept_cut, part,
                    max_length)
    if data.num_dropped:
        log.warning("%d %s examples were dropped: no labelled token within data.max_length=%d (the prompt fills "
                    "it): %s", data.num_dropped, part, max_length, ", ".join(data.dropped))


def lora_ga_batches(config: RunConfig, data, tokenizer) -> list[dict]:
    """LoRA-GA's estimation batches: the first batch_size * num_batches training examples, in order (as the
    official code), padded to the training buckets; each process keeps its rows."""
    ga = config.lora.lora_ga_config
    loader = make_loader(dataclasses.replace(config, data=dataclasses.replace(config.data, packing=False)), data,
                         tokenizer, ga.batch_size, shuffle=False, seed=0)
    if config.data.packing:  # the same examples per batch, packed: each batch's mean loss is unchanged
        return data_lib.pack_each_batch(data, [loader.global_rows(i) for i in range(ga.num_batches)],
                                        data_lib.bucket_lengths(config.data), pad_id(tokenizer),
                                        jax.process_index(), jax.process_count())
    return [loader.batch(i) for i in range(ga.num_batches)]
