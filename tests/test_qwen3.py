"""Qwen3 (q/k RMSNorm per head, head_dim from the config): float32 logits parity with transformers (unpadded, right-
and left-padded; attention_bias, tied embeddings, linear rope variants), export that transformers reloads, LoRA equal
to PEFT's (logits and gradients) on PEFT's default targets, PEFT's module names, a LoRA-GA init that leaves step 0 at
the base, sharded == single-device logits, greedy generation equal to transformers', and unsupported config fields
named in one ValueError.
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
from jaxlora.lora.weights import LoraWeights
from jaxlora.sharding import MeshConfig
from tiny import peft_with_random_factors

PARITY_ATOL = 1e-4  # float32, PyTorch vs XLA on CPU
MESH_ATOL = 1e-5
SEQ, VOCAB = 12, 128
# head_dim 32 != hidden / heads (16): read from the config, as Qwen3 does
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS = {
    "qwen3": {},
    "qwen3_bias": dict(attention_bias=True),
    "qwen3_tied": dict(tie_word_embeddings=True),
    "qwen3_linear_rope": dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0)),
}
PARITY_ERRORS: dict[str, float] = {}


def build_hf(name: str = "qwen3", seed: int = 0, **extra) -> transformers.Qwen3ForCausalLM:
    """A tiny transformers Qwen3 of variant `name`, weights redrawn so logits are O(1) and norms non-trivial."""
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**TINY, **VARIANTS[name], **extra})).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):  # input/post-attention/final norms and q_norm, k_norm
                p.uniform_(0.5, 1.5)
            else:  # kernels, embeddings and biases
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


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    name = request.param
    hf = build_hf(name)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return name, hf, folder, jaxlora.from_pretrained(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = build_hf("qwen3")
    folder = tmp_path_factory.mktemp("qwen3_base")
    hf.save_pretrained(folder)
    return hf, folder, jaxlora.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("padding", ["unpadded", "right", "left"])
def test_logits_match_transformers(variant, padding):
    name, hf, _, model = variant
    ids, mask = make_batch(padding)
    mask = None if padding == "unpadded" else mask
    ref, got = hf_logits(hf, ids, mask), jax_logits(model, ids, mask)
    keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    err = float(np.abs(got - ref)[keep].max())
    PARITY_ERRORS[f"{name}/{padding}"] = err
    assert got.shape == ref.shape == (2, SEQ, VOCAB)
    assert np.abs(ref).max() > 1.0, "reference logits are too small for the tolerance to mean anything"
    assert err < PARITY_ATOL


def test_config_features_and_param_count(variant):
    """Each variant's feature reaches the config and the param tree (so parity tested it); q/k norms are per head."""
    name, hf, _, model = variant
    cfg, params = model.config, model.params
    attn = params["model"]["layers"]["self_attn"]
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params == sum(p.numel() for p in hf.parameters())
    assert cfg.head_dim == 32 and attn["q_proj"]["kernel"].shape == (2, 64, 4 * 32)
    assert attn["q_norm"]["scale"].shape == attn["k_norm"]["scale"].shape == (2, 32)
    assert all(("bias" in attn[p]) == (name == "qwen3_bias") for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert ("lm_head" in params) == (name != "qwen3_tied") == (not cfg.tie_word_embeddings)
    assert (dict(cfg.rope_scaling).get("rope_type") == "linear") == (name == "qwen3_linear_rope")
    np.testing.assert_array_equal(np.asarray(attn["q_norm"]["scale"][1]),
                                  hf.model.layers[1].self_attn.q_norm.weight.detach().numpy())


def test_export_reloads_in_transformers(base, tmp_path):
    hf, _, model = base
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "export")).eval()
    assert type(reloaded) is type(hf)
    ref_state, got_state = hf.state_dict(), reloaded.state_dict()
    assert set(ref_state) == set(got_state)
    for key, t in ref_state.items():
        assert torch.equal(t, got_state[key]), key


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


