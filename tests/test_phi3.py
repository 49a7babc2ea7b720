"""Phi-3 (fused qkv_proj / gate_up_proj, LongRoPE, partial rotary, sliding window): float32 logits parity with
transformers (unpadded, right- and left-padded) for the default rope, LongRoPE in its long regime and "su" in its
short regime, LoRA on the fused kernels equal to PEFT's (logits and gradients) and through a PEFT export, PEFT's
module names, a LoRA-GA init that leaves step 0 at the base, sharded == single-device logits, greedy generation equal
to transformers' (with a sliding window in the KV cache), and unsupported config fields named in one ValueError.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util

import jaxlora
from jaxlora import sharding
from jaxlora.generation import generate_ids
from jaxlora.lora import LoraConfig, LoraGAConfig, lora_items, module_names
from jaxlora.sharding import MeshConfig
from tiny import peft_with_random_factors

PARITY_ATOL = 1e-4  # float32, PyTorch vs XLA on CPU
MESH_ATOL = 1e-5
SEQ, VOCAB = 12, 128
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
_FACTORS = lambda n, step: [1.0 + step * i for i in range(n)]
VARIANTS = {
    "phi3": {},
    # original 8 < SEQ: the long factors, attention factor sqrt(1 + ln(64/8) / ln 8)
    "phi3_longrope": dict(original_max_position_embeddings=8, rope_scaling=dict(
        rope_type="longrope", short_factor=_FACTORS(8, 0.1), long_factor=_FACTORS(8, 0.7),
        original_max_position_embeddings=8)),
    # older "su" name, short regime (original 32 > every position), half the head rotated, window 5, tied
    "phi3_su_window": dict(original_max_position_embeddings=32, sliding_window=5, tie_word_embeddings=True,
                           partial_rotary_factor=0.5, rope_scaling=dict(
                               type="su", short_factor=_FACTORS(4, 0.3), long_factor=_FACTORS(4, 0.9),
                               original_max_position_embeddings=32, partial_rotary_factor=0.5)),
}
TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
PARITY_ERRORS: dict[str, float] = {}


def build_hf(name: str = "phi3", seed: int = 0) -> transformers.Phi3ForCausalLM:
    """A tiny transformers Phi-3 of variant `name`, weights redrawn so logits are O(1) and norms non-trivial."""
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**TINY, **VARIANTS[name]})).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model


def hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.float().numpy()


_JITTED: dict = {}


def jax_logits(model, ids, mask=None, lora=None) -> np.ndarray:
    if id(model) not in _JITTED:  # one jitted forward per model, kept alive with it
        _JITTED[id(model)] = (model, jax.jit(lambda p, i, m, lo: model.apply(p, i, m, lora=lo)))
    fn = _JITTED[id(model)][1]
    return np.asarray(fn(model.params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask), lora))


def make_batch(padding: str = "right", seed: int = 0):
    """Ids (2, SEQ) and a mask where row 1 is padded (right: 7 real tokens; left: 5 pads)."""
    ids = np.random.RandomState(seed).randint(0, VOCAB, (2, SEQ)).astype(np.int32)
    mask = np.ones((2, SEQ), np.int32)
    if padding == "left":
        mask[1, :5] = 0
    elif padding == "right":
        mask[1, 7:] = 0
    return ids, mask


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_LOADED: dict = {}


def loaded(name: str, tmp_path_factory):
    """(hf model, folder, jaxlora model) of a variant, built once per module."""
    if name not in _LOADED:
        hf = build_hf(name)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        _LOADED[name] = (hf, folder, jaxlora.from_pretrained(folder))
    return _LOADED[name]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    return (request.param, *loaded(request.param, tmp_path_factory))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return loaded("phi3", tmp_path_factory)


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("padding", ["unpadded", "right", "left"])
def test_logits_match_transformers(variant, padding):
    name, hf, _, model = variant
    ids, mask = make_batch(padding)  # "unpadded": an all-ones mask (one compiled forward for the three)
    ref, got = hf_logits(hf, ids, None if padding == "unpadded" else mask), jax_logits(model, ids, mask)
    keep = mask.astype(bool)
    err = float(np.abs(got - ref)[keep].max())
    PARITY_ERRORS[f"{name}/{padding}"] = err
    PARITY_ERRORS[f"{name}/{padding} (rel. to max|logit|)"] = err / float(np.abs(ref).max())
    assert got.shape == ref.shape == (2, SEQ, VOCAB)
    assert np.abs(ref).max() > 1.0, "reference logits are too small for the tolerance to mean anything"
    assert err < PARITY_ATOL


def test_config_features_and_param_count(variant):
    """Each variant's feature reaches the config (so parity tested it); the fused kernels keep HF's shapes."""
    name, hf, _, model = variant
    cfg, params = model.config, model.params
    layers = params["model"]["layers"]
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params == sum(p.numel() for p in hf.parameters())
    assert layers["self_attn"]["qkv_proj"]["kernel"].shape == (2, 64, (4 + 2 * 2) * 16)
    assert layers["mlp"]["gate_up_proj"]["kernel"].shape == (2, 64, 2 * 96)
    np.testing.assert_array_equal(np.asarray(layers["self_attn"]["qkv_proj"]["kernel"][1]),
                                  hf.model.layers[1].self_attn.qkv_proj.weight.detach().numpy().T)
    assert cfg.rope_type == ("default" if name == "phi3" else "longrope")
    assert (cfg.sliding_window, cfg.rotary_dim, cfg.tie_word_embeddings) == (
        (5, 8, True) if name == "phi3_su_window" else (None, 16, False))
    if name == "phi3_longrope":
        assert cfg.attention_factor == pytest.approx(np.sqrt(1 + np.log(8) / np.log(8)))


def test_longrope_switches_to_the_long_factors_past_the_original_length(tmp_path_factory):
    """The same weights give other logits once max(position) + 1 > original_max_position_embeddings (the long
    factors take over), and equal transformers' on both sides of the switch."""
    hf, _, model = loaded("phi3_longrope", tmp_path_factory)
    ids, _ = make_batch("unpadded")
    short_ids = ids[:, :8]  # positions 0..7: max + 1 = 8, not past the original 8: short factors
    ref, got = hf_logits(hf, short_ids), jax_logits(model, short_ids)
    PARITY_ERRORS["phi3_longrope/short regime"] = float(np.abs(got - ref).max())
    assert np.abs(got - ref).max() < PARITY_ATOL
    assert np.abs(got[:, :8] - jax_logits(model, ids)[:, :8]).max() > 1e-2, "long factors must change the logits"


