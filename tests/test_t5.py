"""T5 encoder-decoders (v1.0 ReLU / tied, v1.1 gated-gelu / untied): float32 parity with transformers (decoder logits
and loss with padded inputs and -100 labels), LoRA equal to PEFT's (logits and gradients), PEFT's module names, a
sharded mesh equal to one device, export that transformers reloads, the objective through LoRA-GA and training, and
GLUE-as-text class probabilities equal to a direct transformers computation.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import jaxlora
from tiny import peft_with_random_factors
from jaxlora import sharding
from jaxlora.tasks import t5_glue
from jaxlora.lora import LoraConfig, LoraGAConfig, lora_items, module_names
from jaxlora.models import t5
from jaxlora.sharding import MeshConfig

PARITY_ATOL = 1e-4  # float32, PyTorch vs XLA on CPU
VOCAB, SEQ, TGT = 64, 12, 5
PARITY_ERRORS: dict[str, float] = {}
VARIANTS = [("relu", True), ("gated-gelu", False), ("relu", False), ("gated-gelu", True)]


def hf_config(ff: str, tie: bool, **overrides) -> transformers.T5Config:
    kwargs = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj=ff,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1, tie_word_embeddings=tie)
    return transformers.T5Config(**{**kwargs, **overrides})


def make_folder(ff: str, tie: bool, folder, seed: int = 0):
    """A random T5 saved as HF files, and the transformers model loaded back from them (the reference).

    Layer norms U(0.5, 1.5) so a misplaced norm shows. Untied: transformers 5 saves T5 always tied, so the folder is
    written by hand with its own lm_head.weight and tie_word_embeddings=false, as v1.1 / FLAN checkpoints are."""
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(hf_config(ff, tie))
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "layer_norm" in key:
                p.uniform_(0.5, 1.5)
    if tie:
        hf.save_pretrained(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items() if "embed_tokens" not in k}
        state["lm_head.weight"] = torch.randn(VOCAB, 32) * 0.2
        safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = {**hf.config.to_dict(), "tie_word_embeddings": False, "architectures": ["T5ForConditionalGeneration"]}
        (folder / "config.json").write_text(json.dumps(cfg))
    ref = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    assert ref.config.scale_decoder_outputs == tie
    return ref


def make_batch(seed: int = 0):
    """Inputs (3, SEQ): row 1 right-padded, row 2 left-padded; labels (3, TGT) with -100 tails on rows 0 and 2."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(2, VOCAB, (3, SEQ)).astype(np.int32)
    mask = np.ones((3, SEQ), np.int32)
    mask[1, 7:] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 0
    labels = rs.randint(2, VOCAB, (3, TGT)).astype(np.int32)
    labels[0, 3:] = -100
    labels[2, 4:] = -100
    return ids, mask, labels


def torch_out(model, ids, mask, labels):
    return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                 labels=torch.tensor(labels, dtype=torch.long))


def ours(model, ids, mask, labels, lora=None, params=None):
    dec = t5.shift_right(jnp.asarray(labels), model.config.decoder_start_token_id, model.config.pad_token_id)
    f = jax.jit(lambda p, i, m, d, lo: model.apply(p, i, m, lora=lo, decoder_input_ids_BxL=d))
    return np.asarray(f(model.params if params is None else params, jnp.asarray(ids), jnp.asarray(mask), dec, lora))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(ff: str, tie: bool):
        if (ff, tie) not in cache:
            folder = tmp_path_factory.mktemp(f"t5_{ff}_{'tied' if tie else 'untied'}")
            ref = make_folder(ff, tie, folder)
            cache[ff, tie] = ref, folder, jaxlora.from_pretrained(folder)
        return cache[ff, tie]
    return get


