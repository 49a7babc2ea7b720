"""Quantized frozen bases (int8, NF4 with and without double quantization) and fp16 dynamic loss scaling.

Codes and dequantized weights against a numpy reference written here from the definitions (QLoRA's NF4 from normal
quantiles, its blockwise absmax, double quantization; int8 absmax/127) and against bitsandbytes where it imports;
the quantized model against the same model on its dequantized weights (logits, LoRA gradients, LoRA-GA's init,
generation, sharded vs one device); the base untouched by a step; DeepSpeed's loss-scale rule, skipped steps and
an exact resume of the scale state."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxlora
import tiny
from jaxlora import quant
from jaxlora.config import ModelConfig, RunConfig, TrainConfig
from jaxlora.generation import generate_ids
from jaxlora.lora import LoraConfig, LoraGAConfig, LoraWeights, build_lora_tree, linear_modules, lora_items
from jaxlora.quant import nf4
from jaxlora.sharding import MeshConfig, make_mesh
from jaxlora.training import optim
from jaxlora.training.build import build_training
from jaxlora.training.step import place_batch
from jaxlora.training.optim import OptimConfig

PARITY_ERRORS: dict[str, float] = {}  # printed after the module (pytest -s): conftest.report_parity
UP = ("model", "layers", "mlp", "up_proj", "kernel")
DOWN = ("model", "layers", "mlp", "down_proj", "kernel")  # in = intermediate 96: padded to 128 in nf4


def _w(out_features: int, in_features: int, seed: int) -> np.ndarray:
    """A torch-layout weight (out, in) with an outlier row and an all-zero block."""
    w = np.random.RandomState(seed).standard_normal((out_features, in_features)).astype(np.float32) * 0.05
    w[1, 3] = 0.9
    w[2, :64] = 0.0
    return w


_quantize = jax.jit(quant.quantize, static_argnums=(1, 2))
_dequantize = jax.jit(quant.dequantize, static_argnums=(1,))


def _ours(w_torch: np.ndarray, kind: str, double_quant: bool = False) -> quant.QArray:
    return _quantize(jnp.asarray(w_torch.T), kind, double_quant)


# ------------------------------------------------------------------------------------ numpy references


def nf4_values_from_paper() -> np.ndarray:
    """QLoRA's NF4: quantiles of N(0, 1) for 8 positive and 7 negative levels plus an exact zero, normalized to
    [-1, 1] (offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, as the paper's appendix / bnb's create_normal_map)."""
    from scipy.stats import norm
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.abs(v).max()


def ref_nf4(w_torch: np.ndarray):
    """(codes (out, in), absmax (out, in/64), dequantized (out, in)): blocks of 64 along each row, each value to the
    nearest NF4 level of x / absmax (x times the float32 reciprocal, as bitsandbytes scales)."""
    out_f, in_f = w_torch.shape
    blocks = w_torch.reshape(out_f, in_f // 64, 64)
    absmax = np.abs(blocks).max(-1)
    inv = np.where(absmax > 0, np.float32(1) / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
    scaled = np.clip(blocks * inv[..., None], -1, 1)
    codes = np.abs(scaled[..., None].astype(np.float64) - nf4.NF4.astype(np.float64)).argmin(-1)
    deq = (nf4.NF4[codes] * absmax[..., None]).astype(np.float32)
    return codes.reshape(out_f, in_f), absmax, deq.reshape(out_f, in_f)


def unpack(codes_ours: np.ndarray) -> np.ndarray:
    """Our packed (in/2, out) uint8 -> (out, in) codes (input row 2m in the high nibble)."""
    c = np.asarray(codes_ours)
    return np.stack([c >> 4, c & 15], axis=1).reshape(-1, c.shape[-1]).T


# ------------------------------------------------------------------------------------ formats


def test_nf4_codes_and_values_match_the_paper():
    np.testing.assert_allclose(nf4.NF4, nf4_values_from_paper(), atol=2e-7)
    w = _w(96, 192, 0)
    q = _ours(w, "nf4")
    codes, absmax, deq = ref_nf4(w)
    assert q.codes.shape == (96, 96) and q.codes.dtype == jnp.uint8 and q.scale.shape == (3, 96)
    np.testing.assert_array_equal(unpack(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.scale).T, absmax)
    got = np.asarray(_dequantize(q, jnp.float32)).T
    np.testing.assert_array_equal(got, deq)
    PARITY_ERRORS["nf4 round trip (max |w - dq|)"] = float(np.abs(got - w).max())
    assert np.all(got[2, :64] == 0)  # an all-zero block stays zero


def test_double_quant_matches_its_definition():
    w = _w(96, 192, 1)
    q = _ours(w, "nf4", double_quant=True)
    _, absmax, _ = ref_nf4(w)
    np.testing.assert_array_equal(unpack(q.codes), ref_nf4(w)[0])  # the 4-bit codes do not depend on it
    offset = np.float32(q.offset)  # the mean: summation order differs between numpy and XLA by an ulp
    assert abs(offset - absmax.mean(dtype=np.float64)) < 1e-7
    flat = (absmax - offset).reshape(-1)  # output-major, as bnb orders absmax; 288 = one block of 256 + 32
    blocks = [flat[:256], flat[256:]]
    absmax2 = np.array([np.abs(b).max() for b in blocks], np.float32)
    np.testing.assert_array_equal(np.asarray(q.scale2), absmax2)
    scaled = np.concatenate([blocks[0] * (np.float32(1) / absmax2[0]), blocks[1] / absmax2[1]])
    codes8 = np.abs(np.clip(scaled, -1, 1)[:, None].astype(np.float64) - nf4.DYNAMIC).argmin(-1)
    np.testing.assert_array_equal(np.asarray(q.scale).T.reshape(-1), codes8)
    back = np.concatenate([nf4.DYNAMIC[codes8[:256]] * absmax2[0], nf4.DYNAMIC[codes8[256:]] * absmax2[1]]) + offset
    got = np.asarray(nf4.dequantize_absmax(q.scale, q.scale2, q.offset)).T.reshape(-1)
    np.testing.assert_array_equal(got, back.astype(np.float32))
    PARITY_ERRORS["nf4 double-quant absmax (max rel)"] = float(np.abs(got - absmax.reshape(-1)).max() / absmax.max())


def test_int8_matches_its_definition():
    w = _w(48, 80, 2)
    q = _ours(w, "int8")
    absmax = np.abs(w).max(1)
    codes = np.round(w * (np.float32(127) / absmax)[:, None]).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(q.codes).T, codes)
    got = np.asarray(_dequantize(q, jnp.float32)).T
    np.testing.assert_array_equal(got, codes.astype(np.float32) * absmax[:, None] * np.float32(1 / 127))
    PARITY_ERRORS["int8 round trip (max |w - dq|)"] = float(np.abs(got - w).max())
    zero = _quantize(jnp.zeros((8, 4)), "int8", False)  # an all-zero column: no division by zero
    assert not np.any(np.asarray(_dequantize(zero)))


def test_against_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (pip install bitsandbytes==0.50.2)")
    import torch
    np.testing.assert_array_equal(nf4.DYNAMIC, bnb.create_dynamic_map().numpy())
    w = _w(96, 192, 3)
    t = torch.from_numpy(w)
    packed, state = bnb.quantize_4bit(t, blocksize=64, quant_type="nf4")
    q = _ours(w, "nf4")
    np.testing.assert_array_equal(np.asarray(q.codes).T, packed.numpy().reshape(96, 96))  # the same bytes
    np.testing.assert_array_equal(np.asarray(q.scale).T.reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(_dequantize(q)).T, bnb.dequantize_4bit(packed, state).numpy())
    # double quantization: bnb dequantizes our state to our values; its own state's 8-bit codes differ where its
    # native CPU kernel's approximate search picked the farther of two near-tied codes
    packed2, state2 = bnb.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
    qd = _ours(w, "nf4", double_quant=True)
    np.testing.assert_array_equal(packed2.numpy(), packed.numpy())
    ours_state = copy.copy(state2)
    ours_state.absmax = torch.from_numpy(np.asarray(qd.scale).T.reshape(-1).copy())
    ours_state.offset = torch.tensor(float(qd.offset))
    ours_state.state2 = copy.copy(state2.state2)
    ours_state.state2.absmax = torch.from_numpy(np.asarray(qd.scale2).copy())
    deq = np.asarray(_dequantize(qd)).T  # XLA fuses code * absmax2 + offset into one fma: an ulp of the scale
    np.testing.assert_allclose(deq, bnb.dequantize_4bit(packed2, ours_state).numpy(), rtol=2.5e-7, atol=0)
    true = np.asarray(state.absmax)
    ours_err = np.abs(np.asarray(nf4.dequantize_absmax(qd.scale, qd.scale2, qd.offset)).T.reshape(-1) - true)
    bnb_err = np.abs(bnb.dequantize_blockwise(state2.absmax, state2.state2).numpy() + state2.offset.item() - true)
    assert np.all(ours_err <= bnb_err + 1e-7)  # where the 8-bit codes differ, ours is the nearer one
    own = np.abs(deq - bnb.dequantize_4bit(packed2, state2).numpy()).max()
    assert own < 1e-3  # one 8-bit code step of a block scale, where the codes differ
    PARITY_ERRORS["nf4+dq vs bnb's own state (max abs)"] = float(own)
    PARITY_ERRORS["nf4+dq 8-bit codes differing from bnb's native CPU kernel"] = float(
        np.sum(np.asarray(qd.scale).T.reshape(-1) != state2.absmax.numpy()))
    cb, stats, _ = bnb.int8_vectorwise_quant(t)
    qi = _ours(w, "int8")
    np.testing.assert_array_equal(np.asarray(qi.codes).T, cb.numpy())
    np.testing.assert_array_equal(np.asarray(_dequantize(qi)).T, bnb.int8_vectorwise_dequant(cb, stats).numpy())


def test_input_dims_not_a_multiple_of_64_are_padded_per_column():
    w = np.random.RandomState(4).standard_normal((40, 100)).astype(np.float32)  # torch (out, in=100)
    q = _ours(w, "nf4")
    assert q.shape == (100, 40) and q.codes.shape == (64, 40) and q.scale.shape == (2, 40)  # 100 -> 128 rows
    padded = np.concatenate([w, np.zeros((40, 28), np.float32)], axis=1)
    np.testing.assert_array_equal(np.asarray(_dequantize(q)).T, ref_nf4(padded)[2][:, :100])
    odd = _quantize(jnp.ones((5, 3)), "nf4", True)
    np.testing.assert_array_equal(np.asarray(_dequantize(odd)), np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="quantization must be one of"):
        quant.quantize(jnp.ones((64, 3)), "int4")
    with pytest.raises(ValueError, match="double quantization applies to nf4"):
        quant.quantize(jnp.ones((64, 3)), "int8", double_quant=True)


def test_config_validation():
    assert ModelConfig(quantization="nf4", double_quant=True).double_quant
    with pytest.raises(ValueError, match="quantization must be null, int8 or nf4"):
        ModelConfig(quantization="fp4")
    with pytest.raises(ValueError, match="double_quant applies to quantization: nf4"):
        ModelConfig(quantization="int8", double_quant=True)
    with pytest.raises(ValueError, match="loss_scale_min"):
        OptimConfig(loss_scale_min=0)
    with pytest.raises(ValueError, match="loss_scale_window"):
        OptimConfig(loss_scale_window=0)


# ------------------------------------------------------------------------------------ quantized models


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def nf4_model(folder):
    return jaxlora.from_pretrained(folder, quantization="nf4", mesh=make_mesh(devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def dense_model(folder):
    return jaxlora.from_pretrained(folder, mesh=make_mesh(devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 128, (8, 12)).astype(np.int32)
    labels = ids.copy()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


TARGETS = ["q_proj", "down_proj"]  # down_proj's input dim (96) is padded in nf4


def _lora(model, seed=1, zero_b: bool = False):
    """A LoRA tree (r=4, TARGETS) drawn with numpy and placed in the model's LoRA shardings (no init to compile)."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    targets = model.lora_targets(cfg)
    kernels = linear_modules(model.abstract_params)
    rng = np.random.RandomState(seed)

    def make(t):
        *lead, d_in, d_out = kernels[t.path].shape
        b = np.zeros((*lead, 4, d_out), np.float32) if zero_b else rng.normal(0, 0.2, (*lead, 4, d_out))
        return LoraWeights(rng.normal(0, 0.2, (*lead, d_in, 4)).astype(np.float32), b.astype(np.float32),
                           scale=t.scale)
    return jax.device_put(build_lora_tree(targets, make), model.lora_shardings(targets, cfg))


