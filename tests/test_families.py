"""BLOOM and GPT-2: float32 logits parity with transformers (unpadded, right- and left-padded, pads inside a row),
export that transformers reloads, LoRA on the fused attention kernel equal to PEFT's (logits and gradients), PEFT's
module names, and sharded + remat gradients equal to the single-device ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import jaxlora
from family_helpers import (SEQ, VOCAB, PARITY_ATOL, check_export_reloads, check_lora_matches_peft,
                            check_peft_module_names, hf_logits, jax_logits, lora_from_peft, lora_tree, make_batch,
                            redraw)
from tiny import peft_with_random_factors
from jaxlora import sharding
from jaxlora.lora import LoraConfig, linear_modules, module_names
from jaxlora.models import bloom, registry
from jaxlora.sharding import MeshConfig

_BLOOM = (transformers.BloomConfig, transformers.BloomForCausalLM)
_GPT2 = (transformers.GPT2Config, transformers.GPT2LMHeadModel)
# name -> (transformers config class, model class, config kwargs)
VARIANTS = {
    "bloom": (*_BLOOM, dict(hidden_size=64, n_layer=2, n_head=4)),
    # 6 heads: ALiBi's non-power-of-2 slopes; residual after the layer norm; an untied lm_head
    "bloom_6heads_postln_untied": (*_BLOOM, dict(hidden_size=96, n_layer=2, n_head=6, tie_word_embeddings=False,
                                                 apply_residual_connection_post_layernorm=True)),
    "gpt2": (*_GPT2, dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    # exact-erf gelu, n_inner, per-layer attention scaling (a scanned layer index), untied lm_head
    "gpt2_gelu_inner_layerscale_untied": (*_GPT2, dict(n_embd=64, n_layer=3, n_head=4, n_positions=64, n_inner=80,
                                                       activation_function="gelu", tie_word_embeddings=False,
                                                       scale_attn_by_inverse_layer_idx=True)),
}
PEFT_TARGET = {"bloom": "query_key_value", "gpt2": "c_attn"}
PARITY_ERRORS: dict[str, float] = {}


def family(name: str) -> str:
    return name.split("_")[0]


def build_hf(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny transformers model of variant `name`, weights redrawn: layer norm weights in [0.5, 1.5], kernels,
    embeddings and biases N(0, 0.2)."""
    config_cls, model_cls, kwargs = VARIANTS[name]
    torch.manual_seed(seed)
    return redraw(model_cls(config_cls(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **kwargs)),
                  is_norm=lambda key: ("layernorm" in key or ".ln_" in key) and key.endswith("weight"))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    name = request.param
    hf = build_hf(name)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return name, hf, folder, jaxlora.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("padding", ["unpadded", "right", "left", "holes"])
def test_logits_match_transformers(variant, padding):
    """Non-pad positions only. BLOOM's ALiBi positions come from the mask (cumsum), GPT-2's learned positions stay
    0..T-1, both as HF does. A per-row offset of ALiBi positions cancels in the softmax, so left padding alone
    cannot tell cumsum from 0..T-1 positions; pads inside the row ("holes") do."""
    name, hf, _, model = variant
    ids, mask = make_batch(padding)
    mask = None if padding == "unpadded" else mask
    ref, got = hf_logits(hf, ids, mask), jax_logits(model, ids, mask)
    keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    err = float(np.abs(got - ref)[keep].max())
    padded_row_err = float(np.abs(got - ref)[1][keep[1]].max())
    PARITY_ERRORS[f"{name}/{padding}"] = err
    if padding != "unpadded":
        PARITY_ERRORS[f"{name}/{padding} (padded row only)"] = padded_row_err
    assert got.shape == ref.shape == (2, SEQ, VOCAB)
    assert np.abs(ref).max() > 1.0, "reference logits are too small for the tolerance to mean anything"
    assert err < PARITY_ATOL and padded_row_err < PARITY_ATOL
    if padding == "left" and family(name) == "bloom":  # ALiBi from the mask: the row's logits, unpadded
        np.testing.assert_allclose(got[1, 5:], jax_logits(model, ids[1:, 5:])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40, 48, 71, 112])
