"""Mixtral (top-k routed SwiGLU experts, stacked and expert-parallel): float32 logits parity with transformers
(unpadded, right- and left-padded; top-2 of 4 and top-1 with a sliding window), export that transformers reloads,
per-expert LoRA (attention + each expert's w1/w2/w3) equal to PEFT's once exported in the PEFT layout PEFT converts
for Mixtral, and equal to the merged model; HF module names, a LoRA-GA init at the base, sharded (experts over the
tensor axis) == single-device logits with LoRA, greedy generation equal to transformers', the optional router
load-balancing loss (output_router_logits) equal to transformers' (value, training loss and LoRA gradients), and
unsupported config fields named in one ValueError.
"""

from __future__ import annotations

import copy
import logging

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import jaxlora
from family_helpers import (VOCAB, PARITY_ATOL, check_export_reloads, check_greedy_generation, check_logits_match,
                            check_lora_ga_step0, check_lora_grads_match_peft, check_packed_row, check_unsupported_field,
                            family_fixtures, hf_logits, jax_logits, lora_from_peft, lora_ga_batches, make_batch,
                            one_device, redraw)
from family_helpers import torch_single_thread  # noqa: F401  (autouse)
from jaxlora import sharding
from jaxlora.lora import LoraConfig, LoraGAConfig, LoraGAError, lora_items, module_names
from jaxlora.models.mixtral import route
from jaxlora.sharding import MeshConfig
from tiny import peft_with_random_factors

MESH_RTOL = 1e-5  # x max|logit|: the expert combine is a cross-device sum when experts are split (float32 order)
LAYERS, EXPERTS = 2, 4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS = {
    "mixtral": {},
    "mixtral_top1_window": dict(num_experts_per_tok=1, sliding_window=5, tie_word_embeddings=True),
}
EXPERT_TARGETS = ["q_proj", "v_proj", "w1", "w2", "w3"]
PARITY_ERRORS: dict[str, float] = {}


# the variants, weights redrawn so logits are O(1) and norms non-trivial, each built once
loaded, variant, base = family_fixtures(transformers.MixtralForCausalLM, transformers.MixtralConfig, TINY, VARIANTS,
                                        base="mixtral")


def random_lora(model, cfg: LoraConfig, seed: int = 1) -> dict:
    """A non-trivial adapter: both factors random (PEFT's init_lora_weights=False), in the model's shardings."""
    return jaxlora.init_lora(model, cfg, jax.random.key(seed))


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("padding", ["unpadded", "right", "left"])
def test_logits_match_transformers(variant, padding):
    name, hf, _, model = variant
    check_logits_match(hf, model, padding, PARITY_ERRORS, name)


def test_routing_is_transformers_router():
    """route() = MixtralTopKRouter's weights: softmax over all experts, top-k, renormalized (numpy float64)."""
    logits = np.random.RandomState(0).normal(size=(2, 5, 6)).astype(np.float32)
    got = np.asarray(route(jnp.asarray(logits), 2))
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1)[..., :2]
    want = np.zeros_like(p)
    np.put_along_axis(want, top, np.take_along_axis(p, top, -1) / np.take_along_axis(p, top, -1).sum(-1, keepdims=True),
                      -1)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert ((got > 0).sum(-1) == 2).all()


def test_config_features_and_param_count(variant):
    name, hf, _, model = variant
    cfg, params = model.config, model.params
    moe = params["model"]["layers"]["block_sparse_moe"]
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params == sum(p.numel() for p in hf.parameters())
    assert moe["experts"]["w1"]["kernel"].shape == (LAYERS, EXPERTS, 64, 48)
    assert moe["experts"]["w2"]["kernel"].shape == (LAYERS, EXPERTS, 48, 64)
    assert moe["gate"]["weight"].shape == (LAYERS, 64, EXPERTS)
    # HF (transformers 5) fuses [w1; w3] per expert into gate_up_proj: expert 3 of layer 1 is ours, transposed
    gate_up = hf.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()[3]
    np.testing.assert_array_equal(np.asarray(moe["experts"]["w1"]["kernel"][1, 3]), gate_up[:48].T)
    np.testing.assert_array_equal(np.asarray(moe["experts"]["w3"]["kernel"][1, 3]), gate_up[48:].T)
    assert (cfg.num_experts_per_tok, cfg.sliding_window, cfg.tie_word_embeddings) == (
        (1, 5, True) if name == "mixtral_top1_window" else (2, None, False))


