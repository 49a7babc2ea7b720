"""Instruction data for LoRA fine-tuning: load, tokenize, mask, bucket, batch.

Records are read through Hugging Face ``datasets`` (local json/jsonl/parquet/csv files, ``save_to_disk`` folders,
or hub names), rendered with prompt/response templates or the tokenizer's chat template, and tokenized with the
prompt masked out of the loss (label -100), as in the alpaca-lora / BELLE recipes; an encoder-decoder (T5) gets the
seq2seq layout instead (prompt -> encoder ``input_ids``, response -> decoder ``labels``). Batches are padded to a
small, fixed set of lengths ("buckets") and are a pure function of the step number, so a resumed run sees exactly
the batches an uninterrupted one would. Bad user input raises ``DataError`` naming the file, line or record, and
field, instead of a traceback from deep inside a library.

    config.py     DataConfig, DataError, the bucket ladders
    records.py    load_records: files, save_to_disk folders, hub datasets; file:line error messages
    tokenize.py   tokenize_example: templates, chat, prompt masking, label words, seq2seq examples
    tokenized.py  TokenizedData and load_tokenized: the tokenization cache, the eval split, untrainable examples
    loader.py     BatchLoader (deterministic, resumable, bucketed, per-process slices), count_tokens
    packing.py    PackedLoader (data.packing: several examples per row, block-diagonal attention), pack_each_batch
    targets.py    target_positions: the positions that predict a labelled token (model.logits_at_targets)

Everything other code uses is re-exported here: ``from jaxlora.training import data as data_lib; data_lib.X``.
"""

from jaxlora.losses import IGNORE_INDEX
from jaxlora.training.data.config import DataConfig, DataError, bucket_lengths, target_bucket_lengths
from jaxlora.training.data.loader import BatchLoader, count_tokens
from jaxlora.training.data.packing import PackedLoader, pack_each_batch
from jaxlora.training.data.records import load_records
from jaxlora.training.data.targets import most_targets, target_positions
from jaxlora.training.data.tokenize import label_word_ids, tokenize_example
from jaxlora.training.data.tokenized import TokenizedData, load_tokenized

__all__ = ["IGNORE_INDEX", "BatchLoader", "DataConfig", "DataError", "PackedLoader", "TokenizedData",
           "bucket_lengths", "count_tokens", "label_word_ids", "load_records", "load_tokenized", "most_targets",
           "pack_each_batch", "target_bucket_lengths", "target_positions", "tokenize_example"]
