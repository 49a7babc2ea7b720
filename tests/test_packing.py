"""Packed sequences (`data.packing`): each example packed equals the example alone, in every causal family.

The proofs: logits and loss of each packed example equal those of the example alone (float32, 1e-5) for Llama
(sliding window), Qwen3, Gemma 2/3, GPT-2 and BLOOM; packed == unpacked on the 8-device mesh; the held-out loss of
`jaxlora eval` is the same packed and unpacked; LoRA-GA's statistic is unchanged by packing; the packed loader is a
pure function of the step (resume exact, every example once per epoch); packing an encoder-decoder or a
classifier is one clear error.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import tiny
from jaxlora import sharding
from jaxlora.config import load_run_config
from jaxlora.losses import IGNORE_INDEX
from jaxlora.models.model import Model
from jaxlora.sharding import MeshConfig
from jaxlora.training import data as data_lib, setup
from jaxlora.training import trainer as train_lib
from jaxlora.training.data.packing import best_fit_decreasing
from jaxlora.training.evaluation import evaluate_run

ATOL = 1e-5  # float32: a packed example against the same example alone
VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ROPE = dict(_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "mistral_window": transformers.MistralConfig(**_ROPE, sliding_window=4, tie_word_embeddings=False),
    "qwen3": transformers.Qwen3Config(**_ROPE, head_dim=16),
    "gemma2": transformers.Gemma2Config(**_ROPE, head_dim=16, sliding_window=4, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=8.0, query_pre_attn_scalar=12),
    "gemma3": transformers.Gemma3TextConfig(**_ROPE, head_dim=16, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention"]),
    "gpt2": transformers.GPT2Config(**_COMMON, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "bloom": transformers.BloomConfig(**_COMMON, hidden_size=32, n_layer=2, n_head=4),
}
LENGTHS = (7, 5, 9)  # three examples in one row of 24 (3 pad tokens)


def redrawn(model: Model, seed: int = 0) -> dict:
    """The model's params redrawn N(0, 0.3) (norm scales near 1) so logits are O(1) and every part matters."""
    leaves, treedef = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jnp.asarray(0.3 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, new)


def examples(rng: np.random.Generator):
    """Token ids and labels (prompt masked: the first 2 tokens -100) of examples of LENGTHS."""
    out = []
    for n in LENGTHS:
        ids = rng.integers(3, VOCAB, n).astype(np.int32)
        labels = ids.copy()
        labels[:2] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def pack_row(exs, length: int) -> dict:
    """One packed row as `packing.packed_arrays` lays it out (checked against it in test_loader_layout)."""
    row = {"input_ids": np.zeros((1, length), np.int32), "attention_mask": np.zeros((1, length), np.int32),
           "positions": np.zeros((1, length), np.int32), "labels": np.full((1, length), IGNORE_INDEX, np.int32)}
    start = 0
    for seg, (ids, labels) in enumerate(exs, start=1):
        end = start + len(ids)
        row["input_ids"][0, start:end], row["attention_mask"][0, start:end] = ids, seg
        row["positions"][0, start:end] = np.arange(len(ids))
        row["labels"][0, start + 1:end] = labels[1:]
        start = end
    return row