def test_lora_matches_peft(base):
    """PEFT's default Qwen3 targets (q_proj, v_proj) on both sides, random factors: logits and LoRA gradients equal
    PEFT's, left padded (non-pad positions)."""
    hf, _, model = base
    pm = peft_with_random_factors(hf, 1, r=4, lora_alpha=8)  # no target_modules: PEFT's default for qwen3
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    assert {t.path[-1] for t in model.lora_targets(cfg)} == {"q_proj", "v_proj"} == set(
        pm.peft_config["default"].target_modules)
    lora = lora_from_peft(model, pm, cfg)
    ids, mask = make_batch("left")
    keep = mask.astype(bool)
    weights = np.random.RandomState(3).normal(size=(2, SEQ, VOCAB)).astype(np.float32) * keep[..., None]
    ref_t = pm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    (ref_t * torch.tensor(weights)).sum().backward()
    got = jax_logits(model, ids, mask, lora=lora)
    err = float(np.abs(got - ref_t.detach().numpy())[keep].max())
    PARITY_ERRORS["qwen3/peft_lora_q_v/left"] = err
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


def test_lora_module_names_are_peft_names(base):
    hf, _, model = base
    n_layers = model.config.num_hidden_layers
    ours = {n for t in model.lora_targets(LoraConfig(r=2, target_modules="all-linear"))
            for n in module_names(t.path, n_layers, model.names.stack_name)}
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs and len(ours) == 7 * n_layers


def test_lora_ga_step0_is_the_base(base):
    """LoRA-GA (exact SVD, 2 tiny batches) on every projection: step-0 logits equal the base's, b is nonzero, and the
    adapter without its frozen offsets does move the logits."""
    _, _, model = base
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(2):
        ids = rs.randint(3, VOCAB, (2, SEQ)).astype(np.int32)
        mask = np.ones((2, SEQ), np.int32)
        mask[0, SEQ - 4:] = 0
        labels = np.where(mask == 1, ids, -100)
        labels[:, :3] = -100
        batches.append(dict(input_ids=ids * mask, attention_mask=mask, labels=labels))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=2, num_batches=2, svd_method="exact"))
    lora = jaxlora.lora_ga_init(model, cfg, batches, progress=False)
    leaves = dict(lora_items(lora))
    assert len(leaves) == 7 and all(float(jnp.abs(w.b).max()) > 0 for w in leaves.values())
    worst, scale = 0.0, 0.0
    for b in batches:
        ref = jax_logits(model, b["input_ids"], b["attention_mask"])
        got = jax_logits(model, b["input_ids"], b["attention_mask"], lora=lora)
        worst, scale = max(worst, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
    print(f"\nqwen3 LoRA-GA step 0 vs base: max-abs {worst:.3e} (max |logit| {scale:.2f})")
    assert worst < 1e-5 * scale
    strip = jax.tree.map(lambda w: LoraWeights(w.a, w.b, scale=w.scale), lora,
                         is_leaf=lambda x: isinstance(x, LoraWeights))
    b0 = batches[0]
    moved = np.abs(jax_logits(model, b0["input_ids"], b0["attention_mask"], lora=strip)
                   - jax_logits(model, b0["input_ids"], b0["attention_mask"])).max()
    assert moved > 1e-2


# ------------------------------------------------------------------------------------------ sharding, generation


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=8), MeshConfig(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "dp2_fsdp2_tp2"])
def test_sharded_equals_single_device(base, mesh_cfg):
    _, folder, _ = base
    ids, mask = make_batch("left", seed=1)
    ids, mask = np.concatenate([ids] * 4), np.concatenate([mask] * 4)  # batch 8: one row per data shard
    one = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    sharded = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(mesh_cfg))
    assert dict(sharded.mesh.shape) == {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}
    np.testing.assert_allclose(jax_logits(sharded, ids, mask), jax_logits(one, ids, mask), atol=MESH_ATOL, rtol=0)


def test_greedy_generation_equals_transformers(base):
    """Prompts of different lengths batched together (left padded by generate_ids) vs transformers' generate on
    each unpadded prompt."""
    hf, _, model = base
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
    ("use_sliding_window", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ("layer_types", dict(layer_types=["full_attention", "sliding_attention"])),
    ("rope_parameters", dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=10000.0))),
    ("hidden_act", dict(hidden_act="gelu")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unsupported_config_field_is_named(tmp_path, field, change):
    hf = transformers.Qwen3Config(**TINY).to_dict()
    hf.update(architectures=["Qwen3ForCausalLM"], **change)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=field) as e:
        jaxlora.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)