def test_export_reloads_in_transformers(base, tmp_path):
    hf, _, model = base
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "export")).eval()
    assert type(reloaded) is type(hf)
    ref_state, got_state = hf.state_dict(), reloaded.state_dict()
    assert set(ref_state) == set(got_state)
    for key, t in ref_state.items():
        assert torch.equal(t, got_state[key]), key


def test_packed_row_equals_its_sequences_alone(tmp_path_factory):
    """A packed row (attention_mask = segment ids 1, 2; positions restarting at each segment, as `data.packing`
    makes them) gives each sequence the logits it gets alone (right padded), via common.causal_padding_mask."""
    _, _, model = loaded('phi3_longrope', tmp_path_factory)
    ids = np.random.RandomState(2).randint(3, VOCAB, SEQ).astype(np.int32)
    n = 5  # sequence a: ids[:5], sequence b: ids[5:]
    pad = lambda x: np.concatenate([x, np.zeros(SEQ - len(x), np.int32)])
    batch = np.stack([ids, pad(ids[:n]), pad(ids[n:])])
    mask = np.stack([np.r_[np.ones(n), 2 * np.ones(SEQ - n)], pad(np.ones(n, np.int32)),
                     pad(np.ones(SEQ - n, np.int32))]).astype(np.int32)
    positions = np.stack([np.r_[np.arange(n), np.arange(SEQ - n)], np.arange(SEQ), np.arange(SEQ)]).astype(np.int32)
    out = np.asarray(jax.jit(lambda p, i, m, q: model.apply(p, i, m, positions=q))(model.params, batch, mask,
                                                                                   positions))
    scale = np.abs(out).max()
    np.testing.assert_allclose(out[0, :n], out[1, :n], atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(out[0, n:], out[2, :SEQ - n], atol=1e-5 * scale, rtol=0)


# ------------------------------------------------------------------------------------------ LoRA


def lora_from_peft(model, pm, lora_config: LoraConfig) -> dict:
    """Our LoRA tree (in the model's LoRA shardings) with PEFT's factors: a[i] = lora_A.weight.T, b = lora_B.T."""
    modules = dict(pm.base_model.model.named_modules())
    factor = lambda names, which: np.stack([getattr(modules[n], which)["default"].weight.detach().numpy().T
                                            for n in names])
    shardings = model.lora_shardings(model.lora_targets(lora_config), lora_config)
    flat = {}
    for path, s in lora_items(shardings):
        names = module_names(path, model.config.num_hidden_layers, model.names.stack_name)
        flat[path] = s.replace(a=jax.device_put(factor(names, "lora_A"), s.a),
                               b=jax.device_put(factor(names, "lora_B"), s.b))
    return traverse_util.unflatten_dict(flat)


def test_lora_on_fused_kernels_matches_peft(base, tmp_path):
    """LoRA on the fused qkv_proj and gate_up_proj (and o_proj, down_proj) with PEFT's random factors: logits and
    LoRA gradients equal PEFT's, left padded; the adapter exported in PEFT's format loads in PEFT to the same
    logits."""
    hf, folder, model = base
    pm = peft_with_random_factors(hf, 1, r=4, lora_alpha=8, target_modules=TARGETS)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    lora = lora_from_peft(model, pm, cfg)
    ids, mask = make_batch("left")
    keep = mask.astype(bool)
    weights = np.random.RandomState(3).normal(size=(2, SEQ, VOCAB)).astype(np.float32) * keep[..., None]
    ref_t = pm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    (ref_t * torch.tensor(weights)).sum().backward()
    got = jax_logits(model, ids, mask, lora=lora)
    err = float(np.abs(got - ref_t.detach().numpy())[keep].max())
    PARITY_ERRORS["phi3/peft_lora_fused/left"] = err
    assert err < PARITY_ATOL
    assert np.abs(got - jax_logits(model, ids, mask))[keep].max() > 0.1, "the adapter must change the logits"

    loss = lambda lo: jnp.sum(model.apply(model.params, jnp.asarray(ids), jnp.asarray(mask), lora=lo) * weights)
    grads = jax.jit(jax.grad(loss))(lora)
    modules = dict(pm.base_model.model.named_modules())
    for path, g in lora_items(grads):
        for i, n in enumerate(module_names(path, model.config.num_hidden_layers, model.names.stack_name)):
            for ours, theirs in ((g.a[i], modules[n].lora_A["default"].weight.grad.T),
                                 (g.b[i], modules[n].lora_B["default"].weight.grad.T)):
                theirs = theirs.numpy()
                np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * np.abs(theirs).max(), rtol=0)

    out = tmp_path / "adapter"
    jaxlora.export_peft(model, lora, cfg, out)
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), out).eval()
    ref = hf_logits(reloaded, ids, mask)
    assert np.abs(got - ref)[keep].max() < PARITY_ATOL
    back, _ = jaxlora.import_peft(model, out)
    assert np.abs(jax_logits(model, ids, mask, lora=back) - got)[keep].max() < 1e-5


