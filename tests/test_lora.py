"""Functional LoRA: PEFT's target matching, ranks and scales, init, shardings, merge/unmerge, parity with PEFT's
forward, dropout, and the modules_to_save helpers."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import lora as L
from jaxlora.lora import LoraConfig, LoraConfigError, init_lora, merge, unmerge
from jaxlora.lora.weights import LoraWeights, low_rank_matmul_cpu
from jaxlora.sharding import MeshConfig, make_mesh

SEQ = 10
NUM_LAYERS = 2
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ATTN = ("model", "layers", "self_attn")
MLP = ("model", "layers", "mlp")
ALL_LINEAR = {ATTN + (n,) for n in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    MLP + (n,) for n in ("gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny untied Llama (GQA) saved by transformers, weights drawn so logits are O(1)."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if key.endswith("norm.weight") else p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return jaxlora.from_pretrained(folder)


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, SEQ)), jnp.int32)


_JITTED: dict = {}


def logits(model, ids, params=None, lora=None, **kw) -> np.ndarray:
    if id(model) not in _JITTED:  # one jitted apply per model (kept alive with it), so calls do not recompile
        _JITTED[id(model)] = (model, jax.jit(model.apply, static_argnames=("deterministic",)))
    return np.asarray(_JITTED[id(model)][1](model.params if params is None else params, ids, lora=lora, **kw))


def targets(model, **cfg) -> dict[tuple[str, ...], L.Target]:
    return {t.path: t for t in model.lora_targets(LoraConfig(**cfg))}


# ------------------------------------------------------------------------------------------ target matching


def test_target_suffix_list(model):
    assert set(targets(model, target_modules=["q_proj", "v_proj"])) == {ATTN + ("q_proj",), ATTN + ("v_proj",)}
    # a dotted suffix matches too, a partial word does not: an entry of an explicit list that matches no module is
    # an error naming it and the names that exist (it used to be dropped without a word)
    assert set(targets(model, target_modules=["self_attn.o_proj"])) == {ATTN + ("o_proj",)}
    with pytest.raises(LoraConfigError, match=r"entry 'proj' matches no module.*q_proj"):
        targets(model, target_modules=["self_attn.o_proj", "proj"])
    with pytest.raises(LoraConfigError, match=r"entry 'qkv_proj' matches no module"):
        targets(model, target_modules=["q_proj", "qkv_proj"])  # a Llama has no fused qkv_proj


def test_target_regex_is_a_full_match(model):
    assert set(targets(model, target_modules=r".*\.(q|v)_proj")) == {ATTN + ("q_proj",), ATTN + ("v_proj",)}
    assert set(targets(model, target_modules=r"model\.layers\.\d+\.mlp\..*")) == {
        MLP + (n,) for n in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(LoraConfigError, match="matches no module"):  # a string is a regex over the whole name
        targets(model, target_modules="q_proj")


def test_all_linear_excludes_lm_head(model):
    assert "lm_head" in model.params
    assert set(targets(model, target_modules="all-linear")) == ALL_LINEAR
    assert set(targets(model, target_modules=["lm_head"])) == {("lm_head",)}  # when asked for by name


def test_exclude_modules(model):
    got = targets(model, target_modules="all-linear", exclude_modules=["o_proj", "down_proj"])
    assert set(got) == ALL_LINEAR - {ATTN + ("o_proj",), MLP + ("down_proj",)}
    got = targets(model, target_modules="all-linear", exclude_modules=r".*\.mlp\..*")
    assert set(got) == {p for p in ALL_LINEAR if p[:3] == ATTN}


def test_default_targets(model):
    assert set(targets(model)) == {ATTN + ("q_proj",), ATTN + ("v_proj",)}


def test_no_match_lists_module_names(model):
    with pytest.raises(LoraConfigError, match="matches no module") as e:
        targets(model, target_modules=["qkv_proj", "fc1"])
    msg = str(e.value)
    for name in ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "lm_head"):
        assert name in msg


def test_rank_larger_than_kernel(model):
    with pytest.raises(LoraConfigError, match="r=40 is larger than a dimension of model.layers.0.self_attn.k_proj"):
        targets(model, r=40, target_modules=["k_proj"])  # k_proj is 64 x 32 (2 kv heads)
    assert targets(model, r=32, target_modules=["k_proj"])[ATTN + ("k_proj",)].rank == 32


def test_single_layer_regex_is_refused(model):
    with pytest.raises(LoraConfigError, match="some layers only"):
        targets(model, target_modules=r"model\.layers\.0\.self_attn\.q_proj")
    with pytest.raises(LoraConfigError, match="different values across layers"):
        targets(model, target_modules=["q_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 2})


# ------------------------------------------------------------------------------------------ ranks and scales


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns(model, rslora):
    got = targets(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=rslora,
                  rank_pattern={"v_proj": 2}, alpha_pattern={r"mlp\.up_proj": 4})
    norm = math.sqrt if rslora else float
    q, v, up = got[ATTN + ("q_proj",)], got[ATTN + ("v_proj",)], got[MLP + ("up_proj",)]
    assert (q.rank, v.rank, up.rank) == (8, 2, 8)
    assert q.scale == pytest.approx(16 / norm(8), rel=1e-12)
    assert v.scale == pytest.approx(16 / norm(2), rel=1e-12)
    assert up.scale == pytest.approx(4 / norm(8), rel=1e-12)
    assert all(t.stacked for t in got.values())
    lora = init_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                       use_rslora=rslora, rank_pattern={"v_proj": 2},
                                       alpha_pattern={r"mlp\.up_proj": 4}), jax.random.key(0))
    w = lora["model"]["layers"]["self_attn"]["v_proj"]
    assert (w.a.shape, w.b.shape, w.scale) == ((NUM_LAYERS, 64, 2), (NUM_LAYERS, 2, 32), v.scale)
    w = lora["model"]["layers"]["mlp"]["up_proj"]
    assert (w.a.shape, w.b.shape, w.scale) == ((NUM_LAYERS, 64, 8), (NUM_LAYERS, 8, 96), up.scale)


# ------------------------------------------------------------------------------------------ init


def test_default_init(model):
    lora = init_lora(model, LoraConfig(r=16, target_modules="all-linear"), jax.random.key(0))
    kernels = L.linear_modules(model.params)
    items = dict(L.lora_items(lora))
    assert set(items) == ALL_LINEAR
    for path, w in items.items():
        d_in, d_out = kernels[path].shape[-2:]
        assert w.a.shape == (NUM_LAYERS, d_in, 16) and w.b.shape == (NUM_LAYERS, 16, d_out)
        assert w.a.dtype == w.b.dtype == jnp.float32
        assert not np.any(np.asarray(w.b))  # B = 0: the adapter starts as a no-op
        a, bound = np.asarray(w.a), 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        assert abs(a.std() / (bound / math.sqrt(3)) - 1) < 0.1 and abs(a.mean()) < 0.1 * bound
        assert not np.allclose(a[0], a[1])  # layers are initialized independently
    q, v = items[ATTN + ("q_proj",)].a, items[ATTN + ("v_proj",)].a
    assert not np.allclose(np.asarray(q), np.asarray(v))
    # per-target keys: adding targets leaves the others' init unchanged
    only_q = init_lora(model, LoraConfig(r=16, target_modules=["q_proj"]), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(only_q["model"]["layers"]["self_attn"]["q_proj"].a), np.asarray(q))


def test_gaussian_init(model):
    r = 8
    lora = init_lora(model, LoraConfig(r=r, target_modules="all-linear", init_lora_weights="gaussian"),
                     jax.random.key(1))
    a = np.concatenate([np.asarray(w.a).ravel() for _, w in L.lora_items(lora)])
    assert abs(a.std() * r - 1) < 0.05 and abs(a.mean()) < 0.05 / r  # N(0, (1/r)^2)
    assert all(not np.any(np.asarray(w.b)) for _, w in L.lora_items(lora))


def test_zero_b_lora_is_exactly_the_base(model, ids):
    lora = init_lora(model, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"), jax.random.key(0))
    np.testing.assert_array_equal(logits(model, ids, lora=lora), logits(model, ids))


def test_lora_shardings(folder):
    model = jaxlora.from_pretrained(folder, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    lora = init_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj", "lm_head"]), jax.random.key(0))
    q = lora["model"]["layers"]["self_attn"]["q_proj"]
    # b follows its kernel's output dim (tensor) and, fsdp being unused by that rule, fsdp too (pure FSDP would
    # otherwise keep b and its Adam moments whole on every chip)
    assert q.a.sharding.spec == P(None, "fsdp", None) and q.b.sharding.spec == P(None, None, ("tensor", "fsdp"))
    down = lora["model"]["layers"]["mlp"]["down_proj"]  # kernel (mlp, embed): a on tensor, b on fsdp
    assert down.a.sharding.spec == P(None, "tensor", None) and down.b.sharding.spec == P(None, None, "fsdp")
    head = lora["lm_head"]  # unstacked: no layer axis
    assert head.a.shape == (64, 4) and head.b.shape == (4, 128)
    assert head.a.sharding.spec == P("fsdp", None) and head.b.sharding.spec == P(None, ("tensor", "fsdp"))
    # merging keeps every kernel in its sharding
    merged = merge(model.params, jax.tree.map(lambda x: x + 0.1, lora))
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(model.params)):
        assert x.sharding.is_equivalent_to(y.sharding, y.ndim), (x.sharding, y.sharding)


# ------------------------------------------------------------------------------------------ merge


@pytest.fixture(scope="module")
def random_lora(model):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "lm_head"],
                     init_lora_weights=False)
    return init_lora(model, cfg, jax.random.key(2))


def test_merge_equals_unmerged(model, ids, random_lora):
    before = jax.tree.map(np.array, model.params)
    merged = merge(model.params, random_lora)
    with_lora = logits(model, ids, lora=random_lora)
    assert np.abs(with_lora - logits(model, ids)).max() > 0.1  # the adapter is not a no-op
    np.testing.assert_allclose(logits(model, ids, params=merged), with_lora, atol=1e-5, rtol=0)
    # functional: the input params are untouched; only adapted kernels change
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), before)
    adapted = {p + ("kernel",) for p, _ in L.lora_items(random_lora)}
    flat_m, flat_p = traverse_util.flatten_dict(merged), traverse_util.flatten_dict(model.params)
    assert set(flat_m) == set(flat_p)
    for path in flat_p:
        same = np.array_equal(np.asarray(flat_m[path]), np.asarray(flat_p[path]))
        assert same == (path not in adapted), path
        assert flat_m[path].dtype == flat_p[path].dtype


def test_merge_delta_and_unmerge(model, random_lora):
    merged = merge(model.params, random_lora)
    w = random_lora["model"]["layers"]["self_attn"]["v_proj"]
    delta = np.asarray(merged["model"]["layers"]["self_attn"]["v_proj"]["kernel"]) - np.asarray(
        model.params["model"]["layers"]["self_attn"]["v_proj"]["kernel"])
    np.testing.assert_allclose(delta, w.scale * np.einsum("lir,lro->lio", np.asarray(w.a), np.asarray(w.b)),
                               atol=1e-6, rtol=0)
    restored = unmerge(merged, random_lora)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(model.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ PEFT parity


def _peft_lora_tree(model, peft_model, cfg: LoraConfig) -> dict:
    """Copies PEFT's lora_A (r, in) / lora_B (out, r) into a jaxlora tree: a = A^T, b = B^T, stacked by layer."""
    base = peft_model.base_model.model
    out = {}
    for t in model.lora_targets(cfg):
        mods = [base.get_submodule(name) for name in L.module_names(t.path, NUM_LAYERS)]
        assert all(m.scaling["default"] == pytest.approx(t.scale, rel=1e-12) for m in mods)  # same scale as PEFT
        a = np.stack([m.lora_A["default"].weight.detach().numpy().T for m in mods])
        b = np.stack([m.lora_B["default"].weight.detach().numpy().T for m in mods])
        assert a.shape[-1] == t.rank and np.abs(b).max() > 0
        out[t.path] = LoraWeights(jnp.asarray(a), jnp.asarray(b), scale=t.scale)
    return traverse_util.unflatten_dict(out)


