"""Generation with a KV cache: greedy output equals transformers' generate (and PEFT's, with an adapter) token for
token on a batch of prompts of different lengths; EOS stops each row; top-k=1 and a tiny top-p are greedy; sampling
is reproducible per seed and stays inside top-k/top-p; one compilation serves a bucket; a sharded mesh gives the
same tokens; the chat template and the CLI."""

from __future__ import annotations

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
import tiny
from jaxlora import cli, lora as L
from jaxlora.generation import _decode_fn, generate_ids, sample_logits
from jaxlora.lora import LoraConfig
from jaxlora.lora.weights import LoraWeights
from jaxlora.io.peft import export_peft
from jaxlora.sharding import MeshConfig, make_mesh

NEW = 12
EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny Llama (GQA) with its BPE tokenizer and chat template, weights redrawn so logits are O(1) and greedy
    choices are far from ties."""
    path = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny.tiny_hf_config()).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if key.endswith("norm.weight") else p.normal_(0.0, 0.2)
    hf.save_pretrained(path)
    tiny.tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return jaxlora.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(model):
    return model.tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Token ids of different lengths (3 to 19: two prompt buckets' worth), batched together."""
    texts = ["what is two", "what is four plus three ? the answer is", "nine"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    return ids + [list(np.random.RandomState(1).randint(3, 128, 19))]


@pytest.fixture(scope="module")
def adapter(folder, model, tmp_path_factory):
    """(LoRA tree with b != 0, its PEFT export folder)."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    rng = np.random.RandomState(0)
    kernels = L.linear_modules(model.abstract_params)
    lora = {}
    for t in model.lora_targets(cfg):
        *lead, d_in, d_out = kernels[t.path].shape
        lora[t.path] = LoraWeights(jnp.asarray(rng.normal(0, 0.3, (*lead, d_in, t.rank)), jnp.float32),
                                   jnp.asarray(rng.normal(0, 0.3, (*lead, t.rank, d_out)), jnp.float32),
                                   scale=t.scale)
    lora = traverse_util.unflatten_dict(lora)
    return lora, export_peft(model, lora, cfg, tmp_path_factory.mktemp("adapter") / "adapter")


def hf_greedy(hf_model, prompt, eos=EOS, new=NEW) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (new tokens, up to and including EOS)."""
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                dtype=torch.long), max_new_tokens=new, do_sample=False, eos_token_id=eos,
                                pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def hf_model(folder, adapter_dir=None):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(m, adapter_dir).eval() if adapter_dir else m


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "lora"])
def test_greedy_equals_transformers(folder, model, prompts, adapter, with_adapter):
    lora, adapter_dir = adapter if with_adapter else (None, None)
    ours = generate_ids(model, model.params, prompts, lora=lora, max_new_tokens=NEW, eos_token_id=EOS,
                        pad_token_id=PAD)
    ref_model = hf_model(folder, adapter_dir)
    refs = [hf_greedy(ref_model, p) for p in prompts]
    assert ours == refs
    if with_adapter:  # the adapter changes what is generated
        assert ours != generate_ids(model, model.params, prompts, max_new_tokens=NEW, eos_token_id=EOS)


