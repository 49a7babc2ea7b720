"""LoRA-GA initialization (`jaxlora.lora.ga`) against independent references.

1. A float64 numpy implementation of the OFFICIAL algorithm (../shared/docs/loraga.md sections 1-3, torch layout),
   fed with gradients computed by transformers' torch model in float64: same a0, b0 up to the sign of each singular
   vector, same residual base, for every direction and scale. The gradient itself is checked too.
2. PEFT 0.21 (`preprocess_loraga` + `get_peft_model`, torch float32) against jaxlora's `singular_values_in_b` variant.
3. The model is unchanged at step 0 (exact / randomized / streaming, float32 and bfloat16).
4. The first SGD step of LoRA-GA follows the full fine-tuning step (cosine), plain LoRA does not.
5. Sharded == unsharded.  6. randomized / streaming subspaces vs exact; streaming never forms a full gradient.
7. Caching.  8. Bad input.  9. a0/b0 kept, `residual_params` reproduces the residual bitwise.

Sign convention: a singular pair (u_i, v_i) is defined up to a common sign, and a0 and b0 take DIFFERENT pairs
(e.g. ArB2r: a0 <- pairs 0..r-1, b0 <- pairs r..2r-1), so each column of a0 and each row of b0 carries its own
arbitrary sign, and so does the residual W - s*B@A. Comparisons therefore flip each reference vector to the sign
jaxlora chose, then rebuild the reference residual from the aligned reference factors (float64).

Models live on a single-device mesh except in the sharding test (5), which runs the same init on the 8-device
data mesh and on data=2 x fsdp=2 x tensor=2: on 8 simulated CPU devices every small eager op of the init is an
8-way launch, which would multiply this module's run time for no extra coverage.

Several tests reuse one real gradient estimate instead of re-running `estimate_gradients` for every configuration
(`_use_gradients`): the gradient does not depend on r, direction, scale or svd method, it is checked against torch
float64 once (`test_gradient_matches_torch_float64`), the unpatched end-to-end path is exercised by the `ga_exact`,
streaming, bf16, sharded and cache tests, and it keeps the module within its CPU time budget.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

import jaxlora
from jaxlora import lora as L, sharding
from jaxlora.lora import ga as lora_ga
from jaxlora.lora import LoraConfig, LoraGAConfig, LoraGAError
from jaxlora.lora.weights import LoraWeights
from jaxlora.sharding import MeshConfig

NUM_LAYERS = 2
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
# PEFT comparison model: every kernel has min(in, out) <= 4r = 16, so PEFT's svd_lowrank(q=min(4r, min(shape)))
# sees q = min(shape): its range finder spans the whole space and the SVD is exact up to rounding.
TINY_PEFT = dict(TINY, hidden_size=16, intermediate_size=32)  # head_dim 4: q/o 16x16, k/v 16->8, mlp 16<->32
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GRID = ("k_proj", "gate_proj", "down_proj")  # out < in, out > in, in > out: catches in/out mix-ups in scales
R, ALPHA = 4, 8.0
NB, BS, SEQ = 2, 4, 20  # estimation batches; SEQ, BS*SEQ and q are no kernel dimension (streaming jaxpr test)
DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")

REF_FACTOR_RTOL = 1e-4  # a0/b0 vs float64 reference, relative to the factor's max-abs
REF_RESIDUAL_ATOL = 1e-5  # residual base vs float64 reference (kernels are O(0.2), float32)
GRAD_RTOL = 1e-4  # jaxlora float32 gradient vs torch float64, relative to the gradient's max-abs
PEFT_ATOL = 1e-4  # adapters and residual vs PEFT, float32
STEP0_RTOL_F32 = 1e-5  # logits with (residual, lora) vs the base model, float32: max-abs / max|logits|
#                        (~84 float32 epsilons of the largest logit, through 2 layers, norms and the lm_head)
MESH_ATOL = 1e-5  # sharded vs single-device init
OVERLAP_MIN = 0.99  # randomized (defaults) / streaming (power_iterations=3) vs exact subspace overlap
STREAMING_POWER = 3  # see test_streaming_defaults_overlap: the default (1) reaches ~0.91-0.94 on this tiny model

RESULTS: dict[str, str] = {}  # printed at the end of the module (pytest -s)


def _report(key: str, text: str) -> None:
    RESULTS[key] = text
    print(f"\n[lora_ga] {key}: {text}")


# ---------------------------------------------------------------------------------------------- fixtures


def _save_tiny(path, cfg: dict, seed: int):
    """A tiny untied Llama (GQA) saved by transformers, weights redrawn so logits are O(1)."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if key.endswith("norm.weight") else p.normal_(0.0, 0.2)
    hf.save_pretrained(path)
    return path


def _make_batches(seed: int, vocab: int = 128, n: int = NB) -> list[dict]:
    """Prompt-masked (first 4 labels -100) batches with one right-padded row (pads masked and -100)."""
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        ids = rs.randint(6, vocab, (BS, SEQ)).astype(np.int32)
        mask = np.ones((BS, SEQ), np.int32)
        mask[0, SEQ - 5:] = 0
        ids[mask == 0] = 0
        labels = ids.copy()
        labels[:, :4] = -100
        labels[mask == 0] = -100
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels))
    return out


@pytest.fixture(scope="module", autouse=True)
def _torch_single_thread():
    """torch's intra-op pool spins while it waits and competes with XLA's threads for the CPU cores: one PEFT
    init costs ~1 s of CPU with 2 threads and ~10 ms with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder64(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("llama64"), TINY, seed=0)


@pytest.fixture(scope="module")
def folder16(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("llama16"), TINY_PEFT, seed=1)


@pytest.fixture(scope="module")
def batches():
    return _make_batches(0)


def _single_device_mesh():
    return sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def model64(folder64):
    return jaxlora.from_pretrained(folder64, mesh=_single_device_mesh())


@pytest.fixture(scope="module")
def model16(folder16):
    return jaxlora.from_pretrained(folder16, mesh=_single_device_mesh())


def _cfg(targets=ALL, r=R, alpha=ALPHA, use_rslora=False, **ga) -> LoraConfig:
    ga = dict(dict(batch_size=BS, num_batches=NB, svd_method="exact"), **ga)
    return LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(targets),
                      init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(**ga))


def _flat_kernels(tree) -> dict:
    """{module path: np array (L, in, out)} of a params / gradient tree."""
    return {p[:-1]: np.asarray(jax.device_get(x)) for p, x in traverse_util.flatten_dict(tree).items()
            if p[-1] == "kernel"}


def _estimate(model, batches_):
    targets = model.lora_targets(_cfg(ALL))
    return _flat_kernels(lora_ga.estimate_gradients(model, model.params, targets, batches_, progress=False))


@pytest.fixture(scope="module")
def grads64(model64, batches):
    return _estimate(model64, batches)


@pytest.fixture(scope="module")
def grads16(model16, batches):
    return _estimate(model16, batches)


def _use_gradients(monkeypatch, model, grads, batches_):
    """`estimate_gradients` returns the precomputed (real) estimate of `model` on `batches_` (see module doc)."""
    def fake(m, params, targets, bs, progress=True):
        assert m is model and params is model.params and len(bs) == len(batches_)
        assert all(np.array_equal(x[k], y[k]) for x, y in zip(bs, batches_) for k in x)
        return traverse_util.unflatten_dict({t.path + ("kernel",): jnp.asarray(grads[t.path]) for t in targets})
    monkeypatch.setattr(lora_ga, "estimate_gradients", fake)


def _equivalent_residual(params, lora):
    """W0 - s*a0@b0 (float32, cast back): the base the official code trains against (it rewrites its weights). jaxlora
    leaves W0 untouched and applies s*x@(a@b - a0@b0); comparisons with the references use this equivalent."""
    offsets = jax.tree.map(lambda w: LoraWeights(w.a0, w.b0, scale=w.scale), lora, is_leaf=L.is_lora_leaf)
    return L.unmerge(params, offsets)


def _init(model, cfg, batches_, **kw):
    """(LoRA tree, its equivalent residual base) of the unmodified `lora_ga_init`; the model's params stay untouched."""
    lora = lora_ga.lora_ga_init(model, cfg, batches_, progress=False, **kw)
    return lora, _equivalent_residual(kw.get("params", model.params), lora)