@pytest.mark.parametrize("extra", [{}, dict(use_rslora=True, rank_pattern={"v_proj": 2},
                                            alpha_pattern={"gate_proj": 3.0})], ids=["plain", "rslora_patterns"])
def test_peft_parity(folder, model, ids, extra):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], **extra)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **kw)).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
        with peft_model.disable_adapter():
            hf_base = peft_model(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
    lora = _peft_lora_tree(model, peft_model, LoraConfig(**kw))
    got = logits(model, ids, lora=lora)
    assert np.abs(ref - hf_base).max() > 0.1  # PEFT's adapter changes the logits
    err = np.abs(got - ref).max()
    print(f"\nPEFT parity {extra or 'plain'}: max-abs {err:.3e}")
    assert err < 1e-4


# ------------------------------------------------------------------------------------------ dropout


def test_dropout(model, ids):
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    lora = init_lora(model, cfg, jax.random.key(0))
    assert lora["model"]["layers"]["self_attn"]["q_proj"].dropout == 0.5
    det = logits(model, ids, lora=lora)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    d1 = logits(model, ids, lora=lora, deterministic=False, dropout_rng=k1)
    np.testing.assert_array_equal(d1, logits(model, ids, lora=lora, deterministic=False, dropout_rng=k1))
    assert np.abs(d1 - logits(model, ids, lora=lora, deterministic=False, dropout_rng=k2)).max() > 1e-3
    assert np.abs(d1 - det).max() > 1e-3
    np.testing.assert_array_equal(logits(model, ids, lora=lora, deterministic=True, dropout_rng=k1), det)
    # dropout acts on the LoRA branch only: with B = 0 the output is the base, dropout or not
    zero_b = jax.tree.map(jnp.zeros_like, lora)
    np.testing.assert_array_equal(logits(model, ids, lora=zero_b, deterministic=False, dropout_rng=k1),
                                  logits(model, ids))


# ------------------------------------------------------------------------------------------ modules_to_save


def test_split_modules_to_save_and_overlay(model):
    picked = L.split_modules_to_save(model.params, ["lm_head", "model.norm"])
    assert set(traverse_util.flatten_dict(picked)) == {("lm_head", "kernel"), ("model", "norm", "scale")}
    assert picked["lm_head"]["kernel"] is model.params["lm_head"]["kernel"]
    embed = L.split_modules_to_save(model.params, ["embed_tokens"])
    assert set(traverse_util.flatten_dict(embed)) == {("model", "embed_tokens", "embedding")}
    assert L.split_modules_to_save(model.params, None) == {}

    new = jax.tree.map(lambda x: x + 1.0, picked)
    out = L.overlay(model.params, new)
    flat_out, flat_p = traverse_util.flatten_dict(out), traverse_util.flatten_dict(model.params)
    assert set(flat_out) == set(flat_p)
    for path, x in flat_out.items():
        if path in traverse_util.flatten_dict(new):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_p[path]) + 1.0)
        else:
            assert x is flat_p[path]
    assert L.overlay(model.params, {}) is model.params


