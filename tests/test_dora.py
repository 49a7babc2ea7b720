"""DoRA (`use_dora=True`) against PEFT 0.21's DoRA on a tiny Llama, PyTorch CPU, float32.

1. Init: the magnitude is PEFT's ||W||_c (b = 0) and the model is the base at step 0.
2. A PEFT DoRA adapter with random factors and magnitudes, imported: logits and the gradients of a, b and m equal
   PEFT's (the norm detached in both); the column norm that never forms W + s*a@b equals the dense one.
3. Merge equals PEFT's merge_and_unload; the PEFT export round-trips (PEFT loads it, same logits).
4. Bad input: DoRA with an init relative to the base, on a quantized base, unmerge: one clear error each.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxlora
from jaxlora import sharding
from jaxlora.config import RunConfig
from jaxlora.lora import LoraConfig, LoraConfigError, lora_items, module_names
from jaxlora.lora.weights import dora_norm
from jaxlora.sharding import MeshConfig
from jaxlora.training.build import initial_lora

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8.0
LOGITS_ATOL = 1e-4  # float32 through 2 layers and the head (logits O(1-10))
GRAD_RTOL = 1e-4  # gradient max-abs error relative to the gradient's max-abs
MAG_ATOL = 1e-5  # magnitudes (column norms, O(1))
MERGE_ATOL = 1e-5  # merged kernels (O(0.2-1))
STEP0_RTOL = 1e-6  # max-abs / max|logit| at step 0 (g = m/||W||_c = 1 up to rounding)

RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    print("\n[dora] max abs errors:", json.dumps({k: float(f"{v:.3g}") for k, v in RESULTS.items()}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dora")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if key.endswith("norm.weight") else p.normal_(0.0, 0.2)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(folder):
    return jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))


@pytest.fixture(scope="module")
def batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(6, TINY["vocab_size"], (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 9:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _cfg(**kw) -> LoraConfig:
    return LoraConfig(**{"r": R, "lora_alpha": ALPHA, "target_modules": TARGETS, "use_dora": True, **kw})


@pytest.fixture(scope="module")
def peft_dora(hf, tmp_path_factory):
    """PEFT DoRA with random factors (N(0, 0.2)) and magnitudes (||W + s BA||_c * U(0.5, 1.5)); saved."""
    import peft
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                                  use_dora=True, init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if "lora_A" in key or "lora_B" in key:
                p.normal_(0.0, 0.2)
        for key, p in pm.named_parameters():
            if "lora_magnitude_vector" in key:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    pm.eval()
    out = tmp_path_factory.mktemp("peft_dora") / "adapter"
    pm.save_pretrained(out)
    return pm, out


_APPLY: dict = {}


def _logits(model, lora, batch) -> np.ndarray:
    if id(model) not in _APPLY:
        _APPLY[id(model)] = (model, jax.jit(lambda p, i, m, lo: model.apply(p, i, m, lora=lo)))
    fn = _APPLY[id(model)][1]
    return np.asarray(fn(model.params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), lora))


def _torch_logits(pm, batch) -> np.ndarray:
    with torch.no_grad():
        return pm(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                  attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()


def _rel(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_init_magnitude_is_peft_and_step0_is_base(model, hf, batch):
    import peft
    lora = initial_lora(model, RunConfig(lora=_cfg()), jax.random.key(0))
    api = jaxlora.init_lora(model, _cfg(), jax.random.key(0))  # the Python API gives the same DoRA tree
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), api, lora)))
    assert all(w.dora for _, w in lora_items(api))
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                                  use_dora=True)).eval()
    err = 0.0
    for path, w in lora_items(lora):
        m = np.asarray(jax.device_get(w.m))
        for i, name in enumerate(module_names(path, model.config.num_hidden_layers, model.names.stack_name)):
            ref = pm.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight.detach().numpy()
            err = max(err, np.abs((m[i] if m.ndim == 2 else m) - ref).max())
    RESULTS["init magnitude"] = err
    assert err < MAG_ATOL
    base = _logits(model, None, batch)
    rel = _rel(_logits(model, lora, batch), base)
    RESULTS["step0 rel"] = rel
    assert rel < STEP0_RTOL


def test_norm_without_forming_the_matrix(model):
    k, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(3, 24, 40), (3, 24, 4), (3, 4, 40)]))
    dense = jax.jit(lambda k, a, b: jnp.linalg.norm(k + 1.5 * a @ b, axis=-2))(k, a, b)
    err = float(jnp.abs(jax.jit(dora_norm, static_argnums=3)(k, a, b, 1.5) - dense).max() / jnp.abs(dense).max())
    RESULTS["norm rel"] = err
    assert err < 1e-6


def test_logits_and_gradients_equal_peft(model, batch, peft_dora):
    pm, adapter = peft_dora
    lora, cfg = jaxlora.import_peft(model, adapter)
    assert cfg.use_dora and all(w.dora for _, w in lora_items(lora))
    keep = batch["attention_mask"].astype(bool)
    ref = _torch_logits(pm, batch)
    got = _logits(model, lora, batch)
    RESULTS["logits"] = float(np.abs(got[keep] - ref[keep]).max())
    assert RESULTS["logits"] < LOGITS_ATOL
    assert np.abs(got - _logits(model, None, batch))[keep].max() > 0.1  # the adapter changes the model

    pm.zero_grad()
    logits = pm(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                attention_mask=torch.tensor(batch["attention_mask"])).logits
    labels = torch.tensor(batch["labels"], dtype=torch.long)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                      ignore_index=-100).backward()

    def loss(lo):
        total, count = model.loss_sums(model.params, {k: jnp.asarray(v) for k, v in batch.items()}, lo)
        return total / count
    grads = jax.jit(jax.grad(loss))(lora)
    err = {"a": 0.0, "b": 0.0, "m": 0.0}
    for path, g in lora_items(grads):
        parts = {f: np.asarray(jax.device_get(getattr(g, f))) for f in err}
        for i, name in enumerate(module_names(path, model.config.num_hidden_layers, model.names.stack_name)):
            mod = pm.base_model.model.get_submodule(name)
            ref = {"a": mod.lora_A["default"].weight.grad.numpy().T, "b": mod.lora_B["default"].weight.grad.numpy().T,
                   "m": mod.lora_magnitude_vector["default"].weight.grad.numpy()}
            for f in err:
                mine = parts[f][i] if parts[f].ndim > ref[f].ndim else parts[f]
                err[f] = max(err[f], np.abs(mine - ref[f]).max() / np.abs(ref[f]).max())
    for f, e in err.items():
        RESULTS[f"grad {f} rel"] = e
        assert e < GRAD_RTOL, f"d/d{f}: {e:.2e}"


def test_merge_and_peft_export_round_trip(model, hf, batch, peft_dora, tmp_path):
    import peft
    pm, adapter = peft_dora
    lora, cfg = jaxlora.import_peft(model, adapter)
    merged = jaxlora.merge(model.params, lora)
    ref = copy.deepcopy(pm).merge_and_unload()
    err = 0.0
    from flax import traverse_util
    flat = traverse_util.flatten_dict(merged)
    for path, _ in lora_items(lora):
        k = np.asarray(jax.device_get(flat[path + ("kernel",)]))
        for i, name in enumerate(module_names(path, model.config.num_hidden_layers, model.names.stack_name)):
            w = ref.get_submodule(name).weight.detach().numpy().T
            err = max(err, np.abs((k[i] if k.ndim == 3 else k) - w).max())
    RESULTS["merge"] = err
    assert err < MERGE_ATOL
    with pytest.raises(LoraConfigError, match="unmerge is not defined for DoRA"):
        jaxlora.unmerge(merged, lora)

    jaxlora.export_peft(model, lora, cfg, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    again = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "out").eval()
    keep = batch["attention_mask"].astype(bool)
    err = np.abs(_torch_logits(again, batch)[keep] - _logits(model, lora, batch)[keep]).max()
    RESULTS["export logits"] = float(err)
    assert RESULTS["export logits"] < LOGITS_ATOL


def test_bad_input_is_one_clear_error(folder, model):
    with pytest.raises(LoraConfigError, match="use_dora with init_lora_weights='pissa' is not supported"):
        _cfg(init_lora_weights="pissa")
    qmodel = jaxlora.from_pretrained(folder, quantization="int8",
                                     mesh=sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]))
    with pytest.raises(LoraConfigError, match="DoRA needs a dense floating-point base: .*q_proj is quantized"):
        initial_lora(qmodel, RunConfig(lora=_cfg(target_modules=["q_proj"])), jax.random.key(0))


def test_dropout_rescales_the_dropped_base_term_as_peft():
    """With dropout in training, PEFT's DoRA output is x@W + (g - 1) * x_d@W + g * s * x_d@a@b (x_d = dropout(x)).
    The same module path and rng give LoraDense's plain-LoRA branch the same mask, which yields x_d@W (a = I,
    b = W) and x_d@a@b to build the reference from."""
    from jaxlora.lora.weights import LoraWeights
    from jaxlora.models.common import LoraDense
    d_in, d_out, r, s, p = 8, 6, 2, 1.5, 0.5
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (3, 5, d_in))
    w = jax.random.normal(ks[1], (d_in, d_out))
    a, b = jax.random.normal(ks[2], (d_in, r)), jax.random.normal(ks[3], (r, d_out))
    m = jax.random.uniform(ks[4], (d_out,), minval=0.5, maxval=2.0)
    layer = LoraDense(d_out, ("embed", "mlp"), False, jnp.float32, jnp.float32, deterministic=False)
    run = lambda lora: layer.apply({"params": {"kernel": w}}, x, lora, rngs={"dropout": jax.random.key(7)})

    @jax.jit
    def outputs(a, b, m, w):
        got = run(LoraWeights(a, b, m=m, scale=s, dropout=p))
        xw = x @ w
        xd_w = run(LoraWeights(jnp.eye(d_in), w, scale=1.0, dropout=p)) - xw
        xd_ab = run(LoraWeights(a, b, scale=1.0, dropout=p)) - xw
        g = (m / jnp.linalg.norm(w + s * a @ b, axis=0)).reshape(1, 1, -1)
        return got, xw + (g - 1) * xd_w + g * s * xd_ab, jnp.abs(xd_w - xw).max()

    got, want, dropped = outputs(a, b, m, w)
    assert float(dropped) > 0.1  # the mask drops something
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    RESULTS["dropout rel"] = err
    assert err < 1e-5