def _items(lora) -> dict:
    return dict(L.lora_items(lora))


@pytest.fixture(scope="module")
def ga_exact(model64, batches):
    """The unpatched end-to-end init (all linear layers, r=4, defaults but svd_method="exact")."""
    t0 = time.perf_counter()
    out = _init(model64, _cfg(ALL), batches)
    jax.block_until_ready(out)
    _report("time ga_exact (unpatched lora_ga_init, compiles the gradient step)", f"{time.perf_counter() - t0:.1f}s")
    return out


# ---------------------------------------------------------------------------------------------- torch references


def _hf_names(path) -> list[str]:
    return L.module_names(path, NUM_LAYERS)


def _torch_token_loss(logits, labels):
    """Mean next-token cross entropy over labels != -100 (as jaxlora.losses.next_token_loss_sums / count)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100, reduction="mean")


def _torch_gradients(folder, batches_, names, dtype=torch.float64):
    """{hf module name: (mean over batches of dL/dW (out, in), W)} from transformers' torch model in `dtype`."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").to(dtype).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    weights = [hf.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    acc = [torch.zeros_like(w) for w in weights]
    for b in batches_:
        logits = hf(input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
                    attention_mask=torch.tensor(b["attention_mask"])).logits
        loss = _torch_token_loss(logits, torch.tensor(b["labels"], dtype=torch.long))
        for a, g in zip(acc, torch.autograd.grad(loss, weights)):
            a += g
    return {n: ((a / len(batches_)).numpy(), w.detach().numpy()) for n, a, w in zip(names, acc, weights)}


@pytest.fixture(scope="module")
def torch64(folder64, batches, model64):
    names = [n for t in model64.lora_targets(_cfg(ALL)) for n in _hf_names(t.path)]
    return _torch_gradients(folder64, batches, names)


def _official_factors(G, W, r, s, direction, scale, gamma, idx=None):
    """The official LoRA-GA init (loraga.md section 3), torch layout, float64: (A (r, n), B (m, r))."""
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    U, Vt = U[:, :2 * r], Vt[:2 * r]
    table = {"ArB2r": (np.arange(r), np.arange(r, 2 * r)),  # (A rows of V^T, B columns of U)
             "A2rBr": (np.arange(r, 2 * r), np.arange(r)),
             "ArBr": (np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2))}
    ia, ib = table[direction] if direction in table else idx
    A, B = Vt[ia], U[:, ib]
    m = G.shape[0]  # out features
    if scale == "stable":
        c = m ** 0.25 / gamma ** 0.5
        A, B = A * c, B * c
    elif scale == "gd_scale":
        A, B = A / s, B / s
    elif scale == "weight_svd":
        c = np.mean(np.sqrt(np.linalg.svd(W, compute_uv=False)[:r] / s))
        A, B = A * c, B * c
    return A, B


def _replay_indices(model, cfg) -> dict:
    """The "random" direction's indices jaxlora drew: `direction_indices` replayed with the same seeded Generator in
    `_build_init`'s order (targets in order, then layers). Any other order would mis-pair and fail the comparison."""
    ga = cfg.lora_ga_config
    rng = np.random.default_rng(ga.seed)
    return {t.path: [lora_ga.direction_indices(ga.direction, t.rank, rng, ga.singular_values_in_b)
                     for _ in range(NUM_LAYERS)] for t in model.lora_targets(cfg)}


def _align_cols(got, ref):
    """ref's columns flipped to got's signs (got, ref (n, k)); the number of flips."""
    signs = np.sign(np.sum(got * ref, axis=0))
    signs[signs == 0] = 1
    return ref * signs[None, :], int(np.sum(signs < 0))


def _compare(got_a, got_b, got_res, A, B, W, s):
    """got_* float32 Flax layout (in, r), (r, out), (in, out); reference A (r, in), B (out, r), W (out, in) float64.
    Returns (a rel err, b rel err, residual max-abs, sign flips)."""
    a_ref, fa = _align_cols(got_a, A.T)
    bT_ref, fb = _align_cols(got_b.T, B)
    res_ref = W - s * bT_ref @ a_ref.T  # (out, in), from the sign-aligned reference factors
    ea = np.abs(got_a - a_ref).max() / np.abs(a_ref).max()
    eb = np.abs(got_b - bT_ref.T).max() / np.abs(bT_ref).max()
    return ea, eb, np.abs(got_res - res_ref.T).max(), fa + fb


# ---------------------------------------------------------------------------------------------- 1. official


def test_gradient_matches_torch_float64(grads64, torch64, model64):
    worst = 0.0
    for t in model64.lora_targets(_cfg(ALL)):
        for layer, name in enumerate(_hf_names(t.path)):
            G = torch64[name][0]
            err = np.abs(grads64[t.path][layer] - G.T).max() / np.abs(G).max()
            worst = max(worst, err)
            assert err < GRAD_RTOL, (name, err)
    _report("gradient vs torch float64", f"max rel err {worst:.2e} (tol {GRAD_RTOL})")


