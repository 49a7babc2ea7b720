"""Seq2seq training data and `jaxlora train` on an encoder-decoder (tiny random T5 + the tests' trained tokenizer).

Data: prompt -> encoder input_ids, response (+ eos) -> decoder labels with their own length limit and buckets;
label_words (class id -> word, T5's GLUE casting) with clear errors. Trainer: the shipped configs/t5_base_glue_sst2.yaml
(model and training split pointed at local tiny ones, the real offline SST-2 validation split kept) runs on the 8-device
mesh with LoRA-GA, the loss falls, the held-out accuracy it logs equals an independent single-device scoring
(`t5_glue.evaluate`) of the saved checkpoint, and `evaluate_run` reproduces it from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import random

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxlora import sharding
import assets
from jaxlora.training import data as data_lib
from jaxlora.tasks import t5_glue
from jaxlora.training import evaluation, export, setup, trainer
from jaxlora.io.configfile import load_config
from jaxlora.config import RunConfig
from jaxlora.training.data import DataConfig, DataError
from tiny import WORDS, tiny_model_dir, tiny_tokenizer, write_jsonl

CONFIG = "configs/t5_base_glue_sst2.yaml"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tok):
    """A random T5 v1.1 (gated-gelu, untied) with the tiny tokenizer's vocabulary and special ids."""
    folder = tmp_path_factory.mktemp("tiny_t5")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    """SST-2-shaped records ({"sentence", "label", "idx"}): label 1 when the sentence says "plus", 0 for "minus"."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.randrange(2)
        a, b = rng.choice(WORDS[:10]), rng.choice(WORDS[:10])
        out.append({"sentence": f"{a} {'plus' if label else 'minus'} {b} is the answer", "label": label, "idx": i})
    return out


def _seq2seq_cfg(**kw) -> DataConfig:
    return DataConfig(**{"prompt_template": "sst2 sentence: {sentence}", "label_words": ("minus", "plus"),
                         "seq2seq": True, "max_length": 16, "max_target_length": 4, **kw})


# ------------------------------------------------------------------------------------------------ data


def test_seq2seq_example_layout(tok):
    cfg = _seq2seq_cfg()
    rec = {"sentence": "two plus three", "label": 1}
    ex = data_lib.tokenize_example(rec, cfg, tok)
    prompt = tok("sst2 sentence: two plus three")["input_ids"]
    assert ex["input_ids"] == prompt[:16]
    assert ex["labels"] == tok("plus", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert data_lib.label_word_ids(cfg, tok) == [tok(w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                                                 for w in ("minus", "plus")]
    # the causal layout of the same record: one sequence, prompt masked
    causal = data_lib.tokenize_example(rec, _seq2seq_cfg(seq2seq=False, max_length=64), tok)
    assert causal["input_ids"] == prompt + ex["labels"]
    assert causal["labels"] == [-100] * len(prompt) + ex["labels"]


def test_seq2seq_truncation_keeps_the_inputs_eos(tok):
    """A T5 tokenizer ends every input with </s>; cutting a long input keeps it last (as HF's truncation does)."""
    class EndsWithEos:
        eos_token_id = tok.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return {"input_ids": ids + [self.eos_token_id] if add_special_tokens else ids}
    long = {"sentence": " ".join(["two plus three"] * 10), "label": 0}
    ex = data_lib.tokenize_example(long, _seq2seq_cfg(), EndsWithEos())
    assert len(ex["input_ids"]) == 16 and ex["input_ids"][-1] == tok.eos_token_id and ex["truncated"]
    cut = data_lib.tokenize_example({"sentence": "x", "label": 0}, _seq2seq_cfg(max_target_length=1), tok)
    assert len(cut["labels"]) == 1 and cut["truncated"]


def test_loader_pads_targets_to_their_own_buckets(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", sentiment_records(12))
    cfg = _seq2seq_cfg(path=str(path), bucket_lengths=(8, 16), target_bucket_lengths=(2, 4))
    data = data_lib.load_tokenized(cfg, tok)
    assert data.seq2seq and len(data) == 12
    assert list(data_lib.target_bucket_lengths(cfg)) == [2, 4]
    assert data_lib.target_bucket_lengths(_seq2seq_cfg(max_target_length=20)) == (8, 16, 20)
    loader = data_lib.BatchLoader(data, 4, data_lib.bucket_lengths(cfg), tok.pad_token_id,
                                  label_bucket_lengths=data_lib.target_bucket_lengths(cfg))
    b = loader.batch(0)
    words = data_lib.label_word_ids(cfg, tok)
    assert [len(w) for w in words] == [2, 2]  # one token + eos: the smallest target bucket, not the input's
    assert b["input_ids"].shape == (4, 16) and b["labels"].shape == (4, 2)
    gold = [json.loads(line)["label"] for line in path.read_text().splitlines()]
    np.testing.assert_array_equal(t5_glue.classes_of_labels(b["labels"], words),
                                  [gold[i] for i in loader.global_rows(0)])
    with pytest.raises(DataError, match="label_bucket_lengths"):
        data_lib.BatchLoader(data, 4, data_lib.bucket_lengths(cfg), tok.pad_token_id)


@pytest.mark.parametrize("kw,match", [
    (dict(train_on_inputs=True), "train_on_inputs has no meaning with seq2seq"),
    (dict(response_template="{sentence}"), "label_words sets the response"),
    (dict(label_words=("plus", "plus")), "distinct"),
    (dict(target_bucket_lengths=(2, 8)), r"target_bucket_lengths must be <= max_target_length=4"),
    (dict(max_target_length=0), "max_target_length must be > 0"),
])
def test_bad_seq2seq_config(kw, match):
    with pytest.raises(DataError, match=match):
        _seq2seq_cfg(**kw)


def test_label_outside_the_words_names_file_line_and_field(tmp_path, tok):
    recs = sentiment_records(4)
    recs[2]["label"] = -1  # GLUE's unlabelled test rows
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DataError, match=r"bad.jsonl:3: field 'label' is -1, not a class id in \[0, 2\) "
                                        r"\(label_words: minus, plus\)"):
        data_lib.load_tokenized(_seq2seq_cfg(path=str(path)), tok)


def test_eval_split_of_a_dataset_dict(tmp_path, tok):
    """data.eval_split picks the held-out split of the same DatasetDict folder (or hub dataset) as data.path."""
    import datasets
    folder = tmp_path / "sst2_like"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(sentiment_records(8, seed=1)),
                          "validation": datasets.Dataset.from_list(sentiment_records(3, seed=2))}).save_to_disk(folder)
    cfg = _seq2seq_cfg(path=str(folder), split="train", eval_path=str(folder), eval_split="validation")
    assert len(data_lib.load_tokenized(cfg, tok, "train")) == 8
    assert len(data_lib.load_tokenized(cfg, tok, "eval")) == 3
    with pytest.raises(DataError, match="no split 'test'"):
        data_lib.load_tokenized(dataclasses.replace(cfg, eval_split="test"), tok, "eval")


