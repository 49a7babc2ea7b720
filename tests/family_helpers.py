"""What the causal-family test files (test_families, test_qwen3, test_gemma, test_phi3, test_mixtral) share: a tiny
transformers model redrawn so its logits are O(1), the jaxlora model loaded from its folder (built once per module),
the batches, and the checks each family makes against transformers and PEFT (logits and LoRA gradients, PEFT's module
names, export, LoRA-GA at step 0, sharding, generation, packed rows, refused config fields). Each check asserts what
the test files asserted when each had its own copy; a test adds its family's own assertions around it.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util

import jaxlora
from jaxlora import sharding
from jaxlora.generation import generate_ids
from jaxlora.lora import LoraConfig, lora_items, module_names
from jaxlora.sharding import MeshConfig

PARITY_ATOL = 1e-4  # float32, PyTorch vs XLA on CPU
MESH_ATOL = 1e-5
SEQ, VOCAB = 12, 128


def redraw(model, norm_range=(0.5, 1.5), is_norm=lambda key: key.endswith("norm.weight")):
    """`model` (eval mode) with its weights redrawn so logits are O(1): norm weights uniform in `norm_range`,
    everything else (kernels, embeddings, biases) N(0, 0.2)."""
    model = model.eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if is_norm(key):
                p.uniform_(*norm_range)
            else:
                p.normal_(0.0, 0.2)
    return model


def hf_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.float().numpy()


_JITTED: dict = {}


def jax_logits(model, ids, mask=None, lora=None, params=None) -> np.ndarray:
    """`model.apply` jitted once per model (kept alive with it), on the model's params unless `params` are given."""
    if id(model) not in _JITTED:
        _JITTED[id(model)] = (model, jax.jit(lambda p, i, m, lo: model.apply(p, i, m, lora=lo)))
    fn = _JITTED[id(model)][1]
    return np.asarray(fn(model.params if params is None else params, jnp.asarray(ids),
                         None if mask is None else jnp.asarray(mask), lora))