def _loss(model, params, lora, batch):
    s, n = model.loss_sums(params, jax.tree.map(jnp.asarray, batch), lora)
    return s / n


_JITTED: dict = {}


def _jitted(model, batch) -> dict:
    """Jitted apply, mean loss and its LoRA gradient, one set per model (kept alive with it), so the tests share
    their compilations."""
    if id(model) not in _JITTED:
        _JITTED[id(model)] = model, {
            "apply": jax.jit(model.apply), "grad": jax.jit(jax.grad(lambda lo, p: _loss(model, p, lo, batch)))}
    return _JITTED[id(model)][1]


def test_quantized_model_equals_its_dequantized_base(nf4_model, dense_model, batch):
    model = nf4_model
    flat = traverse_util.flatten_dict(model.params)
    k = flat[DOWN]
    assert quant.is_quantized(k) and k.shape == (2, 96, 64) and k.dtype == jnp.float32
    assert k.codes.shape == (2, 64, 64)  # in = 96 padded to 128 rows: 64 bytes
    assert not any(quant.is_quantized(flat[p]) for p in flat if "layers" not in p)  # embeddings, norms, lm_head
    dense = quant.dequantize_params(model.params)
    lora = _lora(model)
    fns, dense_fns = _jitted(model, batch), _jitted(dense_model, batch)
    lq, ld = fns["apply"](model.params, batch["input_ids"], lora=lora), dense_fns["apply"](dense, batch["input_ids"],
                                                                                           lora=lora)
    np.testing.assert_array_equal(np.asarray(lq), np.asarray(ld))
    PARITY_ERRORS["nf4 logits vs the float32 base (quantization error)"] = float(
        jnp.abs(lq - dense_fns["apply"](dense_model.params, batch["input_ids"], lora=lora)).max())
    # LoRA gradients on the quantized base are those on its dequantized kernels
    gq, gd = fns["grad"](lora, model.params), dense_fns["grad"](lora, dense)
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gd)))
    assert err < 1e-6
    PARITY_ERRORS["nf4 LoRA grads vs the dequantized base"] = err


