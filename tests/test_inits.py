"""PiSSA, OLoRA and LoRA-One (`jaxlora.lora.inits`) against PEFT 0.21 and float64 references, on a tiny Llama.

1. PiSSA ("pissa", "pissa_niter_4") and OLoRA: the same lora_A / lora_B as PEFT's get_peft_model (up to the sign of
   each singular pair / QR column), and PEFT's residual base W0 - s*B@A equals W0 - s*a0@b0.
2. Step 0 equals the base (the update is relative to the untouched weights), sharded over (data, fsdp, tensor).
3. The PEFT export (rank 2r on the original weights) loads in PEFT and gives jaxlora's logits after the factors move.
4. LoRA-One: s*a@b = -(s/gamma) [G]_r / S_1 with G torch's float64 gradient, a^T a = b b^T = S_r/(gamma S_1).
5. Bad input: one clear error each. 6. `jaxlora train --set lora.init_lora_weights=...` runs from a config (LoRA-One
   with DoRA, `lora.use_dora=true`).

Every kernel of the tiny model gets a geometric spectrum (ratio 0.3), so the randomized SVD ("pissa_niter_4", q = r,
as torch.svd_lowrank) reaches the exact top-r triplets on both sides and the two can be compared.
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
import tiny
from jaxlora import cli, sharding
from jaxlora.lora import LoraConfig, LoraConfigError, LoraGAConfig, LoraGAError, lora_items, module_names
from jaxlora.lora import inits
from jaxlora.config import RunConfig
from jaxlora.sharding import MeshConfig
from jaxlora.training.build import initial_lora

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 4, 8.0
FACTOR_ATOL = 5e-5  # factors vs PEFT's: float32 SVD/QR on both sides (XLA's and LAPACK's), each off the float64
#                    factors by ~ n eps ||W|| = 48 * 1.2e-7 * 2 = 1.1e-5 (measured: see the printed figures)
NITER_ATOL = 1e-4  # pissa_niter_4: two randomized SVDs with different random sketches (q = r, 4 power iterations),
#                    each ~(s_r+1 / s_r)^(2*4+1) = 0.3^9 = 2e-5 off the exact vectors
RESIDUAL_ATOL = 1e-5  # PEFT's rewritten base vs W0 - s*a0@b0 (weights O(1))
STEP0_RTOL = 1e-5  # logits at step 0 vs the base: max-abs / max|logit|
PEFT_LOGITS_ATOL = 1e-4  # jaxlora vs PEFT logits of the exported adapter (logits O(1-10))
ONE_RTOL = 1e-4  # LoRA-One's s*a@b vs the float64 rank-r step, relative to its max-abs

RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    print("\n[inits] max abs errors:", json.dumps({k: float(f"{v:.3g}") for k, v in RESULTS.items()}))


def _spectral(shape, gen) -> torch.Tensor:
    """A random (out, in) matrix with singular values 2 * 0.3^k: well separated, so every SVD is well defined."""
    out_, in_ = shape
    k = min(shape)
    u = torch.linalg.qr(torch.randn(out_, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_, k, generator=gen, dtype=torch.float64))[0]
    return (u * (2.0 * 0.3 ** torch.arange(k, dtype=torch.float64))) @ v.T


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("inits")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if key.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif any(key.endswith(f"{m}.weight") for m in ALL):
                p.copy_(_spectral(p.shape, gen))
            else:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(folder):  # kernels sharded over fsdp and tensor: the factorizations run on sharded weights
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


def _cfg(init, **kw) -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(ALL), init_lora_weights=init, **kw)


_APPLY: dict = {}


def _logits(model, params, lora, batch) -> np.ndarray:
    if id(model) not in _APPLY:  # one jitted apply per model (kept alive with it): compiled once per tree layout
        _APPLY[id(model)] = (model, jax.jit(lambda p, i, m, lo: model.apply(p, i, m, lora=lo)))
    fn = _APPLY[id(model)][1]
    return np.asarray(fn(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), lora))


def _per_module(model, lora) -> dict:
    """{hf module name: (a (in, r), b (r, out), a0, b0)} as float64 numpy."""
    out = {}
    for path, w in lora_items(lora):
        parts = [None if x is None else np.asarray(jax.device_get(x), np.float64) for x in (w.a, w.b, w.a0, w.b0)]
        for i, name in enumerate(module_names(path, model.config.num_hidden_layers, model.names.stack_name)):
            out[name] = tuple(None if x is None else x[i] for x in parts)
    return out


def _peft(hf, init):
    import peft
    return peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=list(ALL), init_lora_weights=init)).eval()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_factors_and_residual_match_peft(model, hf, batch, init):
    """Same lora_A/lora_B as PEFT up to the sign of each pair; PEFT's residual base = W0 - s*a0@b0; and the model
    with the init is the base at step 0 (PEFT's is residual + adapter: the same function)."""
    lora = inits.weight_init(model, _cfg(init))
    ours = _per_module(model, lora)
    pm = _peft(hf, init)
    s = ALPHA / R
    err_f = err_res = err64 = errp64 = 0.0
    for name, (a, b, a0, b0) in ours.items():
        mod = pm.base_model.model.get_submodule(name)
        A = mod.lora_A["default"].weight.detach().double().numpy().T  # (in, r)
        B = mod.lora_B["default"].weight.detach().double().numpy().T  # (r, out)
        sign = np.sign(np.sum(a * A, axis=0))  # one sign per pair (singular vectors / QR columns)
        assert np.all(sign != 0)
        err_f = max(err_f, np.abs(a * sign - A).max(), np.abs(b * sign[:, None] - B).max())
        if init == "olora":  # both sides against the float64 QR of W0 (torch layout (out, in))
            q64, r64 = np.linalg.qr(hf.get_submodule(name).weight.detach().double().numpy())
            a64, b64 = r64[:R].T, q64[:, :R].T
            s64 = np.sign(np.sum(a * a64, axis=0))
            err64 = max(err64, np.abs(a * s64 - a64).max(), np.abs(b * s64[:, None] - b64).max())
            s64 = np.sign(np.sum(A * a64, axis=0))
            errp64 = max(errp64, np.abs(A * s64 - a64).max(), np.abs(B * s64[:, None] - b64).max())
        np.testing.assert_array_equal(a, a0)  # offsets start equal to the factors
        w0 = hf.get_submodule(name).weight.detach().double().numpy().T
        residual = mod.base_layer.weight.detach().double().numpy().T
        err_res = max(err_res, np.abs(residual - (w0 - s * a0 @ b0)).max())
    RESULTS[f"{init} factors"], RESULTS[f"{init} residual"] = err_f, err_res
    if init == "olora":
        RESULTS["olora ours vs float64"], RESULTS["olora peft vs float64"] = err64, errp64
    tol = NITER_ATOL if "niter" in init else FACTOR_ATOL
    assert err_f < tol, f"{init}: factors differ from PEFT's by {err_f:.2e}"
    assert err_res < RESIDUAL_ATOL, f"{init}: PEFT's residual differs from W0 - s a0 b0 by {err_res:.2e}"
    base = _logits(model, model.params, None, batch)
    step0 = _logits(model, model.params, lora, batch)
    rel = np.abs(step0 - base).max() / np.abs(base).max()
    RESULTS[f"{init} step0 rel"] = rel
    assert rel < STEP0_RTOL


def test_export_loads_in_peft_with_same_logits(model, hf, batch, tmp_path):
    """A moved PiSSA adapter exported as rank 2r on the original weights: PEFT's logits equal jaxlora's."""
    import peft
    cfg = _cfg("pissa")
    lora = inits.weight_init(model, cfg)
    key = jax.random.key(3)
    lora = jax.tree.map(lambda w: w.replace(a=w.a + 0.05 * jax.random.normal(key, w.a.shape),
                                            b=w.b * 1.1), lora, is_leaf=lambda x: isinstance(x, jaxlora.LoraWeights))
    jaxlora.export_peft(model, lora, cfg, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * R and saved["init_lora_weights"] is True
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
    got = _logits(model, model.params, lora, batch)
    keep = batch["attention_mask"].astype(bool)
    err = np.abs(got[keep] - ref[keep]).max()
    RESULTS["pissa export logits"] = err
    assert err < PEFT_LOGITS_ATOL
    assert np.abs(got - _logits(model, model.params, None, batch))[keep].max() > 1e-2  # the adapter does something


def _torch_gradient64(hf, batch, names) -> dict:
    """dL/dW (as (in, out)) of the mean next-token loss over labelled tokens, float64."""
    m = copy.deepcopy(hf).double()
    logits = m(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
               attention_mask=torch.tensor(batch["attention_mask"])).logits
    labels = torch.tensor(batch["labels"], dtype=torch.long)[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    return {n: m.get_submodule(n).weight.grad.numpy().T for n in names}


def test_lora_one_is_one_rank_r_step(model, hf, batch):
    gamma = 4.0
    cfg = _cfg("lora_one", lora_ga_config=LoraGAConfig(num_batches=1, svd_method="exact", lora_one_gamma=gamma))
    lora = inits.lora_one_init(model, cfg, [batch], progress=False)
    ours = _per_module(model, lora)
    assert all(a0 is None for _, _, a0, _ in ours.values())  # a plain adapter: the step is the init
    grads = _torch_gradient64(hf, batch, list(ours))
    s = ALPHA / R
    err = 0.0
    for name, (a, b, _, _) in ours.items():
        u, sv, vt = np.linalg.svd(grads[name], full_matrices=False)
        step = -(s / gamma) * (u[:, :R] * sv[:R]) @ vt[:R] / sv[0]  # normalized by the top singular value
        err = max(err, np.abs(s * a @ b - step).max() / np.abs(step).max())
        np.testing.assert_allclose(a.T @ a, b @ b.T, atol=1e-5 / gamma)  # sqrt(S / S_1) on each factor
    RESULTS["lora_one step rel"] = err
    assert err < ONE_RTOL


def test_bad_input_is_one_clear_error(model):
    with pytest.raises(LoraConfigError, match="pissa_niter_K"):
        LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ValueError, match=r"r=20 is larger than a dimension of .*k_proj \(kernel 32x16\)"):
        inits.weight_init(model, LoraConfig(r=20, target_modules=["k_proj"], init_lora_weights="pissa"))
    with pytest.raises(LoraConfigError, match="call jaxlora.lora.inits.initial_tree"):
        jaxlora.init_lora(model, _cfg("olora"), jax.random.key(0))
    with pytest.raises(LoraGAError, match="lora_one' needs estimation batches"):
        initial_lora(model, RunConfig(lora=_cfg("lora_one")), jax.random.key(0))
    with pytest.raises(LoraGAError, match="LoRA-One needs estimation batches"):
        inits.lora_one_init(model, _cfg("lora_one"), [], progress=False)
    with pytest.raises(LoraGAError, match="lora_one_gamma must be positive"):
        LoraGAConfig(lora_one_gamma=0.0)


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("inits_train")
    tiny.tiny_model_dir(d / "model")
    tiny.write_jsonl(d / "train.jsonl", tiny.instruction_records(32))
    cfg = d / "run.yaml"
    cfg.write_text(f"""
model: {{path: {d}/model}}
lora: {{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj], lora_ga_config: {{batch_size: 8, num_batches: 2}}}}
data: {{path: {d}/train.jsonl, max_length: 32, bucket_lengths: [32]}}
optim: {{learning_rate: 1.0e-3}}
train: {{micro_batch_size: 8, max_steps: 1, save_every: 0, log_every: 1, progress_bar: false,
         peak_tflops_per_device: 1.0}}
""")
    return cfg


@pytest.mark.parametrize("init,dora", [("pissa", False), ("lora_one", True)])
def test_train_from_config(run_config, tmp_path, init, dora):
    """`jaxlora train --set lora.init_lora_weights=...` on the tiny test model: runs (LoRA-One gets the trainer's
    estimation batches; with DoRA, whose magnitudes train too), exports a PEFT adapter (rank 2r for PiSSA: relative
    to the original weights; lora_magnitude_vector for DoRA)."""
    assert cli.main(["train", "--config", str(run_config), "--set", f"lora.init_lora_weights={init}",
                     "--set", f"lora.use_dora={str(dora).lower()}", "--set", f"train.output_dir={tmp_path}/run"]) == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == (2 * 4 if init == "pissa" else 4) and saved["use_dora"] is dora
    if dora:
        from safetensors.numpy import load_file
        tensors = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
        assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 2 * 2  # q, v in 2 layers
