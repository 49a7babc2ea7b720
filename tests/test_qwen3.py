"""Qwen3 (q/k RMSNorm per head, head_dim from the config): float32 logits parity with transformers (unpadded, right-
and left-padded; attention_bias, tied embeddings, linear rope variants), export that transformers reloads, LoRA equal
to PEFT's (logits and gradients) on PEFT's default targets, PEFT's module names, a LoRA-GA init that leaves step 0 at
the base, sharded == single-device logits, greedy generation equal to transformers', and unsupported config fields
named in one ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from family_helpers import (VOCAB, check_export_reloads, check_greedy_generation, check_logits_match,
                            check_lora_ga_step0, check_lora_matches_peft, check_peft_module_names,
                            check_sharded_equals_single_device, check_unsupported_field, family_fixtures, jax_logits,
                            lora_from_peft, lora_ga_batches, make_batch)
from family_helpers import torch_single_thread  # noqa: F401  (autouse)
from jaxlora.lora import LoraConfig, LoraGAConfig, lora_items
from jaxlora.lora.weights import LoraWeights
from jaxlora.sharding import MeshConfig
from tiny import peft_with_random_factors

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


# the variants, weights redrawn so logits are O(1) and norms non-trivial, each built once
loaded, variant, base = family_fixtures(transformers.Qwen3ForCausalLM, transformers.Qwen3Config, TINY, VARIANTS,
                                        base="qwen3")


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("padding", ["unpadded", "right", "left"])
def test_logits_match_transformers(variant, padding):
    name, hf, _, model = variant
    check_logits_match(hf, model, padding, PARITY_ERRORS, name)


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
    check_export_reloads(hf, model, tmp_path / "export")


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_matches_peft(base):
    """PEFT's default Qwen3 targets (q_proj, v_proj) on both sides, random factors: logits and LoRA gradients equal
    PEFT's, left padded (non-pad positions)."""
    hf, _, model = base
    pm = peft_with_random_factors(hf, 1, r=4, lora_alpha=8)  # no target_modules: PEFT's default for qwen3
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    assert {t.path[-1] for t in model.lora_targets(cfg)} == {"q_proj", "v_proj"} == set(
        pm.peft_config["default"].target_modules)
    _, PARITY_ERRORS["qwen3/peft_lora_q_v/left"] = check_lora_matches_peft(model, pm, lora_from_peft(model, pm, cfg),
                                                                           *make_batch("left"))


def test_lora_module_names_are_peft_names(base):
    hf, _, model = base
    check_peft_module_names(hf, model, per_layer=7)


def test_lora_ga_step0_is_the_base(base):
    """LoRA-GA (exact SVD, 2 tiny batches) on every projection: step-0 logits equal the base's, b is nonzero, and the
    adapter without its frozen offsets does move the logits."""
    _, _, model = base
    batches = lora_ga_batches(2)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=2, num_batches=2, svd_method="exact"))
    lora = check_lora_ga_step0(model, cfg, batches, "qwen3")
    leaves = dict(lora_items(lora))
    assert len(leaves) == 7 and all(float(jnp.abs(w.b).max()) > 0 for w in leaves.values())
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
    _, folder, model = base
    sharded = check_sharded_equals_single_device(folder, model, mesh_cfg)
    assert dict(sharded.mesh.shape) == {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor}


def test_greedy_generation_equals_transformers(base):
    """Prompts of different lengths batched together (left padded by generate_ids) vs transformers' generate on
    each unpadded prompt."""
    hf, _, model = base
    check_greedy_generation(hf, model)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("field, change", [
    ("use_sliding_window", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ("layer_types", dict(layer_types=["full_attention", "sliding_attention"])),
    ("rope_parameters", dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=10000.0))),
    ("hidden_act", dict(hidden_act="gelu")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unsupported_config_field_is_named(tmp_path, field, change):
    check_unsupported_field(tmp_path, transformers.Qwen3Config(**TINY).to_dict(), "Qwen3ForCausalLM", field, change)