def test_classes_of_labels_rejects_unknown_targets():
    with pytest.raises(ValueError, match=r"row 1: target tokens \[7\] are none of the label words"):
        t5_glue.classes_of_labels(np.array([[5, 2], [7, -100]]), [[5, 2], [6, 2]])


# ------------------------------------------------------------------------------------------------ training


def _run_config(tmp_path, t5_dir, *overrides) -> RunConfig:
    train_file = write_jsonl(tmp_path / "sst2_like.jsonl", sentiment_records(256))
    return load_config(RunConfig, CONFIG, [
        f"model.path={t5_dir}", f"data.path={train_file}", "data.label_words=[minus, plus]",
        f"data.eval_path={assets.glue_validation_path('sst2')}", "data.max_length=64", "data.bucket_lengths=[32, 64]",
        f"data.cache_dir={tmp_path / 'tok'}", f"lora.lora_ga_config.cache_dir={tmp_path / 'ga'}",
        "lora.lora_ga_config.num_batches=4", "train.micro_batch_size=8", "train.max_steps=24",
        "train.eval_every=0", "train.save_every=0", "train.progress_bar=false", "train.log_every=4",
        f"train.output_dir={tmp_path / 'run'}", "optim.learning_rate=3e-3",
        # the tiny model is a gated T5 v1.1 (wi_0/wi_1, no `wi`): the shipped t5-base config's targets less `wi`, which
        # matched nothing here (an explicit entry that matches no module is now an error)
        "lora.target_modules=[q, k, v, o, wo]", *overrides])


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory, t5_dir):
    tmp = tmp_path_factory.mktemp("t5_train")
    config = _run_config(tmp, t5_dir)
    return config, trainer.train(config)