@pytest.mark.parametrize("kind,double_quant", [("int8", False), ("nf4", True)])
def test_loading_quantizes_each_checkpoint_tensor(folder, dense_model, kind, double_quant):
    model = jaxlora.from_pretrained(folder, quantization=kind, double_quant=double_quant)
    flat, dense = traverse_util.flatten_dict(model.params), traverse_util.flatten_dict(dense_model.params)
    assert set(model.quantized_paths) == {p for p in dense if p[-1] == "kernel" and "layers" in p}
    for p in (DOWN,):
        want = jax.jit(jax.vmap(lambda w: quant.quantize(w, kind, double_quant)))(dense[p])  # layer by layer
        for a, b in zip(jax.tree.leaves(flat[p]), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-7)  # fma: an ulp of a dq scale
        assert flat[p].kind == kind and flat[p].double_quant == double_quant
    np.testing.assert_array_equal(np.asarray(flat[("lm_head", "kernel")]), np.asarray(dense[("lm_head", "kernel")]))


def test_peft_export_is_unchanged_and_a_merged_export_dequantizes(nf4_model, dense_model, tmp_path):
    from safetensors.numpy import load_file
    from jaxlora.io.peft import export_peft
    lora, cfg = _lora(nf4_model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    a = load_file(export_peft(nf4_model, lora, cfg, tmp_path / "q") / "adapter_model.safetensors")
    b = load_file(export_peft(dense_model, lora, cfg, tmp_path / "d") / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    merged = quant.dequantize_params(jaxlora.merge(nf4_model.params, lora))  # merge casts (= dequantizes) targets
    flat, w = traverse_util.flatten_dict(merged), dict(lora_items(lora))[DOWN[:-1]]
    dq = np.asarray(_dequantize(traverse_util.flatten_dict(nf4_model.params)[DOWN]))
    np.testing.assert_allclose(np.asarray(flat[DOWN]), dq + w.scale * np.asarray(w.a) @ np.asarray(w.b), atol=1e-6)
    nf4_model.save_pretrained(tmp_path / "merged", merged)
    back = traverse_util.flatten_dict(jaxlora.from_pretrained(tmp_path / "merged", mesh=dense_model.mesh).params)
    assert all(np.array_equal(np.asarray(back[p]), np.asarray(x)) for p, x in flat.items())


def test_modules_to_save_refuses_quantized_kernels(nf4_model):
    config = RunConfig(lora=LoraConfig(r=4, target_modules="all-linear", modules_to_save=["up_proj"]))
    with pytest.raises(ValueError, match="selects quantized kernels"):
        build_training(nf4_model, config, total_steps=1, abstract=True)


def test_lora_ga_on_a_quantized_base(nf4_model, batch):
    """LoRA-GA's statistic is the gradient w.r.t. the dequantized kernel G: checked against LoRA's gradient at a = 0
    (the base's forward, dL/da = s * G @ b^T, on the quantized base, which the test above equates with the
    dequantized base's), then the init: a0 from G's top singular vectors (ArB2r), a = a0 over the frozen base."""
    from jaxlora.lora.ga import estimate_gradients
    lc = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights="lora_ga",
                    lora_ga_config=LoraGAConfig(batch_size=8, num_batches=1, svd_method="exact"))
    targets = nf4_model.lora_targets(lc)
    g = traverse_util.flatten_dict(estimate_gradients(nf4_model, nf4_model.params, targets, [batch], False))
    lora = _lora(nf4_model, seed=3)
    lora = jax.tree.map(lambda w: w.replace(a=jnp.zeros_like(w.a)), lora, is_leaf=lambda x: hasattr(x, "a0"))
    fns = _jitted(nf4_model, batch)
    da = dict(lora_items(fns["grad"](lora, nf4_model.params)))
    for path, w in lora_items(lora):
        want = w.scale * np.asarray(g[path + ("kernel",)]) @ np.swapaxes(np.asarray(w.b), -1, -2)
        np.testing.assert_allclose(np.asarray(da[path].a), want, atol=1e-6)
    got = jaxlora.lora_ga_init(nf4_model, lc, [batch], progress=False)
    for path, w in lora_items(got):
        u = np.linalg.svd(np.asarray(g[path + ("kernel",)]), compute_uv=True)[0][..., :2]  # ArB2r: a0 = U[:, :r] * c
        a0 = np.asarray(w.a0) / np.linalg.norm(np.asarray(w.a0), axis=-2, keepdims=True)
        np.testing.assert_allclose(np.abs(a0), np.abs(u), atol=1e-4)
        np.testing.assert_array_equal(np.asarray(w.a), np.asarray(w.a0))  # relative to the untouched base


def test_generation_equals_the_dequantized_base(nf4_model):
    lora = _lora(nf4_model, seed=2)
    prompts = [[5, 9, 11, 4], [7, 3]]
    run = lambda p: generate_ids(nf4_model, p, prompts, lora=lora, max_new_tokens=3)
    assert run(nf4_model.params) == run(quant.dequantize_params(nf4_model.params))


def test_sharded_equals_unsharded(folder, nf4_model, batch):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = jaxlora.from_pretrained(folder, quantization="nf4", mesh=mesh)
    k = traverse_util.flatten_dict(sharded.params)[UP]
    assert k.codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(nf4_model.params)):  # nf4_model: 1 device
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora = _lora(nf4_model)
    np.testing.assert_allclose(  # a LoRA tree in its own shardings for each
        np.asarray(jax.jit(sharded.apply)(sharded.params, batch["input_ids"], lora=_lora(sharded))),
        np.asarray(_jitted(nf4_model, batch)["apply"](nf4_model.params, batch["input_ids"], lora=lora)), atol=1e-5)
    with pytest.raises(ValueError, match="quantized kernels: pass jaxlora.quant.dequantize_params"):
        sharded.save_pretrained(folder / "never")


