"""EVA and CorDA (`jaxlora.lora.inits.eva` / `.corda`) against PEFT 0.21 and float64 references, on a tiny Llama of
test_inits' shape (every targeted kernel with a geometric spectrum, ratio RATIO), with two estimation batches (padding
and ignored labels in them).

1. EVA: a = the top-r principal components of each layer's kept inputs, the same as PEFT's `get_eva_state_dict` run on
   the same tokens (one batch holding both of ours, PEFT's incremental PCA with exact SVDs), and as the float64 PCA of
   the inputs captured from torch (plain and whitened); b = 0, so the model is the base bitwise. PEFT as shipped
   (torch.svd_lowrank, q = 2r, 4 power iterations) is off that PCA by its randomized SVD's error: ours differs from it
   by no more than that error (+ EVA_ATOL).
2. CorDA (ipm, kpm): the same lora_A / lora_B as PEFT's `preprocess_corda` + get_peft_model on the same rows (each row a
   sample of its real tokens, as PEFT's batch-1 hook sees it), up to the sign of each pair; PEFT's rewritten base is
   W0 - s*a0@b0; the model is the base at step 0; the rank-2r PEFT export gives PEFT's logits.
3. The base params are never modified. 4. Bad input: one clear error each. 5. `jaxlora train` runs with CorDA (kpm
   from the config file's `lora.corda_config`); EVA's run init is `initial_lora`'s, checked in 1.
"""

from __future__ import annotations

import copy
import json
from unittest import mock

import jax
import numpy as np
import pytest
import tiny
import torch
from test_inits import (ALL, ALPHA, PEFT_LOGITS_ATOL, STEP0_RTOL, TINY, R, _logits, _per_module,  # noqa: F401
                        _torch_single_thread, batch, run_config)

import jaxlora
from jaxlora import cli, sharding
from jaxlora.config import RunConfig
from jaxlora.lora import CordaConfig, EvaConfig, LoraConfig, LoraConfigError, LoraGAConfig, LoraGAError, inits
from jaxlora.sharding import MeshConfig
from jaxlora.training.build import initial_lora

EVA_ATOL = 2e-5  # components (unit vectors, entries O(0.1-1)) vs PEFT's exact incremental PCA and the float64 PCA:
#                  float32 scatter accumulation + eigh here, float32 SVD of the centered tokens there
CORDA_ATOL = {  # factors (entries up to ~1) vs PEFT's and vs the float64 algorithm on torch's inputs, both float32:
    "ipm": 1e-4,  # the largest triplets of W C' (measured ~7e-6)
    "kpm": 1e-3,  # the smallest: their gaps are ~1e-3 (singular values ~0.014-0.03), and the two forwards' inputs
    #               differ by ~1e-6 relative (float32 op order), so each side's vectors move by ~1e-6/1e-3 times
    #               sqrt(S/s) ~ 0.1 (measured: ours 2.5e-4, PEFT's 4e-5 off float64; set after that measurement)
}
RESIDUAL_ATOL = 5e-5  # PEFT's rewritten base vs W0 - s*a0@b0: s * r * max|factor| * the ipm/kpm factor differences

RESULTS: dict[str, float] = {}
RATIO = 0.93  # singular values of every targeted kernel: 2 * RATIO^k. Milder than test_inits' 0.3, whose smallest are
#               ~1e-16: below float32's resolution, so kpm's smallest-r triplets would be rounding noise on any side


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import transformers
    path = tmp_path_factory.mktemp("inits_data")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if any(key.endswith(f"{m}.weight") for m in ALL):
                k = min(p.shape)
                u = torch.linalg.qr(torch.randn(p.shape[0], k, generator=gen, dtype=torch.float64))[0]
                v = torch.linalg.qr(torch.randn(p.shape[1], k, generator=gen, dtype=torch.float64))[0]
                p.copy_((u * (2.0 * RATIO ** torch.arange(k, dtype=torch.float64))) @ v.T)
            elif not key.endswith("norm.weight"):
                p.normal_(0.0, 0.2)
    hf.save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(folder):
    import transformers
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(folder):  # kernels sharded over fsdp and tensor
    return jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\n[inits_data] max abs errors:", json.dumps({k: float(f"{v:.3g}") for k, v in RESULTS.items()}))