def test_shipped_t5_config_trains_with_lora_ga(sst2_run):
    config, result = sst2_run
    assert config.lora.init_lora_weights == "lora_ga" and config.data.seq2seq is None  # resolved from the model
    losses = np.array(result.losses)
    print(f"\n[t5 train] loss {losses[:3].mean():.3f} (first 3) -> {losses[-6:].mean():.3f} (last 6); held-out SST-2 "
          f"loss {result.eval_loss:.3f}, accuracy {result.eval_accuracy:.4f}; {result.compiles} compilations")
    assert len(losses) == 24 and np.isfinite(losses).all()
    assert losses[-6:].mean() < 0.5 * losses[:3].mean(), losses  # the "plus"/"minus" rule is learnt
    assert 0.0 <= result.eval_accuracy <= 1.0 and np.isfinite(result.eval_loss)
    # two input buckets at most x one target bucket (max_target_length 4): bounded compilations
    assert result.compiles <= 2
    metrics = trainer.loss_history(result.output_dir)
    assert any("eval_accuracy" in m for m in metrics)
    assert (result.output_dir / "adapter" / "adapter_config.json").exists()


def test_logged_accuracy_equals_single_device_scoring(sst2_run, tok):
    """The accuracy the 8-device run logged == t5_glue.evaluate of the restored checkpoint on one device, over the
    872 real SST-2 validation sentences encoded independently (t5_glue.encode, padding to the longest)."""
    config, result = sst2_run
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    model = setup.load_model(config, mesh)
    trainable, step = export.restore_adapters(config, model)
    params = model.params
    import datasets
    records = list(datasets.load_from_disk(str(assets.glue_validation_path("sst2"))))
    assert len(records) == 872
    enc = t5_glue.encode(tok, "sst2", records, max_length=config.data.max_length)
    words = data_lib.label_word_ids(setup.resolve_data_layout(config, model).data, tok)
    batches = [{k: v[i:i + 64] for k, v in enc.items()} for i in range(0, 872, 64)]
    ref = t5_glue.evaluate(model, params, batches, words, lora=trainable["lora"])
    assert step == 24
    print(f"\n[t5 accuracy] logged (8 devices) {result.eval_accuracy:.4f} vs single-device t5_glue.evaluate "
          f"{ref['accuracy']:.4f}")
    assert abs(ref["accuracy"] - result.eval_accuracy) < 0.5 / 872, (ref["accuracy"], result.eval_accuracy)
    # and evaluate_run (`jaxlora eval`) reproduces the in-training figures from the checkpoint
    again = evaluation.evaluate_run(config)
    assert again["eval_accuracy"] == pytest.approx(result.eval_accuracy, abs=0.5 / 872)
    assert again["eval_loss"] == pytest.approx(result.eval_loss, rel=1e-5)


def test_layout_contradicting_the_model(tmp_path, t5_dir, tmp_path_factory):
    with pytest.raises(trainer.TrainingError, match=r"data.seq2seq=False but .* is an encoder-decoder "
                                                    r"\(T5ForConditionalGeneration\)"):
        trainer.train(_run_config(tmp_path, t5_dir, "data.seq2seq=false"))
    llama = tiny_model_dir(tmp_path_factory.mktemp("llama"))
    with pytest.raises(trainer.TrainingError, match=r"label_words .* needs an encoder-decoder"):
        trainer.train(_run_config(tmp_path, t5_dir, f"model.path={llama}", "lora.init_lora_weights=true",
                                  "lora.target_modules=[q_proj]"))


def test_generate_cli_with_the_trained_adapter(sst2_run, t5_dir, capsys):
    """`jaxlora generate` on the T5 folder with the run's exported PEFT adapter (LoRA-GA: relative to the original
    weights) answers the training rule's label words for unseen sentences of the training pattern, as a batch."""
    from jaxlora import cli
    _, result = sst2_run
    prompts = {"sst2 sentence: nine plus four is the answer": "plus",
               "sst2 sentence: seven minus eight is the answer": "minus"}
    argv = ["generate", "--model", str(t5_dir), "--adapter", str(result.adapter_dir), "--max-new-tokens", "4"]
    for p in prompts:
        argv += ["--prompt", p]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]
    got = {r["prompt"]: r["completion"].replace(" ", "") for r in lines}
    print(f"\n[t5 generate] {got}")
    assert got == prompts