# ------------------------------------------------------------------------------------ fp16 loss scaling


class DeepSpeedScaler:
    """DeepSpeed's DynamicLossScaler.update_scale (consecutive_hysteresis off), transcribed as the reference."""

    def __init__(self, init, window, hysteresis, minimum):
        self.scale, self.window, self.delayed, self.hyst, self.min = init, window, hysteresis, hysteresis, minimum
        self.iter, self.last_overflow = 0, -1

    def update(self, overflow: bool) -> bool:
        exhausted = False
        if overflow:
            if self.delayed == 1 or self.hyst == 1:
                exhausted = self.scale == self.min  # DeepSpeed raises here
                self.scale = max(self.scale / 2, self.min)
            else:
                self.hyst -= 1
            self.last_overflow = self.iter
        elif (self.iter - self.last_overflow) % self.window == 0:
            self.hyst = self.delayed
            self.scale *= 2
        self.iter += 1
        return exhausted


def test_loss_scale_rule_is_deepspeeds():
    cfg = OptimConfig(loss_scale_init=16.0, loss_scale_window=3, loss_scale_hysteresis=2, loss_scale_min=1.0)
    flags = [False, False, True, False, True, True, True, True, True, True, True, False, False, False, False, False,
             False, True, False, False, True, True, True, True, True, True, True, True]
    ref, ls = DeepSpeedScaler(16.0, 3, 2, 1.0), optim.init_loss_scale(cfg)
    update = jax.jit(lambda ls, finite: optim.update_loss_scale(ls, finite, cfg))
    for overflow in flags:
        ls, exhausted = update(ls, jnp.asarray(not overflow))
        assert bool(exhausted) == ref.update(overflow)
        assert (float(ls.scale), int(ls.hysteresis)) == (ref.scale, ref.hyst)
    assert int(ls.skipped) == sum(flags)