def _name(ff, tie):
    return f"{ff}/{'tied' if tie else 'untied'}"


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("ff,tie", VARIANTS)
def test_logits_and_loss_match_transformers(tiny, ff, tie):
    """Decoder logits at every target position (labelled or not) and the loss, with padded inputs."""
    hf, _, model = tiny(ff, tie)
    ids, mask, labels = make_batch()
    with torch.no_grad():
        ref = torch_out(hf, ids, mask, labels)
    got = ours(model, ids, mask, labels)
    err = float(np.abs(got - ref.logits.numpy()).max())
    PARITY_ERRORS[f"logits/{_name(ff, tie)}"] = err
    assert got.shape == (3, TGT, VOCAB)
    assert np.abs(ref.logits.numpy()).max() > 0.5, "reference logits are too small for the tolerance to mean anything"
    assert err < PARITY_ATOL
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    total, count = model.loss_sums(model.params, batch)
    assert float(count) == float((labels != -100).sum())
    assert abs(float(total / count) - float(ref.loss)) < PARITY_ATOL
    # padding changes nothing: row 1 alone, unpadded, gives the same logits
    alone = ours(model, ids[1:2, :7], mask[1:2, :7], labels[1:2])
    np.testing.assert_allclose(got[1], alone[0], atol=1e-5, rtol=0)


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    rel = np.arange(-300, 300)[None, :] - np.zeros((1, 1), np.int64)
    for bidirectional in (True, False):
        for buckets, dist in ((32, 128), (8, 16)):
            ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, buckets, dist).numpy()
            np.testing.assert_array_equal(t5.relative_position_bucket(rel, bidirectional, buckets, dist), ref)


@pytest.mark.parametrize("ff,tie", [("relu", True), ("gated-gelu", False)])
def test_config_and_param_tree(tiny, ff, tie):
    hf, _, model = tiny(ff, tie)
    cfg, params = model.config, model.params
    assert (cfg.tie_word_embeddings, cfg.is_gated_act) == (tie, ff.startswith("gated"))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params == sum(p.numel() for p in hf.parameters())
    blk = params["decoder"]["block"]["layer"]
    assert blk["1"]["EncDecAttention"]["q"]["kernel"].shape == (2, 32, 32)
    assert ("lm_head" in params) == (not tie)
    assert params["encoder"]["relative_attention_bias"]["embedding"].shape == (8, 4)
    assert "relative_attention_bias" not in params["decoder"]["block"]["layer"]["0"]["SelfAttention"]


def test_sharded_remat_equals_single_device(tiny):
    _, folder, _ = tiny("gated-gelu", False)
    one = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    eight = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                                    remat="full")
    wi = eight.params["encoder"]["block"]["layer"]["1"]["DenseReluDense"]["wi_0"]["kernel"]
    assert wi.sharding.spec == P(None, "fsdp", "tensor")
    ids, mask, labels = make_batch()
    a, b = ours(eight, ids, mask, labels), ours(one, ids, mask, labels)
    err = float(np.abs(a - b).max())
    PARITY_ERRORS["logits/sharded_vs_single"] = err
    assert err < 1e-5


@pytest.mark.parametrize("ff,tie", [("relu", True), ("gated-gelu", False)])
def test_export_reloads_in_transformers(tiny, tmp_path, ff, tie):
    hf, _, model = tiny(ff, tie)
    out = model.save_pretrained(tmp_path / "export")
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    assert reloaded.config.scale_decoder_outputs == tie
    ref_state, got_state = hf.state_dict(), reloaded.state_dict()
    assert set(ref_state) == set(got_state)
    for key, t in ref_state.items():
        assert torch.equal(t, got_state[key]), key
    ids, mask, labels = make_batch(1)
    with torch.no_grad():
        np.testing.assert_array_equal(torch_out(reloaded, ids, mask, labels).logits.numpy(),
                                      torch_out(hf, ids, mask, labels).logits.numpy())


def test_unsupported_t5_variants_are_named():
    with pytest.raises(ValueError, match="num_decoder_layers 3 != num_layers 2"):
        t5.T5Config.from_hf_dict(hf_config("relu", True, num_decoder_layers=3).to_dict())
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-foo'.*activation 'foo'"):
        t5.T5Config.from_hf_dict({**hf_config("relu", True).to_dict(), "feed_forward_proj": "gated-foo"})


# ------------------------------------------------------------------------------------------ LoRA


def _peft_lora(hf, model, targets):
    pm = peft_with_random_factors(hf, r=4, lora_alpha=8, target_modules=targets)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    modules = dict(pm.base_model.model.named_modules())
    flat, n_layers = {}, model.config.num_hidden_layers
    for path, s in lora_items(model.lora_shardings(model.lora_targets(cfg), cfg)):
        names = module_names(path, n_layers, model.names.stack_name)
        a = np.stack([modules[n].lora_A["default"].weight.detach().numpy().T for n in names])
        b = np.stack([modules[n].lora_B["default"].weight.detach().numpy().T for n in names])
        flat[path] = s.replace(a=jax.device_put(a, s.a), b=jax.device_put(b, s.b))
    return pm, modules, traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("ff,tie", [("relu", True), ("gated-gelu", False)])