def _check_official(model, lora, residual, torch_ref, cfg, key):
    ga = cfg.lora_ga_config
    idx = _replay_indices(model, cfg) if ga.direction == "random" else None
    items, res = _items(lora), _flat_kernels(residual)
    worst = np.zeros(3)
    flips = 0
    for t in model.lora_targets(cfg):
        w = items[t.path]
        for layer, name in enumerate(_hf_names(t.path)):
            G, W = torch_ref[name]
            if idx is not None:
                ia, ib = idx[t.path][layer]
                assert sorted(np.concatenate([ia, ib]).tolist()) == list(range(2 * t.rank))  # disjoint halves
            A, B = _official_factors(G, W, t.rank, t.scale, ga.direction, ga.scale, ga.stable_gamma,
                                     None if idx is None else idx[t.path][layer])
            ea, eb, er, f = _compare(np.asarray(w.a0[layer]), np.asarray(w.b0[layer]), res[t.path][layer], A, B, W,
                                     t.scale)
            flips += f
            worst = np.maximum(worst, [ea, eb, er])
            assert ea < REF_FACTOR_RTOL and eb < REF_FACTOR_RTOL, (name, ea, eb)
            assert er < REF_RESIDUAL_ATOL, (name, er)
    _report(f"official {key}", f"a0 rel {worst[0]:.1e}, b0 rel {worst[1]:.1e}, residual max-abs {worst[2]:.1e}, "
                               f"sign flips {flips}")


def test_end_to_end_matches_official(model64, ga_exact, torch64):
    """The unpatched lora_ga_init (all linear layers, ArB2r + stable) against the float64 reference."""
    _check_official(model64, *ga_exact, torch64, _cfg(ALL), "end-to-end ArB2r/stable")


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_matches_official(monkeypatch, model64, batches, grads64, torch64, direction, scale):
    _use_gradients(monkeypatch, model64, grads64, batches)
    cfg = _cfg(GRID, direction=direction, scale=scale, seed=3)
    lora, residual = _init(model64, cfg, batches)
    _check_official(model64, lora, residual, torch64, cfg, f"{direction}/{scale}")


# ---------------------------------------------------------------------------------------------- 2. PEFT


def _peft_init(folder, batches_, direction, scale, targets, monkeypatch, random_idx=None):
    """PEFT 0.21: preprocess_loraga over `batches_` (mean token loss per batch, one backward each), get_peft_model.
    Returns {hf name: (A (r, in), B (out, r), W_res (out, in), W0 (out, in), PEFT's gradient (out, in))}.

    Two PEFT calls are made deterministic, each replaced by its exact target:
    - torch.svd_lowrank(M, q): called with q = min(shape) on every gradient here (TINY_PEFT), where it is exact up
      to rounding already; for scale="weight_svd" PEFT calls it on W with q = r, an approximation of W's top
      singular value: the patch sets q = min(shape), so PEFT gets the exact value (jaxlora computes it exactly).
    - "random": PEFT draws torch.randperm(2r)[:r] for each layer; the patch returns the permutation whose first r
      entries are the indices jaxlora drew for that layer (`random_idx`, keyed by module name).
    """
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.loraga import preprocess_loraga

    orig_lowrank = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda A, q=6, niter=2, M=None: orig_lowrank(
        A, q=min(A.shape[-2:]), niter=niter, M=M))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    names = {id(m): n for n, m in hf.named_modules()}
    current = {}
    if random_idx is not None:
        orig_init = LoraLayer.lora_ga_init

        def init_with_name(self, adapter_name, cfg):
            current["name"] = names[id(self.get_base_layer())]
            return orig_init(self, adapter_name, cfg)

        def randperm(n, *a, **k):
            first = np.asarray(random_idx[current["name"]])
            rest = np.setdiff1d(np.arange(n), first)
            return torch.tensor(np.concatenate([first, rest]), dtype=torch.long)
        monkeypatch.setattr(LoraLayer, "lora_ga_init", init_with_name)
        monkeypatch.setattr(torch, "randperm", randperm)

    config = _peft_config(direction, scale, targets)
    w0 = {n: m.weight.detach().clone().numpy() for n, m in hf.named_modules() if n.endswith(targets)}

    def train_step():
        for b in batches_:
            logits = hf(input_ids=torch.tensor(b["input_ids"], dtype=torch.long),
                        attention_mask=torch.tensor(b["attention_mask"])).logits
            _torch_token_loss(logits, torch.tensor(b["labels"], dtype=torch.long)).backward()

    preprocess_loraga(hf, config, train_step)
    grads = {n: m._peft_loraga_grad.clone().numpy() for n, m in hf.named_modules()
             if hasattr(m, "_peft_loraga_grad")}
    import peft
    pm = peft.get_peft_model(hf, config)
    out = {}
    for n in w0:
        m = pm.base_model.model.get_submodule(n)
        out[n] = (m.lora_A["default"].weight.detach().numpy().astype(np.float64),
                  m.lora_B["default"].weight.detach().numpy().astype(np.float64),
                  m.get_base_layer().weight.detach().numpy().astype(np.float64), w0[n], grads[n])
    return out


def _peft_config(direction, scale, targets):
    import peft
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets), init_lora_weights="lora_ga",
                           lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_matches_peft(monkeypatch, folder16, model16, batches, grads16, direction, scale):
    cfg = _cfg(GRID, direction=direction, scale=scale, singular_values_in_b=True, seed=5)
    random_idx = None
    if direction == "random":  # PEFT's variant: the same random half for a and b
        replay = _replay_indices(model16, cfg)
        random_idx = {}
        for t in model16.lora_targets(cfg):
            for layer, name in enumerate(_hf_names(t.path)):
                ia, ib = replay[t.path][layer]
                assert np.array_equal(ia, ib)
                random_idx[name] = ia
    ref = _peft_init(folder16, batches, direction, scale, GRID, monkeypatch, random_idx)
    _use_gradients(monkeypatch, model16, grads16, batches)
    lora, residual = _init(model16, cfg, batches)
    items, res, base = _items(lora), _flat_kernels(residual), _flat_kernels(model16.params)
    worst, flips, gerr = np.zeros(3), 0, 0.0
    for t in model16.lora_targets(cfg):
        w = items[t.path]
        assert w.scale == pytest.approx(ALPHA / R)
        for layer, name in enumerate(_hf_names(t.path)):
            A, B, W_res, W0, G = ref[name]
            np.testing.assert_array_equal(base[t.path][layer], W0.T)  # the same base weights on both sides
            gerr = max(gerr, np.abs(grads16[t.path][layer] - G.T).max() / np.abs(G).max())
            a, b = np.asarray(w.a0[layer]), np.asarray(w.b0[layer])
            a_ref, fa = _align_cols(a, A.T)
            bT_ref, fb = _align_cols(b.T, B)
            flips += fa + fb
            # PEFT's residual, re-expressed with jaxlora's sign choices (equal to it when nothing was flipped)
            res_ref = W_res + t.scale * (B @ A - bT_ref @ a_ref.T)
            errs = [np.abs(a - a_ref).max(), np.abs(b - bT_ref.T).max(), np.abs(res[t.path][layer] - res_ref.T).max()]
            worst = np.maximum(worst, errs)
            assert max(errs) < PEFT_ATOL, (name, errs)
    assert gerr < GRAD_RTOL  # both estimate the same gradient (PEFT's float32 vs jaxlora's)
    _report(f"PEFT {direction}/{scale}", f"max-abs a {worst[0]:.1e}, b {worst[1]:.1e}, residual {worst[2]:.1e}, "
                                         f"sign flips {flips}, gradient rel {gerr:.1e}")