@pytest.fixture(scope="module")
def batches(batch):  # noqa: F811 (test_inits' fixture)
    """Two 4-row batches: test_inits' (row 0 padded, 3 ignored labels per row) and a second with another padding."""
    rs = np.random.RandomState(1)
    ids = rs.randint(6, 128, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, 7:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :2] = -100
    return [batch, {"input_ids": ids, "attention_mask": mask, "labels": labels}]


def _cfg(init, **kw) -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(ALL), init_lora_weights=init,
                      lora_ga_config=LoraGAConfig(num_batches=2), **kw)


def _torch(b) -> dict:
    return {k: torch.tensor(v, dtype=torch.long) for k, v in b.items()}


def _joined(batches) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _up_to_sign(ours, ref):
    """max |ours * sign - ref| with one sign per column (ours, ref: (in, r))."""
    sign = np.sign(np.sum(ours * ref, axis=0))
    assert np.all(sign != 0)
    return np.abs(ours * sign - ref).max(), sign


def _snapshot(params) -> list:
    return [np.array(x) for x in jax.tree.leaves(jax.device_get(params))]


def _row_inputs(hf, batches, names) -> tuple[dict, list]:
    """({name: [float64 inputs (real tokens, in) of each row]}, [each row's labels at its real tokens]): every row run
    alone on its real tokens (as PEFT's CorDA hook sees a sample), inputs captured with forward hooks."""
    got = {n: [] for n in names}
    hooks = [hf.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got[n].append(i[0][0].double().numpy()))
             for n in names]
    labels = []
    with torch.no_grad():
        for b in batches:
            for ids, mask, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
                hf(input_ids=torch.tensor(ids[mask > 0], dtype=torch.long)[None])
                labels.append(lab[mask > 0])
    for h in hooks:
        h.remove()
    return got, labels


# ------------------------------------------------------------------------------------------ EVA


def _peft_eva(hf, joined, exact: bool) -> dict:
    import peft
    from peft.tuners.lora import eva as peft_eva
    from peft.utils.incremental_pca import IncrementalPCA
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(ALL), init_lora_weights="eva",
                          eva_config=peft.EvaConfig(rho=1.0, tau=0.999))
    pca = (lambda **kw: IncrementalPCA(**{**kw, "lowrank": False})) if exact else IncrementalPCA
    with mock.patch.object(peft_eva, "IncrementalPCA", pca):
        state = peft.get_eva_state_dict(copy.deepcopy(hf), [_torch(joined)], peft_config=cfg,
                                        show_progress_bar=False)
    return {k: v.double().numpy().T for k, v in state.items()}  # (in, r)


def test_eva_matches_peft_and_pca(model, hf, batches):
    """Our components from the two batches = PEFT's from one batch of the same rows = the float64 PCA."""
    before = _snapshot(model.params)
    lora = inits.eva_init(model, _cfg("eva"), batches)
    whitened = _per_module(model, inits.eva_init(model, _cfg("eva", eva_config=EvaConfig(whiten=True)), batches))
    ours = _per_module(model, lora)
    assert all(np.array_equal(x, y) for x, y in zip(before, _snapshot(model.params)))  # the base is untouched
    assert all(a0 is None and not b.any() for _, b, a0, _ in ours.values())  # b = 0, no offsets
    joined = _joined(batches)
    rows, labels = _row_inputs(hf, batches, list(ours))
    inputs = {n: np.concatenate([x[lab != -100] for x, lab in zip(rows[n], labels)]) for n in ours}
    exact, lowrank = _peft_eva(hf, joined, exact=True), _peft_eva(hf, joined, exact=False)
    assert set(exact) == set(lowrank) == set(ours)
    err = {k: 0.0 for k in ("peft exact", "peft lowrank", "float64", "float64 whiten", "peft lowrank vs float64")}
    for name, (a, _, _, _) in ours.items():
        x = inputs[name] - inputs[name].mean(axis=0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        e64, sign = _up_to_sign(a, vt[:R].T)
        w = whitened[name][0] * sign
        for key, e in [("peft exact", _up_to_sign(a, exact[name])[0]),
                       ("peft lowrank", _up_to_sign(a, lowrank[name])[0]),
                       ("float64", e64), ("float64 whiten", np.abs(w - vt[:R].T / np.sqrt(s[:R])).max()),
                       ("peft lowrank vs float64", _up_to_sign(lowrank[name], vt[:R].T)[0])]:
            err[key] = max(err[key], e)
    RESULTS.update({f"eva {k}": v for k, v in err.items()})
    assert err["peft exact"] < EVA_ATOL and err["float64"] < EVA_ATOL and err["float64 whiten"] < EVA_ATOL, err
    assert err["peft lowrank"] < err["peft lowrank vs float64"] + EVA_ATOL, err  # PEFT's randomized SVD's own error
    np.testing.assert_array_equal(_logits(model, model.params, lora, batches[0]),
                                  _logits(model, model.params, None, batches[0]))  # b = 0: the base, bitwise
    run = initial_lora(model, RunConfig(lora=_cfg("eva")), jax.random.key(0), lora_ga_batches=batches)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(run), jax.tree.leaves(lora)))  # a run's init