def make_batch(padding: str = "right", seed: int = 0):
    """Ids (2, SEQ) and a mask where row 1 is padded (right: 7 real tokens; left: 5 pads; holes: 3 pads inside)."""
    ids = np.random.RandomState(seed).randint(0, VOCAB, (2, SEQ)).astype(np.int32)
    mask = np.ones((2, SEQ), np.int32)
    if padding == "left":
        mask[1, :5] = 0
    elif padding == "right":
        mask[1, 7:] = 0
    elif padding == "holes":
        mask[1, 3:6] = 0
    return ids, mask


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
    """Imported by a test module: torch on one thread for that module (the CPU is shared with XLA)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Zoo:
    """(hf model, folder, jaxlora model) per variant name, built by `build_hf(name)` once per test module."""

    def __init__(self, build_hf, **load_kwargs):
        self.build_hf, self.load_kwargs, self.built = build_hf, load_kwargs, {}

    def __call__(self, name: str, tmp_path_factory):
        if name not in self.built:
            hf = self.build_hf(name)
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            self.built[name] = (hf, folder, jaxlora.from_pretrained(folder, **self.load_kwargs))
        return self.built[name]


def family_fixtures(model_cls, config_cls, tiny: dict, variants: dict, base: str):
    """(zoo, `variant` fixture, `base` fixture) of a family's test module, to be bound to those three names: the
    variants are `model_cls(config_cls(**tiny, **variants[name]))` seeded with 0 and `redraw`n (logits O(1), norms
    non-trivial); `variant` is (name, hf, folder, model) for each of them, `base` (hf, folder, model) of `base`.
    The jaxlora models live on one device (compiling for one device is several times faster on the CPU's simulated
    eight); the sharded tests load their meshes from the folder."""
    def build_hf(name: str):
        torch.manual_seed(0)
        return redraw(model_cls(config_cls(**{**tiny, **variants[name]})))

    zoo = Zoo(build_hf, mesh=one_device())

    @pytest.fixture(scope="module", params=list(variants), name="variant")
    def variant(request, tmp_path_factory):
        return (request.param, *zoo(request.param, tmp_path_factory))

    @pytest.fixture(scope="module", name="base")
    def base_fixture(tmp_path_factory):
        return zoo(base, tmp_path_factory)

    return zoo, variant, base_fixture


# ------------------------------------------------------------------------------------------ parity and export


def check_logits_match(hf, model, padding: str, errors: dict, name: str):
    """float32 logits of `make_batch(padding)` within PARITY_ATOL of transformers' at the non-pad positions, with
    reference logits large enough for that to mean something; the error goes to `errors` (absolute and relative to
    max |logit|). "unpadded" gives transformers no mask and ours an all-ones one (one compiled forward for the
    three paddings)."""
    ids, mask = make_batch(padding)
    ref, got = hf_logits(hf, ids, None if padding == "unpadded" else mask), jax_logits(model, ids, mask)
    keep = mask.astype(bool)
    err = float(np.abs(got - ref)[keep].max())
    errors[f"{name}/{padding}"] = err
    errors[f"{name}/{padding} (rel. to max|logit|)"] = err / float(np.abs(ref).max())
    assert got.shape == ref.shape == (2, SEQ, VOCAB)
    assert np.abs(ref).max() > 1.0, "reference logits are too small for the tolerance to mean anything"
    assert err < PARITY_ATOL


def check_export_reloads(hf, model, out_dir):
    """`save_pretrained` reloads in transformers as the same class with every tensor equal; returns the reload."""
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(model.save_pretrained(out_dir)).eval()
    assert type(reloaded) is type(hf)
    ref_state, got_state = hf.state_dict(), reloaded.state_dict()
    assert set(ref_state) == set(got_state)
    for key, t in ref_state.items():
        assert torch.equal(t, got_state[key]), key
    return reloaded


def check_packed_row(model):
    """A packed row (attention_mask = segment ids 1, 2; positions restarting at each segment, as `data.packing`
    makes them) gives each sequence the logits it gets alone (right padded), via common.causal_padding_mask."""
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


def check_unsupported_field(tmp_path, hf_config: dict, architecture: str, field: str, change: dict):
    """config.json with `change` fails to load with one ValueError naming `field` and the file."""
    hf = dict(hf_config, architectures=[architecture], **change)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=field) as e:
        jaxlora.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


# ------------------------------------------------------------------------------------------ LoRA and PEFT


def lora_tree(model, lora_config: LoraConfig, factors) -> dict:
    """A LoRA tree placed in the model's LoRA shardings, with `factors(path, names) -> (a, b)` numpy values."""
    shardings = model.lora_shardings(model.lora_targets(lora_config), lora_config)
    flat = {}
    for path, s in lora_items(shardings):
        a, b = factors(path, module_names(path, model.config.num_hidden_layers, model.names.stack_name))
        flat[path] = s.replace(a=jax.device_put(a, s.a), b=jax.device_put(b, s.b))
    return traverse_util.unflatten_dict(flat)


def lora_from_peft(model, pm, lora_config: LoraConfig) -> dict:
    """Our LoRA tree with PEFT's factors copied in: a[i] = lora_A.weight.T, b[i] = lora_B.weight.T."""
    modules = dict(pm.base_model.model.named_modules())
    factor = lambda names, which: np.stack([getattr(modules[n], which)["default"].weight.detach().numpy().T
                                            for n in names])
    return lora_tree(model, lora_config, lambda path, names: (factor(names, "lora_A"), factor(names, "lora_B")))


def check_lora_grads_match_peft(model, pm, grads, rel: float = 1e-4) -> float:
    """Our LoRA gradients equal the ones PEFT's backward left on its factors, within `rel` x max |theirs| per factor;
    returns the worst such relative error."""
    modules = dict(pm.base_model.model.named_modules())
    worst = 0.0
    for path, g in lora_items(grads):
        for i, n in enumerate(module_names(path, model.config.num_hidden_layers, model.names.stack_name)):
            for ours, theirs in ((g.a[i], modules[n].lora_A["default"].weight.grad.T),
                                 (g.b[i], modules[n].lora_B["default"].weight.grad.T)):
                theirs = theirs.numpy()
                np.testing.assert_allclose(np.asarray(ours), theirs, atol=rel * np.abs(theirs).max(), rtol=0)
                worst = max(worst, float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()))
    return worst