# ---------------------------------------------------------------------------------------------- 3. step 0

_APPLY: dict = {}


def _logits(model, params, lora, batch) -> np.ndarray:
    if id(model) not in _APPLY:  # one jitted apply per model, kept alive with it
        _APPLY[id(model)] = (model, jax.jit(lambda p, i, m, lo: model.apply(p, i, m, lora=lo)))
    fn = _APPLY[id(model)][1]
    return np.asarray(fn(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]), lora),
                      np.float32)


class _Recorder:
    """Wraps `_build_init` to keep the triplets each init factorized (for the subspace test)."""

    def __init__(self):
        self.triplets = None
        self.real = lora_ga.build_init

    def __call__(self, model, params, targets, triplets, *a, **k):
        self.triplets = {p: tuple(np.asarray(x) for x in v) for p, v in triplets.items()}
        return self.real(model, params, targets, triplets, *a, **k)


@pytest.fixture(scope="module")
def inits(model64, batches, grads64, ga_exact):
    """(lora, residual, triplets) for exact (unpatched), randomized (reused gradient) and streaming (unpatched, with
    estimate_gradients raising: streaming must never call it)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        rec = _Recorder()
        mp.setattr(lora_ga, "build_init", rec)
        _use_gradients(mp, model64, grads64, batches)
        _init(model64, _cfg(ALL), batches)  # ga_exact's config on the same gradient: records its triplets
        out["exact"] = (*ga_exact, rec.triplets)
        out["randomized"] = (*_init(model64, _cfg(ALL, svd_method="randomized"), batches), rec.triplets)

        def no_gradients(*a, **k):
            raise AssertionError("streaming must not estimate full gradients")
        mp.setattr(lora_ga, "estimate_gradients", no_gradients)
        t0 = time.perf_counter()
        out["streaming"] = (*_init(model64, _cfg(ALL, svd_method="streaming"), batches), rec.triplets)
        _report("time streaming init (defaults: 4 passes, compiles the sketch step)",
                f"{time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        out["streaming_p3"] = (*_init(model64, _cfg(ALL, svd_method="streaming", power_iterations=STREAMING_POWER),
                                      batches), rec.triplets)
        _report(f"time streaming init (power {STREAMING_POWER}: 8 passes, step reused)",
                f"{time.perf_counter() - t0:.1f}s")
    return out


@pytest.mark.parametrize("method", ["exact", "randomized", "streaming"])
def test_step0_unchanged_float32(model64, batches, inits, method):
    lora, residual, _ = inits[method]
    worst, scale = 0.0, 0.0
    for b in batches:
        base = _logits(model64, model64.params, None, b)
        got = _logits(model64, model64.params, lora, b)  # the base is W0, untouched: the update is a@b - a0@b0
        worst, scale = max(worst, np.abs(got - base).max()), max(scale, np.abs(base).max())
    # the adapter is not a no-op on its own: without its frozen offsets (a0, b0) the logits move
    strip = jax.tree.map(lambda w: LoraWeights(w.a, w.b, scale=w.scale), lora, is_leaf=L.is_lora_leaf)
    moved = np.abs(_logits(model64, model64.params, strip, batches[0]) - _logits(model64, model64.params, None,
                                                                                    batches[0])).max()
    _report(f"step-0 float32 {method}", f"max-abs {worst:.1e} = {worst / scale:.1e} x max|logits| {scale:.1f} "
                                        f"(tol {STEP0_RTOL_F32:.0e}x); the adapter without its offsets moves "
                                        f"them by {moved:.2f}")
    assert moved > 1e-2
    assert worst < STEP0_RTOL_F32 * scale


def test_step0_unchanged_bfloat16(folder64, model64, batches):
    """bf16 base (param and compute dtype). The bound is the bf16 model's own distance to its float32 evaluation
    (same bf16 weights, float32 compute), x2: what the residual design (W0 - s*a0@b0 rounded to bf16) needed, with a
    step-0 error of 0.28 at logits ~7 on SmolLM2. The base is now untouched and the update a@b - a0@b0 is exactly
    zero at step 0 up to the rounding of one rank-2r dot (reported: 0.000 here); a wrong init moves the logits by
    O(1)."""
    m16 = jaxlora.from_pretrained(folder64, dtype="bfloat16", mesh=_single_device_mesh())
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), m16.params)  # the bf16 weights, float32 compute
    lora, _ = _init(m16, _cfg(ALL), batches)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(m16.params))
    assert all(w.a.dtype == jnp.float32 for w in _items(lora).values())
    worst, floor, scale = 0.0, 0.0, 0.0
    for b in batches:
        base = _logits(m16, m16.params, None, b)
        got = _logits(m16, m16.params, lora, b)
        ref32 = _logits(model64, p32, None, b)
        worst, floor = max(worst, np.abs(got - base).max()), max(floor, np.abs(base - ref32).max())
        scale = max(scale, np.abs(base).max())
    _report("step-0 bfloat16", f"max-abs {worst:.3f} (bf16 rounding floor {floor:.3f}, logits max {scale:.1f})")
    assert worst < 2 * floor


def test_dropout_acts_on_the_update_only(model64, batches, inits):
    """LoRA dropout (train mode) on a LoRA-GA adapter acts on the whole update s*drop(x)@(a@b - a0@b0), so (a) training
    starts at the base model (to rounding), and (b) at any a, b the model equals the exported adapter a' = [a, a0],
    b' = [b, -b0] on the ORIGINAL base under the same dropout mask, logits and gradients of a, b (PEFT's semantics for
    that adapter), with no special case. (The official code's residual design drops the input of the whole branch,
    which moved the step-0 logits by O(1): SmolLM2 r=8, dropout 0.05: loss 16.2 vs 12.7.)"""
    import dataclasses
    p_drop = 0.3
    lora, _, _ = inits["exact"]
    params = model64.params  # W0: never modified
    with_drop = lambda tree: jax.tree.map(lambda w: dataclasses.replace(w, dropout=p_drop), tree, is_leaf=L.is_lora_leaf)
    lora = with_drop(lora)
    b = {k: jnp.asarray(v) for k, v in batches[0].items()}
    rng = jax.random.key(7)

    def train_logits(params, lo):
        return model64.apply(params, b["input_ids"], b["attention_mask"], lora=lo, deterministic=False,
                             dropout_rng=rng)
    base = np.asarray(model64.apply(model64.params, b["input_ids"], b["attention_mask"]))
    step0 = np.asarray(jax.jit(train_logits)(params, lora))
    scale = np.abs(base).max()
    assert np.abs(step0 - base).max() < STEP0_RTOL_F32 * scale

    # move a and b away from a0, b0 (as training does) and compare with the exported adapter on the original base
    keys = iter(jax.random.split(jax.random.key(3), 1000))
    moved = jax.tree.map(lambda w: dataclasses.replace(w, a=w.a + 0.05 * jax.random.normal(next(keys), w.a.shape),
                                                       b=w.b + 0.05 * jax.random.normal(next(keys), w.b.shape)),
                         lora, is_leaf=L.is_lora_leaf)
    exported = jax.tree.map(lambda w: LoraWeights(jnp.concatenate([w.a, w.a0], -1), jnp.concatenate([w.b, -w.b0], -2),
                                                  scale=w.scale, dropout=p_drop), moved, is_leaf=L.is_lora_leaf)
    ours = np.asarray(jax.jit(train_logits)(params, moved))
    theirs = np.asarray(jax.jit(train_logits)(model64.params, exported))
    assert np.abs(ours - np.asarray(jax.jit(train_logits)(params, lora))).max() > 1e-2  # the masks do matter
    assert np.abs(ours - theirs).max() < STEP0_RTOL_F32 * np.abs(theirs).max()

    grad = lambda params, lo: jax.jit(jax.grad(lambda lo: jnp.sum(train_logits(params, lo) ** 2) / base.size))(lo)
    g_ours, g_theirs = _items(grad(params, moved)), _items(grad(model64.params, exported))
    worst = 0.0
    for path, g in g_ours.items():
        rank = g.a.shape[-1]
        ref_a, ref_b = g_theirs[path].a[..., :rank], g_theirs[path].b[..., :rank, :]
        worst = max(worst, float(jnp.abs(g.a - ref_a).max() / jnp.abs(ref_a).max()),
                    float(jnp.abs(g.b - ref_b).max() / jnp.abs(ref_b).max()))
        assert g.a0 is None or float(jnp.abs(g.a0).max()) == 0.0  # a0, b0 stay frozen
    _report("LoRA dropout on a LoRA-GA adapter", f"step 0 train mode vs base {np.abs(step0 - base).max():.1e}; "
                                                 f"vs exported adapter on W0: logits {np.abs(ours - theirs).max():.1e}, "
                                                 f"gradients {worst:.1e} x max")
    assert worst < GRAD_RTOL


# ---------------------------------------------------------------------------------------------- 4. first step


def _first_step_cosines(model, params, lora_ab, batches_, grads, lr):
    """One SGD step on the estimation batches (the loss whose gradient LoRA-GA factorized). Returns (global cosine,
    per-layer cosines, second-order share) of the effective weight change s*(a'b' - ab) with -lr*G."""
    device_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches_]

    def loss(lora, params, bs):
        return sum(lora_ga.mean_loss(model, params, lora, b)[0] for b in bs) / len(bs)
    gl = jax.jit(jax.grad(loss))(lora_ab, params, device_batches)
    dots = norms_lora = norms_full = 0.0
    per_layer, second = [], 0.0
    for path, w in L.lora_items(lora_ab):
        ga = dict(L.lora_items(gl))[path]
        a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
        da, db = np.asarray(ga.a, np.float64), np.asarray(ga.b, np.float64)
        for layer in range(a.shape[0]):
            new = (a[layer] - lr * da[layer]) @ (b[layer] - lr * db[layer])
            dw = w.scale * (new - a[layer] @ b[layer])
            full = -lr * grads[path][layer].astype(np.float64)
            second = max(second, np.linalg.norm(w.scale * lr ** 2 * da[layer] @ db[layer]) / np.linalg.norm(dw))
            dots += np.sum(dw * full)
            norms_lora += np.sum(dw ** 2)
            norms_full += np.sum(full ** 2)
            per_layer.append((path, layer, np.sum(dw * full) / np.linalg.norm(dw) / np.linalg.norm(full)))
    return dots / np.sqrt(norms_lora * norms_full), per_layer, second


def test_first_step_follows_full_finetuning(monkeypatch, model64, batches, grads64):
    """LoRA-GA (ArB2r + stable, rsLoRA alpha 16, r=16): the first SGD step moves W + s*a@b by
    -lr s^2 c^2 (U_r U_r^T G + G V_{r:2r} V_{r:2r}^T) = -lr s^2 c^2 G_2r, so per layer the cosine with the full step
    -lr G is ||G_2r||_F / ||G||_F exactly (up to the lr^2 term). Plain LoRA (kaiming a, b = 0) moves by
    -lr s^2 a a^T G only."""
    r, alpha, lr = 16, 16.0, 1e-4
    _use_gradients(monkeypatch, model64, grads64, batches)
    cfg = _cfg(ALL, r=r, alpha=alpha, use_rslora=True)
    lora, residual = _init(model64, cfg, batches)
    strip = lambda tree: jax.tree.map(lambda w: LoraWeights(w.a, w.b, scale=w.scale, dropout=w.dropout), tree,
                                      is_leaf=lambda x: isinstance(x, LoraWeights))
    cos_ga, per_layer, second = _first_step_cosines(model64, residual, strip(lora), batches, grads64, lr)
    energy = []
    for path, layer, c in per_layer:
        s = np.linalg.svd(grads64[path][layer].astype(np.float64), compute_uv=False)
        e = np.sum(s[:2 * r] ** 2) / np.sum(s ** 2)
        energy.append(e)
        assert abs(c - np.sqrt(e)) < 1e-3, (path, layer, c, np.sqrt(e))
    plain_cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=list(ALL))
    plain = L.init_lora(model64, plain_cfg, jax.random.key(0))
    cos_plain, plain_layers, _ = _first_step_cosines(model64, model64.params, plain, batches, grads64, lr)
    _report("first SGD step cosine with full fine-tuning",
            f"LoRA-GA {cos_ga:.4f} (per layer {min(c for *_, c in per_layer):.3f}..{max(c for *_, c in per_layer):.3f};"
            f" top-2r={2 * r} of the gradient's energy {min(energy):.3f}..{max(energy):.3f}; lr^2 term "
            f"{second:.1e}); plain LoRA {cos_plain:.4f} (per layer {min(c for *_, c in plain_layers):.3f}.."
            f"{max(c for *_, c in plain_layers):.3f}); r={r}, rsLoRA alpha={alpha}")
    assert cos_ga > 0.9
    assert cos_plain < 0.6 and cos_ga - cos_plain > 0.3


# ---------------------------------------------------------------------------------------------- 5. sharding


def test_packed_batches_keep_the_statistic(model64):
    """2-row estimation batches of different lengths packed for an 8-way batch axis (4 per packed batch: 3 real
    groups + 1 empty): right-padded, grouped, and the packed loss (sum of per-group means) equals the sum of the
    batches' own mean losses, so the accumulated gradient is the same statistic."""
    rs = np.random.RandomState(3)
    originals = []
    for t in (12, 20, 16):
        ids = rs.randint(6, 128, (2, t)).astype(np.int32)
        labels = ids.copy()
        labels[:, :3] = -100
        originals.append(dict(input_ids=ids, attention_mask=np.ones_like(ids), labels=labels, extra=ids))
    packed, groups = lora_ga.pack_batches(originals, divisor=8)
    assert groups == 4 and len(packed) == 1
    (p,) = packed
    assert set(p) == {"input_ids", "attention_mask", "labels", "group"}
    assert p["input_ids"].shape == (8, 20) and p["group"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (p["attention_mask"][:2, 12:] == 0).all() and (p["labels"][:2, 12:] == -100).all()
    assert (p["labels"][6:] == -100).all()  # the empty group
    params = model64.params
    packed_loss, packed_count = lora_ga.mean_loss(model64, params, None, {k: jnp.asarray(v) for k, v in p.items()},
                                                   groups)
    singles = [lora_ga.mean_loss(model64, params, None, {k: jnp.asarray(b[k]) for k in lora_ga.BATCH_KEYS})
               for b in originals]
    np.testing.assert_allclose(float(packed_loss), sum(float(x) for x, _ in singles), rtol=1e-6)
    assert float(packed_count) == sum(float(n) for _, n in singles)
    assert lora_ga.pack_batches(originals[:1], divisor=2)[1] == 1  # 2 rows already divide a 2-way batch axis


def test_sharded_equals_single_device(folder64, batches, ga_exact):
    """ga_exact (single device) against the same unpatched init on the 8-device data mesh (the two 4-row batches are
    packed into one 8-row batch there, `lora_ga.pack_batches`) and on data=2 x fsdp=2 x tensor=2 (kernels split over fsdp and tensor, batch over data x fsdp).
    Targets q_proj (embed -> heads), k_proj (embed -> kv heads) and down_proj (mlp -> embed) cover both kernel
    orientations; each target's init depends on its own gradient only, so ga_exact's (all targets) is the reference."""
    targets = ("q_proj", "k_proj", "down_proj")
    meshes = {"data8": MeshConfig(data=8), "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2)}
    runs = {k: _init(jaxlora.from_pretrained(folder64, mesh=sharding.make_mesh(m)), _cfg(targets), batches)
            for k, m in meshes.items()}
    ref_items, ref_k = _items(ga_exact[0]), _flat_kernels(ga_exact[1])
    worst = {}
    for key, (lora, res) in runs.items():
        items, k = _items(lora), _flat_kernels(res)
        assert len(items) == len(targets)
        errs = [0.0]
        for p, w in ref_items.items():
            if p not in items:
                continue
            for f in ("a", "b", "a0", "b0"):
                errs.append(np.abs(np.asarray(getattr(items[p], f)) - np.asarray(getattr(w, f))).max())
            errs.append(np.abs(k[p] - ref_k[p]).max())
        worst[key] = max(errs)
    sh_lora = _items(runs["data2_fsdp2_tensor2"][0])
    q = sh_lora[("model", "layers", "self_attn", "q_proj")]
    assert q.a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert q.b0.sharding.spec == jax.sharding.PartitionSpec(None, None, ("tensor", "fsdp"))  # out dim, fsdp unused
    _report("sharded vs single device", ", ".join(f"{k}: {v:.1e}" for k, v in worst.items()) + f" (tol {MESH_ATOL})")
    assert max(worst.values()) < MESH_ATOL


# ---------------------------------------------------------------------------------------------- 6. subspaces


def _overlap(x, y) -> float:
    """||Qx^T Qy||_F^2 / k for the column spaces of x, y (n, k): 1 = same subspace."""
    qx, qy = np.linalg.qr(x.astype(np.float64))[0], np.linalg.qr(y.astype(np.float64))[0]
    return float(np.sum((qx.T @ qy) ** 2) / x.shape[1])


def _overlaps(inits, method) -> dict:
    lo_e, _, trip_e = inits["exact"]
    lo_m, _, trip_m = inits[method]
    ie, im = _items(lo_e), _items(lo_m)
    worst = dict(a=1.0, b=1.0, u2r=1.0, v2r=1.0)
    for p in ie:
        for layer in range(NUM_LAYERS):
            r = ie[p].rank
            worst["a"] = min(worst["a"], _overlap(np.asarray(ie[p].a0[layer]), np.asarray(im[p].a0[layer])))
            worst["b"] = min(worst["b"], _overlap(np.asarray(ie[p].b0[layer]).T, np.asarray(im[p].b0[layer]).T))
            (ue, _, vte), (um, _, vtm) = trip_e[p], trip_m[p]
            worst["u2r"] = min(worst["u2r"], _overlap(ue[layer][:, :2 * r], um[layer][:, :2 * r]))
            worst["v2r"] = min(worst["v2r"], _overlap(vte[layer][:2 * r].T, vtm[layer][:2 * r].T))
    return worst


@pytest.mark.parametrize("method", ["randomized", "streaming_p3"])
def test_subspaces_match_exact(inits, method):
    """Worst over targets and layers of ||Q_exact^T Q_method||_F^2 / k for a0's columns (k = r), b0's rows, and the
    top-2r left (u2r) and right (v2r) singular subspaces; randomized at its defaults (q = 4r, 4 power iterations),
    streaming with q = 4r and 3 power iterations (8 passes)."""
    worst = _overlaps(inits, method)
    _report(f"subspace overlap {method} vs exact", ", ".join(f"{k} {v:.5f}" for k, v in worst.items()))
    assert min(worst.values()) > OVERLAP_MIN


def test_streaming_defaults_overlap(inits):
    worst = _overlaps(inits, "streaming")
    _report("subspace overlap streaming (defaults) vs exact", ", ".join(f"{k} {v:.5f}" for k, v in worst.items()))
    assert min(worst.values()) > OVERLAP_MIN


def _jaxpr_shapes(jaxpr) -> list[tuple]:
    """Shapes of every equation output, recursively through sub-jaxprs (scan, pjit, custom_vjp, ...)."""
    out = []

    def subs(v):
        if hasattr(v, "eqns"):
            yield v
        elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
            yield v.jaxpr
        elif isinstance(v, (tuple, list)):
            for x in v:
                yield from subs(x)

    def walk(j):
        for eqn in j.eqns:
            out.extend(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
            for v in eqn.params.values():
                for s in subs(v):
                    walk(s)
    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
    return out


def test_streaming_never_forms_a_full_gradient(model64, batches):
    """The sketch step's jaxpr (every intermediate, through the layer scan) has no array with a target kernel's
    (in, out) or (out, in) trailing shape, while the same model's gradient w.r.t. the kernels (what exact and
    randomized estimate) does: the detector is not vacuous. (streaming_factorize also ran in `inits` with
    estimate_gradients raising.)"""
    cfg = _cfg(ALL, svd_method="streaming")
    targets = model64.lora_targets(cfg)
    flat = traverse_util.flatten_dict(model64.abstract_params)
    kshapes = set()
    for t in targets:
        d_in, d_out = flat[t.path + ("kernel",)].shape[-2:]
        kshapes |= {(d_in, d_out), (d_out, d_in)}
    q = lora_ga.sketch_rank(cfg.lora_ga_config, R, 64, 64)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}

    def make(t):
        *lead, d_in, d_out = flat[t.path + ("kernel",)].shape
        return LoraWeights(jnp.zeros((*lead, d_in, q)), jnp.zeros((*lead, q, d_out)), scale=1.0)
    lora = L.build_lora_tree(targets, make)
    step = lora_ga.make_sketch_step(model64, targets, BS)
    sketch = _jaxpr_shapes(jax.make_jaxpr(step)(lora, model64.params, lora, batch))
    full_size = [s for s in sketch if len(s) >= 2 and s[-2:] in kshapes]
    kernels = {t.path + ("kernel",): flat[t.path + ("kernel",)] for t in targets}

    def grad_kernels(params, batch):
        def loss(k):
            return lora_ga.mean_loss(model64, L.overlay(params, traverse_util.unflatten_dict(k)), None, batch)[0]
        return jax.grad(loss)({p: params_flat[p] for p in kernels})
    params_flat = traverse_util.flatten_dict(model64.params)
    control = _jaxpr_shapes(jax.make_jaxpr(grad_kernels)(model64.params, batch))
    control_full = [s for s in control if len(s) >= 2 and s[-2:] in kshapes]
    _report("streaming jaxpr", f"{len(sketch)} intermediates, {len(full_size)} kernel-shaped (control: "
                               f"{len(control_full)} of {len(control)}); q={q}")
    assert control_full, "detector found no full-size gradient in the kernel-gradient jaxpr"
    assert not full_size, full_size[:5]


# ---------------------------------------------------------------------------------------------- 7. caching


def test_cache(monkeypatch, tmp_path, model64, batches, grads64):
    calls = []
    _use_gradients(monkeypatch, model64, grads64, batches)
    fake = lora_ga.estimate_gradients

    def counting(*a, **k):
        calls.append(1)
        return fake(*a, **k)
    monkeypatch.setattr(lora_ga, "estimate_gradients", counting)
    cfg = _cfg(GRID, cache_dir=str(tmp_path))
    lora1, res1 = _init(model64, cfg, batches)
    assert len(calls) == 1
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} == {"gradients.safetensors",
                                                                            "init.safetensors"}

    class Estimated(Exception):
        pass

    def refuse(*a, **k):
        raise Estimated

    monkeypatch.setattr(lora_ga, "estimate_gradients", refuse)
    lora2, res2 = _init(model64, cfg, batches)  # hit: no estimation
    for x, y in zip(jax.tree.leaves((lora1, res1)), jax.tree.leaves((lora2, res2))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(lora1) == jax.tree.structure(lora2)
    assert all(w.scale == v.scale for w, v in zip(_items(lora1).values(), _items(lora2).values()))
    with pytest.raises(Estimated):  # another direction: miss
        _init(model64, _cfg(GRID, cache_dir=str(tmp_path), direction="A2rBr"), batches)
    other = [dict(b) for b in batches]
    other[1] = dict(other[1], labels=np.where(np.arange(SEQ) < 6, -100, other[1]["labels"]))
    with pytest.raises(Estimated):  # other batches (a different prompt mask): miss
        _init(model64, cfg, other)
    # other weights under the same model path (a re-saved checkpoint): miss
    def with_up_proj(f):
        flat = traverse_util.flatten_dict(model64.params)
        key = ("model", "layers", "mlp", "up_proj", "kernel")
        return traverse_util.unflatten_dict({**flat, key: f(flat[key])})
    with pytest.raises(Estimated):
        _init(model64, cfg, batches, params=with_up_proj(lambda k: k * 1.001))
    same = lora_ga.weights_fingerprint(model64.params)
    assert lora_ga.weights_fingerprint(with_up_proj(lambda k: k + 0.0)) == same
    assert lora_ga.weights_fingerprint(with_up_proj(lambda k: k[..., ::-1])) != same  # same values, other places


def test_fewer_batches_than_configured_warns(model64, batches, caplog):
    with caplog.at_level("WARNING", logger="jaxlora.lora.ga"):
        _init(model64, _cfg(GRID, num_batches=5), batches)
    assert f"{len(batches)} estimation batches were given, fewer than num_batches=5" in caplog.text


# ---------------------------------------------------------------------------------------------- 8. bad input


def test_integer_base_weights(model64, batches):
    flat = traverse_util.flatten_dict(model64.abstract_params)
    path = ("model", "layers", "self_attn", "k_proj", "kernel")
    flat[path] = jax.ShapeDtypeStruct(flat[path].shape, jnp.int8)
    params = traverse_util.flatten_dict(model64.params)
    params[path] = params[path].astype(jnp.int8)
    bad = object.__new__(type(model64))
    bad.__dict__.update(model64.__dict__, abstract_params=traverse_util.unflatten_dict(flat))
    bad.params = traverse_util.unflatten_dict(params)
    with pytest.raises(LoraGAError, match=r"model\.layers\.0\.self_attn\.k_proj is int8"):
        _init(bad, _cfg(ALL), batches)


def test_rank_too_large(model64, batches):
    with pytest.raises(LoraGAError, match=r"2r <= min\(in, out\); model\.layers\.0\.self_attn\.k_proj is 64x32"):
        _init(model64, _cfg(("q_proj", "k_proj"), r=17), batches)


@pytest.mark.parametrize("method", ["exact", "streaming"])
def test_every_label_masked(model64, batches, method):
    masked = [dict(b, labels=np.full_like(b["labels"], -100)) for b in batches]
    with pytest.raises(LoraGAError, match=r"masked") as e:
        _init(model64, _cfg(ALL, svd_method=method), masked)
    if method == "streaming":  # no token count on this path: the all-zero sketch names the layer
        assert "all zero" in str(e.value) and "model.layers.0." in str(e.value)


def _with_kernel(model, name, layer, fn):
    flat = traverse_util.flatten_dict(model.params)
    path = ("model", "layers") + (("self_attn",) if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                                  else ("mlp",)) + (name, "kernel")
    flat[path] = flat[path].at[layer].set(fn(flat[path][layer]))
    return jax.device_put(traverse_util.unflatten_dict(flat), model.param_shardings)


def test_non_finite_gradient_names_the_layer(model64, batches):
    params = _with_kernel(model64, "o_proj", 1, lambda k: k.at[3, 5].set(jnp.nan))
    with pytest.raises(LoraGAError, match=r"gradient of model\.layers\.\d\.(self_attn|mlp)\.\w+_proj is not finite"):
        _init(model64, _cfg(ALL), batches, params=params)


@pytest.mark.parametrize("method", ["exact", "streaming"])
def test_zero_gradient_in_one_layer_names_it(model64, batches, method):
    """k_proj = 0 in layer 1 makes every attention score of that layer 0 whatever q is, so q_proj's gradient is
    exactly zero in layer 1 only; the init must stop naming that layer, not factorize a zero matrix."""
    params = _with_kernel(model64, "k_proj", 1, jnp.zeros_like)
    with pytest.raises(LoraGAError, match=r"gradient of model\.layers\.1\.self_attn\.q_proj is all zero"):
        _init(model64, _cfg(ALL, svd_method=method), batches, params=params)


def test_not_lora_ga_config(model64, batches):
    with pytest.raises(LoraGAError, match="init_lora_weights='lora_ga'"):
        lora_ga.lora_ga_init(model64, LoraConfig(r=4, target_modules=["q_proj"]), batches)


# ---------------------------------------------------------------------------------------------- 9. a0/b0, the base


def test_base_untouched_and_a0_b0_kept(folder64, model64, ga_exact):
    """The init leaves the loaded base bitwise as it was (LoRA-GA never rewrites W0); a0/b0 are kept (frozen, copies
    of a/b in the same shardings); the equivalent residual W0 - s*a0@b0 differs from W0 in exactly the targets."""
    lora, residual = ga_exact
    fresh = jaxlora.from_pretrained(folder64, mesh=_single_device_mesh())
    for (pa, x), (pb, y) in zip(traverse_util.flatten_dict(model64.params).items(),
                                traverse_util.flatten_dict(fresh.params).items()):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(pa))
    for path, w in L.lora_items(lora):
        assert w.relative_to_base and w.a0.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(w.a0), np.asarray(w.a))
        np.testing.assert_array_equal(np.asarray(w.b0), np.asarray(w.b))
        assert w.a0.sharding == w.a.sharding and w.b0.sharding == w.b.sharding
    flat_res, flat_base = traverse_util.flatten_dict(residual), traverse_util.flatten_dict(model64.params)
    changed = sum(not np.array_equal(np.asarray(flat_res[k]), np.asarray(flat_base[k])) for k in flat_res)
    assert changed == len(ALL)  # the update relative to W0 touches exactly the targeted kernels
    template = lora_ga.lora_ga_template(model64, _cfg(ALL))
    assert jax.tree.structure(template) == jax.tree.structure(lora)
    assert all(x.shape == y.shape and x.sharding == y.sharding
               for x, y in zip(jax.tree.leaves(template), jax.tree.leaves(lora)))