def test_alibi_slopes_match_transformers(num_heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    ref = _get_alibi_slopes(num_heads, torch.device("cpu")).numpy()
    np.testing.assert_allclose(bloom.alibi_slopes(num_heads), ref, rtol=1e-6, atol=0)


def test_config_features_and_param_count(variant):
    """Each variant's distinguishing feature reaches the config and the param tree (so parity tested it)."""
    name, hf, _, model = variant
    cfg, params = model.config, model.params
    n_hf = sum(p.numel() for p in hf.parameters())
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params == n_hf
    assert ("lm_head" in params) == name.endswith("untied") == (not cfg.tie_word_embeddings)
    assert cfg.num_hidden_layers == hf.config.num_hidden_layers
    if family(name) == "bloom":
        assert cfg.apply_residual_connection_post_layernorm == ("postln" in name)
        assert params["transformer"]["h"]["self_attention"]["query_key_value"]["kernel"].shape == (
            2, cfg.hidden_size, 3 * cfg.hidden_size)
    else:
        assert cfg.scale_attn_by_inverse_layer_idx == ("layerscale" in name)
        assert cfg.activation_function == ("gelu" if "gelu_" in name else "gelu_new")
        assert params["transformer"]["h"]["mlp"]["c_fc"]["kernel"].shape[-1] == (80 if "inner" in name else 256)
    for axes, x in zip(jax.tree.leaves(model.param_axes, is_leaf=lambda a: isinstance(a, tuple)),
                       jax.tree.leaves(params)):
        assert len(axes) == x.ndim and any(a is not None for a in axes), (axes, x.shape)


# ------------------------------------------------------------------------------------------ export


def test_export_reloads_in_transformers(variant, tmp_path):
    name, hf, _, model = variant
    reloaded = check_export_reloads(hf, model, tmp_path / "export")
    out = tmp_path / "export"
    ids, mask = make_batch("left")
    np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask))
    again = jaxlora.from_pretrained(out)
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_old_gpt2_attention_buffers_are_ignored(tmp_path):
    """Older GPT-2 checkpoints carry attn.bias / attn.masked_bias causal-mask buffers; they are read past: the model
    loads exactly the weights of the same checkpoint without them, and its logits still match transformers'."""
    import safetensors.torch
    hf = build_hf("gpt2")
    hf.save_pretrained(tmp_path / "clean")
    hf.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    for i in range(2):
        tensors[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        tensors[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    model, clean = jaxlora.from_pretrained(tmp_path / "old"), jaxlora.from_pretrained(tmp_path / "clean")
    flat, flat_clean = traverse_util.flatten_dict(model.params), traverse_util.flatten_dict(clean.params)
    assert set(flat) == set(flat_clean)
    for key, x in flat.items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_clean[key]), err_msg="/".join(key))
    ids, mask = make_batch("left")
    keep = mask.astype(bool)
    assert np.abs(jax_logits(model, ids, mask) - hf_logits(hf, ids, mask))[keep].max() < PARITY_ATOL


# ------------------------------------------------------------------------------------------ LoRA


def peft_model(hf, fam: str, r: int = 4, alpha: float = 8.0, seed: int = 1):
    """PEFT LoRA on the fused attention kernel, both factors random (a real, non-zero adapter)."""
    return peft_with_random_factors(hf, seed, r=r, lora_alpha=alpha, target_modules=[PEFT_TARGET[fam]],
                                    fan_in_fan_out=fam == "gpt2")  # GPT-2's Conv1D stores (in, out)


@pytest.mark.parametrize("name", ["bloom", "gpt2"])
def test_lora_on_fused_kernel_matches_peft(name, tmp_path):
    """Logits and LoRA gradients equal PEFT's for the same factors, with left padding (non-pad positions)."""
    fam = family(name)
    hf = build_hf(name)
    hf.save_pretrained(tmp_path)
    model = jaxlora.from_pretrained(tmp_path)
    pm = peft_model(hf, fam)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=[PEFT_TARGET[fam]], init_lora_weights=False)
    lora = lora_from_peft(model, pm, cfg)
    _, PARITY_ERRORS[f"{name}/peft_lora_{PEFT_TARGET[fam]}/left"] = check_lora_matches_peft(
        model, pm, lora, *make_batch("left"))


