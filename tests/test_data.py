"""Tests for jaxlora.training.data: loading, tokenizing/masking, caching, bucketed batching."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jaxlora.training import data as D

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Human : Assistant : hello world how are you",
    "fine thanks and you what is the capital of France Paris",
    "translate this sentence please the cat sat on the mat",
    "one two three four five six seven eight nine ten",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(autouse=True)
def isolated_datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' file-conversion cache out of the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer built locally: word-level, BOS added, ChatML-like chat template."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


BELLE = [
    {"input": "what is the capital of France", "target": "Paris"},
    {"input": "translate this sentence please", "target": "the cat sat on the mat"},
    {"input": "hello world", "target": "fine thanks and you"},
]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"eval_fraction": -0.1}, "eval_fraction"),
        ({"format": "sharegpt"}, "format"),
        ({"max_length": 0}, "max_length"),
        ({"bucket_lengths": (128, 64)}, "increasing"),
        ({"bucket_lengths": (0, 64)}, "positive"),
        ({"bucket_lengths": (64, 1024), "max_length": 512}, "max_length"),
        ({"prompt_template": "{} says"}, "positional"),
        ({"prompt_template": "{input"}, "prompt_template"),
    ],
)
def test_config_validation(kwargs, msg):
    with pytest.raises(D.DataError, match=msg):
        D.DataConfig(**kwargs)


def test_bucket_lengths():
    assert D.bucket_lengths(D.DataConfig(max_length=512)) == (64, 128, 256, 512)
    assert D.bucket_lengths(D.DataConfig(max_length=300)) == (64, 128, 256, 300)
    assert D.bucket_lengths(D.DataConfig(max_length=32)) == (32,)
    assert D.bucket_lengths(D.DataConfig(max_length=100, bucket_lengths=[16, 48])) == (16, 48, 100)
    assert D.bucket_lengths(D.DataConfig(max_length=48, bucket_lengths=(16, 48))) == (16, 48)


# --------------------------------------------------------------------------- tokenize_example


def test_prompt_masked_response_trained_eos(tokenizer):
    cfg = D.DataConfig(prompt_template="Human : {input} Assistant :", response_template="{target}")
    out = D.tokenize_example({"input": "hello world", "target": "fine thanks"}, cfg, tokenizer)
    prompt = [tokenizer.bos_token_id] + ids(tokenizer, "Human : hello world Assistant :")
    response = ids(tokenizer, "fine thanks") + [tokenizer.eos_token_id]
    assert out["input_ids"] == prompt + response
    assert out["labels"] == [-100] * len(prompt) + response
    assert out["input_ids"][-1] == tokenizer.eos_token_id
    assert out["truncated"] is False


def test_train_on_inputs_and_no_eos(tokenizer):
    cfg = D.DataConfig(train_on_inputs=True, add_eos=False)
    out = D.tokenize_example({"input": "hello world", "target": "fine"}, cfg, tokenizer)
    assert out["labels"] == out["input_ids"]
    assert out["input_ids"][-1] != tokenizer.eos_token_id
    assert -100 not in out["labels"]


def test_truncation_keeps_beginning(tokenizer):
    cfg = D.DataConfig(max_length=5)
    rec = {"input": "one two three four five six", "target": "seven eight"}
    out = D.tokenize_example(rec, cfg, tokenizer)
    assert out["truncated"] is True
    assert out["input_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, "one two three four")
    assert len(out["labels"]) == 5


def test_missing_field_names_field(tokenizer):
    with pytest.raises(D.DataError, match=r"missing field 'target'.*fields present: input, output"):
        D.tokenize_example({"input": "hi", "output": "x"}, D.DataConfig(), tokenizer)


def test_chat_response_is_last_assistant_message(tokenizer):
    cfg = D.DataConfig(format="chat")
    messages = [
        {"role": "system", "content": "one two"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "fine thanks"},
        {"role": "user", "content": "what is the capital of France"},
        {"role": "assistant", "content": "Paris"},
    ]
    out = D.tokenize_example({"messages": messages}, cfg, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # The trained part is the last assistant message, its end marker, and eos.
    expected = ids(tokenizer, "Paris") + [im_end, tokenizer.eos_token_id]
    labels = np.array(out["labels"])
    trained = labels[labels != -100].tolist()
    assert trained == expected
    n = len(expected)
    assert out["input_ids"][-n:] == expected
    assert (labels[:-n] == -100).all()
    prompt_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert out["input_ids"][:-n] == ids(tokenizer, prompt_text)


def test_chat_without_assistant_is_error(tokenizer):
    with pytest.raises(D.DataError, match="assistant"):
        D.tokenize_example({"messages": [{"role": "user", "content": "hi"}]}, D.DataConfig(format="chat"), tokenizer)


# --------------------------------------------------------------------------- loading


def test_all_file_kinds_load(tmp_path):
    expected = BELLE
    (tmp_path / "a.json").write_text(json.dumps(expected))
    write_jsonl(tmp_path / "a.jsonl", expected)
    ds = datasets.Dataset.from_list(expected)
    ds.to_csv(str(tmp_path / "a.csv"))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    for name in ["a.json", "a.jsonl", "a.csv", "a.parquet", "saved", "dict"]:
        got = D.load_records(str(tmp_path / name), cache_dir=str(tmp_path / "hf"))
        assert got.to_list() == expected, name
    assert len(D.load_records(str(tmp_path / "dict"), split="test")) == 1
    with pytest.raises(D.DataError, match="no split 'validation'"):
        D.load_records(str(tmp_path / "dict"), split="validation")


def test_missing_file(tmp_path):
    with pytest.raises(D.DataError, match="nope.jsonl: no such file"):
        D.load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(D.DataError, match="nothere.json: no such file"):
        D.load_records("./nothere.json")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in BELLE] + ['{"input": "x" "target": "y"}', json.dumps(BELLE[0])]
    lines.insert(1, "")  # a blank line must not shift the reported line number
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DataError) as info:
        D.load_records(str(path), cache_dir=str(tmp_path / "hf"))
    msg = str(info.value)
    assert f"{path}:5: not valid JSON" in msg


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"input": "a", "target": "b"},\n{"input": "a" "target": "b"}\n]\n')
    with pytest.raises(D.DataError, match=r"bad.json:3: not valid JSON"):
        D.load_records(str(path), cache_dir=str(tmp_path / "hf"))


def test_missing_field_in_file_names_file_line_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [BELLE[0], BELLE[1], {"input": "hello"}])
    cfg = D.DataConfig(path=path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(D.DataError) as info:
        D.load_tokenized(cfg, tokenizer)
    msg = str(info.value)
    assert f"{path}:3:" in msg and "missing field 'target'" in msg


def test_belle_jsonl_default_templates(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "belle.jsonl", BELLE)
    data = D.load_tokenized(D.DataConfig(path=path, cache_dir=str(tmp_path / "c")), tokenizer)
    assert len(data) == 3 and data.num_examples == 3
    assert data.num_truncated == 0 and data.num_dropped == 0
    x, y = data.rows([0])
    expected = D.tokenize_example(BELLE[0], D.DataConfig(), tokenizer)
    assert x[0].tolist() == expected["input_ids"]
    assert y[0].tolist() == expected["labels"]
    assert x[0].dtype == np.int32


def test_truncated_counted_and_fully_masked_dropped(tmp_path, tokenizer):
    records = [
        {"input": "hello", "target": "one two three four five six seven"},  # truncated, response survives
        {"input": "one two three four five six seven eight", "target": "nine"},  # truncated, no label left
        {"input": "hello", "target": "fine"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    data = D.load_tokenized(D.DataConfig(path=path, max_length=6), tokenizer)
    assert data.num_truncated == 2
    assert data.num_dropped == 1
    assert len(data) == 2
    assert data.lengths.max() <= 6


def test_max_examples_and_eval_split(tmp_path, tokenizer):
    records = [{"input": f"one {w}", "target": "two"} for w in CORPUS[3].split()] * 2  # 20 records
    path = write_jsonl(tmp_path / "many.jsonl", records)
    cfg = D.DataConfig(path=path, eval_fraction=0.25, max_examples=16)
    train = D.load_tokenized(cfg, tokenizer, "train")
    evald = D.load_tokenized(cfg, tokenizer, "eval")
    assert len(train) == 12 and len(evald) == 4
    # Deterministic and disjoint: union of the two parts is exactly the first 16 records.
    all_rows = [tuple(r) for r in train.rows(range(12))[0] + evald.rows(range(4))[0]]
    expected = [tuple(D.tokenize_example(r, cfg, tokenizer)["input_ids"]) for r in records[:16]]
    assert sorted(all_rows) == sorted(expected)
    again = D.load_tokenized(cfg, tokenizer, "eval")
    assert [r.tolist() for r in again.rows(range(4))[0]] == [r.tolist() for r in evald.rows(range(4))[0]]
    with pytest.raises(D.DataError, match="no eval data"):
        D.load_tokenized(D.DataConfig(path=path), tokenizer, "eval")
    eval_file = write_jsonl(tmp_path / "eval.jsonl", BELLE)
    assert len(D.load_tokenized(D.DataConfig(path=path, eval_path=eval_file), tokenizer, "eval")) == 3


def test_chat_format_end_to_end(tmp_path, tokenizer):
    convo = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine thanks"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": convo}] * 4)
    data = D.load_tokenized(D.DataConfig(path=path, format="chat"), tokenizer)
    x, y = data.rows([2])
    trained = y[0][y[0] != -100].tolist()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained == ids(tokenizer, "fine thanks") + [im_end, tokenizer.eos_token_id]


def test_cache_reused(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "belle.jsonl", BELLE)
    cache = tmp_path / "cache"
    cfg = D.DataConfig(path=path, cache_dir=str(cache))
    first = D.load_tokenized(cfg, tokenizer)
    files = sorted(p for p in os.listdir(cache) if p.startswith("jaxlora-tokenized-"))
    assert len(files) == 1
    cache_file = str(cache / files[0])
    mtime = os.stat(cache_file).st_mtime_ns
    assert cache_file in [f["filename"] for f in first.dataset.cache_files]

    # A second load must not tokenize anything: make tokenizing explode.
    def boom(*args, **kwargs):
        raise AssertionError("map recomputed instead of reusing the cache")

    monkeypatch.setattr(D.tokenized, "tokenize_example", boom)  # where load_tokenized looks it up
    second = D.load_tokenized(cfg, tokenizer)
    assert os.stat(cache_file).st_mtime_ns == mtime
    assert cache_file in [f["filename"] for f in second.dataset.cache_files]
    assert [r.tolist() for r in second.rows(range(3))[0]] == [r.tolist() for r in first.rows(range(3))[0]]

    # A config change that alters tokenization gets its own cache file.
    monkeypatch.undo()
    D.load_tokenized(D.DataConfig(path=path, cache_dir=str(cache), train_on_inputs=True), tokenizer)
    assert len([p for p in os.listdir(cache) if p.startswith("jaxlora-tokenized-")]) == 2


# --------------------------------------------------------------------------- BatchLoader


def synthetic(n: int = 53, seed: int = 1) -> D.TokenizedData:
    """Examples whose first token is their index, with varied lengths and masks."""
    rng = np.random.default_rng(seed)
    input_ids, labels = [], []
    for i in range(n):
        length = int(rng.integers(2, 100))
        x = [i] + rng.integers(10, 50, size=length - 1).tolist()
        cut = int(rng.integers(1, length))
        input_ids.append(x)
        labels.append([-100] * cut + x[cut:])
    return D.TokenizedData.from_lists(input_ids, labels)


BUCKETS = (16, 32, 64, 128)


def test_batch_is_pure_function_of_step():
    data = synthetic()
    a = D.BatchLoader(data, 8, BUCKETS, pad_id=0, seed=3)
    b = D.BatchLoader(data, 8, BUCKETS, pad_id=0, seed=3)
    later = a.batch(17)
    for step in [0, 5, 17, 6, 0]:
        x, y = a.batch(step), b.batch(step)
        assert x.keys() == {"input_ids", "attention_mask", "labels"}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
            assert x[k].dtype == np.int32
    np.testing.assert_array_equal(a.batch(17)["input_ids"], later["input_ids"])
    assert [t["input_ids"].tolist() for t in a.iterate(4, 3)] == [a.batch(s)["input_ids"].tolist() for s in (4, 5, 6)]


def test_epochs_cover_every_example_once_and_differ():
    data = synthetic(n=53)
    loader = D.BatchLoader(data, 8, BUCKETS, pad_id=0)
    spe = loader.steps_per_epoch
    assert spe == 53 // 8
    epochs = []
    for e in range(2):
        firsts = np.concatenate([loader.batch(e * spe + s)["input_ids"][:, 0] for s in range(spe)])
        assert len(set(firsts.tolist())) == len(firsts) == spe * 8  # each example at most once
        epochs.append(firsts)
    assert not np.array_equal(epochs[0], epochs[1])
    # Without a remainder, every example appears exactly once per epoch.
    full = D.BatchLoader(synthetic(n=48), 8, BUCKETS, pad_id=0)
    firsts = np.concatenate([full.batch(s)["input_ids"][:, 0] for s in range(full.steps_per_epoch)])
    assert sorted(firsts.tolist()) == list(range(48))


def test_shapes_bounded_and_padding_correct():
    data = synthetic()
    loader = D.BatchLoader(data, 4, BUCKETS, pad_id=7)
    shapes = set()
    for step in range(60):
        batch = loader.batch(step)
        shapes.add(batch["input_ids"].shape)
        rows = loader.global_rows(step)
        ids, labels = data.rows(rows)
        longest = max(len(x) for x in ids)
        length = batch["input_ids"].shape[1]
        assert length in BUCKETS and length >= longest
        assert all(b < longest for b in BUCKETS if b < length)  # smallest fitting bucket
        for i, (x, y) in enumerate(zip(ids, labels)):
            n = len(x)
            assert batch["input_ids"][i, :n].tolist() == x.tolist()
            assert (batch["input_ids"][i, n:] == 7).all()
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
            assert batch["labels"][i, :n].tolist() == y.tolist()
            assert (batch["labels"][i, n:] == -100).all()
        assert D.count_tokens(batch) == sum(len(x) for x in ids)
    assert shapes <= {(4, b) for b in BUCKETS}


def test_process_slices_concatenate_to_global_batch():
    data = synthetic()
    single = D.BatchLoader(data, 8, BUCKETS, pad_id=0, seed=5)
    parts = [D.BatchLoader(data, 8, BUCKETS, pad_id=0, seed=5, process_index=i, process_count=2) for i in range(2)]
    for step in [0, 3, 9, 20]:
        whole = single.batch(step)
        halves = [p.batch(step) for p in parts]
        for k in whole:
            assert halves[0][k].shape == (4, whole[k].shape[1])
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])


def test_loader_errors():
    data = synthetic(n=5)
    with pytest.raises(D.DataError, match=r"5 examples.*global_batch_size=8"):
        D.BatchLoader(data, 8, BUCKETS, pad_id=0)
    with pytest.raises(D.DataError, match="divisible"):
        D.BatchLoader(synthetic(), 6, BUCKETS, pad_id=0, process_count=4)
    with pytest.raises(D.DataError, match="largest bucket"):
        D.BatchLoader(synthetic(), 4, (16, 32), pad_id=0)


def test_end_to_end_tokenized_to_batches(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "belle.jsonl", BELLE * 4)
    cfg = D.DataConfig(path=path, max_length=64, bucket_lengths=(8, 16))
    data = D.load_tokenized(cfg, tokenizer)
    loader = D.BatchLoader(data, 4, D.bucket_lengths(cfg), pad_id=tokenizer.pad_token_id)
    batch = loader.batch(0)
    assert batch["input_ids"].shape[1] in D.bucket_lengths(cfg)
    # Every example has some trained tokens and they end in eos.
    for row_ids, row_labels in zip(batch["input_ids"], batch["labels"]):
        trained = np.flatnonzero(row_labels != -100)
        assert len(trained) > 0
        assert row_ids[trained[-1]] == tokenizer.eos_token_id
