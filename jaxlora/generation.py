"""Text generation with a KV cache: prefill + a jitted decode loop, greedy or sampled, batched, stopping at EOS.

    texts = jaxlora.generate(model, model.params, tokenizer, ["what is two plus three ?"], lora=lora)

Prompts are left-padded to a bucket length P (a power of two, at least 16) so that one compiled program serves every
batch of prompts up to P tokens; each row's positions count its own tokens only (0 at its first real token, like
transformers' generate with left padding), and the padding slots are masked out of attention. The cache holds
P + max_new_tokens slots per row:

    slots:  [pad pad p0 p1 p2 | t0 t1 t2 ...]      positions: [- - 0 1 2 | 3 4 5 ...]
             prompt (prefill)   one decode step per new token (jax.lax.while_loop, exits when every row hit EOS)

Sampling follows transformers' order: temperature, then top-k, then top-p (nucleus); temperature 0 is greedy.
The sampling parameters are traced values, so changing them does not recompile.

An encoder-decoder (T5) decodes without a cache: every step reruns the encoder and the decoder over a fixed
(B, max_new_tokens + 1) buffer of decoder inputs (causal, so the unfilled slots do not matter) and reads the logits of
step i. That is quadratic in the output length: meant for short targets such as GLUE label words.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import sharding
from jaxlora.io import hf_checkpoint

MIN_BUCKET = 16
DEFAULT_MAX_NEW_TOKENS = 64  # the API's and `jaxlora generate --max-new-tokens`' default
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its jitted decode (see _decode_fn)


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def sample_logits(logits_BxV, key, temperature, top_k, top_p) -> jax.Array:
    """Next tokens (B,): argmax when temperature == 0, else a draw from softmax(logits / temperature) restricted to
    the top_k most likely tokens (0: all) and to the smallest set holding top_p of the probability mass."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    vocab = logits_BxV.shape[-1]
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, k - 1, 1, axis=-1)
    sorted_BxV = jnp.where(jnp.arange(vocab)[None, :] < k, sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    keep_BxV = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) < top_p  # the first token is always kept
    pth_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    threshold_Bx1 = jnp.maximum(kth_Bx1, pth_Bx1)
    masked_BxV = jnp.where(scaled_BxV < threshold_Bx1, -jnp.inf, scaled_BxV)
    sampled_B = jax.random.categorical(key, masked_BxV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def _decode(model, params, lora, ids_BxP, mask_BxP, rng, temperature, top_k, top_p, eos_E, pad_id, *,
            max_new_tokens: int):
    """(B, max_new_tokens) new tokens, pad_id after a row's EOS."""
    if model.is_encoder_decoder:
        return _decode_seq2seq(model, params, lora, ids_BxP, mask_BxP, rng, temperature, top_k, top_p, eos_E, pad_id,
                               max_new_tokens=max_new_tokens)
    b, p = ids_BxP.shape
    cache, axes = model.init_cache(b, p + max_new_tokens)
    cache = jax.lax.with_sharding_constraint(cache, jax.tree.map(
        lambda ax, x: sharding.named_sharding(ax, x.shape, model.mesh, model.rules), axes, cache,
        is_leaf=lambda x: isinstance(x, tuple)))
    cache_mask_BxS = jnp.concatenate([mask_BxP, jnp.zeros((b, max_new_tokens), mask_BxP.dtype)], axis=1)
    positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
    logits_BxPxV, cache = model.apply_cached(params, ids_BxP, cache_mask_BxS, positions_BxP, cache, 0, lora)
    next_pos_B = jnp.sum(mask_BxP, axis=1)

    def cond(state):
        i, _, _, done_B, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        i, logits_BxV, cache, done_B, out_BxN, cache_mask_BxS, rng = state
        rng, key = jax.random.split(rng)
        tok_B = jnp.where(done_B, pad_id, sample_logits(logits_BxV, key, temperature, top_k, top_p))
        out_BxN = jax.lax.dynamic_update_slice(out_BxN, tok_B[:, None], (0, i))
        done_B = done_B | jnp.any(tok_B[:, None] == eos_E[None, :], axis=1)
        cache_mask_BxS = jax.lax.dynamic_update_slice(cache_mask_BxS, jnp.ones((b, 1), cache_mask_BxS.dtype),
                                                      (0, p + i))
        logits_Bx1xV, cache = model.apply_cached(params, tok_B[:, None], cache_mask_BxS, (next_pos_B + i)[:, None],
                                                 cache, p + i, lora)
        return i + 1, logits_Bx1xV[:, 0], cache, done_B, out_BxN, cache_mask_BxS, rng

    out_BxN = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), logits_BxPxV[:, -1], cache, jnp.zeros((b,), bool), out_BxN, cache_mask_BxS, rng)
    return jax.lax.while_loop(cond, body, state)[4]


