"""Logits parity with transformers (PyTorch, float32) for every supported Llama-family variant, plus the model's
structural invariants: sharded == unsharded, remat == plain (logits and LoRA gradients), causality.

Every reference model is a tiny random transformers model saved with `save_pretrained`; its weights are redrawn
at a scale where the logits are O(1) and norms/biases are non-trivial, so a mis-mapped tensor cannot hide.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import sharding
from jaxlora.lora import LoraConfig, init_lora
from jaxlora.models import llama
from jaxlora.sharding import MeshConfig

PARITY_ATOL = 1e-4  # float32, PyTorch vs XLA on CPU
MESH_ATOL = 1e-5  # same weights, different shardings
SEQ = 12
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6)

# name -> (transformers config class, model class, config overrides)
VARIANTS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_theta=500000.0, max_position_embeddings=64,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16))),
    "linear_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_key_value_heads=2, sliding_window=4, num_hidden_layers=3)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "smollm2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
}
PARITY_ERRORS: dict[str, float] = {}


def build_hf(name: str, seed: int = 0, **extra) -> transformers.PreTrainedModel:
    """A tiny transformers model of variant `name`, weights redrawn so logits are O(1)."""
    config_cls, model_cls, overrides = VARIANTS[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides, **extra})).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:  # kernels, embeddings and biases
                p.normal_(0.0, 0.2)
    return model


def hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(ids)), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.float().numpy()


_JITTED: dict = {}


def jax_logits(model, ids, mask=None, params=None, lora=None) -> np.ndarray:
    if id(model) not in _JITTED:  # one jitted forward per model, so repeated calls do not recompile
        _JITTED[id(model)] = (model, jax.jit(lambda p, i, m, lo: model.apply(p, i, m, lora=lo)))
    fn = _JITTED[id(model)][1]
    return np.asarray(fn(model.params if params is None else params, jnp.asarray(ids),
                         None if mask is None else jnp.asarray(mask), lora))


def make_batch(seed: int = 0, left: bool = False):
    """Token ids (2, SEQ) and an attention mask where row 1 is padded (right: 7 real tokens; left: 5 pads)."""
    ids = np.random.RandomState(seed).randint(0, TINY["vocab_size"], (2, SEQ)).astype(np.int32)
    mask = np.ones((2, SEQ), np.int32)
    if left:
        mask[1, :5] = 0
    else:
        mask[1, 7:] = 0
    return ids, mask


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    name = request.param
    hf = build_hf(name)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return name, hf, folder, jaxlora.from_pretrained(folder)


@pytest.mark.parametrize("padded", ["unpadded", "right_padded", "left_padded"])
def test_logits_match_transformers(variant, padded):
    """Only non-pad positions are compared. Right padding never reaches a real query under a causal mask; left
    padding does, so it checks the key-padding mask (positions are 0..T-1 whatever the padding, as in HF)."""
    name, hf, _, model = variant
    ids, mask = make_batch(left=padded == "left_padded")
    mask = None if padded == "unpadded" else mask
    ref = hf_logits(hf, ids, mask)
    got = jax_logits(model, ids, mask)
    keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    err = float(np.abs(got - ref)[keep].max())
    PARITY_ERRORS[f"{name}/{padded}"] = err
    print(f"\n{name} padded={padded}: max-abs {err:.3e} (|logits| up to {np.abs(ref).max():.2f})")
    assert got.shape == ref.shape == (2, SEQ, TINY["vocab_size"])
    assert np.abs(ref).max() > 1.0, "reference logits are too small for the tolerance to mean anything"
    assert err < PARITY_ATOL


def test_variant_features_are_read(variant):
    """Each variant's distinguishing feature reaches the config and the param tree (so parity tested it)."""
    name, hf, _, model = variant
    cfg, params = model.config, model.params
    attn = params["model"]["layers"]["self_attn"]
    default_freq = llama.rope_inv_freq(dataclasses.replace(cfg, rope_scaling=()))
    scaled = not np.array_equal(llama.rope_inv_freq(cfg), default_freq)
    assert scaled == (name in ("llama3_rope", "linear_rope"))
    assert cfg.sliding_window == (4 if name == "mistral" else None)
    assert ("bias" in attn["q_proj"]) == (name in ("llama_bias", "qwen2"))
    assert ("bias" in attn["o_proj"]) == (name == "llama_bias")
    assert ("bias" in params["model"]["layers"]["mlp"]["up_proj"]) == (name == "llama_bias")
    assert ("lm_head" in params) == (name != "smollm2")
    assert attn["q_proj"]["kernel"].shape == (cfg.num_hidden_layers, 64, cfg.num_attention_heads * cfg.head_dim)
    assert attn["k_proj"]["kernel"].shape[-1] == cfg.num_key_value_heads * cfg.head_dim
    n_hf = sum(p.numel() for p in hf.parameters())
    assert sum(x.size for x in jax.tree.leaves(params)) == n_hf


def test_mistral_sliding_window_is_applied_by_transformers(tmp_path):
    """The reference really uses the window (seq 12 > window 4), so parity covers our window mask."""
    windowed = build_hf("mistral")
    full = build_hf("mistral", sliding_window=None)
    full.load_state_dict(windowed.state_dict())
    ids, _ = make_batch()
    a, b = hf_logits(windowed, ids), hf_logits(full, ids)
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)  # inside the window: same attention
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-2
    eager = build_hf("mistral", attn_implementation="eager")
    eager.load_state_dict(windowed.state_dict())
    np.testing.assert_allclose(hf_logits(eager, ids), a, atol=1e-5)


