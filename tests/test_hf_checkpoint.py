"""HF safetensors import/export: round trips through transformers, sharded files, merged export, bfloat16, and a
clear error for each kind of bad input (and no half-written export folder, ever)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import jaxlora
from jaxlora.io import hf_checkpoint
from jaxlora.io.hf_checkpoint import CheckpointError
from jaxlora.lora import LoraConfig, init_lora, merge

ATOL = 1e-4  # float32, PyTorch vs XLA on CPU
SEQ = 10
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def build_hf(seed=0, dtype=torch.float32, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random Llama with O(1) logits and non-trivial norm weights."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if key.endswith("norm.weight") else p.normal_(0.0, 0.2)
    return model.to(dtype)


def batch():
    ids = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, SEQ)).astype(np.int32)
    return ids, np.ones_like(ids)


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def jax_logits(model, ids, params=None, lora=None) -> np.ndarray:
    return np.asarray(model.apply(model.params if params is None else params, jnp.asarray(ids), lora=lora))


def hf_reload(folder) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def file_tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(transformers model, its save_pretrained folder, the jaxlora model loaded from it)."""
    hf = build_hf()
    folder = tmp_path_factory.mktemp("src")
    hf.save_pretrained(folder)
    return hf, folder, jaxlora.from_pretrained(folder)


# ------------------------------------------------------------------------------------------ export


def test_export_reloads_in_transformers(source, tmp_path):
    hf, folder, model = source
    ids, _ = batch()
    out = model.save_pretrained(tmp_path / "export")
    # weights, config, and the source folder's side files (here transformers' generation_config.json)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # same keys and bitwise the same tensors as the source checkpoint
    src, exp = safetensors.torch.load_file(folder / "model.safetensors"), safetensors.torch.load_file(
        out / "model.safetensors")
    assert set(exp) == set(src)
    for key in src:
        assert torch.equal(exp[key], src[key]), key
    reloaded = torch_logits(hf_reload(out), ids)
    np.testing.assert_allclose(reloaded, jax_logits(model, ids), atol=ATOL, rtol=0)
    np.testing.assert_allclose(reloaded, torch_logits(hf, ids), atol=1e-6, rtol=0)


def test_tied_export_reloads_in_transformers(tmp_path):
    hf = build_hf(seed=2, tie_word_embeddings=True, head_dim=32)
    hf.save_pretrained(tmp_path / "src")
    model = jaxlora.from_pretrained(tmp_path / "src")
    out = model.save_pretrained(tmp_path / "export")
    assert "lm_head.weight" not in safetensors.torch.load_file(out / "model.safetensors")
    ids, _ = batch()
    reloaded = hf_reload(out)
    assert reloaded.config.tie_word_embeddings
    np.testing.assert_allclose(torch_logits(reloaded, ids), jax_logits(model, ids), atol=ATOL, rtol=0)


def test_sharded_export_with_index(source, tmp_path):
    hf, _, model = source
    ids, _ = batch()
    out = model.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and "model.safetensors" not in shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(hf.state_dict())
    sizes = {}
    for name in shards:
        for key, t in safetensors.torch.load_file(out / name).items():
            assert index["weight_map"][key] == name
            sizes[name] = sizes.get(name, 0) + t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == sum(sizes.values())
    big = max(t.numel() * 4 for t in hf.state_dict().values())
    assert all(s <= max(40_000, big) for s in sizes.values())

    np.testing.assert_allclose(torch_logits(hf_reload(out), ids), jax_logits(model, ids), atol=ATOL, rtol=0)
    again = jaxlora.from_pretrained(out)  # jaxlora reads the index too
    for x, y in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_merged_export_matches_unmerged_lora(source, tmp_path):
    _, _, model = source
    ids, _ = batch()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                     init_lora_weights=False)
    lora = init_lora(model, cfg, jax.random.key(3))
    unmerged = jax_logits(model, ids, lora=lora)
    assert np.abs(unmerged - jax_logits(model, ids)).max() > 0.1  # the adapter changes the model
    out = model.save_pretrained(tmp_path / "merged", params=merge(model.params, lora))
    np.testing.assert_allclose(torch_logits(hf_reload(out), ids), unmerged, atol=ATOL, rtol=0)