def alone_batch(exs) -> dict:
    """The examples one per row, right-padded to the longest (causal: a row's pad tokens after it change nothing
    before them, so each row is its example alone)."""
    length = max(len(ids) for ids, _ in exs)
    batch = {"input_ids": np.zeros((len(exs), length), np.int32), "attention_mask": np.zeros((len(exs), length),
                                                                                              np.int32),
             "labels": np.full((len(exs), length), IGNORE_INDEX, np.int32)}
    for r, (ids, labels) in enumerate(exs):
        batch["input_ids"][r, :len(ids)], batch["attention_mask"][r, :len(ids)] = ids, 1
        batch["labels"][r, :len(ids)] = labels
    return batch


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packed_example_equals_the_example_alone(name):
    model = Model.random(FAMILIES[name].to_dict(), mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    params = redrawn(model)
    exs = examples(np.random.default_rng(0))
    row = pack_row(exs, sum(LENGTHS) + 3)
    alone = alone_batch(exs)
    logits = jax.jit(lambda p, b: model.apply(p, b["input_ids"], b["attention_mask"], positions=b.get("positions")))
    losses = jax.jit(model.loss_sums)
    packed_logits, alone_logits = np.asarray(logits(params, row)), np.asarray(logits(params, alone))
    (packed_sum, packed_count), (alone_sum, alone_count) = losses(params, row), losses(params, alone)
    start = 0
    for r, (ids, _) in enumerate(exs):
        want = alone_logits[r, :len(ids)]
        assert want.std() > 0.1  # the comparison is not between near-zero logits
        np.testing.assert_allclose(packed_logits[0, start:start + len(ids)], want, atol=ATOL, rtol=0)
        start += len(ids)
    assert float(packed_count) == float(alone_count) == sum(n - 2 for n in LENGTHS)  # labels 2.. of each, shifted
    np.testing.assert_allclose(float(packed_sum), float(alone_sum), rtol=ATOL)


def test_packed_sharded_equals_unsharded():
    config = FAMILIES["mistral_window"].to_dict()
    one = Model.random(config, mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    eight = Model.random(config, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    params = redrawn(one)
    rows = [pack_row(examples(np.random.default_rng(s)), 24) for s in range(4)]
    batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    want = one.loss_sums(params, batch)
    placed = jax.device_put(params, eight.param_shardings)
    got = jax.jit(eight.loss_sums)(placed, sharding.place_batch(batch, eight.mesh))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=ATOL)
    assert float(got[1]) == float(want[1])


def test_best_fit_decreasing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, 500)
    bins = best_fit_decreasing(lengths, 32)
    assert sorted(i for b in bins for i in b) == list(range(500))  # every example exactly once
    assert all(lengths[b].sum() <= 32 for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 32 * 1.1)) + 1  # within 10% of the lower bound
    assert bins == best_fit_decreasing(lengths, 32)  # deterministic
    assert best_fit_decreasing([3, 3, 2, 2, 1, 1], 6) == [[0, 1], [2, 3, 4, 5]]
    with pytest.raises(data_lib.DataError, match="does not fit a packed row of 8"):
        best_fit_decreasing([9], 8)


# ------------------------------------------------------------------------------ the loader and the run


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("packing")
    tiny.tiny_model_dir(d / "model")
    records = tiny.instruction_records(96, seed=5)
    for i in range(0, 96, 5):  # some longer examples: lengths vary, as on real data
        records[i]["input"] = " ".join([records[i]["input"]] * 3)
    tiny.write_jsonl(d / "train.jsonl", records)
    tiny.write_jsonl(d / "eval.jsonl", tiny.instruction_records(24, seed=9))
    return d


def run_config(assets, out, *overrides):
    return load_run_config(None, [
        f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}", "data.max_length=64",
        f"data.eval_path={assets / 'eval.jsonl'}", f"train.output_dir={out}", "train.micro_batch_size=8",
        "optim.learning_rate=3e-3", "train.progress_bar=false", "train.peak_tflops_per_device=1",
        "train.log_every=1", "train.eval_batches=100", *overrides])


def test_loader_layout_order_and_epochs(assets, tmp_path):
    cfg = run_config(assets, tmp_path, "data.packing=true")
    tok = transformers.AutoTokenizer.from_pretrained(assets / "model")
    data = data_lib.load_tokenized(cfg.data, tok)
    loader = setup.make_loader(cfg, data, tok, 8)
    assert loader.fill > 0.85 and loader.steps_per_epoch >= 1
    all_ids = data.rows(range(len(data)))
    label_of = {tuple(x): y for x, y in zip(*all_ids)}
    seen = []
    for step in range(loader.steps_per_epoch):
        b = loader.batch(step)
        assert b["input_ids"].shape == (8, 64) and set(b) == {"input_ids", "attention_mask", "positions", "labels"}
        for r in range(8):
            segs = b["attention_mask"][r]
            for seg in range(1, segs.max() + 1):
                where = np.flatnonzero(segs == seg)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
                assert np.array_equal(b["positions"][r, where], np.arange(len(where)))
                ids = tuple(b["input_ids"][r, where])
                assert b["labels"][r, where[0]] == IGNORE_INDEX  # nothing predicts an example's first token
                np.testing.assert_array_equal(b["labels"][r, where[1:]], label_of[ids][1:])
                seen.append(ids)
    # an epoch visits each example at most once, and all but the rows of the last partial batch
    assert not Counter(seen) - Counter(tuple(x) for x in all_ids[0]) and len(seen) > 0.8 * len(data)
    again = setup.make_loader(cfg, data, tok, 8)  # a pure function of the step: resume sees the same batches
    for step in (0, loader.steps_per_epoch, 2 * loader.steps_per_epoch + 1):
        for k, v in loader.batch(step).items():
            np.testing.assert_array_equal(again.batch(step)[k], v)
    assert not np.array_equal(loader.batch(0)["input_ids"], loader.batch(loader.steps_per_epoch)["input_ids"])