def test_lora_module_names_are_peft_names(base):
    hf, _, model = base
    n_layers = model.config.num_hidden_layers
    ours = {n for t in model.lora_targets(LoraConfig(r=2, target_modules="all-linear"))
            for n in module_names(t.path, n_layers, model.names.stack_name)}
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs and len(ours) == 4 * n_layers


def test_no_default_targets_like_peft(base):
    """PEFT has no default target_modules for phi3; neither has jaxlora (one error asking for them)."""
    _, _, model = base
    with pytest.raises(ValueError, match="target_modules is required"):
        model.lora_targets(LoraConfig(r=2))


def test_lora_ga_step0_is_the_base(base):
    """LoRA-GA (exact SVD, one tiny batch) on the fused kernels: step-0 logits equal the base's, b is nonzero."""
    _, _, model = base
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, SEQ)).astype(np.int32)
    mask = np.ones((2, SEQ), np.int32)
    mask[0, SEQ - 4:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :3] = -100
    batches = [dict(input_ids=ids * mask, attention_mask=mask, labels=labels)]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=2, num_batches=1, svd_method="exact"))
    lora = jaxlora.lora_ga_init(model, cfg, batches, progress=False)
    leaves = dict(lora_items(lora))
    assert len(leaves) == 2 and all(float(jnp.abs(w.b).max()) > 0 for w in leaves.values())
    worst, scale = 0.0, 0.0
    for b in batches:
        ref = jax_logits(model, b["input_ids"], b["attention_mask"])
        got = jax_logits(model, b["input_ids"], b["attention_mask"], lora=lora)
        worst, scale = max(worst, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
    print(f"\nphi3 LoRA-GA step 0 vs base: max-abs {worst:.3e} (max |logit| {scale:.2f})")
    assert worst < 1e-5 * scale


# ------------------------------------------------------------------------------------------ sharding, generation


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=2, tensor=2)], ids=["dp2_fsdp2_tp2"])
def test_sharded_equals_single_device(base, mesh_cfg):
    _, folder, _ = base
    ids, mask = make_batch("left", seed=1)
    ids, mask = np.concatenate([ids] * 4), np.concatenate([mask] * 4)  # batch 8: one row per data shard
    one = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    sharded = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(mesh_cfg))
    assert tuple(sharded.param_shardings["model"]["layers"]["self_attn"]["qkv_proj"]["kernel"].spec) == (
        None, "fsdp", "tensor")
    np.testing.assert_allclose(jax_logits(sharded, ids, mask), jax_logits(one, ids, mask), atol=MESH_ATOL, rtol=0)