def test_bfloat16_checkpoint_loads_bit_identical(tmp_path):
    hf = build_hf(seed=1, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    header_len = int.from_bytes((tmp_path / "bf16" / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "bf16" / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}

    model = jaxlora.from_pretrained(tmp_path / "bf16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    state = hf.state_dict()
    ours = dict(hf_checkpoint.iter_hf_tensors(model.params, model.names, model.config.num_hidden_layers))
    assert set(ours) == set(state)
    for key, t in state.items():
        np.testing.assert_array_equal(ours[key].astype(np.float32), t.float().numpy(), err_msg=key)
    # and the export writes the same bf16 bits back
    out = model.save_pretrained(tmp_path / "bf16_export")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    exported = safetensors.torch.load_file(out / "model.safetensors")
    for key, t in state.items():
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], t), key


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def broken(source, tmp_path):
    """A fresh copy of the source folder to damage."""
    dst = tmp_path / "broken"
    shutil.copytree(source[1], dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        jaxlora.from_pretrained(tmp_path / "no_such_model")
    assert "no_such_model" in str(e.value)


def test_folder_without_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        jaxlora.from_pretrained(broken)


def test_unsupported_architecture(tmp_path):
    transformers.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               architectures=["GPTNeoXForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'") as e:
        jaxlora.from_pretrained(tmp_path)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "BloomForCausalLM", "GPT2LMHeadModel"):
        assert arch in str(e.value)


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})


def test_missing_weight_key(broken):
    _edit_weights(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weight model\.layers\.1\.mlp\.up_proj\.weight"):
        jaxlora.from_pretrained(broken)


def test_unexpected_weight_key(broken):
    _edit_weights(broken, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected weight model\.layers\.0\.self_attn\.extra\.weight") as e:
        jaxlora.from_pretrained(broken)
    assert "model.safetensors" in str(e.value)


def test_wrong_shape(tmp_path, source):
    build_hf(hidden_size=32, num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    shutil.copy(source[1] / "config.json", tmp_path / "config.json")  # says hidden 64
    with pytest.raises(CheckpointError, match=r"has shape \(") as e:
        jaxlora.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "model." in msg and ".weight" in msg and "check config.json" in msg
    key = msg.split(": ")[1].split(" has shape")[0]  # "<folder>/<file>: <key> has shape ..."
    assert key in safetensors.torch.load_file(tmp_path / "model.safetensors")


def test_truncated_safetensors(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        jaxlora.from_pretrained(broken)


def test_export_into_non_empty_folder_is_refused(source, tmp_path):
    _, _, model = source
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = file_tree(out)
    with pytest.raises(CheckpointError, match="not empty"):
        model.save_pretrained(out)
    assert file_tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary folder left behind
    model.save_pretrained(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize("existing", [False, True], ids=["new_folder", "overwrite"])
def test_interrupted_export_leaves_nothing_half_written(source, tmp_path, monkeypatch, existing):
    _, _, model = source
    out = tmp_path / "export"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("previous export")
    before = file_tree(out) if existing else None
    real_write = hf_checkpoint.write_safetensors

    def write_then_fail(tensors, out_dir, max_shard_bytes):
        real_write(iter([next(iter(tensors))]), out_dir, max_shard_bytes)  # a partial file lands first
        raise OSError("disk full")

    monkeypatch.setattr(hf_checkpoint, "write_safetensors", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out, overwrite=existing)
    if existing:
        assert file_tree(out) == before
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["export"] if existing else [])


def test_checkpoint_without_base_prefix_loads(tmp_path):
    """Hub GPT-2 / BLOOM checkpoints store 'h.0.attn...' without 'transformer.': reading accepts both forms."""
    import transformers
    from safetensors.numpy import load_file, save_file

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    model = jaxlora.from_pretrained(tmp_path)
    ids = np.arange(12)[None] % 128
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(model.apply(model.params, ids)) - ref).max() < 1e-4