def test_eval_loss_packed_equals_unpacked(assets, tmp_path):
    losses = {}
    for packing in (False, True):
        cfg = run_config(assets, tmp_path / str(packing), f"data.packing={str(packing).lower()}")
        result = evaluate_run(cfg, base_only=True)
        assert result["examples"] == 24  # every held-out example (packed: the last batch keeps the rows left over)
        losses[packing] = result["eval_loss"]
    np.testing.assert_allclose(losses[True], losses[False], rtol=ATOL)


def test_lora_ga_statistic_unchanged_by_packing(assets, tmp_path):
    from jaxlora.lora import ga as lora_ga
    cfg = run_config(assets, tmp_path, "lora.init_lora_weights=lora_ga", "lora.lora_ga_config.batch_size=8",
                     "lora.lora_ga_config.num_batches=2", "lora.lora_ga_config.svd_method=exact")
    model = setup.load_model(cfg, sharding.make_mesh(cfg.mesh))
    tok = model.tokenizer()
    data = data_lib.load_tokenized(cfg.data, tok)
    plain = setup.lora_ga_batches(cfg, data, tok)
    packed_cfg = run_config(assets, tmp_path, "data.packing=true", "lora.init_lora_weights=lora_ga",
                            "lora.lora_ga_config.batch_size=8", "lora.lora_ga_config.num_batches=2",
                            "lora.lora_ga_config.svd_method=exact")
    packed = setup.lora_ga_batches(packed_cfg, data, tok)
    assert packed[0]["input_ids"].shape[0] < plain[0]["input_ids"].shape[0]  # fewer rows: it packs
    targets = model.lora_targets(cfg.lora)
    want = lora_ga.estimate_gradients(model, model.params, targets, plain, progress=False)
    got = lora_ga.estimate_gradients(model, model.params, targets, packed, progress=False)
    for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        g, h = np.asarray(g), np.asarray(h)
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(h, g, atol=1e-5 * np.abs(g).max(), rtol=0, err_msg=jax.tree_util.keystr(path))


def test_packed_training_runs_compiles_once_and_resumes_exactly(assets, tmp_path):
    common = ("data.packing=true", "optim.schedule=constant", "train.save_every=2", "lora.lora_dropout=0.1",
              "data.bucket_lengths=[64]")
    a = train_lib.train(run_config(assets, tmp_path / "a", *common, "train.max_steps=4"))
    b1 = train_lib.train(run_config(assets, tmp_path / "b", *common, "train.max_steps=2"))
    b2 = train_lib.train(run_config(assets, tmp_path / "b", *common, "train.max_steps=4"))
    assert a.compiles == 1 and np.all(np.isfinite(a.losses)) and a.losses[-1] < a.losses[0]
    np.testing.assert_allclose(b1.losses + b2.losses, a.losses, rtol=1e-6)
    assert a.labelled_tokens_per_second > 0


@pytest.mark.parametrize("arch", ["t5", "bert"])
def test_packing_refused_for_encoder_decoder_and_classifier(arch, tmp_path):
    hf = (transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
          if arch == "t5" else
          transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, architectures=["BertForSequenceClassification"]))
    model = Model.random(hf.to_dict(), mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    cfg = load_run_config(None, ["model.path=x", "data.path=y", "data.packing=true"])
    with pytest.raises(setup.TrainingError, match="data.packing packs causal-LM sequences;.*data.packing: false"):
        setup.resolve_data_layout(cfg, model)