def test_lora_matches_peft(tiny, ff, tie):
    """PEFT's T5 names (q, k, v, o, wi / wi_0 / wi_1, wo) in self-, cross-attention and feed-forward of both stacks:
    the same factors give the same logits and LoRA gradients."""
    hf, _, model = tiny(ff, tie)
    targets = ["q", "k", "v", "o", "wo"] + (["wi_0", "wi_1"] if ff.startswith("gated") else ["wi"])
    pm, modules, lora = _peft_lora(hf, model, targets)
    assert len(lora_items(lora)) == 4 + 4 + 4 + 2 * (len(targets) - 4)  # enc self, dec self, dec cross, 2 FFs

    ids, mask, labels = make_batch()
    weights = np.random.RandomState(3).normal(size=(3, TGT, VOCAB)).astype(np.float32)
    ref_t = torch_out(pm, ids, mask, labels).logits
    (ref_t * torch.tensor(weights)).sum().backward()
    got = ours(model, ids, mask, labels, lora=lora)
    err = float(np.abs(got - ref_t.detach().numpy()).max())
    PARITY_ERRORS[f"logits/peft_lora/{_name(ff, tie)}"] = err
    assert err < PARITY_ATOL
    assert np.abs(got - ours(model, ids, mask, labels)).max() > 0.1, "the adapter must change the logits"

    dec = t5.shift_right(jnp.asarray(labels), 0, 0)
    loss = lambda lo: jnp.sum(model.apply(model.params, jnp.asarray(ids), jnp.asarray(mask), lora=lo,
                                          decoder_input_ids_BxL=dec) * weights)
    grads = jax.jit(jax.grad(loss))(lora)
    worst = 0.0
    for path, g in lora_items(grads):
        for i, n in enumerate(module_names(path, model.config.num_hidden_layers, model.names.stack_name)):
            for mine, theirs in ((g.a[i], modules[n].lora_A["default"].weight.grad.T),
                                 (g.b[i], modules[n].lora_B["default"].weight.grad.T)):
                theirs = theirs.numpy()
                rel = float(np.abs(np.asarray(mine) - theirs).max() / np.abs(theirs).max())
                worst = max(worst, rel)
                assert rel < 1e-4, (n, rel)
    PARITY_ERRORS[f"lora_grads_rel/{_name(ff, tie)}"] = worst


def test_lora_module_names_are_peft_names(tiny):
    """Default targets are PEFT's T5 default (q, v); "all-linear" adapts what PEFT does (a plain PeftModel: PEFT 0.21's SEQ_2_SEQ_LM wrapper fails on transformers 5)."""
    hf, _, model = tiny("gated-gelu", False)
    n_layers = model.config.num_hidden_layers
    names = lambda cfg: {n for t in model.lora_targets(cfg) for n in module_names(t.path, n_layers, "block")}
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2))
    theirs = lambda m: {n.removeprefix("base_model.model.") for n, mod in m.named_modules() if hasattr(mod, "lora_A")}
    assert names(LoraConfig(r=2)) == theirs(pm) and len(theirs(pm)) == 2 * 3 * n_layers
    pm_all = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2,
                                                                     target_modules="all-linear"))
    assert names(LoraConfig(r=2, target_modules="all-linear")) == theirs(pm_all)


# ------------------------------------------------------------------------------------------ objective


def test_lora_ga_keeps_step0_logits(tiny):
    """LoRA-GA estimates gradients through the T5 objective (packed over the mesh: "group" rows) and leaves the
    logits unchanged at step 0."""
    _, _, model = tiny("gated-gelu", False)
    ids, mask, labels = make_batch()
    host = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v", "wo"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=3, num_batches=2, svd_method="exact"))
    lora = jaxlora.lora_ga_init(model, cfg, [host, host])
    params = model.params  # never modified: the update is relative to it
    err = float(np.abs(ours(model, ids, mask, labels, lora=lora, params=params)
                       - ours(model, ids, mask, labels)).max())
    PARITY_ERRORS["lora_ga/step0_logits_change"] = err
    assert err < 1e-4
    assert any(np.abs(np.asarray(w.b)).max() > 0 for _, w in lora_items(lora)), "LoRA-GA gives b a nonzero init"