def test_sliding_window_and_qkv_bias_variants(tmp_path, prompts):
    """Mistral with a window shorter than the prompts (the cache mask applies it) and Qwen2 (q/k/v biases)."""
    for arch, extra in (("mistral", dict(sliding_window=5)), ("qwen2", dict(use_sliding_window=False))):
        torch.manual_seed(1)
        hf = transformers.AutoModelForCausalLM.from_config(tiny.tiny_hf_config(arch, **extra)).eval()
        with torch.no_grad():
            for key, p in hf.named_parameters():
                p.uniform_(0.5, 1.5) if key.endswith("norm.weight") else p.normal_(0.0, 0.2)
        hf.save_pretrained(tmp_path / arch)
        m = jaxlora.from_pretrained(tmp_path / arch)
        ours = generate_ids(m, m.params, prompts, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
        assert ours == [hf_greedy(hf, p) for p in prompts], arch


def test_each_row_stops_at_its_eos(folder, model, prompts):
    free = generate_ids(model, model.params, prompts, max_new_tokens=NEW, eos_token_id=None)
    eos = free[0][4]  # a token row 0 produces at step 4 (and, greedy, never before: checked below)
    assert eos not in free[0][:4]
    ours = generate_ids(model, model.params, prompts, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    assert ours[0] == free[0][:5]
    ref_model = hf_model(folder)
    assert ours == [hf_greedy(ref_model, p, eos=eos) for p in prompts]
    for row, full in zip(ours, free):  # a row stops exactly at its first EOS, the others run on
        assert row == (full[:full.index(eos) + 1] if eos in full else full)


def test_sampling(model, prompts):
    greedy = generate_ids(model, model.params, prompts, max_new_tokens=NEW)
    compiled = _decode_fn(model)._cache_size()
    kw = dict(max_new_tokens=NEW, temperature=1.0)
    assert generate_ids(model, model.params, prompts, top_k=1, **kw) == greedy
    assert generate_ids(model, model.params, prompts, top_p=1e-6, **kw) == greedy
    a = generate_ids(model, model.params, prompts, seed=1, **kw)
    assert a == generate_ids(model, model.params, prompts, seed=1, **kw)  # reproducible
    assert a != generate_ids(model, model.params, prompts, seed=2, **kw) and a != greedy
    # one program for greedy and every sampling setting, and for any prompt length within a bucket
    generate_ids(model, model.params, [p[::-1] for p in prompts[1:]], top_k=5, top_p=0.9, **kw)
    assert _decode_fn(model)._cache_size() == compiled


def test_sample_logits_respects_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.1, 0.05]] * 512))
    draw = jax.jit(lambda key, k, p: sample_logits(logits, key, jnp.float32(1.0), k, p))
    counts = lambda k, p: np.bincount(np.asarray(draw(jax.random.key(0), jnp.int32(k), jnp.float32(p))), minlength=5)
    assert set(np.flatnonzero(counts(2, 1.0))) == {1, 2}  # top-2
    assert set(np.flatnonzero(counts(0, 0.6))) == {1, 2}  # 0.5 < 0.6: the second token is needed
    assert set(np.flatnonzero(counts(0, 0.5))) == {1}
    assert set(np.flatnonzero(counts(0, 1.0))) == {0, 1, 2, 3, 4}
    greedy = sample_logits(logits, jax.random.key(0), jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    assert set(np.asarray(greedy).tolist()) == {1}


def test_sharded_mesh_generates_the_same_tokens(folder, model, prompts, adapter):
    sharded = jaxlora.from_pretrained(folder, mesh=make_mesh(MeshConfig(fsdp=2, tensor=2)))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    lora = jax.device_put(adapter[0], sharded.lora_shardings(sharded.lora_targets(cfg), cfg))
    assert generate_ids(sharded, sharded.params, prompts, lora=lora, max_new_tokens=NEW) == generate_ids(
        model, model.params, prompts, lora=adapter[0], max_new_tokens=NEW)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_text_api_and_chat_template(folder, model, tokenizer, chat):
    texts = ["what is two plus three ?", "nine"]
    ours = jaxlora.generate(model, model.params, tokenizer, texts, max_new_tokens=NEW, chat=chat)
    ref_model = hf_model(folder)
    for text, got in zip(texts, ours):
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
            assert prompt.startswith("<|im_start|>user\n" + text)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        assert got == tokenizer.decode(hf_greedy(ref_model, ids), skip_special_tokens=True)


def test_cli_generate(folder, model, tokenizer, adapter, capsys):
    _, adapter_dir = adapter
    assert cli.main(["generate", "--model", str(folder), "--adapter", str(adapter_dir), "--prompt", "what is two",
                     "--prompt", "nine", "--max-new-tokens", str(NEW)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ref_model = hf_model(folder, adapter_dir)  # PEFT's greedy text for the same adapter
    expected = [tokenizer.decode(hf_greedy(ref_model, tokenizer(t)["input_ids"]), skip_special_tokens=True)
                for t in ("what is two", "nine")]
    assert [x["completion"] for x in lines] == expected and lines[0]["prompt"] == "what is two"
    assert cli.main(["generate", "--model", str(folder), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_dropped_model_is_freed_after_generation(folder, prompts):
    """The compiled decode function must not keep its model (and so its weights) alive once the user drops it."""
    import gc
    import weakref
    m = jaxlora.from_pretrained(folder)
    generate_ids(m, m.params, prompts[:1], max_new_tokens=2)
    generate_ids(m, m.params, prompts[:1], max_new_tokens=2)
    assert _decode_fn(m)._cache_size() == 1  # still one compilation per live model
    model_ref = weakref.ref(m)
    param_refs = [weakref.ref(x) for x in jax.tree.leaves(m.params)]
    del m
    gc.collect()
    assert model_ref() is None
    assert all(r() is None for r in param_refs)
