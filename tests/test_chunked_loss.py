"""The lean causal-LM loss (`model.loss_chunk`): the head applied to chunks of tokens, with each chunk's gradient
computed in the forward pass, gives today's loss and gradients (float32, 1e-5) in every causal family, tied or not,
soft-capped or not, per row or not, w.r.t. the hidden states and the head; its compiled training step holds far less
than the (B, T, vocab) float32 logits the unchunked loss needs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxlora import lora as lora_lib, sharding
from jaxlora.losses import IGNORE_INDEX, chunked_next_token_loss_sums, next_token_loss_sums
from jaxlora.models.model import Model
from jaxlora.sharding import MeshConfig

TOL = 1e-5  # float32, relative
VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ROPE = dict(_COMMON, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
# every head path: untied lm_head, tied embedding, soft-capped (Gemma), GPT-2's and BLOOM's (Qwen3, Phi-3 and Mixtral
# share Llama's)
FAMILIES = {
    "llama_untied": transformers.LlamaConfig(**_ROPE, tie_word_embeddings=False),
    "llama_tied": transformers.LlamaConfig(**_ROPE, tie_word_embeddings=True),
    "gemma2_softcap": transformers.Gemma2Config(**_ROPE, head_dim=16, final_logit_softcapping=3.0),
    "gpt2": transformers.GPT2Config(**_COMMON, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "bloom": transformers.BloomConfig(**_COMMON, hidden_size=32, n_layer=2, n_head=4),
}


def batch(rows: int = 4, t: int = 13, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (rows, t)).astype(np.int32)
    mask = np.ones((rows, t), np.int32)
    mask[1, 9:] = 0  # a padded row
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX  # a masked prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, params, lora, b, per_row=False):
    def f(lora_):
        s, c = model.loss_sums(params, b, lora_, per_row=per_row)
        return jnp.sum(s) / jnp.sum(c), (s, c)
    (_, (s, c)), g = jax.jit(jax.value_and_grad(f, has_aux=True))(lora)
    return np.asarray(s), np.asarray(c), g


@pytest.mark.parametrize("name", list(FAMILIES))
def test_chunked_loss_and_gradients_equal_the_full_logits(name):
    model = Model.random(FAMILIES[name].to_dict(), mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    cfg = lora_lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    lora = lora_lib.init_lora(model, cfg, jax.random.key(1))
    b = batch()
    model.loss_chunk = 0
    want = loss_and_grads(model, model.params, lora, b, per_row=True)
    for chunk in (4, 64) if name == "llama_untied" else (4,):  # 4 chunks, the last ragged; one chunk longer than T
        model.loss_chunk = chunk
        got = loss_and_grads(model, model.params, lora, b, per_row=True)
        np.testing.assert_allclose(got[0], want[0], rtol=TOL)
        np.testing.assert_array_equal(got[1], want[1])
        for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(want[2]), jax.tree.leaves(got[2])):
            g, h = np.asarray(g), np.asarray(h)
            np.testing.assert_allclose(h, g, atol=TOL * np.abs(g).max(), rtol=0,
                                       err_msg=f"{chunk}: {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("vocab_major", [True, False], ids=["tied", "lm_head"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_loss_gradients_wrt_hidden_and_head(vocab_major, softcap):
    """The fused loss alone: per-row sums weighted unevenly (as LoRA-GA's per-group means weigh rows), gradients
    w.r.t. the hidden states (computed in the forward pass) and the head (summed in the backward pass)."""
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 11, 8, 50
    x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, d) if vocab_major else (d, v)), jnp.float32)
    labels = rng.integers(0, v, (b, t))
    labels[:, :2], labels[1, 7:] = IGNORE_INDEX, IGNORE_INDEX
    weights = jnp.asarray(rng.normal(size=(b,)), jnp.float32)

    def full(x_, w_):
        logits = jnp.einsum("btd,vd->btv" if vocab_major else "btd,dv->btv", x_, w_)
        if softcap is not None:
            logits = jnp.tanh(logits / softcap) * softcap
        s, c = next_token_loss_sums(logits, labels, per_row=True)
        return jnp.sum(s * weights), c

    def fused(x_, w_):
        s, c = chunked_next_token_loss_sums(x_, w_, labels, vocab_major=vocab_major, dtype=jnp.float32, chunk=4,
                                            softcap=softcap, per_row=True)
        return jnp.sum(s * weights), c

    (want, wc), want_g = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(x, w)
    (got, gc), got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(x, w)
    np.testing.assert_allclose(float(got), float(want), rtol=TOL)
    np.testing.assert_array_equal(gc, wc)
    for g, h in zip(want_g, got_g):
        np.testing.assert_allclose(np.asarray(h), np.asarray(g), atol=TOL * float(jnp.abs(g).max()), rtol=0)
    only_x = jax.grad(lambda x_: fused(x_, w)[0])(x)  # the head not differentiated: no backward pass over it
    np.testing.assert_allclose(np.asarray(only_x), np.asarray(want_g[0]), atol=TOL * float(jnp.abs(only_x).max()))


def test_lora_on_the_head_falls_back_to_full_logits():
    model = Model.random(FAMILIES["llama_untied"].to_dict(),
                         mesh=sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]), loss_chunk=4)
    lora = lora_lib.init_lora(model, lora_lib.LoraConfig(r=2, target_modules=["lm_head"]), jax.random.key(0))
    assert model._chunked_head(model.params, lora) is None
    assert model._chunked_head(model.params, {}) is not None
    s, c = model.loss_sums(model.params, batch(), lora)
    assert np.isfinite(float(s)) and float(c) > 0


def test_chunked_step_never_holds_the_float32_logits():
    """Compiled on the 8-device mesh: the temporaries of loss + gradient with chunks of 16 tokens stay well below the
    (B, T, vocab) float32 logits that the full loss holds (and keeps for its backward)."""
    config = dict(FAMILIES["llama_tied"].to_dict(), vocab_size=8192)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = Model.random(config, mesh=mesh)
    lora = lora_lib.init_lora(model, lora_lib.LoraConfig(r=4), jax.random.key(0))
    rows, t = 8, 256
    b = {k: np.tile(v[:, :1], (2, t)) for k, v in batch(rows=4).items()}
    placed = sharding.place_batch(b, mesh)

    def temp_bytes(chunk):
        model.loss_chunk = chunk
        grad = jax.jit(jax.grad(lambda lo: model.loss_sums(model.params, placed, lo)[0]))
        return grad.lower(lora).compile().memory_analysis().temp_size_in_bytes
    logits_f32 = rows * t * 8192 * 4 / jax.device_count()  # per device
    full, chunked = temp_bytes(0), temp_bytes(16)
    # the rest of the temporaries (attention probabilities kept for the backward, ...) is the same in both
    assert full - chunked > 2 * logits_f32 and chunked < full / 3, (chunked, full, logits_f32)


def test_the_run_config_reaches_the_loaded_model(tmp_path):
    """`model.loss_chunk` in a run config reaches the model `jaxlora train` loads (from_pretrained) and turns the
    chunked head on."""
    import tiny
    from jaxlora.config import load_run_config
    from jaxlora.training import setup
    folder = tiny.tiny_model_dir(tmp_path / "model")
    cfg = load_run_config(None, [f"model.path={folder}", "data.path=unused.jsonl", "model.loss_chunk=8"])
    model = setup.load_model(cfg, sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    assert model.loss_chunk == 8 and model._chunked_head(model.params, {}) is not None