# ------------------------------------------------------------------------------------------ CorDA


def _peft_corda(hf, batches, method):
    """PEFT's CorDA model: preprocess_corda over each row's real tokens (batch 1, PEFT's hook), then get_peft_model."""
    import peft
    from peft.tuners.lora.config import CordaConfig as CordaPeft
    from peft.tuners.lora.corda import preprocess_corda
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(ALL), init_lora_weights="corda",
                          corda_config=CordaPeft(corda_method=method))
    m = copy.deepcopy(hf)

    def run_model():
        for b in batches:
            for ids, mask in zip(b["input_ids"], b["attention_mask"]):
                m(input_ids=torch.tensor(ids[mask > 0], dtype=torch.long)[None])
    preprocess_corda(m, cfg, run_model=run_model)
    return peft.get_peft_model(m, cfg).eval()


def _corda64(w_OxI, rows, method, scale):
    """PEFT's CorDA factors in float64 from one layer's per-row inputs: (a (in, r), b (r, out))."""
    cov = np.mean([x.T @ x / np.max(x) ** 2 for x in rows], axis=0)
    eye, damp = np.eye(cov.shape[0]), 0.01
    while True:
        fixed = cov + eye * np.mean(np.diag(cov)) * damp
        inv = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inv - eye) < 0.05:
            break
        damp *= 2
    u, s, vh = np.linalg.svd(w_OxI @ fixed, full_matrices=False)
    v = (vh @ inv).T
    pick = slice(0, R) if method == "ipm" else slice(len(s) - R, len(s))
    root = np.sqrt(s[pick] / scale)
    return v[:, pick] * root, root[:, None] * u[:, pick].T


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(model, hf, batches, method):
    before = _snapshot(model.params)
    lora = inits.corda_init(model, _cfg("corda", corda_config=CordaConfig(corda_method=method)), batches)
    assert all(np.array_equal(x, y) for x, y in zip(before, _snapshot(model.params)))
    ours = _per_module(model, lora)
    pm = _peft_corda(hf, batches, method)
    rows, _ = _row_inputs(hf, batches, list(ours))
    s = ALPHA / R
    err_f = err_res = err64 = errp64 = 0.0
    for name, (a, b, a0, b0) in ours.items():
        mod = pm.base_model.model.get_submodule(name)
        A = mod.lora_A["default"].weight.detach().double().numpy().T  # (in, r)
        B = mod.lora_B["default"].weight.detach().double().numpy().T  # (r, out)
        e, sign = _up_to_sign(a, A)
        err_f = max(err_f, e, np.abs(b * sign[:, None] - B).max())
        a64, b64 = _corda64(hf.get_submodule(name).weight.detach().double().numpy(), rows[name], method, s)
        e, sign = _up_to_sign(a, a64)
        err64 = max(err64, e, np.abs(b * sign[:, None] - b64).max())
        e, sign = _up_to_sign(A, a64)
        errp64 = max(errp64, e, np.abs(B * sign[:, None] - b64).max())
        np.testing.assert_array_equal(a, a0)
        np.testing.assert_array_equal(b, b0)
        w0 = hf.get_submodule(name).weight.detach().double().numpy().T
        residual = mod.base_layer.weight.detach().double().numpy().T
        err_res = max(err_res, np.abs(residual - (w0 - s * a0 @ b0)).max())
    RESULTS[f"corda {method} factors"], RESULTS[f"corda {method} residual"] = err_f, err_res
    RESULTS[f"corda {method} ours vs float64"], RESULTS[f"corda {method} peft vs float64"] = err64, errp64
    assert max(err_f, err64) < CORDA_ATOL[method] and err_res < RESIDUAL_ATOL, (err_f, err64, err_res)
    base = _logits(model, model.params, None, batches[0])
    rel = np.abs(_logits(model, model.params, lora, batches[0]) - base).max() / np.abs(base).max()
    RESULTS[f"corda {method} step0 rel"] = rel
    assert rel < STEP0_RTOL
    template = initial_lora(model, RunConfig(lora=_cfg("corda")), jax.random.key(0), template=True)  # for resuming
    assert jax.tree.map(lambda x: (x.shape, x.dtype), template) == jax.tree.map(lambda x: (x.shape, x.dtype), lora)