def _attention_f32(q, k, v, *args, **kwargs):
    """jax.nn.dot_product_attention in float32: XLA:CPU has no float16 dot with a float32 result (F16_F16_F32),
    which jax's XLA attention asks for; float16 compute is for GPUs, the CPU tests only need it to run."""
    dtype = q.dtype
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return _DOT_PRODUCT_ATTENTION(q, k, v, *args, **kwargs).astype(dtype)


_DOT_PRODUCT_ATTENTION = jax.nn.dot_product_attention


@pytest.fixture(scope="module")
def fp16_run(folder, batch):
    with pytest.MonkeyPatch.context() as mp:
        if jax.default_backend() == "cpu":
            mp.setattr(jax.nn, "dot_product_attention", _attention_f32)
        yield _fp16_run(folder, batch)


def _fp16_run(folder, batch):
    model = jaxlora.from_pretrained(folder, "float16", quantization="nf4", mesh=make_mesh(devices=jax.devices()[:1]))
    config = RunConfig(lora=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                       train=TrainConfig(micro_batch_size=4, grad_accum_steps=2),
                       optim=OptimConfig(learning_rate=1e-3, loss_scale_window=2))
    training = build_training(model, config, total_steps=4, lora=_lora(model, seed=4, zero_b=True))
    fresh = lambda: jax.tree.map(jnp.copy, training.state)  # the step donates its state: never the original
    return model, training, fresh, place_batch(batch, model.mesh)