def test_two_lora_ga_adapters_share_one_base(model64, batches, ga_exact):
    """Two LoRA-GA adapters (all linear layers r=4, and q/v r=2 from other estimation batches) on the one base: each
    starts at the base, each trained copy gives its own model, switching is switching trees, and the base is never
    copied or modified (bitwise)."""
    lora_1, _ = ga_exact
    lora_2, _ = _init(model64, _cfg(("q_proj", "v_proj"), r=2), batches[::-1])
    before = [np.asarray(x).copy() for x in jax.tree.leaves(model64.params)]
    b = batches[0]
    base = _logits(model64, model64.params, None, b)
    scale = np.abs(base).max()
    for lo in (lora_1, lora_2):
        assert np.abs(_logits(model64, model64.params, lo, b) - base).max() < STEP0_RTOL_F32 * scale
    keys = iter(jax.random.split(jax.random.key(5), 1000))
    move = lambda tree: jax.tree.map(lambda w: w.replace(a=w.a + 0.05 * jax.random.normal(next(keys), w.a.shape),
                                                         b=w.b + 0.05 * jax.random.normal(next(keys), w.b.shape)),
                                     tree, is_leaf=L.is_lora_leaf)
    moved_1, moved_2 = move(lora_1), move(lora_2)
    out_1, out_2 = _logits(model64, model64.params, moved_1, b), _logits(model64, model64.params, moved_2, b)
    assert np.abs(out_1 - base).max() > 1e-2 and np.abs(out_2 - base).max() > 1e-2 and np.abs(out_1 - out_2).max() > 1e-2
    for lo, out in ((moved_1, out_1), (moved_2, out_2)):  # each equals its own merged model W0 + s*(a@b - a0@b0)
        merged = _logits(model64, L.merge(model64.params, lo), None, b)
        assert np.abs(merged - out).max() < STEP0_RTOL_F32 * scale
    np.testing.assert_array_equal(_logits(model64, model64.params, moved_1, b), out_1)  # switching back: the same
    for x, y in zip(before, jax.tree.leaves(model64.params)):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_training_step_keeps_base_and_offsets_frozen(model64, batches):
    """A LoRA-GA run's train step (the one training build): a0/b0 live in `state.frozen`, outside the trainable tree,
    with no optimizer state; after steps the base is bitwise the loaded one and a0/b0 are unchanged while a/b move."""
    from jaxlora.config import RunConfig
    from jaxlora.training import optim
    from jaxlora.training.build import build_training
    from jaxlora.training.step import place_batch
    cfg = _cfg(("q_proj", "down_proj"))
    run = RunConfig(lora=cfg, optim=optim.OptimConfig(learning_rate=1e-3, schedule="constant"))
    training = build_training(model64, run, total_steps=4, lora_ga_batches=batches)
    state = training.state
    frozen0 = jax.tree.map(lambda x: np.asarray(x).copy(), state.frozen)
    ab0 = jax.tree.map(lambda x: np.asarray(x).copy(), state.trainable["lora"])
    base0 = [np.asarray(x).copy() for x in jax.tree.leaves(model64.params)]
    names = {getattr(k, "name", getattr(k, "key", None)) for p, _ in jax.tree_util.tree_leaves_with_path(state.trainable)
             for k in p}
    assert "a0" not in names and "b0" not in names
    assert len(jax.tree.leaves(state.frozen)) == len(jax.tree.leaves(state.trainable["lora"]))  # a0, b0 per a, b
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert n_opt <= 2 * sum(x.size for x in jax.tree.leaves(state.trainable)) + 16  # Adam's mu, nu of a/b only
    losses = []
    for b in batches:
        state, metrics = training.train_step(training.params, state, place_batch(b, model64.mesh))
        losses.append(float(metrics["loss"]))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y)), frozen0, state.frozen)
    assert any(not np.array_equal(x, np.asarray(y)) for x, y in zip(jax.tree.leaves(ab0),
                                                                   jax.tree.leaves(state.trainable["lora"])))
    for x, y in zip(base0, jax.tree.leaves(model64.params)):
        np.testing.assert_array_equal(x, np.asarray(y))
    assert all(np.isfinite(losses))


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    """Prints the figures the tests above report (pytest -s), after the module."""
    yield
    print("\n==== LoRA-GA test figures ====")
    for k, v in RESULTS.items():
        print(f"{k}: {v}")