def test_train_step_fits_a_batch(tiny):
    """jaxlora's train step (through `Model.loss_sums`: decoder inputs = labels shifted right) fits one batch."""
    from jaxlora.config import RunConfig
    from jaxlora.training import optim
    from jaxlora.training.build import build_training
    _, _, model = tiny("gated-gelu", False)
    ids, mask, labels = make_batch()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v", "wo"])
    lora = jaxlora.init_lora(model, cfg, jax.random.key(0))
    run = RunConfig(lora=cfg, optim=optim.OptimConfig(learning_rate=1e-2, schedule="constant"))
    training = build_training(model, run, total_steps=12, lora=lora, rngs=(jax.random.key(0), jax.random.key(0)),
                              batch_rows=ids.shape[0])
    state, train_step = training.state, training.train_step
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    losses = []
    for _ in range(12):
        state, metrics = train_step(model.params, state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_labels_must_be_token_sequences(tiny):
    _, _, model = tiny("relu", True)
    ids, mask, _ = make_batch()
    with pytest.raises(ValueError, match=r"T5 labels must be decoder target ids of shape \(B, L\)"):
        model.loss_sums(model.params, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
                                       "labels": jnp.zeros((3,), jnp.int32)})


# ------------------------------------------------------------------------------------------ GLUE as text


@pytest.mark.parametrize("ff,tie", [("relu", True), ("gated-gelu", False)])
def test_glue_class_probs_match_transformers(tiny, ff, tie):
    """Label words of different token lengths (with </s>=1): class probabilities equal p(label | x) normalized over
    the classes, computed directly with transformers; accuracy counts argmax hits."""
    hf, _, model = tiny(ff, tie)
    ids, mask, _ = make_batch(2)
    label_ids = [[17, 1], [23, 40, 1], [5, 1]]
    probs = t5_glue.class_probs(model, model.params, ids, mask, label_ids)
    logp = np.zeros((3, len(label_ids)))
    with torch.no_grad():
        for c, lab in enumerate(label_ids):
            lab_t = torch.tensor([lab] * 3)
            out = torch_out(hf, ids, mask, lab_t.numpy())
            logp[:, c] = torch.log_softmax(out.logits.double(), -1).gather(-1, lab_t[..., None])[..., 0].sum(-1).numpy()
    ref = np.exp(logp - logp.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    err = float(np.abs(probs - ref).max())
    PARITY_ERRORS[f"glue_probs/{_name(ff, tie)}"] = err
    assert err < 1e-4 and probs.shape == (3, 3)
    gold = np.array([ref[0].argmax(), ref[1].argmax(), (ref[2].argmax() + 1) % 3])
    res = t5_glue.evaluate(model, model.params, [{"input_ids": ids, "attention_mask": mask, "class": gold}],
                           label_ids)
    assert res["accuracy"] == pytest.approx(2 / 3) and res["predictions"].tolist()[:2] == gold[:2].tolist()
    with pytest.raises(ValueError, match="gold classes range over"):
        t5_glue.evaluate(model, model.params, [{"input_ids": ids, "attention_mask": mask, "class": gold + 3}],
                         label_ids)


@pytest.mark.parametrize("ff,tie", [("gated-gelu", False), ("relu", True)])
def test_greedy_generation_matches_transformers(tiny, ff, tie):
    """jaxlora.generation on T5 (left-padded prompts of different lengths, no KV cache) == transformers' greedy
    generate (right-padded), token for token up to each row's EOS; on the 8-device mesh too."""
    hf, _, model = tiny(ff, tie)
    ids, mask, _ = make_batch(seed=3)
    prompts = [list(ids[0]), list(ids[1, :7]), list(ids[2, 4:])]  # the unpadded prompts
    width = max(len(p) for p in prompts)
    right = np.zeros((3, width), np.int64)
    right_mask = np.zeros((3, width), np.int64)
    for i, p in enumerate(prompts):
        right[i, :len(p)], right_mask[i, :len(p)] = p, 1
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(right), attention_mask=torch.tensor(right_mask), do_sample=False,
                          max_new_tokens=8, min_new_tokens=0, eos_token_id=1, pad_token_id=0).numpy()[:, 1:]
    from jaxlora.generation import generate_ids
    got = generate_ids(model, model.params, prompts, max_new_tokens=8, eos_token_id=1, pad_token_id=0)
    assert sum(len(row) for row in got) > 6, got  # real continuations, not an immediate EOS everywhere
    for row, r in zip(got, ref.tolist()):
        stop = next((i for i, t in enumerate(r) if t == 1), len(r) - 1)
        assert row == r[:stop + 1], (row, r)
    mesh_model = jaxlora.from_pretrained(tiny(ff, tie)[1], mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2,
                                                                                             tensor=2)))
    assert generate_ids(mesh_model, mesh_model.params, prompts, max_new_tokens=8, eos_token_id=1,
                        pad_token_id=0) == got