def _with_scale(state, scale: float):
    """`state` with another loss scale, committed like the step's (an uncommitted one would compile it again)."""
    old = state.loss_scale.scale
    return state.replace(loss_scale=state.loss_scale.replace(scale=jax.device_put(jnp.float32(scale), old.sharding)))


def test_fp16_skips_overflowing_steps_and_adjusts_the_scale(fp16_run):
    model, training, fresh, batch = fp16_run
    state = fresh()
    assert state.trainable["lora"]["model"]["layers"]["mlp"]["down_proj"].a.dtype == jnp.float32
    assert float(state.loss_scale.scale) == 2.0 ** 16
    base = jax.tree.map(np.asarray, training.params)
    state, m = training.train_step(training.params, state, batch)
    assert float(m["skipped"]) == 0 and np.isfinite(float(m["loss"])) and float(m["loss_scale"]) == 2.0 ** 16
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    jax.tree.map(np.testing.assert_array_equal, base, jax.tree.map(np.asarray, training.params))  # bitwise frozen
    # a scale past float16's range overflows the fp16 backward: the step is skipped, nothing moves
    huge = _with_scale(state, 2.0 ** 40)
    before = jax.tree.map(np.asarray, (huge.trainable, huge.opt_state))
    after, m = training.train_step(training.params, huge, batch)
    assert float(m["skipped"]) == 1 and not np.isfinite(float(m["grad_norm"]))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, (after.trainable, after.opt_state)))
    assert float(after.loss_scale.scale) == 2.0 ** 40 and int(after.loss_scale.hysteresis) == 1  # hysteresis first
    after, m = training.train_step(training.params, after, batch)
    assert float(m["skipped"]) == 1 and float(after.loss_scale.scale) == 2.0 ** 39  # then the scale halves
    assert int(after.loss_scale.skipped) == 2 and int(after.step) == 3


