"""Mixtral (top-k routed SwiGLU experts, stacked and expert-parallel): float32 logits parity with transformers
(unpadded, right- and left-padded; top-2 of 4 and top-1 with a sliding window), export that transformers reloads,
per-expert LoRA (attention + each expert's w1/w2/w3) equal to PEFT's once exported in the PEFT layout PEFT converts
for Mixtral, and equal to the merged model; HF module names, a LoRA-GA init at the base, sharded (experts over the
tensor axis) == single-device logits with LoRA, greedy generation equal to transformers', and unsupported config
fields named in one ValueError.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import jaxlora
from jaxlora import sharding
from jaxlora.generation import generate_ids
from jaxlora.lora import LoraConfig, LoraGAConfig, LoraGAError, lora_items, module_names
from jaxlora.models.mixtral import route
from jaxlora.sharding import MeshConfig

PARITY_ATOL = 1e-4  # float32, PyTorch vs XLA on CPU
MESH_RTOL = 1e-5  # x max|logit|: the expert combine is a cross-device sum when experts are split (float32 order)
SEQ, VOCAB, LAYERS, EXPERTS = 12, 128, 2, 4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS = {
    "mixtral": {},
    "mixtral_top1_window": dict(num_experts_per_tok=1, sliding_window=5, tie_word_embeddings=True),
}
EXPERT_TARGETS = ["q_proj", "v_proj", "w1", "w2", "w3"]
PARITY_ERRORS: dict[str, float] = {}


def build_hf(name: str = "mixtral", seed: int = 0) -> transformers.MixtralForCausalLM:
    """A tiny transformers Mixtral of variant `name`, weights redrawn so logits are O(1) and routing is uneven."""
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**TINY, **VARIANTS[name]})).eval()
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
    return loaded("mixtral", tmp_path_factory)


def random_lora(model, cfg: LoraConfig, seed: int = 1) -> dict:
    """A non-trivial adapter: both factors random (PEFT's init_lora_weights=False), in the model's shardings."""
    return jaxlora.init_lora(model, cfg, jax.random.key(seed))


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
    out = model.save_pretrained(tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), "np") as f, safe_open(str(folder / "model.safetensors"), "np") as g:
        assert set(f.keys()) == set(g.keys())  # the checkpoint layout (block_sparse_moe.experts.N.w1), key for key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref_state, got_state = hf.state_dict(), reloaded.state_dict()
    assert set(ref_state) == set(got_state)
    for key, t in ref_state.items():
        assert torch.equal(t, got_state[key]), key


def test_packed_row_equals_its_sequences_alone(tmp_path_factory):
    """A packed row (attention_mask = segment ids 1, 2; positions restarting at each segment, as `data.packing`
    makes them) gives each sequence the logits it gets alone (right padded), via common.causal_padding_mask."""
    _, _, model = loaded('mixtral', tmp_path_factory)
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
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, SEQ)).astype(np.int32)
    mask = np.ones((2, SEQ), np.int32)
    mask[0, SEQ - 4:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :3] = -100
    batches = [dict(input_ids=ids * mask, attention_mask=mask, labels=labels)]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=2, num_batches=1, svd_method="exact"))
    lora = jaxlora.lora_ga_init(model, cfg, batches, progress=False)
    leaves = dict(lora_items(lora))
    assert len(leaves) == 2 and all(float(jnp.abs(w.b).max()) > 0 for w in leaves.values())
    worst, scale = 0.0, 0.0
    for b in batches:
        ref = jax_logits(model, b["input_ids"], b["attention_mask"])
        got = jax_logits(model, b["input_ids"], b["attention_mask"], lora=lora)
        worst, scale = max(worst, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
    print(f"\nmixtral LoRA-GA step 0 vs base: max-abs {worst:.3e} (max |logit| {scale:.2f})")
    assert worst < 1e-5 * scale
    expert_cfg = LoraConfig(r=4, target_modules=["q_proj", "w1"], init_lora_weights="lora_ga",
                            lora_ga_config=LoraGAConfig(batch_size=2, num_batches=1, svd_method="exact"))
    with pytest.raises(LoraGAError, match="stacked expert kernels .*block_sparse_moe.experts.w1"):
        jaxlora.lora_ga_init(model, expert_cfg, batches, progress=False)


def test_quantized_experts_are_the_dequantized_model(base):
    """QLoRA's base: with nf4 kernels (experts included, loaded layer by layer; the router kept dense) the logits are
    the dense model's on the dequantized weights (adapters add to the dequantized kernels as on a dense one)."""
    _, folder, model = base
    q = jaxlora.from_pretrained(folder, quantization="nf4")
    assert jaxlora.quant.is_quantized(q.params["model"]["layers"]["block_sparse_moe"]["experts"]["w2"]["kernel"])
    assert not jaxlora.quant.is_quantized(q.params["model"]["layers"]["block_sparse_moe"]["gate"]["weight"])
    ids, mask = make_batch("right")
    got = jax_logits(q, ids, mask)
    want = np.asarray(model.apply(jaxlora.quant.dequantize_params(q.params), ids, mask))
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
    ("output_router_logits", dict(output_router_logits=True)),
    ("router_jitter_noise", dict(router_jitter_noise=0.01)),
    ("rope_parameters", dict(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=10000.0))),
    ("hidden_act", dict(hidden_act="gelu")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unsupported_config_field_is_named(tmp_path, field, change):
    hf = transformers.MixtralConfig(**TINY).to_dict()
    hf.update(architectures=["MixtralForCausalLM"], **change)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=field) as e:
        jaxlora.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


# ------------------------------------------------------------------------------------------ plan shapes


@pytest.mark.parametrize("name, params", [("gemma-2-9b", 9_241_705_984), ("mixtral-8x7b", 46_702_792_704)])
def test_builtin_plan_shapes_have_the_published_param_counts(name, params):
    """`jaxlora plan`'s built-in shapes build (abstract, no weights) into models of the checkpoints' sizes."""
    from jaxlora.models.model import Model
    from jaxlora.plan.shapes import SHAPES
    model = Model._build(SHAPES[name], "bfloat16", "bfloat16", sharding.make_mesh(MeshConfig(fsdp=8, data=1)))
    assert sum(x.size for x in jax.tree.leaves(model.abstract_params)) == model.config.num_params == params