def _decode_seq2seq(model, params, lora, ids_BxP, mask_BxP, rng, temperature, top_k, top_p, eos_E, pad_id, *,
                    max_new_tokens: int):
    """`_decode` for an encoder-decoder: decoder inputs [start, t0, t1, ...] in a fixed buffer, no cache."""
    b = ids_BxP.shape[0]
    start = model.config.decoder_start_token_id
    dec_BxL = jnp.full((b, max_new_tokens + 1), pad_id, jnp.int32).at[:, 0].set(start)

    def cond(state):
        i, _, done_B, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        i, dec_BxL, done_B, out_BxN, rng = state
        rng, key = jax.random.split(rng)
        logits_BxLxV = model.apply(params, ids_BxP, mask_BxP, lora, decoder_input_ids_BxL=dec_BxL)
        logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxLxV, i, axis=1, keepdims=False)
        tok_B = jnp.where(done_B, pad_id, sample_logits(logits_BxV, key, temperature, top_k, top_p))
        out_BxN = jax.lax.dynamic_update_slice(out_BxN, tok_B[:, None], (0, i))
        dec_BxL = jax.lax.dynamic_update_slice(dec_BxL, tok_B[:, None], (0, i + 1))
        done_B = done_B | jnp.any(tok_B[:, None] == eos_E[None, :], axis=1)
        return i + 1, dec_BxL, done_B, out_BxN, rng

    out_BxN = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    return jax.lax.while_loop(cond, body, (jnp.int32(0), dec_BxL, jnp.zeros((b,), bool), out_BxN, rng))[3]


def _decode_fn(model):
    """The model's jitted `_decode` (one per live model, so repeated calls reuse its compilations). The function
    reaches its model through a weak reference: a cached value that held the model itself would keep its key, and
    with it the weights, alive in the WeakKeyDictionary for ever."""
    fn = _COMPILED.get(model)
    if fn is None:
        model_ref = weakref.ref(model)
        fn = _COMPILED[model] = jax.jit(
            lambda *args, max_new_tokens: _decode(model_ref(), *args, max_new_tokens=max_new_tokens),
            static_argnames=("max_new_tokens",))
    return fn


def pad_prompts(prompt_ids: Sequence[Sequence[int]], pad_id: int, rows_multiple: int = 1):
    """Left-padded ids and mask (B', P): P a bucket length, B' a multiple of `rows_multiple` (extra rows repeat
    the first prompt and are dropped afterwards)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    rows = list(prompt_ids) + [prompt_ids[0]] * (-len(prompt_ids) % rows_multiple)
    p = _bucket(max(len(r) for r in rows))
    ids = np.full((len(rows), p), pad_id, np.int32)
    mask = np.zeros((len(rows), p), np.int32)
    for i, r in enumerate(rows):
        ids[i, p - len(r):], mask[i, p - len(r):] = r, 1
    return ids, mask


def generate_ids(model, params, prompt_ids: Sequence[Sequence[int]], *, lora=None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> list[list[int]]:
    """Generates from token ids; returns each row's new tokens, up to and including its first EOS.

    Args:
      model: a `jaxlora.Model`.
      params: its frozen params (`model.params`, or with modules_to_save swapped in via `jaxlora.lora.overlay`).
      prompt_ids: one list of token ids per prompt (lengths may differ).
      lora: a LoRA tree applied unmerged, or None for the base model.
      max_new_tokens: new tokens per row at most (static: a new value compiles once more).
      temperature: 0 for greedy decoding; otherwise the softmax temperature.
      top_k: sample among the k most likely tokens (0: no limit).
      top_p: sample among the smallest set of tokens holding this much probability (1.0: no limit).
      seed: PRNG seed of the sampling.
      eos_token_id: id (or ids) that end a row; None: run max_new_tokens for every row.
      pad_token_id: id used for the left padding (masked out) and after EOS.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0 or temperature < 0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got {temperature}, {top_k}, "
                         f"{top_p})")
    batch_sharding = sharding.batch_sharding(model.mesh, model.rules)
    axes = batch_sharding.spec[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    shards = int(np.prod([model.mesh.shape[a] for a in axes]))
    ids, mask = pad_prompts(prompt_ids, pad_token_id, shards)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [-1])
    out = _decode_fn(model)(
        params, lora, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding),
        jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
        jnp.asarray(eos, jnp.int32), jnp.int32(pad_token_id), max_new_tokens=max_new_tokens)
    out = np.asarray(jax.device_get(hf_checkpoint._gather(out)))[:len(prompt_ids)]  # all processes take part
    rows = []
    for row in out.tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        rows.append(row if stop is None else row[:stop + 1])
    return rows


def eos_ids(model, tokenizer) -> list[int]:
    """The ids that end generation: the model folder's generation_config.json eos_token_id(s), else the
    tokenizer's EOS (what transformers' generate uses)."""
    cfg = Path(model.source or "") / "generation_config.json"
    if model.source and cfg.exists():
        eos = json.loads(cfg.read_text()).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt; with chat=True wrapped as one user turn by the tokenizer's chat template."""
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("chat=True but the tokenizer has no chat template")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def generate(model, params, tokenizer, prompts: str | Sequence[str], *, lora=None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             chat: bool = False) -> list[str]:
    """Generates a completion for each prompt (batched); returns the new text of each, special tokens removed.

    Args: as `generate_ids`, with `tokenizer` an HF tokenizer (e.g. `model.tokenizer()`), `prompts` strings and
    `chat` to apply the tokenizer's chat template (one user message, generation prompt added).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = generate_ids(model, params, encode_prompts(tokenizer, prompts, chat), lora=lora,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        eos_token_id=eos_ids(model, tokenizer), pad_token_id=pad)
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