def test_fp16_scale_grows_and_resumes_exactly(fp16_run, tmp_path):
    from jaxlora.io import checkpoint as ckpt_lib
    model, training, fresh, batch = fp16_run
    state = fresh()
    state = _with_scale(state, 64.0)
    for _ in range(2):  # window 2: the second overflow-free iteration doubles the scale
        state, m = training.train_step(training.params, state, batch)
        assert float(m["skipped"]) == 0
    assert float(state.loss_scale.scale) == 128.0 and int(state.loss_scale.since_overflow) == 3
    checkpointer = ckpt_lib.Checkpointer(tmp_path / "ckpt")
    signature = ckpt_lib.state_signature(model.config, state)
    checkpointer.save(2, state, {"signature": signature})
    checkpointer.wait()
    restored, _ = checkpointer.restore(2, fresh(), signature)
    checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.loss_scale),
                 jax.tree.map(np.asarray, state.loss_scale))
    a, ma = training.train_step(training.params, state, batch)
    b, mb = training.train_step(training.params, restored, batch)
    assert float(ma["loss"]) == float(mb["loss"]) and float(ma["loss_scale"]) == float(mb["loss_scale"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a.trainable),
                 jax.tree.map(np.asarray, b.trainable))


# ------------------------------------------------------------------ LoRA-GA's gradient estimate in float16


def _estimate(model, batches, **kw) -> dict:
    from jaxlora.lora.ga import estimate_gradients
    targets = model.lora_targets(LoraConfig(r=2, target_modules="all-linear"))
    return traverse_util.flatten_dict(estimate_gradients(model, model.params, targets, batches, False, **kw))


def _rel_errors(got: dict, want: dict) -> dict:
    return {p[-2]: float(np.linalg.norm(np.asarray(got[p]) - np.asarray(want[p])) / np.linalg.norm(np.asarray(want[p])))
            for p in want}


