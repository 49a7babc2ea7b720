"""`model.logits_at_targets`: the head applied only at the positions that predict a labelled token gives the loss
and LoRA gradients of the full logits (float32, 1e-5) in every causal head (tied, untied, soft-capped, GPT-2's,
BLOOM's; with and without the chunked loss, LoRA on lm_head, per row), the loaders add exactly those positions
(packed and bucketed, one K per loader so a run compiles once per bucket), a packed training run with it equals one
without, and an encoder-decoder refuses it in one line."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxlora import lora as lora_lib, sharding
from jaxlora.losses import IGNORE_INDEX
from jaxlora.models.model import Model
from jaxlora.sharding import MeshConfig
from jaxlora.training import data as data_lib
from jaxlora.training import trainer as train_lib
from test_chunked_loss import FAMILIES, TOL, batch, loss_and_grads
from test_packing import assets, run_config  # noqa: F401 (assets: the module fixture)


def with_positions(b: dict) -> dict:
    most = int((np.asarray(b["labels"])[:, 1:] != IGNORE_INDEX).sum(axis=1).max())
    return {**b, "target_positions": data_lib.target_positions(b["labels"], most)}


def assert_same(got, want, what):
    np.testing.assert_allclose(got[0], want[0], rtol=TOL, err_msg=what)
    np.testing.assert_array_equal(got[1], want[1])
    for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(want[2]), jax.tree.leaves(got[2])):
        g, h = np.asarray(g), np.asarray(h)
        np.testing.assert_allclose(h, g, atol=TOL * np.abs(g).max(), rtol=0,
                                   err_msg=f"{what}: {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loss_and_gradients_equal_the_full_logits(name):
    model = Model.random(FAMILIES[name].to_dict(), mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    targets = "all-linear" if name != "llama_untied" else ["q_proj", "v_proj", "down_proj", "lm_head"]
    cfg = lora_lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    lora = lora_lib.init_lora(model, cfg, jax.random.key(1))
    b = batch(t=40)
    b["labels"][:, :22] = IGNORE_INDEX  # a long prompt: at most 17 targets a row, so K = 32 head positions of 40
    sel = with_positions(b)
    assert sel["target_positions"].shape[1] < b["labels"].shape[1]  # fewer head positions than tokens
    model.loss_chunk = 0
    want = loss_and_grads(model, model.params, lora, b, per_row=True)
    assert_same(loss_and_grads(model, model.params, lora, sel, per_row=True), want, "full head")
    if name in ("llama_untied", "gemma2_softcap"):  # the chunked head at the selected positions: a kernel, soft-cap
        lora = {k: v for k, v in lora.items() if k != "lm_head"}  # (LoRA on lm_head keeps the full logits)
        want = loss_and_grads(model, model.params, lora, b, per_row=True)
        model.loss_chunk = 4
        assert_same(loss_and_grads(model, model.params, lora, sel, per_row=True), want, "chunked head")


def test_positions_are_the_targets_in_order():
    labels = np.array([[-100, -100, 5, 6, -100, 7], [-100, -100, -100, -100, -100, 9], [1, 2, 3, 4, 5, 6]])
    pos = data_lib.target_positions(labels, most=5)
    assert pos.dtype == np.int32  # K = 5 rounded up to 16, at most T = 6
    np.testing.assert_array_equal(pos, [[1, 2, 4, -1, -1, -1], [4, -1, -1, -1, -1, -1], [0, 1, 2, 3, 4, -1]])
    with pytest.raises(ValueError, match="row 0 has 63 labelled targets, more than the capacity 32"):
        data_lib.target_positions(np.full((2, 64), 3), most=17)  # an understated bound: an error, never a cut
    assert data_lib.target_positions(np.full((2, 64), -100), most=17).shape == (2, 32)  # 17 -> 32, a multiple of 16


def _data(n: int = 40, seed: int = 0) -> data_lib.TokenizedData:
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(n):
        p, r = int(rng.integers(2, 20)), int(rng.integers(1, 25))
        x = rng.integers(3, 100, p + r).tolist()
        ids.append(x)
        labels.append([IGNORE_INDEX] * p + x[p:])
    return data_lib.TokenizedData.from_lists(ids, labels)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "bucketed"])
def test_loaders_carry_every_target_once_with_one_capacity(packing):
    from jaxlora.config import ModelConfig, RunConfig
    from jaxlora.training.setup import make_loader

    class Tok:
        pad_token_id = 0
    data = _data()
    config = RunConfig(model=ModelConfig(logits_at_targets=True),
                       data=data_lib.DataConfig(max_length=64, bucket_lengths=(32, 64), packing=packing))
    loader = make_loader(config, data, Tok(), 4)
    plain = make_loader(dataclasses.replace(config, model=ModelConfig()), data, Tok(), 4)
    widths = {}
    for step in range(loader.steps_per_epoch):
        b, p = loader.batch(step), plain.batch(step)
        assert "target_positions" not in p
        np.testing.assert_array_equal(b["labels"], p["labels"])
        pos, labels = b["target_positions"], b["labels"]
        t = labels.shape[1]
        widths.setdefault(t, set()).add(pos.shape[1])
        for row, lab in zip(pos, labels):
            want = np.flatnonzero(lab[1:] != IGNORE_INDEX)
            np.testing.assert_array_equal(row[:len(want)], want)
            assert (row[len(want):] == -1).all()
    assert all(len(k) == 1 for k in widths.values()), widths  # one K per row length: one compile per bucket
    assert loader.target_most == data_lib.most_targets(data, loader.bins if packing else None)


def test_packed_run_equals_the_full_logits_run_and_compiles_once(assets, tmp_path):  # noqa: F811
    """Four packed steps with dropout and an evaluation: the same losses as without (the same computation minus the
    prompt positions' logits), one compile."""
    common = ("data.packing=true", "optim.schedule=constant", "lora.lora_dropout=0.1", "data.bucket_lengths=[64]",
              "train.max_steps=4", "train.eval_every=4")
    a = train_lib.train(run_config(assets, tmp_path / "a", *common))
    b = train_lib.train(run_config(assets, tmp_path / "b", *common, "model.logits_at_targets=true"))
    assert b.compiles == 1 and np.all(np.isfinite(b.losses))
    np.testing.assert_allclose(b.losses, a.losses, rtol=TOL)
    np.testing.assert_allclose(b.eval_loss, a.eval_loss, rtol=TOL)


def test_refused_without_a_causal_head():
    import transformers
    from jaxlora.config import load_run_config
    from jaxlora.training import setup
    hf = transformers.T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = Model.random(hf.to_dict(), mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    cfg = load_run_config(None, ["model.path=x", "data.path=y", "model.logits_at_targets=true"])
    with pytest.raises(setup.TrainingError, match="model.logits_at_targets selects a causal LM's head positions;.*"
                                                  "set model.logits_at_targets: false"):
        setup.resolve_data_layout(cfg, model)