def test_greedy_generation_equals_transformers(tmp_path_factory):
    """Prompts of different lengths batched together (left padded by generate_ids) vs transformers' generate on
    each unpadded prompt, on phi3_su_window: LongRoPE ("su", short regime: 27 positions < 32), partial rotary, and
    its 5-token window through the KV cache."""
    hf, _, model = loaded("phi3_su_window", tmp_path_factory)
    rs = np.random.RandomState(1)
    prompts = [rs.randint(3, VOCAB, n).tolist() for n in (3, 9, 1, 17)]
    ours = generate_ids(model, model.params, prompts, max_new_tokens=10, eos_token_id=2, pad_token_id=0)
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    assert ours == refs
    assert len({tuple(r) for r in refs}) > 1


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("field, change", [
    ("rope_parameters", dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
    ("long_factor", dict(rope_parameters=dict(rope_type="longrope", short_factor=_FACTORS(8, 0.1),
                                              original_max_position_embeddings=8, rope_theta=10000.0))),
    ("original_max_position_embeddings", dict(original_max_position_embeddings=None, rope_parameters=dict(
        rope_type="longrope", short_factor=_FACTORS(8, 0.1), long_factor=_FACTORS(8, 0.1), rope_theta=10000.0))),
    ("hidden_act", dict(hidden_act="no_such_act")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unsupported_config_field_is_named(tmp_path, field, change):
    hf = transformers.Phi3Config(**TINY).to_dict()
    hf.update(architectures=["Phi3ForCausalLM"], **change)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=field) as e:
        jaxlora.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)