def check_lora_matches_peft(model, pm, lora, ids, mask):
    """Logits (non-pad positions) and LoRA gradients of sum(logits * random weights) equal PEFT's for the same
    factors, and the adapter changes the logits; returns (our logits, max-abs logit error)."""
    keep = mask.astype(bool)
    weights = np.random.RandomState(3).normal(size=(*ids.shape, VOCAB)).astype(np.float32) * keep[..., None]
    ref_t = pm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    (ref_t * torch.tensor(weights)).sum().backward()
    got = jax_logits(model, ids, mask, lora=lora)
    err = float(np.abs(got - ref_t.detach().numpy())[keep].max())
    assert err < PARITY_ATOL
    assert np.abs(got - jax_logits(model, ids, mask))[keep].max() > 0.1, "the adapter must change the logits"
    loss = lambda lo: jnp.sum(model.apply(model.params, jnp.asarray(ids), jnp.asarray(mask), lora=lo) * weights)
    check_lora_grads_match_peft(model, pm, jax.jit(jax.grad(loss))(lora))
    return got, err


def check_peft_module_names(hf, model, per_layer: int) -> set[str]:
    """target_modules="all-linear" adapts exactly the modules PEFT's does, `per_layer` of them in each layer."""
    n_layers = model.config.num_hidden_layers
    ours = {n for t in model.lora_targets(LoraConfig(r=2, target_modules="all-linear"))
            for n in module_names(t.path, n_layers, model.names.stack_name)}
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert ours == theirs and len(ours) == per_layer * n_layers
    return ours


def lora_ga_batches(n: int) -> list[dict]:
    """`n` LoRA-GA estimation batches (2, SEQ): row 0 right padded by 4, the first 3 labels of each row ignored."""
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(n):
        ids = rs.randint(3, VOCAB, (2, SEQ)).astype(np.int32)
        mask = np.ones((2, SEQ), np.int32)
        mask[0, SEQ - 4:] = 0
        labels = np.where(mask == 1, ids, -100)
        labels[:, :3] = -100
        batches.append(dict(input_ids=ids * mask, attention_mask=mask, labels=labels))
    return batches


def check_lora_ga_step0(model, cfg: LoraConfig, batches: list[dict], name: str) -> dict:
    """`jaxlora.lora_ga_init` on `batches`: with the init, the step-0 logits of every batch equal the base's (within
    1e-5 x max |logit|); returns the LoRA tree."""
    lora = jaxlora.lora_ga_init(model, cfg, batches, progress=False)
    worst, scale = 0.0, 0.0
    for b in batches:
        ref = jax_logits(model, b["input_ids"], b["attention_mask"])
        got = jax_logits(model, b["input_ids"], b["attention_mask"], lora=lora)
        worst, scale = max(worst, float(np.abs(got - ref).max())), max(scale, float(np.abs(ref).max()))
    print(f"\n{name} LoRA-GA step 0 vs base: max-abs {worst:.3e} (max |logit| {scale:.2f})")
    assert worst < 1e-5 * scale
    return lora


# ------------------------------------------------------------------------------------------ sharding, generation


def one_device():
    return sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])


def check_sharded_equals_single_device(folder, one, mesh_cfg: MeshConfig):
    """The model of `folder` on `mesh_cfg` gives the logits of `one`, that model on one device (batch 8, left
    padded); returns it."""
    assert one.mesh.size == 1
    ids, mask = make_batch("left", seed=1)
    ids, mask = np.concatenate([ids] * 4), np.concatenate([mask] * 4)  # batch 8: one row per data shard
    sharded = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(mesh_cfg))
    np.testing.assert_allclose(jax_logits(sharded, ids, mask), jax_logits(one, ids, mask), atol=MESH_ATOL, rtol=0)
    return sharded


def check_greedy_generation(hf, model, lengths=(3, 9, 1, 17), max_new_tokens: int = 10):
    """Prompts of `lengths` batched together (left padded by generate_ids) generate what transformers' greedy
    generate does on each unpadded prompt, and not all the same."""
    rs = np.random.RandomState(1)
    prompts = [rs.randint(3, VOCAB, n).tolist() for n in lengths]
    ours = generate_ids(model, model.params, prompts, max_new_tokens=max_new_tokens, eos_token_id=2, pad_token_id=0)
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    assert ours == refs
    assert len({tuple(r) for r in refs}) > 1
