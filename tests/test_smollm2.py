"""The real SmolLM2-135M-Instruct (pretrained, Llama architecture, tied embeddings, GQA) loaded by jaxlora matches
transformers' logits on real text. The asset is prepared (not skipped) when missing: see scripts/prepare_assets.py."""

import numpy as np
import pytest
import torch
import transformers

import jaxlora
import assets

TEXTS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
         "The capital of France is"]


@pytest.fixture(scope="module")
def folder():
    return assets.smollm2_path(prepare=True)


def test_smollm2_logits_match_transformers(folder):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(TEXTS, return_tensors="np", padding=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"])).logits.numpy()
    model = jaxlora.from_pretrained(folder, "float32")
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    out = np.asarray(model.apply(model.params, enc["input_ids"], enc["attention_mask"]))
    real = enc["attention_mask"].astype(bool)
    err = np.abs(out - ref)[real].max()
    print(f"SmolLM2-135M max-abs logit error vs transformers: {err:.2e} (logit scale {np.abs(ref).max():.1f})")
    # 30 float32 layers accumulate rounding: the bound is relative to the logits' magnitude (1e-5 of max |logit|).
    assert err / np.abs(ref[real]).max() < 1e-5, err
    # the greedy next token after "The capital of France is" is the same
    last = real[1].sum() - 1
    assert out[1, last].argmax() == ref[1, last].argmax()
