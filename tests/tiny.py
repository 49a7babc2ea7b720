"""Tiny real models and data built inside the tests: a transformers model saved with save_pretrained plus a real
BPE tokenizer trained locally, and small instruction datasets. No hub needed."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "zero one two three four five six seven eight nine ten plus minus is what the answer".split()


def instruction_records(n: int, seed: int = 0) -> list[dict]:
    """BELLE-style {"input", "target"} arithmetic records with a learnable pattern."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(6), rng.randrange(5)
        out.append({"input": f"what is {WORDS[a]} plus {WORDS[b]} ?",
                    "target": f"the answer is {WORDS[a + b]} ."})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_tokenizer(vocab_size: int = 96):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(WORDS)] * 4 + [r["input"] + " " + r["target"] for r in instruction_records(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_hf_config(arch: str = "llama", **overrides):
    import transformers
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    return cls(**base)


def tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Saves a random transformers model (float32) and the tiny tokenizer into `path`."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(arch, **overrides)).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return Path(path)


def peft_with_random_factors(hf, seed: int = 1, **lora_kwargs):
    """PEFT LoRA (peft.LoraConfig(**lora_kwargs)) over a copy of `hf`, both factors redrawn N(0, 0.2) after seeding
    torch with `seed`: a real, non-zero adapter to compare against; in eval mode."""
    import copy

    import peft
    import torch
    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **lora_kwargs)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_" in key:
                p.normal_(0.0, 0.2)
    return model