def test_export_reloads_in_transformers(base, tmp_path):
    hf, folder, model = base
    check_export_reloads(hf, model, tmp_path / "export")
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "np") as f, \
            safe_open(str(folder / "model.safetensors"), "np") as g:
        assert set(f.keys()) == set(g.keys())  # the checkpoint layout (block_sparse_moe.experts.N.w1), key for key


def test_packed_row_equals_its_sequences_alone(tmp_path_factory):
    """A packed row (segment ids, positions restarting per segment) gives each sequence its logits alone."""
    check_packed_row(loaded("mixtral", tmp_path_factory)[2])


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_module_names_are_the_checkpoint_modules(base):
    """all-linear adapts attention and every expert's w1/w2/w3 under their HF module names (one per layer and
    expert), and not the router."""
    _, folder, model = base
    ours = {n for t in model.lora_targets(LoraConfig(r=2, target_modules="all-linear"))
            for n in module_names(t.path, LAYERS, "layers", EXPERTS if "experts" in t.path else 0)}
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        theirs = {k.removesuffix(".weight") for k in f.keys() if "_proj" in k or ".experts." in k}
    assert ours == theirs and len(ours) == LAYERS * (4 + 3 * EXPERTS)


def test_expert_lora_matches_peft_and_the_merged_model(base, tmp_path):
    """Per-expert LoRA with random factors on q/v and every expert's w1/w2/w3: our logits equal PEFT's on the
    exported adapter (PEFT converts the per-expert modules onto transformers 5's fused experts) and transformers'
    on our merged export; import_peft reads the adapter back exactly."""
    _, folder, model = base
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=EXPERT_TARGETS, init_lora_weights=False)
    lora = random_lora(model, cfg)
    w1 = dict(lora_items(lora))[("model", "layers", "block_sparse_moe", "experts", "w1")]
    assert w1.a.shape == (LAYERS, EXPERTS, 64, 4) and w1.b.shape == (LAYERS, EXPERTS, 4, 48)
    ids, mask = make_batch("left")
    keep = mask.astype(bool)
    got = jax_logits(model, ids, mask, lora=lora)
    assert np.abs(got - jax_logits(model, ids, mask))[keep].max() > 0.1, "the adapter must change the logits"

    out = tmp_path / "adapter"
    jaxlora.export_peft(model, lora, cfg, out)
    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        assert "base_model.model.model.layers.1.block_sparse_moe.experts.3.w2.lora_A.weight" in f.keys()
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), out).eval()
    err = float(np.abs(got - hf_logits(pm, ids, mask))[keep].max())
    PARITY_ERRORS["mixtral/peft_lora_experts/left"] = err
    assert err < PARITY_ATOL

    merged = transformers.AutoModelForCausalLM.from_pretrained(
        model.save_pretrained(tmp_path / "merged", jaxlora.merge(model.params, lora))).eval()
    err = float(np.abs(got - hf_logits(merged, ids, mask))[keep].max())
    PARITY_ERRORS["mixtral/merged_lora_experts/left"] = err
    assert err < PARITY_ATOL

    back, _ = jaxlora.import_peft(model, out)
    for (path, w), (path2, w2) in zip(lora_items(lora), lora_items(back)):
        assert path == path2
        np.testing.assert_array_equal(np.asarray(w.a), np.asarray(w2.a))
        np.testing.assert_array_equal(np.asarray(w.b), np.asarray(w2.b))