def test_modules_to_save_no_match(model):
    with pytest.raises(LoraConfigError, match="matches no module") as e:
        L.split_modules_to_save(model.params, ["classifier"])
    assert "lm_head" in str(e.value) and "embed_tokens" in str(e.value)


def test_replicated_parameter_dim_is_a_warning_once(caplog):
    """A parameter dim that its mesh axis does not divide (3 KV heads over tensor=2) falls back to replication: a
    WARNING naming its logical axes, shape and mesh, once per distinct case (not once per identical layer)."""
    import logging

    from jaxlora import sharding
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    axes = ("layers", "embed", "kv_heads")
    shapes = {name: jax.ShapeDtypeStruct((5, 64, 3), jnp.float32) for name in ("k_proj", "v_proj")}
    with caplog.at_level(logging.WARNING, logger="jaxlora.sharding"):
        for _ in range(3):  # e.g. the same parameter in several layers / models
            out = sharding.tree_shardings({name: axes for name in shapes}, shapes, mesh)
        assert sharding.logical_to_spec(("batch", "heads"), (7, 3), mesh) == P(None, None)  # not a parameter
    assert out["k_proj"].spec == P(None, "fsdp", None)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "('layers', 'embed', 'kv_heads')" in msg and "(5, 64, 3)" in msg and "kv_heads" in msg
    assert "'fsdp': 4" in msg and "'tensor': 2" in msg and "replicat" in msg