# ------------------------------------------------------------------------------------------ sharding


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral_mesh")
    build_hf("mistral").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=1, fsdp=8)],
                         ids=["dp2_fsdp2_tp2", "fsdp8"])
def test_sharded_equals_unsharded(gqa_folder, mesh_cfg):
    ids, mask = make_batch()
    base = jaxlora.from_pretrained(gqa_folder)
    sharded = jaxlora.from_pretrained(gqa_folder, mesh=sharding.make_mesh(mesh_cfg))
    assert dict(sharded.mesh.shape) == {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}
    for x, y in zip(jax.tree.leaves(base.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # loading is exact under any sharding
    np.testing.assert_allclose(jax_logits(sharded, ids, mask), jax_logits(base, ids, mask), atol=MESH_ATOL, rtol=0)


def test_partition_specs(gqa_folder):
    model = jaxlora.from_pretrained(gqa_folder, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    layers = model.params["model"]["layers"]
    spec = lambda x: x.sharding.spec
    assert spec(layers["self_attn"]["q_proj"]["kernel"]) == P(None, "fsdp", "tensor")
    assert spec(layers["self_attn"]["k_proj"]["kernel"]) == P(None, "fsdp", "tensor")  # 2 kv heads * 16
    assert spec(layers["self_attn"]["o_proj"]["kernel"]) == P(None, "tensor", "fsdp")
    assert spec(layers["mlp"]["down_proj"]["kernel"]) == P(None, "tensor", "fsdp")
    assert spec(layers["input_layernorm"]["scale"]) == P(None, None)
    assert spec(model.params["model"]["embed_tokens"]["embedding"]) == P("tensor", "fsdp")
    assert spec(model.params["lm_head"]["kernel"]) == P("fsdp", "tensor")
    # the param really is split: each device holds a quarter of q_proj
    q = layers["self_attn"]["q_proj"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(3, 32, 32)}

    fsdp8 = jaxlora.from_pretrained(gqa_folder, mesh=sharding.make_mesh(MeshConfig(data=1, fsdp=8)))
    assert spec(fsdp8.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]) == P(None, "fsdp", None)


def test_undivisible_dim_is_replicated():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads"), (2, 64, 48), mesh) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads"), (2, 63, 3), mesh) == P(None, None, None)


# ------------------------------------------------------------------------------------------ remat, causality


def test_remat_same_logits_and_lora_grads(gqa_folder):
    ids, mask = make_batch()
    weights = jnp.asarray(np.random.RandomState(1).normal(size=(2, SEQ, TINY["vocab_size"])).astype(np.float32))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    results, lora = {}, None
    for remat in ("none", "full", "save_matmuls"):
        model = jaxlora.from_pretrained(gqa_folder, remat=remat)
        lora = init_lora(model, cfg, jax.random.key(0)) if lora is None else lora  # same mesh: reuse

        def loss(lo, params, model=model):
            logits = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), lora=lo)
            return jnp.sum(logits * weights), logits

        grad_fn = jax.grad(loss, has_aux=True)
        jaxpr = str(jax.make_jaxpr(grad_fn)(lora, model.params))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none"), remat
        grads, logits = jax.jit(grad_fn)(lora, model.params)
        results[remat] = (np.asarray(logits), grads)
    ref_logits, ref_grads = results["none"]
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads)) > 1e-2
    for remat in ("full", "save_matmuls"):
        logits, grads = results[remat]
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * float(jnp.abs(r).max()), rtol=0)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_causality(name, tmp_path):
    build_hf(name).save_pretrained(tmp_path)
    model = jaxlora.from_pretrained(tmp_path)
    ids, _ = make_batch()
    logits = jax_logits(model, ids)
    rng = np.random.RandomState(7)
    for t in (0, 5, SEQ - 2):
        changed = ids.copy()
        changed[:, t + 1:] = (ids[:, t + 1:] + rng.randint(1, TINY["vocab_size"], ids[:, t + 1:].shape)) % 128
        new = jax_logits(model, changed)
        np.testing.assert_array_equal(new[:, :t + 1], logits[:, :t + 1])
        assert np.abs(new[:, t + 1:] - logits[:, t + 1:]).max() > 1e-3  # later positions do see the change


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_activation_keeps_only_gate_and_up(act):
    """`common.gated_activation` (the SwiGLU / GeGLU middle, act(gate) * up): the same output as the plain product,
    the same gradients as its autodiff (float32, 1e-6), and a backward pass that keeps only gate and up, where
    autodiff of the plain product keeps more (B, T, F)-sized arrays (each stacked over the layer scan in training)."""
    from jaxlora.models.common import ACTIVATIONS, gated_activation
    f = ACTIVATIONS[act]
    r = np.random.RandomState(0)
    gate, up, d_out = (jnp.asarray(r.normal(size=(2, 12, 96)).astype(np.float32) * 3) for _ in range(3))
    plain = lambda g, u: f(g) * u
    out, vjp = jax.vjp(lambda g, u: gated_activation(f, g, u), gate, up)
    want, plain_vjp = jax.vjp(plain, gate, up)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    for name, x, y in zip(("d_gate", "d_up"), vjp(d_out), plain_vjp(d_out)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0, err_msg=name)

    def kept(vjp_fn):
        return sum(1 for x in jax.tree.leaves(vjp_fn) if getattr(x, "shape", None) == gate.shape)

    assert kept(vjp) == 2 and kept(plain_vjp) > 2