def test_lora_ga_step0_is_the_base(base):
    """LoRA-GA (exact SVD, one tiny batch) on the attention projections: step-0 logits equal the base's; on the
    stacked expert kernels it is one error naming the module (not implemented)."""
    _, _, model = base
    batches = lora_ga_batches(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=2, num_batches=1, svd_method="exact"))
    leaves = dict(lora_items(check_lora_ga_step0(model, cfg, batches, "mixtral")))
    assert len(leaves) == 2 and all(float(jnp.abs(w.b).max()) > 0 for w in leaves.values())
    expert_cfg = LoraConfig(r=4, target_modules=["q_proj", "w1"], init_lora_weights="lora_ga",
                            lora_ga_config=LoraGAConfig(batch_size=2, num_batches=1, svd_method="exact"))
    with pytest.raises(LoraGAError, match="stacked expert kernels .*block_sparse_moe.experts.w1"):
        jaxlora.lora_ga_init(model, expert_cfg, batches, progress=False)


def test_quantized_experts_are_the_dequantized_model(base):
    """QLoRA's base: with nf4 kernels (experts included, loaded layer by layer; the router kept dense) the logits are
    the dense model's on the dequantized weights (adapters add to the dequantized kernels as on a dense one)."""
    _, folder, model = base
    q = jaxlora.from_pretrained(folder, quantization="nf4", mesh=one_device())  # the base model's device
    assert jaxlora.quant.is_quantized(q.params["model"]["layers"]["block_sparse_moe"]["experts"]["w2"]["kernel"])
    assert not jaxlora.quant.is_quantized(q.params["model"]["layers"]["block_sparse_moe"]["gate"]["weight"])
    ids, mask = make_batch("right")
    got = jax_logits(q, ids, mask)
    want = jax_logits(model, ids, mask, params=jaxlora.quant.dequantize_params(q.params))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    assert np.abs(got - jax_logits(model, ids, mask)).max() > 1e-3, "nf4 must actually quantize the experts"


# ------------------------------------------------------------------------------------------ sharding, generation


def test_sharded_experts_equal_unsharded(base):
    """Experts split over the tensor axis (expert parallelism), fsdp over embed: logits with a per-expert adapter
    equal those of the unsharded weights (the base model: every param whole on each device)."""
    _, folder, model = base
    ids, mask = make_batch("left", seed=1)
    ids, mask = np.concatenate([ids] * 4), np.concatenate([mask] * 4)  # batch 8: one row per data shard
    sharded = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    spec = lambda m, w: tuple(m.param_shardings["model"]["layers"]["block_sparse_moe"]["experts"][w]["kernel"].spec)
    assert spec(sharded, "w1") == (None, "tensor", "fsdp", None) and spec(sharded, "w2") == (None, "tensor", None,
                                                                                              "fsdp")
    assert all(s.is_fully_replicated for s in jax.tree.leaves(model.param_shardings))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=EXPERT_TARGETS, init_lora_weights=False)
    lora = random_lora(model, cfg)
    lora_sharded = jax.device_put(lora, sharded.lora_shardings(sharded.lora_targets(cfg), cfg))
    ref, got = jax_logits(model, ids, mask, lora), jax_logits(sharded, ids, mask, lora_sharded)
    PARITY_ERRORS["mixtral/sharded dp2_fsdp2_tp2 vs unsharded, LoRA on experts"] = float(np.abs(got - ref).max())
    np.testing.assert_allclose(got, ref, atol=MESH_RTOL * np.abs(ref).max(), rtol=0)