def _grads_close(got, ref, rtol=1e-5):
    """Gradients equal to within rtol of each one's largest entry (float32; only the summation order differs)."""
    for name, g, r in zip("xab", got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=rtol, atol=rtol * float(np.abs(r).max()),
                                   err_msg=name)


@pytest.mark.parametrize("x_shape", [(2, 7, 16), (7, 16), (16,)], ids=["BxTxD", "TxD", "D"])
def test_low_rank_matmul_grads_equal_autodiff(x_shape):
    """The custom VJP of low_rank_matmul (weight gradients laid out for XLA:CPU) gives autodiff's gradients of
    (x @ a) @ b w.r.t. x, a and b, and the same forward."""
    rs = np.random.RandomState(0)
    x, a, b = (jnp.asarray(rs.normal(size=s), jnp.float32) for s in (x_shape, (16, 4), (4, 24)))
    w = jnp.asarray(rs.normal(size=(*x_shape[:-1], 24)), jnp.float32)  # a non-uniform cotangent
    loss = lambda f: lambda x, a, b: jnp.sum(f(x, a, b) * w)
    plain = lambda x, a, b: (x @ a) @ b
    np.testing.assert_allclose(low_rank_matmul_cpu(x, a, b), plain(x, a, b), rtol=1e-6, atol=1e-5)
    ref = jax.grad(loss(plain), argnums=(0, 1, 2))(x, a, b)
    _grads_close(jax.jit(jax.grad(loss(low_rank_matmul_cpu), argnums=(0, 1, 2)))(x, a, b), ref)
    _grads_close(jax.grad(loss(low_rank_matmul_cpu), argnums=(0, 1, 2))(x, a, b), ref)  # eager too


