"""Gemma 2 and Gemma 3 text (one family, `jaxlora.models.gemma`), each test parametrized over both: float32 logits
parity with transformers' eager attention (unpadded, right- and left-padded) on sequences three times the sliding
window, with the window, the soft-capping and the per-layer-type rotary tables shown to matter; num_params; the
older config.json spellings read as transformers reads them; export that transformers reloads; LoRA equal to PEFT's
(logits and gradients) on PEFT's default targets; a LoRA-GA init that leaves step 0 at the base; sharded + remat
gradients equal to single-device ones; greedy generation equal to transformers' with prompts longer than the window;
unsupported config fields named in one ValueError. The real Gemma-3-270m runs when its converted folder is there
(`assets.prepare_gemma3_270m()`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import assets
import jaxlora
from family_helpers import (SEQ, VOCAB, MESH_ATOL, PARITY_ATOL, check_export_reloads, check_greedy_generation,
                            check_logits_match, check_lora_ga_step0, check_lora_grads_match_peft,
                            check_peft_module_names, check_unsupported_field, hf_logits, jax_logits, lora_from_peft,
                            lora_ga_batches, make_batch, one_device, redraw)
from family_helpers import torch_single_thread  # noqa: F401  (autouse)
from jaxlora import sharding
from jaxlora.lora import LoraConfig, LoraGAConfig, lora_items
from jaxlora.models.gemma import GemmaConfig
from jaxlora.sharding import MeshConfig
from tiny import peft_with_random_factors

WINDOW = 4
# 3 layers, head_dim 32 != hidden / heads, GQA 4:2, query_pre_attn_scalar != head_dim, a window of 4 tokens
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=64, sliding_window=WINDOW,
            query_pre_attn_scalar=24, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SLIDING, FULL = "sliding_attention", "full_attention"
FAMILIES = {
    # tied embeddings; layer types by HF's default rule (sliding, full, sliding); both soft-caps small enough to bite
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(attn_logit_softcapping=5.0, final_logit_softcapping=8.0)),
    # untied lm_head, q/k/v/o biases, local/global rotary bases with linear scaling on the global layer, final cap
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(layer_types=[SLIDING, FULL, SLIDING], tie_word_embeddings=False, attention_bias=True,
                    final_logit_softcapping=8.0,
                    rope_parameters={FULL: dict(rope_type="linear", factor=4.0, rope_theta=1_000_000.0),
                                     SLIDING: dict(rope_type="default", rope_theta=100.0)})),
}
PARITY_ERRORS: dict[str, float] = {}


def build_hf(name: str, seed: int = 0, **extra) -> transformers.PreTrainedModel:
    """A tiny transformers Gemma of `name` (eager attention), weights redrawn so logits are O(1) and the (1 + w)
    norms (the four layer norms, q_norm/k_norm and the final norm) non-trivial."""
    config_cls, model_cls, kwargs = FAMILIES[name]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **kwargs, **extra})
    config._attn_implementation = "eager"
    return redraw(model_cls(config), norm_range=(-0.5, 0.5))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    hf = build_hf(name)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)  # one device: the 2x2x2 mesh is compared with it below
    return name, hf, folder, jaxlora.from_pretrained(folder, mesh=one_device())


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("padding", ["unpadded", "right", "left"])
def test_logits_match_transformers(family, padding):
    name, hf, _, model = family
    check_logits_match(hf, model, padding, PARITY_ERRORS, name)


def test_window_softcaps_and_ropes_matter(family):
    """Parity above is not vacuous: transformers' own logits move when the window is lifted (and, Gemma 2, the
    attention soft-cap; Gemma 3, when the local layers get the global rotary table), so matching them within 1e-4
    means computing each; the final cap bounds them."""
    name, hf, _, model = family
    ids, _ = make_batch("unpadded")
    ref = hf_logits(hf, ids)
    changes = {"no window": dict(sliding_window=64)}
    if name == "gemma2":
        changes["no attention soft-cap"] = dict(attn_logit_softcapping=None)
    else:
        changes["global rope on local layers"] = dict(rope_parameters={
            layer_type: dict(rope_type="linear", factor=4.0, rope_theta=1_000_000.0) for layer_type in (FULL, SLIDING)})
    for what, change in changes.items():  # the same seed draws the same weights
        assert np.abs(hf_logits(build_hf(name, **change), ids) - ref).max() > 0.05, what
    assert np.abs(ref).max() < model.config.final_logit_softcapping


def test_config_and_param_count(family):
    name, hf, _, model = family
    cfg, params = model.config, model.params
    layers = params["model"]["layers"]
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params == sum(p.numel() for p in hf.parameters())
    assert cfg.layer_types == (SLIDING, FULL, SLIDING) and cfg.sliding_window == WINDOW
    assert cfg.query_pre_attn_scalar == 24 and cfg.head_dim == 32
    assert {k for k in layers if k.endswith("layernorm")} == {"input_layernorm", "post_attention_layernorm",
                                                             "pre_feedforward_layernorm", "post_feedforward_layernorm"}
    assert ("q_norm" in layers["self_attn"]) == (name == "gemma3") == cfg.qk_norm
    assert ("lm_head" in params) == (name == "gemma3") == (not cfg.tie_word_embeddings)
    if name == "gemma3":
        assert (cfg.rope_theta, cfg.rope_local_theta) == (1_000_000.0, 100.0)
        assert dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 4.0} and cfg.rope_local_scaling == ()
        assert cfg.attn_logit_softcapping is None and "bias" in layers["self_attn"]["o_proj"]
    else:
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (5.0, 8.0)
    np.testing.assert_array_equal(np.asarray(layers["post_feedforward_layernorm"]["scale"][1]),
                                  hf.model.layers[1].post_feedforward_layernorm.weight.detach().numpy())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_older_config_spellings_read_as_transformers_reads_them(name):
    """config.json as older transformers wrote it (no layer_types; Gemma 3: rope_theta, rope_local_base_freq,
    rope_scaling for the global layers, sliding_window_pattern) gives the config the current spelling gives."""
    config_cls, _, _ = FAMILIES[name]
    if name == "gemma2":
        old = dict(TINY, model_type="gemma2", rope_theta=10000.0)
    else:
        old = dict(TINY, num_hidden_layers=5, model_type="gemma3_text", rope_theta=1_000_000.0,
                   rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=8.0),
                   sliding_window_pattern=3)
    new = config_cls(**old).to_dict()  # transformers' own reading, in today's spelling
    assert "layer_types" in new and "rope_parameters" in new
    ours_old, ours_new = GemmaConfig.from_hf_dict(old), GemmaConfig.from_hf_dict(new)
    assert ours_old == ours_new
    assert list(ours_old.layer_types) == new["layer_types"]
    if name == "gemma3":
        assert ours_old.layer_types == (SLIDING, SLIDING, FULL, SLIDING, SLIDING)
        assert (ours_old.rope_theta, ours_old.rope_local_theta, dict(ours_old.rope_scaling)["factor"]) == (
            1_000_000.0, 100.0, 8.0)


def test_export_reloads_in_transformers(family, tmp_path):
    _, hf, _, model = family
    check_export_reloads(hf, model, tmp_path / "export")


# ------------------------------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def peft_run(family):
    """PEFT's default targets (q_proj, v_proj for gemma2 and gemma3_text) with random factors, and the same adapter
    in jaxlora: PEFT's logits and LoRA gradients of sum(logits * weights) on a left-padded batch, and a function
    giving ours, (logits, LoRA gradients), for a jaxlora model of the same folder."""
    _, hf, _, model = family
    pm = peft_with_random_factors(hf, 1, r=4, lora_alpha=8)  # no target_modules: PEFT's default for the model_type
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    assert {t.path[-1] for t in model.lora_targets(cfg)} == {"q_proj", "v_proj"} == set(
        pm.peft_config["default"].target_modules)
    ids, mask = make_batch("left")
    ids, mask = np.concatenate([ids] * 4), np.concatenate([mask] * 4)  # batch 8: one row per data shard
    weights = np.random.RandomState(3).normal(size=(8, SEQ, VOCAB)).astype(np.float32) * mask[..., None]
    ref_t = pm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    (ref_t * torch.tensor(weights)).sum().backward()

    def ours(m):
        def loss(lo):
            logits = m.apply(m.params, jnp.asarray(ids), jnp.asarray(mask), lora=lo)
            return jnp.sum(logits * weights), logits
        lora = lora_from_peft(m, pm, cfg)
        grads, logits = jax.jit(jax.grad(loss, has_aux=True))(lora)
        return np.asarray(logits), grads, str(jax.make_jaxpr(jax.grad(loss, has_aux=True))(lora))

    return pm, ids, mask, ref_t.detach().numpy(), ours, ours(model)


def test_lora_matches_peft(family, peft_run):
    """Our logits and LoRA gradients equal PEFT's (non-pad positions); PEFT's all-linear module names are ours."""
    name, hf, _, model = family
    pm, ids, mask, ref, _, (got, grads, _) = peft_run
    keep = mask.astype(bool)
    err = float(np.abs(got - ref)[keep].max())
    PARITY_ERRORS[f"{name}/peft_lora_q_v/left"] = err
    assert err < PARITY_ATOL
    base = jax_logits(model, ids[:2], mask[:2])  # the shape the parity test compiled
    assert np.abs(got[:2] - base)[keep[:2]].max() > 0.1, "the adapter must change the logits"
    worst = check_lora_grads_match_peft(model, pm, grads)
    PARITY_ERRORS[f"{name}/peft_lora_grads(rel)"] = worst
    assert worst < 1e-4
    check_peft_module_names(hf, model, per_layer=7)


def test_lora_ga_step0_is_the_base(family):
    """LoRA-GA (exact SVD, one tiny batch) on the default targets: step-0 logits equal the base's, and a @ b is
    nonzero in every layer (the update a @ b - a0 @ b0 moves off zero as soon as a, b train)."""
    name, _, _, model = family
    batches = lora_ga_batches(2)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=2, num_batches=1, svd_method="exact"))
    # one estimation batch: jaxlora compiles the estimation step twice for two (its count accumulator starts
    # unsharded), and that second compilation is the slowest part of this test; step 0 is checked on both batches
    leaves = dict(lora_items(check_lora_ga_step0(model, cfg, batches, name)))
    assert {p[-1] for p in leaves} == {"q_proj", "v_proj"}
    for w in leaves.values():  # a nonzero update once training moves a, b off a0, b0: each layer's a @ b is nonzero
        assert np.abs(np.einsum("lir,lro->lio", np.asarray(w.a), np.asarray(w.b))).max(axis=(1, 2)).min() > 0


# ------------------------------------------------------------------------------------------ sharding, generation


def test_sharded_remat_equals_single_device(family, peft_run):
    """The LoRA logits and gradients of the PEFT comparison on a 2x2x2 (data, fsdp, tensor) mesh with full remat
    equal those on one device without remat (the family's model)."""
    _, _, folder, _ = family
    *_, ours, (l1, g1, jaxpr1) = peft_run
    eight = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                                    remat="full")
    assert dict(eight.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    l8, g8, jaxpr8 = ours(eight)
    assert "checkpoint" not in jaxpr1 and "remat" not in jaxpr1 and ("checkpoint" in jaxpr8 or "remat" in jaxpr8)
    np.testing.assert_allclose(l8, l1, atol=MESH_ATOL, rtol=0)
    assert jax.tree.structure(g1) == jax.tree.structure(g8)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.isfinite(y).all() and np.abs(x).max() > 1e-3
        np.testing.assert_allclose(y, x, atol=1e-5 * np.abs(x).max(), rtol=0)


def test_greedy_generation_equals_transformers(family):
    """Prompts of different lengths, most longer than the window, batched together (left padded by generate_ids)
    vs transformers' generate on each unpadded prompt: the cached decode keeps the window and the soft-caps."""
    _, hf, _, model = family
    check_greedy_generation(hf, model, lengths=(3, 9, 1, 14), max_new_tokens=8)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name, field, change", [
    ("gemma2", "rope_parameters", dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=10000.0))),
    ("gemma3", "rope_parameters", dict(rope_parameters={FULL: dict(rope_type="dynamic", factor=2.0),
                                                        SLIDING: dict(rope_type="default")})),
    ("gemma3", "rope_scaling", dict(rope_parameters=None, rope_scaling=dict(rope_type="yarn", factor=2.0))),
    ("gemma3", "attn_logit_softcapping", dict(attn_logit_softcapping=50.0)),
    ("gemma2", "use_bidirectional_attention", dict(use_bidirectional_attention=True)),
    ("gemma2", "layer_types", dict(layer_types=[SLIDING, "chunked_attention", FULL])),
    ("gemma3", "hidden_activation", dict(hidden_activation="tanh")),
    ("gemma2", "attention_dropout", dict(attention_dropout=0.1)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unsupported_config_field_is_named(tmp_path, name, field, change):
    config_cls, model_cls, kwargs = FAMILIES[name]
    check_unsupported_field(tmp_path, config_cls(**{**TINY, **kwargs}).to_dict(), model_cls.__name__, field, change)


# ------------------------------------------------------------------------------------------ the real Gemma-3-270m

GEMMA3_270M = assets.gemma3_270m_path()


@pytest.mark.skipif(not (GEMMA3_270M / "config.json").is_file(),
                    reason="optional asset: `python -c 'import assets; assets.prepare_gemma3_270m()'` in scripts/")
def test_gemma3_270m_logits_match_transformers():
    """The real Gemma-3-270m (18 layers, 5:1 local/global, window 512, 262k vocab, tied) on a real sentence: float32
    logits within 1e-5 of max |logit| of transformers', the same greedy next token."""
    tok = transformers.AutoTokenizer.from_pretrained(GEMMA3_270M)
    enc = tok(["The capital of France is Paris, and the capital of Italy is"], return_tensors="np")
    hf = transformers.AutoModelForCausalLM.from_pretrained(GEMMA3_270M, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor(enc["input_ids"])).logits.numpy()
    del hf
    model = jaxlora.from_pretrained(GEMMA3_270M, mesh=one_device())
    assert model.config.layer_types.count(FULL) == 3 and model.config.sliding_window == 512
    got = np.asarray(jax.jit(model.apply)(model.params, jnp.asarray(enc["input_ids"])))
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    PARITY_ERRORS["gemma3_270m/real_text(rel)"] = rel
    assert rel < 1e-5
    assert got[0, -1].argmax() == ref[0, -1].argmax()