@pytest.fixture(scope="module")
def fp16_estimation(folder):
    """The tiny model in float32 and float16 (nf4 base), one device, and two estimation batches of 8 x 96 tokens:
    768 labelled tokens, so the mean loss's per-token cotangents are ~1e-5 and q/k's fp16 backward underflows."""
    rng = np.random.RandomState(1)
    batches = []
    for _ in range(2):
        ids = rng.randint(3, 127, (8, 96)).astype(np.int32)  # token 127 appears in no batch (the NaN test's)
        batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids.copy()})
    mesh = make_mesh(devices=jax.devices()[:1])
    with pytest.MonkeyPatch.context() as mp:
        if jax.default_backend() == "cpu":
            mp.setattr(jax.nn, "dot_product_attention", _attention_f32)
        m32 = jaxlora.from_pretrained(folder, "float32", quantization="nf4", mesh=mesh)
        m16 = jaxlora.from_pretrained(folder, "float16", quantization="nf4", mesh=mesh)
        yield m32, m16, batches, _estimate(m32, batches)


# Relative Frobenius error of each fp16 estimate vs the float32 one. Measured (CPU): 0.7e-3 to 1.1e-3 loss-scaled for
# every projection; unscaled 1.5e-3 to 2.5e-3 for the MLP and o/v, 1.9e-2 (k) and 2.7e-2 (q), where the cotangents
# reaching q/k are smallest.
FP16_ESTIMATE_RTOL = 2.5e-3


def test_fp16_lora_ga_estimate_is_loss_scaled(fp16_estimation, caplog):
    m32, m16, batches, want = fp16_estimation
    with pytest.MonkeyPatch.context() as mp:
        if jax.default_backend() == "cpu":
            mp.setattr(jax.nn, "dot_product_attention", _attention_f32)
        scaled = _rel_errors(_estimate(m16, batches), want)
        unscaled = _rel_errors(_estimate(m16, batches, loss_scale=1.0), want)
        # a first scale past float16's range overflows: the batch runs again at halved scales, nothing is lost
        with caplog.at_level("INFO", logger="jaxlora.lora.ga.estimate"):
            overflowed = _rel_errors(_estimate(m16, batches, loss_scale=2.0 ** 30), want)
    assert "float16 loss scale lowered from 1.07374e+09 to" in caplog.text
    for name in scaled:
        PARITY_ERRORS[f"fp16 LoRA-GA gradient, {name}: loss-scaled (rel.)"] = scaled[name]
        PARITY_ERRORS[f"fp16 LoRA-GA gradient, {name}: unscaled (rel.)"] = unscaled[name]
    assert max(scaled.values()) < FP16_ESTIMATE_RTOL, scaled
    assert max(overflowed.values()) < FP16_ESTIMATE_RTOL, overflowed
    assert unscaled["q_proj"] > 4 * FP16_ESTIMATE_RTOL and unscaled["k_proj"] > 4 * FP16_ESTIMATE_RTOL, unscaled


def test_fp16_lora_ga_estimate_names_a_non_finite_batch(fp16_estimation):
    from jaxlora.lora import LoraGAError
    _, m16, batches, _ = fp16_estimation
    params = traverse_util.flatten_dict(m16.params)
    emb = ("model", "embed_tokens", "embedding")
    params[emb] = params[emb].at[127].set(jnp.nan)  # only the second batch holds token 127
    bad = [batches[0], {**batches[1], "input_ids": batches[1]["input_ids"].copy()}]
    bad[1]["input_ids"][0, 5] = 127
    m16_nan = copy.copy(m16)  # the same model (and compiled step) with the poisoned params
    m16_nan.params = traverse_util.unflatten_dict(params)
    with pytest.MonkeyPatch.context() as mp:
        if jax.default_backend() == "cpu":
            mp.setattr(jax.nn, "dot_product_attention", _attention_f32)
        with pytest.raises(LoraGAError, match=r"estimation batch 1 is not finite even at loss scale 1 \(starting "
                                              r"from 4\)"):
            _estimate(m16_nan, bad, loss_scale=4.0)