@pytest.mark.parametrize("transform", ["vmap", "scan"])
def test_low_rank_matmul_grads_equal_autodiff_stacked(transform):
    """Over stacked layers (the model scans its layers; vmap for good measure): a (L, in, r), b (L, r, out)."""
    n, rs = 3, np.random.RandomState(1)
    a = jnp.asarray(rs.normal(size=(n, 16, 4)), jnp.float32)
    b = jnp.asarray(rs.normal(size=(n, 4, 16)) * 0.3, jnp.float32)
    x = jnp.asarray(rs.normal(size=(n, 2, 7, 16) if transform == "vmap" else (2, 7, 16)), jnp.float32)

    def run(f):
        if transform == "vmap":
            return lambda x, a, b: jnp.sum(jnp.sin(jax.vmap(f)(x, a, b)))

        def body(h, ab):
            return h + jnp.tanh(f(h, *ab)), None
        return lambda x, a, b: jnp.sum(jnp.sin(jax.lax.scan(body, x, (a, b))[0]))

    ref = jax.grad(run(lambda x, a, b: (x @ a) @ b), argnums=(0, 1, 2))(x, a, b)
    _grads_close(jax.jit(jax.grad(run(low_rank_matmul_cpu), argnums=(0, 1, 2)))(x, a, b), ref)


def test_low_rank_matmul_backward_reads_activations_row_major():
    """XLA:CPU layout of the custom backward: no dot of the compiled gradient has x or dy (B*T rows) as its left
    operand contracted over the rows (x^T @ dxa, dy^T @ xa: the large operand read column-wise, ~9x slower there);
    the weight gradients are formed as (r, B*T) @ (B*T, features) and only their small results are transposed."""
    x = jnp.ones((2, 512, 96), jnp.float32)
    a, b = jnp.ones((96, 8), jnp.float32), jnp.ones((8, 160), jnp.float32)
    loss = lambda x, a, b: jnp.sum(jnp.sin(low_rank_matmul_cpu(x, a, b)))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, a, b).compile().as_text()
    dots = []
    for computation in hlo.split("\n\n"):  # operand names are per computation (fusions reuse param_0, ...)
        shapes = dict(re.findall(r"%([\w.\-]+) = (f32\[[\d,]*\])", computation))
        dots += [(shapes.get(lhs, ""), lc) for lhs, lc in
                 re.findall(r"\sdot\(%([\w.\-]+), %[\w.\-]+\), lhs_contracting_dims=\{(\d)\}", computation)]
    assert len(dots) >= 5, hlo  # xa, xa @ b, dxa, dx, da, db
    assert not [d for d in dots if d == ("f32[1024,96]", "0") or d == ("f32[1024,160]", "0")], (dots, hlo)
