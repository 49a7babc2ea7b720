"""The training step and loop: invariants, not just that they run.

Step level (jaxlora.training.step, called directly): the frozen base stays bitwise equal while the adapters move; a B=0
adapter's loss is the base model's; the loss is a hand-computed masked next-token cross entropy; gradient
accumulation equals one big batch; sharded equals unsharded; LoRA costs fewer FLOPs and has adapter-sized optimizer
state; LoRA+ and modules_to_save reach the right parameters with the right learning rates.

Loop level (jaxlora.training.trainer.train on a tiny real HF model): one compilation per bucket length; resume is exact;
checkpoints are adapter-sized and rotated; a NaN stops the run before it is checkpointed; resuming another LoRA
shape or model is a clear ResumeError; over-long examples are truncated and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file
from transformers import AutoTokenizer

import tiny
from jaxlora.io import checkpoint as ckpt_lib
from jaxlora.training import data as data_lib
from jaxlora import sharding
from jaxlora.training import optim
from jaxlora.training import step as step_lib
from jaxlora.training import evaluation, export, setup, trainer as train_lib
from jaxlora.config import RunConfig, TrainConfig, load_run_config
from jaxlora.lora import LoraConfig
from jaxlora.models.model import from_pretrained
from jaxlora.losses import next_token_loss_sums
from jaxlora.training.build import build_training
from jaxlora.training.optim import OptimConfig
from jaxlora.sharding import MeshConfig

# A vocabulary much larger than the tokenizer's (96) makes the base clearly bigger than any adapter, as in real
# models, so "checkpoints are adapter-sized" is a meaningful check. Everything else is the 2-layer, hidden-64 model.
VOCAB = 4096
MAX_LEN = 32
BATCH = 16
LR = 3e-3


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train")
    tiny.tiny_model_dir(d / "model", vocab_size=VOCAB)
    tiny.write_jsonl(d / "train.jsonl", tiny.instruction_records(64))
    return d


@pytest.fixture(scope="module")
def model(assets):
    return from_pretrained(assets / "model")  # all 8 devices on the data axis


@pytest.fixture(scope="module")
def batches(assets, model) -> list[dict]:
    """Host batches (numpy) of 16 prompt-masked examples, as the training loop makes them."""
    tok = model.tokenizer()
    cfg = data_lib.DataConfig(path=str(assets / "train.jsonl"), max_length=MAX_LEN)
    loader = data_lib.BatchLoader(data_lib.load_tokenized(cfg, tok), BATCH, data_lib.bucket_lengths(cfg),
                                  tok.pad_token_id)
    return [loader.batch(i) for i in range(3)]


def make_step(model, lora=LoraConfig(), optim_cfg=OptimConfig(learning_rate=LR, schedule="constant"),
              accum: int = 1, tx=None, seed: int = 0):
    """(initial state, jitted train step) exactly as `train()` builds them; `tx` overrides the optimizer."""
    run = RunConfig(lora=lora, optim=optim_cfg, train=TrainConfig(grad_accum_steps=accum))
    training = build_training(model, run, total_steps=10, rngs=(jax.random.PRNGKey(seed), jax.random.PRNGKey(seed + 1)),
                              tx=tx or optim.make_optimizer(optim_cfg, 10)[0])
    return training.state, training.train_step


def host(tree):
    """A numpy copy (the step donates its state, so device buffers of an old state are gone after a step)."""
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def two_steps(model, batches):
    """Two real steps of default LoRA (q_proj, v_proj; B=0 at init): base before/after, states, metrics."""
    state, step = make_step(model)
    base_before = host(model.params)
    lora_before = host(state.trainable["lora"])
    metrics = []
    for b in batches[:2]:
        state, m = step(model.params, state, step_lib.place_batch(b, model.mesh))
        metrics.append({k: float(v) for k, v in m.items()})
    return dict(base_before=base_before, lora_before=lora_before, state=state, metrics=metrics)


# ------------------------------------------------------------------------------------------------ step level


def test_step_leaves_base_bitwise_frozen_and_moves_adapters(model, two_steps):
    base_after = host(model.params)
    flat_before = jax.tree_util.tree_leaves_with_path(two_steps["base_before"])
    flat_after = jax.tree.leaves(base_after)
    assert len(flat_before) == len(flat_after) > 0
    for (path, x), y in zip(flat_before, flat_after):
        assert np.array_equal(x, y), f"base param {jax.tree_util.keystr(path)} changed"

    before = two_steps["lora_before"]
    after = host(two_steps["state"].trainable["lora"])
    leaves = jax.tree_util.tree_leaves_with_path(after)
    assert {jax.tree_util.keystr(p).split(".")[-1] for p, _ in leaves} == {"a", "b"}
    for (path, x), x0 in zip(leaves, jax.tree.leaves(before)):
        name = jax.tree_util.keystr(path)
        assert not np.array_equal(x, x0), f"{name} did not move"
        if name.endswith(".b"):
            assert not np.any(x0) and np.any(x), f"{name}: b starts at zero and must leave it"
    assert int(two_steps["state"].step) == 2


def test_zero_b_lora_loss_equals_base_loss(model, batches, two_steps):
    b = batches[0]
    logits = model.apply(model.params, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]))
    loss_sum, count = next_token_loss_sums(logits, jnp.asarray(b["labels"]))
    np.testing.assert_allclose(two_steps["metrics"][0]["loss"], float(loss_sum / count), rtol=1e-5)
    assert two_steps["metrics"][0]["tokens"] == float(count)


def test_loss_is_masked_next_token_cross_entropy(model, batches, two_steps):
    b = batches[0]
    ids, labels = b["input_ids"], b["labels"]
    logits = np.asarray(model.apply(model.params, jnp.asarray(ids), jnp.asarray(b["attention_mask"])), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = []
    nll_with_prompt = []  # what a loss that forgot the mask would be
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labels[i, t + 1] != data_lib.IGNORE_INDEX:  # token t predicts t+1
                nll.append(-logp[i, t, labels[i, t + 1]])
            if b["attention_mask"][i, t + 1]:
                nll_with_prompt.append(-logp[i, t, ids[i, t + 1]])
    prompt = (labels == data_lib.IGNORE_INDEX) & (b["attention_mask"] == 1)
    assert prompt[:, 1:].sum() > 0, "the batch must have prompt tokens for this test to mean anything"
    assert two_steps["metrics"][0]["tokens"] == len(nll)
    np.testing.assert_allclose(two_steps["metrics"][0]["loss"], np.mean(nll), rtol=1e-5)
    assert abs(np.mean(nll_with_prompt) - np.mean(nll)) > 1e-3


def test_grad_accumulation_equals_one_big_batch(model, batches):
    # SGD, not Adam: Adam's first step is ~lr * sign(g) and would hide a wrongly scaled gradient.
    b = dict(batches[0])
    labels = b["labels"].copy()
    for i in range(BATCH // 2, BATCH):  # fewer labelled tokens in the 2nd micro-batch: mean of means != mean
        trained = np.flatnonzero(labels[i] != data_lib.IGNORE_INDEX)
        labels[i, trained[:3]] = data_lib.IGNORE_INDEX
    b["labels"] = labels
    lora = LoraConfig(init_lora_weights=False)  # b != 0, so a gets gradients too
    out = {}
    for accum in (1, 2):
        state, step = make_step(model, lora, accum=accum, tx=optax.sgd(1.0))
        state, m = step(model.params, state, step_lib.place_batch(b, model.mesh))
        out[accum] = (host(state.trainable), {k: float(v) for k, v in m.items()})
    np.testing.assert_allclose(out[2][1]["loss"], out[1][1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(out[2][1]["grad_norm"], out[1][1]["grad_norm"], rtol=1e-5)
    assert out[1][1]["tokens"] == out[2][1]["tokens"]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), out[2][0], out[1][0])


def test_sharded_equals_unsharded(assets, model, batches):
    lora = LoraConfig(lora_dropout=0.1, target_modules="all-linear")
    meshes = {
        "data=8": model,
        "fsdp=2,tensor=2": from_pretrained(assets / "model", mesh=sharding.make_mesh(MeshConfig(fsdp=2, tensor=2))),
        "1 device": from_pretrained(assets / "model",
                                    mesh=sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])),
    }
    runs = {}
    for name, m in meshes.items():
        state, step = make_step(m, lora)
        losses = []
        for b in batches:
            state, metrics = step(m.params, state, step_lib.place_batch(b, m.mesh))
            losses.append(float(metrics["loss"]))
        runs[name] = (losses, host(state.trainable["lora"]))
    spec = meshes["fsdp=2,tensor=2"].param_shardings["model"]["layers"]["self_attn"]["q_proj"]["kernel"].spec
    assert tuple(spec) == (None, "fsdp", "tensor")  # the model really is split on that mesh
    ref_losses, ref_lora = runs["1 device"]
    for name, (losses, lora_tree) in runs.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=name),
                     lora_tree, ref_lora)


def test_fsdp_shards_activations(assets, batches, monkeypatch):
    """Under pure FSDP (fsdp=8) every chip must hold only its rows' activations, as under pure data parallelism:
    the compiled step's per-device temporaries stay close to data=8's. Without the activation constraints
    (`sharding.constrain`) XLA keeps the hidden states whole on every chip: several times more (checked below)."""
    def temp_bytes(mesh_cfg) -> int:
        m = from_pretrained(assets / "model", mesh=sharding.make_mesh(mesh_cfg))
        state, step = make_step(m, LoraConfig(target_modules="all-linear"))
        big = {k: np.tile(v, (4, 4)) for k, v in batches[0].items()}  # 64 rows x 128 tokens: activations dominate
        compiled = step.lower(m.params, state, step_lib.place_batch(big, m.mesh)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    data8, fsdp8 = temp_bytes(MeshConfig(data=8)), temp_bytes(MeshConfig(data=1, fsdp=8))
    monkeypatch.setattr(sharding, "constrain", lambda x, names: x)
    fsdp8_unconstrained = temp_bytes(MeshConfig(data=1, fsdp=8))
    assert fsdp8 < 1.5 * data8, (fsdp8, data8)
    assert fsdp8_unconstrained > 3 * fsdp8, (fsdp8_unconstrained, fsdp8)


def test_optimizer_state_offload_to_host(assets, batches):
    """optim.offload_state keeps the Adam moments in pinned host memory between steps (memory kinds) and trains
    exactly as with the state on the device (same losses, same adapters)."""
    m = from_pretrained(assets / "model", mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=4)))
    lora = LoraConfig(target_modules="all-linear")
    runs = {}
    for offload in (False, True):
        optim_cfg = OptimConfig(learning_rate=LR, schedule="constant", offload_state=offload)
        run = RunConfig(lora=lora, optim=optim_cfg)
        training = build_training(m, run, total_steps=10, rngs=(jax.random.PRNGKey(0), jax.random.PRNGKey(1)))
        params, state, step = training.params, training.state, training.train_step
        losses = []
        for b in batches[:3]:
            state, metrics = step(params, state, step_lib.place_batch(b, m.mesh))
            losses.append(float(metrics["loss"]))
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
        assert kinds == ({"pinned_host"} if offload else {"device"}), kinds
        runs[offload] = (losses, host(state.trainable["lora"]))
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), runs[True][1], runs[False][1])


def cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_lora_step_costs_less_than_full_finetuning(model, batches):
    batch = step_lib.place_batch(batches[0], model.mesh)
    lora_cfg = LoraConfig(r=8, target_modules="all-linear")
    state, step = make_step(model, lora_cfg)
    lora_flops = cost_flops(step.lower(model.params, state, batch).compile())
    adapter_bytes = nbytes(state.trainable)
    assert adapter_bytes == nbytes(state.trainable["lora"]) > 0
    assert 2 * adapter_bytes <= nbytes(state.opt_state) <= 2 * adapter_bytes + 64  # mu, nu + step counters

    full = {"lora": {}, "full": model.params}
    full_training = build_training(model, RunConfig(lora=lora_cfg, optim=OptimConfig(learning_rate=LR)),
                                   total_steps=10, trainable=full,
                                   rngs=(jax.random.PRNGKey(0), jax.random.PRNGKey(1)))
    full_state, full_step = full_training.state, full_training.train_step
    full_flops = cost_flops(full_step.lower(model.params, full_state, batch).compile())
    base_bytes = nbytes(model.params)
    assert 2 * base_bytes <= nbytes(full_state.opt_state) <= 2 * base_bytes + 64

    # Frozen kernels get no weight-gradient matmul: ~4 instead of ~6 FLOPs per weight and token.
    assert lora_flops < 0.8 * full_flops, (lora_flops, full_flops)
    assert lora_flops > 0.5 * full_flops, (lora_flops, full_flops)  # the forward and input gradients remain


@pytest.fixture(scope="module")
def loraplus_step(model, batches):
    """One AdamW step with LoRA+ (ratio 16) and lm_head in modules_to_save at its own learning rate."""
    lora = LoraConfig(init_lora_weights=False, modules_to_save=["lm_head"])
    optim_cfg = OptimConfig(learning_rate=1e-3, schedule="constant", loraplus_lr_ratio=16.0,
                            modules_to_save_lr=5e-4, max_grad_norm=0.0, eps=1e-30)
    state, step = make_step(model, lora, optim_cfg)
    before = host(state.trainable)
    labels = optim.param_labels(state.trainable)
    state, _ = step(model.params, state, step_lib.place_batch(batches[0], model.mesh))
    return dict(before=before, after=host(state.trainable), labels=labels)


def test_loraplus_learning_rates_per_group(loraplus_step):
    labels = jax.tree_util.tree_leaves_with_path(loraplus_step["labels"])
    by_name = {jax.tree_util.keystr(p): label for p, label in labels}
    assert by_name and all(
        label == ("full" if k.startswith("['full']") else "lora_b" if k.endswith(".b") else "lora_a")
        for k, label in by_name.items()), by_name
    assert set(by_name.values()) == {"lora_a", "lora_b", "full"}

    # AdamW's first update is lr * g / |g| = lr for every element with a nonzero gradient (eps ~ 0, no decay).
    expected = {"lora_a": 1e-3, "lora_b": 16e-3, "full": 5e-4}
    deltas = jax.tree.map(lambda x, y: np.abs(x - y), loraplus_step["after"], loraplus_step["before"])
    for (path, label), delta in zip(labels, jax.tree.leaves(deltas)):
        moved = delta[delta > 0]
        assert moved.size > 0.9 * delta.size, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.median(moved), expected[label], rtol=1e-3, err_msg=jax.tree_util.keystr(path))
        assert np.mean(np.isclose(moved, expected[label], rtol=1e-2)) > 0.99, jax.tree_util.keystr(path)


def test_modules_to_save_trains_a_copy(model, loraplus_step):
    before = loraplus_step["before"]["full"]["lm_head"]["kernel"]
    after = loraplus_step["after"]["full"]["lm_head"]["kernel"]
    base = host(model.params["lm_head"]["kernel"])
    np.testing.assert_array_equal(before, base)  # the copy starts as the base
    assert not np.array_equal(after, before)  # and trains
    assert list(loraplus_step["after"]["full"]) == ["lm_head"]
    assert np.array_equal(host(model.params["lm_head"]["kernel"]), base)  # while the base stays frozen


# ------------------------------------------------------------------------------------------------ loop level


def run_config(assets, out: Path, *overrides: str) -> RunConfig:
    return load_run_config(None, [
        f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}", f"data.max_length={MAX_LEN}",
        f"train.output_dir={out}", f"train.micro_batch_size={BATCH}", f"optim.learning_rate={LR}",
        "train.progress_bar=false", "train.peak_tflops_per_device=1", "train.log_every=1", *overrides])


def step_dirs(out: Path) -> list[int]:
    """Checkpointed steps (a leftover temporary folder fails int(): checkpoints must be atomic)."""
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.is_dir())


@contextlib.contextmanager
def count_compiles(name: str):
    """Counts XLA compilations of jitted function `name` (from jax's own compile log)."""
    counter = {"n": 0}
    pattern = re.compile(rf"Finished XLA compilation of jit\({name}\)")

    class Handler(logging.Handler):
        def emit(self, record):
            counter["n"] += bool(pattern.search(record.getMessage()))

    handler = Handler(logging.DEBUG)
    logger = logging.getLogger("jax._src.dispatch")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield counter
    finally:
        logger.removeHandler(handler)


def test_compiles_once_per_bucket_and_truncates(assets, tmp_path, caplog):
    # Mostly short examples, some medium and some longer than max_length, over buckets 16/24/32.
    records = tiny.instruction_records(48, seed=3)
    for i in range(0, 48, 7):
        records[i]["input"] = " ".join([records[i]["input"]] * 2)  # ~18 tokens
    for i in range(3, 48, 11):
        records[i]["input"] = " ".join([records[i]["input"]] * 6)  # ~42 tokens: truncated to 32
    data = tiny.write_jsonl(tmp_path / "buckets.jsonl", records)
    cfg = run_config(assets, tmp_path / "run", f"data.path={data}", "data.bucket_lengths=[16,24,32]",
                     "train.micro_batch_size=8", "train.max_steps=6")

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    untruncated = data_lib.load_tokenized(data_lib.DataConfig(path=str(data), max_length=1024), tokenizer)
    n_long = int((untruncated.lengths > MAX_LEN).sum())
    loader = setup.make_loader(cfg, data_lib.load_tokenized(cfg.data, tokenizer), tokenizer, 8)
    lengths = {loader.batch(s)["input_ids"].shape[1] for s in range(6)}
    assert n_long >= 3 and len(lengths) >= 2, (n_long, lengths)  # the test data must exercise both features
    assert lengths <= {16, 24, 32}  # every batch is padded to a bucket

    with caplog.at_level(logging.WARNING, logger="jaxlora"), count_compiles("train_step") as compiles:
        result = train_lib.train(cfg)
    assert len(result.losses) == 6 and np.all(np.isfinite(result.losses))
    assert result.compiles <= len(lengths)
    assert compiles["n"] == result.compiles == len(lengths), (compiles["n"], result.compiles, lengths)
    # their prompts alone fill max_length: no labelled token is left, so they are dropped and named (issue 16 item
    # 10: the warning used to call them "truncated")
    assert f"{n_long} training examples were dropped: no labelled token within data.max_length={MAX_LEN}" \
        in caplog.text


RESUME = ("lora.lora_dropout=0.1", "optim.schedule=constant", "optim.warmup_steps=10", "train.save_every=4",
          "train.keep_checkpoints=2")


@pytest.fixture(scope="module")
def resume_runs(assets, tmp_path_factory):
    """A: 12 steps straight. B: 8 steps, then a second call resumes to 12 (same output_dir).

    The warmup (10 steps) is fixed, not a ratio of max_steps, so both runs have the same schedule and B's resumed
    steps 9..10 depend on the restored step counter; dropout makes them depend on the restored RNG.
    """
    d = tmp_path_factory.mktemp("resume")
    a = train_lib.train(run_config(assets, d / "a", *RESUME, "train.max_steps=12"))
    b1 = train_lib.train(run_config(assets, d / "b", *RESUME, "train.max_steps=8"))
    b2 = train_lib.train(run_config(assets, d / "b", *RESUME, "train.max_steps=12"))
    return dict(a=a, b1=b1, b2=b2, dir=d)


def test_resume_is_exact(resume_runs):
    a, b1, b2 = resume_runs["a"], resume_runs["b1"], resume_runs["b2"]
    assert len(a.losses) == 12 and len(b1.losses) == 8 and len(b2.losses) == 4
    np.testing.assert_allclose(b1.losses, a.losses[:8], rtol=1e-6)
    np.testing.assert_allclose(b2.losses, a.losses[8:], rtol=1e-6)
    adapter_a = load_file(a.adapter_dir / "adapter_model.safetensors")
    adapter_b = load_file(b2.adapter_dir / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys() and adapter_a
    for k in adapter_a:
        np.testing.assert_allclose(adapter_b[k], adapter_a[k], rtol=1e-6, atol=1e-8, err_msg=k)
    assert any(np.any(v) for k, v in adapter_a.items() if "lora_B" in k)


def test_checkpoints_are_adapter_sized_and_rotated(model, resume_runs):
    out = resume_runs["dir"] / "a"
    assert step_dirs(out) == [8, 12]  # keep_checkpoints=2 of 4, 8, 12
    ckpt_bytes = sum(f.stat().st_size for f in (out / "checkpoints" / "12").rglob("*") if f.is_file())

    lora = LoraConfig(lora_dropout=0.1)
    trainable = build_training(model, RunConfig(lora=lora), total_steps=12).state.trainable
    tx, _ = optim.make_optimizer(OptimConfig(), 12)
    state_bytes = nbytes(trainable) + nbytes(jax.eval_shape(tx.init, trainable))
    base_bytes = nbytes(model.params)
    # What orbax stored for each array (its OCDBT index: chunks and zarr metadata, 0.2-0.3 KB per array here): the
    # state once, nothing of the base. (The files on disk add orbax's metadata and OCDBT B-tree nodes, whose sizes
    # vary from run to run with how its asynchronous commits batch: 155-281 KB for this 43 KB state, so the
    # on-disk total is bounded against the base only.)
    from orbax.checkpoint._src.serialization import ocdbt_utils
    stored = asyncio.run(ocdbt_utils.get_tensor_raw_bytes(out / "checkpoints" / "12" / "state"))
    payload = sum(stored.values())
    assert state_bytes <= payload < state_bytes + 512 * len(stored), (payload, state_bytes, len(stored))
    assert len(stored) == len(jax.tree.leaves((trainable, jax.eval_shape(tx.init, trainable)))), sorted(stored)
    assert ckpt_bytes < base_bytes / 4, (ckpt_bytes, base_bytes)


def test_nan_loss_stops_before_checkpointing(assets, tmp_path, monkeypatch):
    real = step_lib.make_train_step

    def diverging(model, tx, schedule, accum, offloaded_opt_shardings=None, **options):
        """The real step, whose state turns NaN when it enters step 6 (state.step == 5), a checkpoint step."""
        step = real(model, tx, schedule, accum, offloaded_opt_shardings, **options)

        def train_step(params, state, batch):
            bad = state.step == 5
            poisoned = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), state.trainable)
            return step(params, state.replace(trainable=poisoned), batch)
        return train_step

    monkeypatch.setattr(step_lib, "make_train_step", diverging)
    out = tmp_path / "run"
    with pytest.raises(train_lib.TrainingError) as err:
        train_lib.train(run_config(assets, out, "train.max_steps=8", "train.save_every=2"))
    message = str(err.value)
    assert re.search(r"loss is nan at step 6\b", message), message
    assert f"Last good checkpoint: step 4 in {out / 'checkpoints'}" in message, message
    assert step_dirs(out) == [2, 4]  # nothing for step 6 (checked before its save) or after (7 was dispatched)
    assert not (out / "adapter").exists()