def test_lora_module_names_are_peft_names(variant):
    """Default targets are PEFT's per-model defaults; "all-linear" adapts exactly the modules PEFT's does."""
    name, hf, _, model = variant
    fam = family(name)
    n_layers = model.config.num_hidden_layers
    (default,) = model.lora_targets(LoraConfig(r=2))
    assert module_names(default.path, n_layers, model.names.stack_name)[0] == {
        "bloom": "transformer.h.0.self_attention.query_key_value", "gpt2": "transformer.h.0.attn.c_attn"}[fam]
    ours = check_peft_module_names(hf, model, per_layer=4)
    assert not any("lm_head" in n for n in ours)


# ------------------------------------------------------------------------------------------ sharding, remat


@pytest.mark.parametrize("name", ["bloom", "gpt2"])
def test_sharded_remat_grads_equal_single_device(name, tmp_path):
    """LoRA gradients (all-linear) on a 2x2x2 mesh with full remat equal the 1-device, no-remat ones."""
    build_hf(name).save_pretrained(tmp_path)
    one = jaxlora.from_pretrained(tmp_path, mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    mesh8 = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    eight = jaxlora.from_pretrained(tmp_path, mesh=mesh8, remat="full")
    qkv = "self_attention/query_key_value" if name == "bloom" else "attn/c_attn"
    layers = eight.params["transformer"]["h"]
    kernel = layers
    for key in qkv.split("/"):
        kernel = kernel[key]
    assert kernel["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in kernel["kernel"].addressable_shards} == {(2, 32, 96)}

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    kernels = linear_modules(one.abstract_params)

    def factors(path, _):
        rng = np.random.RandomState(sum(map(len, path)))
        layers, d_in, d_out = kernels[path].shape
        return (rng.normal(0, 0.2, (layers, d_in, 4)).astype(np.float32),
                rng.normal(0, 0.2, (layers, 4, d_out)).astype(np.float32))
    lora1, lora8 = lora_tree(one, cfg, factors), lora_tree(eight, cfg, factors)
    ids, mask = make_batch("left")
    weights = jnp.asarray(np.random.RandomState(1).normal(size=(2, SEQ, VOCAB)).astype(np.float32))

    def grads(model, lora):
        loss = lambda lo, p: jnp.sum(model.apply(p, jnp.asarray(ids), jnp.asarray(mask), lora=lo) * weights)
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(lora, model.params))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (model is eight)
        return jax.jit(jax.grad(loss))(lora, model.params)

    g1, g8 = grads(one, lora1), grads(eight, lora8)
    assert jax.tree.structure(g1) == jax.tree.structure(g8)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.isfinite(y).all() and np.abs(x).max() > 1e-3
        np.testing.assert_allclose(y, x, atol=1e-5 * np.abs(x).max(), rtol=0)


# ------------------------------------------------------------------------------------------ bad input


def test_gpt2_unsupported_activation_is_named(tmp_path):
    transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, activation_function="tanh",
                            architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function 'tanh' is not supported") as e:
        jaxlora.from_pretrained(tmp_path)
    assert "config.json" in str(e.value) and "gelu_new" in str(e.value)


# ------------------------------------------------------------------------------------------ the family registry


@pytest.mark.parametrize("fam", registry.FAMILIES, ids=lambda f: f.name)
def test_registry_entry_round_trips(fam):
    """Every architecture and model_type a family record lists leads back to that record."""
    for arch in fam.architectures:
        assert registry.family_for({"architectures": [arch], "model_type": "something-else"}) is fam
        assert registry.by_architecture(arch) is fam
    for model_type in fam.model_types:
        assert registry.family_for({"model_type": model_type}) is fam


def test_registry_lists_every_family_once():
    assert [f.name for f in registry.FAMILIES] == ["llama", "bloom", "gpt2", "bert", "t5", "qwen3", "gemma", "phi3",
                                                   "mixtral"]
    archs = [a for f in registry.FAMILIES for a in f.architectures]
    assert len(archs) == len(set(archs)) and registry.SUPPORTED_ARCHITECTURES == tuple(archs)


@pytest.mark.parametrize("hf_config", [{"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"},
                                       {"model_type": "gpt_neox"}], ids=["architecture", "model_type"])
def test_registry_unknown_family_names_the_supported_ones(hf_config):
    unknown = (hf_config.get("architectures") or [hf_config["model_type"]])[0]
    with pytest.raises(ValueError, match=f"x/config.json: unsupported architecture '{unknown}'; supported: ") as e:
        registry.family_for(hf_config, "x/config.json")
    for arch in registry.SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)