def test_greedy_generation_equals_transformers(tmp_path_factory):
    """Prompts of different lengths batched together (left padded by generate_ids) vs transformers' generate on
    each unpadded prompt, on mixtral_top1_window (top-1 routing, its 5-token window through the KV cache)."""
    hf, _, model = loaded("mixtral_top1_window", tmp_path_factory)
    check_greedy_generation(hf, model)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("field, change", [
    ("router_jitter_noise", dict(router_jitter_noise=0.01)),
    ("rope_parameters", dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=10000.0))),
    ("hidden_act", dict(hidden_act="gelu")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unsupported_config_field_is_named(tmp_path, field, change):
    check_unsupported_field(tmp_path, transformers.MixtralConfig(**TINY).to_dict(), "MixtralForCausalLM", field,
                            change)


# ------------------------------------------------------------------------------------------ router load balancing


def test_router_aux_loss_matches_transformers(tmp_path, tmp_path_factory):
    """output_router_logits=true (coef 0.05): the load-balancing loss, the training loss CE + coef * aux (the mean of
    `Model.loss_sums`, also with the head in chunks and per row) and its LoRA gradients (a PEFT q/v adapter, random
    factors) equal transformers' on a right-padded batch, ours in float32 against transformers in float64, within
    1e-5. Off (the default) the same weights give the same logits and the loss is CE alone."""
    coef = 0.05
    torch.manual_seed(0)  # the weights of the "mixtral" variant, with the option on
    hf = redraw(transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **TINY, output_router_logits=True, router_aux_loss_coef=coef)))
    hf.save_pretrained(tmp_path / "aux")
    # the reference runs in float64 (the saved float32 weights, exactly): transformers' own float32 LoRA gradients
    # differ from its float64 ones by up to 1.1e-5 x max |grad| on an AMD EPYC (ours, float32: 2.1e-6), so a
    # float32-vs-float32 comparison at 1e-5 measured the two rounding errors added, and passed or not by machine
    hf.config._experts_implementation = "eager"  # the grouped-matmul experts take no float64
    hf = hf.double()
    model = jaxlora.from_pretrained(tmp_path / "aux", mesh=one_device())
    chunked = copy.copy(model)  # the same model, its head applied to 4 tokens at a time in the loss
    chunked.loss_chunk = 4
    _, _, off = loaded("mixtral", tmp_path_factory)
    assert model.config.aux_loss_coef == coef and off.config.aux_loss_coef == 0.0
    pm = peft_with_random_factors(hf, 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lora = lora_from_peft(model, pm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    ids, mask = make_batch("right")
    batch = dict(input_ids=ids, attention_mask=mask, labels=np.where(mask == 1, ids, -100))
    ref = pm(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(batch["labels"]).long())
    factors = [p for name, p in pm.named_parameters() if "lora_" in name]
    aux_grads = torch.autograd.grad(coef * ref.aux_loss, factors, retain_graph=True)
    ref.loss.backward()
    moved = max(float(g.abs().max() / p.grad.abs().max()) for g, p in zip(aux_grads, factors))
    print(f"\nthe aux term's share of transformers' LoRA gradients: up to {moved:.2e} x max |grad|")
    assert moved > 1e-3, "the aux term's gradient must be far above the tolerance for the comparison to test it"

    ref_aux, ref_loss = float(ref.aux_loss.detach()), float(ref.loss.detach())
    mean = lambda m: lambda lo: (lambda total, count: total / count)(*m.loss_sums(m.params, batch, lo))
    loss, grads = jax.jit(jax.value_and_grad(mean(model)))(lora)
    aux, loss_chunked, (total_r, count_r), ce, logits, logits_off = jax.jit(lambda lo: (  # one compilation
        model.apply(model.params, ids, mask, lora=lo, aux_loss=True)[1], mean(chunked)(lo),
        model.loss_sums(model.params, batch, lo, per_row=True), mean(off)(lo),
        model.apply(model.params, ids, mask, lora=lo), off.apply(off.params, ids, mask, lora=lo)))(lora)
    PARITY_ERRORS["mixtral/router aux loss"] = abs(float(aux) - ref_aux)
    PARITY_ERRORS["mixtral/CE + coef * aux"] = abs(float(loss) - ref_loss)
    print(f"aux {float(aux):.6f} (transformers {ref_aux:.6f}), loss {float(loss):.6f} ({ref_loss:.6f})")
    assert abs(float(aux) - ref_aux) < 1e-5 and float(aux) > 1.0  # k = 2 for even routing, more if not
    assert abs(float(loss) - ref_loss) < 1e-5
    PARITY_ERRORS["mixtral/CE + coef * aux LoRA grads (rel)"] = check_lora_grads_match_peft(model, pm, grads, rel=1e-5)
    assert abs(float(loss_chunked) - float(loss)) < 1e-5
    np.testing.assert_allclose(float(jnp.sum(total_r) / jnp.sum(count_r)), float(loss), atol=1e-6, rtol=0)

    np.testing.assert_array_equal(np.asarray(logits_off), np.asarray(logits))  # off: the same model, CE alone
    assert abs(float(ce) - (ref_loss - coef * ref_aux)) < 1e-5 and coef * float(aux) > 1e-2


# ------------------------------------------------------------------------------------------ plan shapes


@pytest.mark.parametrize("name, params", [("gemma-2-9b", 9_241_705_984), ("mixtral-8x7b", 46_702_792_704)])
def test_builtin_plan_shapes_have_the_published_param_counts(name, params):
    """`jaxlora plan`'s built-in shapes build (abstract, no weights) into models of the checkpoints' sizes."""
    from jaxlora.models.model import Model
    from jaxlora.plan.shapes import SHAPES
    model = Model._build(SHAPES[name], "bfloat16", "bfloat16", sharding.make_mesh(MeshConfig(fsdp=8, data=1)))
    assert sum(x.size for x in jax.tree.leaves(model.abstract_params)) == model.config.num_params == params


def test_plan_estimates_lora_ga_without_the_expert_kernels(caplog):
    """`jaxlora plan` compiles LoRA-GA's estimation over the targets LoRA-GA accepts: with attention and expert targets,
    its float32 accumulators are exactly the attention kernels' (the experts, which lora_ga_init refuses, are left
    out), which the plan says once; with expert targets only there is nothing to estimate and no LoRA-GA plan."""
    import math
    from flax import traverse_util
    from jaxlora import plan as plan_lib
    from jaxlora.config import ModelConfig, RunConfig, TrainConfig
    from jaxlora.training.data import DataConfig
    hf = dict(TINY, architectures=["MixtralForCausalLM"], model_type="mixtral")
    tgt = plan_lib.resolve_target("cpu8")
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4), plan_lib.target_devices(tgt))

    def planner(targets):
        cfg = RunConfig(model=ModelConfig(path="tiny"), lora=LoraConfig(r=4, target_modules=targets),
                        data=DataConfig(max_length=16), train=TrainConfig(micro_batch_size=8))
        return plan_lib.Planner(cfg, mesh, None, tgt.hbm_bytes, hf)

    p = planner(EXPERT_TARGETS)
    flat, flat_sh = (traverse_util.flatten_dict(t) for t in (p.model.dense_abstract_params,
                                                             p.model.dense_param_shardings))
    targets = p.model.lora_targets(p.config.lora)
    attention = [t for t in targets if t.path[-1] in ("q_proj", "v_proj")]
    assert len(attention) == 2 and len(targets) == 5
    with caplog.at_level(logging.INFO, logger="jaxlora"):
        ga = p.lora_ga_exact()
        assert p.lora_ga_streaming().fits
    assert sum("LoRA-GA estimation planned for 2 of 5 targets" in r.getMessage() for r in caplog.records) == 1
    assert ga.fits and ga.parts["accumulators"] == 4 * sum(
        math.prod(flat_sh[t.path + ("kernel",)].shard_shape(flat[t.path + ("kernel",)].shape)) for t in attention)
    experts_only = planner(["w1", "w2", "w3"])
    assert experts_only.lora_ga_exact() is None and experts_only.lora_ga_streaming() is None