def test_resume_rejects_other_lora_shape_or_model(assets, resume_runs, tmp_path):
    src = resume_runs["dir"] / "a" / "checkpoints"
    shutil.copytree(src, tmp_path / "rank" / "checkpoints")
    shape_change = r"another LoRA shape: .*q_proj.*\[2, 64, 8\].* there, \[\[2, 64, 4\]"
    with pytest.raises(ckpt_lib.ResumeError, match=shape_change):
        train_lib.train(run_config(assets, tmp_path / "rank", *RESUME, "train.max_steps=12", "lora.r=4"))

    tiny.tiny_model_dir(tmp_path / "narrow", vocab_size=VOCAB, hidden_size=32)
    shutil.copytree(src, tmp_path / "model" / "checkpoints")
    with pytest.raises(ckpt_lib.ResumeError, match="another model: hidden_size is 64 there, 32 now"):
        train_lib.train(run_config(assets, tmp_path / "model", *RESUME, "train.max_steps=12",
                                   f"model.path={tmp_path / 'narrow'}"))
    assert step_dirs(tmp_path / "model") == [8, 12]


def test_resume_refuses_other_lora_alpha_and_logs_other_optimizer(assets, resume_runs, tmp_path, caplog):
    """lora_alpha changes the adapted model's function: resuming with another one is refused, naming the key and both
    values; a changed learning rate only changes the optimization: accepted, and logged with both values."""
    src = resume_runs["dir"] / "a" / "checkpoints"
    shutil.copytree(src, tmp_path / "alpha" / "checkpoints")
    with pytest.raises(ckpt_lib.ResumeError, match=r"lora\.lora_alpha=8\.0, this run has lora\.lora_alpha=16\.0"):
        train_lib.train(run_config(assets, tmp_path / "alpha", *RESUME, "train.max_steps=12", "lora.lora_alpha=16"))
    with pytest.raises(ckpt_lib.ResumeError, match=r"lora\.lora_alpha=8\.0, this run has lora\.lora_alpha=16\.0"):
        export.restore_adapters(run_config(assets, tmp_path / "alpha", *RESUME, "lora.lora_alpha=16"),
                                   from_pretrained(assets / "model"))  # eval/export of the run too

    shutil.copytree(src, tmp_path / "lr" / "checkpoints")
    with caplog.at_level(logging.INFO, logger="jaxlora"):
        result = train_lib.train(run_config(assets, tmp_path / "lr", *RESUME, "train.max_steps=13",
                                            "optim.learning_rate=0.001"))
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "resuming at step 12 with optim.learning_rate=0.001; the checkpoint was trained with " \
           f"optim.learning_rate={LR}" in warnings, warnings
    assert f"resumed from {tmp_path / 'lr' / 'checkpoints'} at step 12" in caplog.text


