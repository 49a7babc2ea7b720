"""Phi-3 (fused qkv_proj / gate_up_proj, LongRoPE, partial rotary, sliding window): float32 logits parity with
transformers (unpadded, right- and left-padded) for the default rope, LongRoPE in its long regime and "su" in its
short regime, LoRA on the fused kernels equal to PEFT's (logits and gradients) and through a PEFT export, PEFT's
module names, a LoRA-GA init that leaves step 0 at the base, sharded == single-device logits, greedy generation equal
to transformers' (with a sliding window in the KV cache), and unsupported config fields named in one ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers

import jaxlora
from family_helpers import (VOCAB, PARITY_ATOL, check_export_reloads, check_greedy_generation, check_logits_match,
                            check_lora_ga_step0, check_lora_matches_peft, check_packed_row, check_peft_module_names,
                            check_sharded_equals_single_device, check_unsupported_field, family_fixtures, hf_logits,
                            jax_logits, lora_from_peft, lora_ga_batches, make_batch)
from family_helpers import torch_single_thread  # noqa: F401  (autouse)
from jaxlora.lora import LoraConfig, LoraGAConfig, lora_items
from jaxlora.sharding import MeshConfig
from tiny import peft_with_random_factors

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


# the variants, weights redrawn so logits are O(1) and norms non-trivial, each built once
loaded, variant, base = family_fixtures(transformers.Phi3ForCausalLM, transformers.Phi3Config, TINY, VARIANTS,
                                        base="phi3")


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("padding", ["unpadded", "right", "left"])
def test_logits_match_transformers(variant, padding):
    name, hf, _, model = variant
    check_logits_match(hf, model, padding, PARITY_ERRORS, name)


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
    check_export_reloads(hf, model, tmp_path / "export")


def test_packed_row_equals_its_sequences_alone(tmp_path_factory):
    """A packed row (segment ids, positions restarting per segment) gives each sequence its logits alone."""
    check_packed_row(loaded("phi3_longrope", tmp_path_factory)[2])


# ------------------------------------------------------------------------------------------ LoRA


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
    got, PARITY_ERRORS["phi3/peft_lora_fused/left"] = check_lora_matches_peft(model, pm, lora, ids, mask)

    out = tmp_path / "adapter"
    jaxlora.export_peft(model, lora, cfg, out)
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), out).eval()
    ref = hf_logits(reloaded, ids, mask)
    assert np.abs(got - ref)[keep].max() < PARITY_ATOL
    back, _ = jaxlora.import_peft(model, out)
    assert np.abs(jax_logits(model, ids, mask, lora=back) - got)[keep].max() < 1e-5


def test_lora_module_names_are_peft_names(base):
    hf, _, model = base
    check_peft_module_names(hf, model, per_layer=4)


def test_no_default_targets_like_peft(base):
    """PEFT has no default target_modules for phi3; neither has jaxlora (one error asking for them)."""
    _, _, model = base
    with pytest.raises(ValueError, match="target_modules is required"):
        model.lora_targets(LoraConfig(r=2))


def test_lora_ga_step0_is_the_base(base):
    """LoRA-GA (exact SVD, one tiny batch) on the fused kernels: step-0 logits equal the base's, b is nonzero."""
    _, _, model = base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=2, num_batches=1, svd_method="exact"))
    leaves = dict(lora_items(check_lora_ga_step0(model, cfg, lora_ga_batches(1), "phi3")))
    assert len(leaves) == 2 and all(float(jnp.abs(w.b).max()) > 0 for w in leaves.values())


# ------------------------------------------------------------------------------------------ sharding, generation


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=2, tensor=2)], ids=["dp2_fsdp2_tp2"])
def test_sharded_equals_single_device(base, mesh_cfg):
    _, folder, model = base
    sharded = check_sharded_equals_single_device(folder, model, mesh_cfg)
    assert tuple(sharded.param_shardings["model"]["layers"]["self_attn"]["qkv_proj"]["kernel"].spec) == (
        None, "fsdp", "tensor")


def test_greedy_generation_equals_transformers(tmp_path_factory):
    """Prompts of different lengths batched together (left padded by generate_ids) vs transformers' generate on
    each unpadded prompt, on phi3_su_window: LongRoPE ("su", short regime: 27 positions < 32), partial rotary, and
    its 5-token window through the KV cache."""
    hf, _, model = loaded("phi3_su_window", tmp_path_factory)
    check_greedy_generation(hf, model)


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
    check_unsupported_field(tmp_path, transformers.Phi3Config(**TINY).to_dict(), "Phi3ForCausalLM", field, change)