def test_corda_export_loads_in_peft(model, hf, batches, tmp_path):
    """A moved CorDA adapter exports as rank 2r on the original weights: PEFT's logits equal jaxlora's."""
    import peft
    cfg = _cfg("corda")
    lora = inits.corda_init(model, cfg, batches)
    key = jax.random.key(3)
    lora = jax.tree.map(lambda w: w.replace(a=w.a + 0.05 * jax.random.normal(key, w.a.shape), b=w.b * 1.1), lora,
                        is_leaf=lambda x: isinstance(x, jaxlora.LoraWeights))
    jaxlora.export_peft(model, lora, cfg, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2 * R
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    b = batches[0]
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(b["attention_mask"])).logits.numpy()
    keep = b["attention_mask"].astype(bool)
    err = np.abs(_logits(model, model.params, lora, b)[keep] - ref[keep]).max()
    RESULTS["corda export logits"] = err
    assert err < PEFT_LOGITS_ATOL


# ------------------------------------------------------------------------------------------ errors, train


def test_bad_input_is_one_clear_error(model, batches):
    with pytest.raises(LoraConfigError, match=r"eva_config.rho=2.0 \(rank redistribution\) is not supported"):
        EvaConfig(rho=2.0)
    with pytest.raises(LoraConfigError, match="corda_config.corda_method must be one of"):
        CordaConfig(corda_method="both")
    with pytest.raises(LoraConfigError, match="use_dora with init_lora_weights='corda' is not supported"):
        _cfg("corda", use_dora=True)
    for init in ("eva", "corda"):
        with pytest.raises(LoraGAError, match=f"init_lora_weights='{init}' needs estimation batches"):
            initial_lora(model, RunConfig(lora=_cfg(init)), jax.random.key(0))
    with pytest.raises(LoraGAError, match="EVA needs batches"):
        inits.eva_init(model, _cfg("eva"), [])
    with pytest.raises(LoraGAError, match="CorDA needs batches"):
        inits.corda_init(model, _cfg("corda"), None)
    with pytest.raises(LoraConfigError, match=r"r=20 is larger than a dimension of .*k_proj \(kernel 32x16\)"):
        inits.eva_init(model, LoraConfig(r=20, target_modules=["k_proj"], init_lora_weights="eva"), batches)
    masked = [{**b, "labels": np.full_like(b["labels"], -100)} for b in batches]
    with pytest.raises(LoraGAError, match="EVA: 0 tokens were kept"):
        inits.eva_init(model, _cfg("eva"), masked)


def test_train_from_config(run_config, tmp_path):  # noqa: F811 (test_inits' fixture)
    """`jaxlora train --set lora.init_lora_weights=corda` runs on the trainer's estimation batches (kpm from the
    config) and exports the rank-2r PEFT adapter on the original weights. (EVA's run goes through the same
    `initial_lora` dispatch, checked in test_eva_matches_peft_and_pca; one run keeps the file short.)"""
    assert cli.main(["train", "--config", str(run_config), "--set", "lora.init_lora_weights=corda",
                     "--set", "lora.corda_config.corda_method=kpm", "--set", f"train.output_dir={tmp_path}/run"]) == 0
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 2 * 4