@pytest.mark.parametrize("lr,warmup,stop", [
    (1e30, 0, r"loss is nan at step 2 \(the loss of the parameters checkpointed at step 1: that checkpoint was "
              r"removed\); stopped\. Last good checkpoint: none"),
    (1e30, 3, r"loss is nan at step 3 \(the loss of the parameters checkpointed at step 2: that checkpoint was "
              r"removed\); stopped\. Last good checkpoint: step 1 in "),
    (1e39, 0, r"the parameters are not finite after step 1 \(its loss, of the parameters before it, was [\d.]+\); "
              r"step 1 was not saved; stopped\. Last good checkpoint: none"),
], ids=["diverges_at_step_2", "finite_params_nan_loss", "nonfinite_params"])
def test_divergence_keeps_only_good_checkpoints(assets, tmp_path, lr, warmup, stop):
    """Issue 16 item 1: a huge learning rate on every linear layer, a checkpoint every step. The loss checked at step N
    is that of the parameters before update N, so the checkpoint of step N - 1 is what gave a NaN loss at step N, and
    the parameters after update N can already be non-finite. The last good checkpoint the stop names, restored, has
    finite parameters and a finite loss, and it is the one a rerun resumes from. (With 1e30 the params after an
    update are finite but their loss is NaN; a warmup makes step 1's update zero, so step 1 is good. 1e39 is inf in
    float32: the params after step 1 are not finite.)"""
    out = tmp_path / "run"
    overrides = (f"optim.learning_rate={lr}", f"optim.warmup_steps={warmup}", "optim.schedule=constant",
                 "lora.target_modules=all-linear", "train.save_every=1", "train.max_steps=6",
                 "train.micro_batch_size=8")
    cfg = run_config(assets, out, *overrides)
    with pytest.raises(train_lib.TrainingError) as err:
        train_lib.train(cfg)
    message = str(err.value)
    named = re.search(r"Last good checkpoint: step (\d+)", message)
    if named is not None:  # the checkpoint the stop names, restored: finite parameters and a finite loss
        good = int(named.group(1))
        model = setup.load_model(cfg, sharding.make_mesh(cfg.mesh))
        adapters, step = export.restore_adapters(cfg, model, good)
        assert step == good and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(adapters)), message
        evaluated = evaluation.evaluate_run(dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, eval_path=str(assets / "train.jsonl"))), good)
        assert evaluated["step"] == good and np.isfinite(evaluated["eval_loss"]), (evaluated, message)
    assert re.search(stop, message), message
    assert not (out / "adapter").exists()
    assert step_dirs(out) == ([int(named.group(1))] if named else []), step_dirs(out)  # what a rerun resumes from
