"""The rotary decoder-only causal LM that Llama/Mistral/Qwen2, Qwen3, Gemma 2/3, Phi-3 and Mixtral share, written once
here so that a family file holds only what is its own (config fields, layer/attention/MLP differences, HF name rules):
the rotary parts (rope tables, GQA attention, gated SiLU MLP, KV cache), the config and name-table helpers, and the
assembled model:

    XForCausalLM (`CausalLM`)       head: hidden_only / tied embedding / lm_head, optional final soft-cap
      model (`Decoder`)             embed_tokens -> rotary cos/sin -> mask -> scanned `layers` -> final norm
        layers (`PreNormLayer` or the family's own layer)

Every family keeps HF's module names (`model.embed_tokens`, `model.layers.N...`, `model.norm`, `lm_head`), so the
parameter trees, name tables and LoRA paths are the ones each family file had before this module existed.

Hooks are plain methods (and class attributes) a family overrides: `Decoder.layer_cls`, `scale_embeddings`, `rotary`,
`attention_mask`, `per_layer_inputs`, `final_norm`; `PreNormLayer.attention` / `feed_forward`; `CausalLM.decoder_cls`
and `auxiliary_loss`. A scanned layer returns (hidden states, (KV cache, aux)): `aux` is a per-layer output the
family's `auxiliary_loss` turns into a training regularizer (Mixtral's router logits; None elsewhere).

Generation: with a KV cache (`init_kv_cache`, (layers, B, S, kv_heads, head_dim) keys and values, scanned with
the layers) the T new tokens' keys/values are written at slots cache_index.. and attention runs over all S slots under
a (B, S) slot mask; `attention_mask_BxT` is then that (B, S) mask and `positions_BxT` must be given. With
`cache=None` (training, evaluation) the forward is the plain one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import sharding
from jaxlora.io.hf_checkpoint import NameRule, NameTable
from jaxlora.models.attention import dot_product_attention
from jaxlora.models.common import (Family, LayerPart, LayerStack, LoraDense, ModelRoot, RMSNorm, causal_padding_mask,
                                   gated_activation, scanned_layers, select_positions)

# ---------------------------------------------------------------------------------- rotary attention and KV cache
# The Llama-style parts: rotary embeddings, GQA attention with an optional per-head q/k RMSNorm, the gated SiLU MLP,
# and the KV cache used for generation. Configs provide head_dim, rope_theta, rope_scaling (sorted (key, value)
# pairs), num_attention_heads, num_key_value_heads, hidden_size, qkv_bias, o_bias, rms_norm_eps, intermediate_size
# and num_hidden_layers.

ROPE_TYPES = ("default", "linear", "llama3")


def rope_from_hf(hf: dict, where: str) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(rope_theta, sorted rope scaling pairs) from config.json's rope_parameters / rope_scaling; a rope type not in
    ROPE_TYPES is a ValueError naming the field."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(field) or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: {field} rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    rope = {} if rope_type == "default" else {**rope, "rope_type": rope_type}
    return float(theta), tuple(sorted(rope.items()))


def rope_inv_freq(cfg) -> np.ndarray:
    """Rotary inverse frequencies, with HF's 'linear' and 'llama3' scalings (float64, then float32 like HF)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(is_medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions_BxT: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
    freqs_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))[None, None, :]
    emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """HF's rotate-half layout: no q/k permutation is needed for HF checkpoints."""
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    cos, sin = cos_BxTxH[:, :, None, :], sin_BxTxH[:, :, None, :]
    return (x_BxTxNxH * cos + rotated * sin).astype(x_BxTxNxH.dtype)


class RopeAttention(LayerPart):
    """GQA self-attention with rotary positions (HF names q_proj, k_proj, v_proj, o_proj); `qk_norm`: an RMSNorm over
    head_dim on each query and key head (q_norm, k_norm), after the projection and before the rotation (Qwen3).
    With a `cache`, returns (output, updated cache)."""

    qk_norm: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, mask_Bx1xTxT, lora, cache=None, cache_index=None):
        c, lora = self.cfg, lora or {}
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b, t, _ = x_BxTxD.shape

        def proj(features, axes, bias, name, x):
            layer = LoraDense(features, axes, bias, self.dtype, self.param_dtype, self.deterministic, name=name)
            return layer(x, lora.get(name))

        q = proj(n * h, ("embed", "heads"), c.qkv_bias, "q_proj", x_BxTxD).reshape(b, t, n, h)
        kk = proj(k * h, ("embed", "kv_heads"), c.qkv_bias, "k_proj", x_BxTxD).reshape(b, t, k, h)
        v = proj(k * h, ("embed", "kv_heads"), c.qkv_bias, "v_proj", x_BxTxD).reshape(b, t, k, h)
        if self.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
            kk = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="k_norm")(kk)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        kk, v, cache, impl = with_cache(cache, kk, v, cache_index, self.attention_impl)
        out = dot_product_attention(q, kk, v, mask_Bx1xTxT, causal=cache is None, implementation=impl)
        out = proj(c.hidden_size, ("heads", "embed"), c.o_bias, "o_proj", out.reshape(b, t, n * h))
        return out if cache is None else (out, cache)


class GatedMLP(LayerPart):
    """down(silu(gate(x)) * up(x)), HF names gate_proj, up_proj, down_proj (Llama's MLP)."""

    use_bias: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        dense = lambda f, axes, name, x: LoraDense(f, axes, self.use_bias, self.dtype, self.param_dtype,
                                                   self.deterministic, name=name)(x, lora.get(name))
        gate = dense(c.intermediate_size, ("embed", "mlp"), "gate_proj", x_BxTxD)
        up = dense(c.intermediate_size, ("embed", "mlp"), "up_proj", x_BxTxD)
        return dense(c.hidden_size, ("mlp", "embed"), "down_proj", gated_activation(nn.silu, gate, up))


def cached_causal_mask(cache_mask_BxS: jax.Array, t: int, cache_index, sliding_window: int | None) -> jax.Array:
    """(B, 1, T, S) boolean for T new tokens at cache slots cache_index..cache_index+T-1: each sees the filled,
    non-padding slots up to its own (and within the window). Slots are contiguous per row, so slot distance is
    position distance for every real token."""
    s = cache_mask_BxS.shape[1]
    i, j = cache_index + jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    allowed_TxS = j <= i
    if sliding_window is not None:
        allowed_TxS &= (i - j) < sliding_window
    return allowed_TxS[None, None] & cache_mask_BxS.astype(bool)[:, None, None, :]


def cache_write(cache, k_BxTxKxH, v_BxTxKxH, cache_index):
    """The layer's cache (B, S, K, H) with T new keys/values written from slot cache_index."""
    start = (0, cache_index, 0, 0)
    k = jax.lax.dynamic_update_slice(cache["k"], k_BxTxKxH.astype(cache["k"].dtype), start)
    v = jax.lax.dynamic_update_slice(cache["v"], v_BxTxKxH.astype(cache["v"].dtype), start)
    return k, v


def with_cache(cache, k_BxTxKxH, v_BxTxKxH, cache_index, impl: str | None):
    """(keys, values, cache, attention implementation) for a layer's attention: as given without a cache; decoding,
    this step's keys/values written at slot cache_index and every slot attended (masked), with XLA's attention."""
    if cache is None:
        return k_BxTxKxH, v_BxTxKxH, None, impl
    k, v = cache_write(cache, k_BxTxKxH, v_BxTxKxH, cache_index)
    return k, v, {"k": k, "v": v}, "xla"


def init_kv_cache(cfg, batch: int, length: int, dtype) -> dict:
    """Zeroed KV cache {"k", "v"}: (layers, B, S, kv_heads, head_dim) each (logical axes `KV_CACHE_AXES`)."""
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


KV_CACHE_AXES = ("layers", "batch", "seq", "kv_heads", None)


# ------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class DecoderDims:
    """The sizes every rotary decoder config starts with (a family's config dataclass subclasses this and adds its
    own fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


def decoder_fields(hf: dict, *, rms_norm_eps: float, max_position_embeddings: int,
                   tie_word_embeddings: bool = False) -> dict:
    """`DecoderDims`' fields plus rms_norm_eps, max_position_embeddings and tie_word_embeddings from config.json, with
    HF's fallbacks (kv heads = heads, head_dim = hidden / heads) and the family's defaults for the last three."""
    heads = hf["num_attention_heads"]
    return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                rms_norm_eps=hf.get("rms_norm_eps", rms_norm_eps),
                max_position_embeddings=hf.get("max_position_embeddings", max_position_embeddings),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", tie_word_embeddings)))


def require_silu(hf: dict, where: str) -> None:
    """A ValueError naming hidden_act unless it is silu (the gated SiLU MLP is all these families implement)."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")


# ------------------------------------------------------------------------------------------ names and record

PROJ_KERNEL_RULE = NameRule(r"model/layers/(self_attn|mlp)/(\w+_proj)/kernel", "model.layers.{layer}.{0}.{1}.weight",
                            transpose=True)
PROJ_BIAS_RULE = NameRule(r"model/layers/(self_attn|mlp)/(\w+_proj)/bias", "model.layers.{layer}.{0}.{1}.bias")
QK_NORM_RULE = NameRule(r"model/layers/self_attn/(q_norm|k_norm)/scale", "model.layers.{layer}.self_attn.{0}.weight")


def decoder_names(*layer_rules: NameRule, ignore: tuple[str, ...]) -> NameTable:
    """The name table of a rotary decoder: the embedding, the family's `layer_rules`, the layers' norms, the final
    norm and lm_head (HF's `model.` prefix, which some checkpoints omit)."""
    return NameTable(rules=(
        NameRule(r"model/embed_tokens/embedding", "model.embed_tokens.weight"),
        *layer_rules,
        NameRule(r"model/layers/(\w+)/scale", "model.layers.{layer}.{0}.weight"),
        NameRule(r"model/norm/scale", "model.norm.weight"),
        NameRule(r"lm_head/kernel", "lm_head.weight", transpose=True),
    ), ignore=ignore, base_prefix="model.")


def decoder_family(**fields) -> Family:
    """A rotary decoder's `Family` record: `fields` plus the KV cache and the embedding path they all share."""
    return Family(init_cache=init_kv_cache, cache_axes=KV_CACHE_AXES,
                  embedding_path=("model", "embed_tokens", "embedding"), **fields)


# ------------------------------------------------------------------------------------------ the module


def decoder_mask(attention_mask_BxT, t: int, cache_index, cached: bool, window: int | None) -> jax.Array:
    """A boolean attention mask for T new tokens: (B, 1, T, T) over the tokens (`causal_padding_mask`), or with a
    cache (B, 1, T, S) over its slots, the tokens at slots cache_index.. (`cached_causal_mask`)."""
    if cached:
        return cached_causal_mask(attention_mask_BxT, t, cache_index, window)
    return causal_padding_mask(attention_mask_BxT, window)


class PreNormLayer(LayerPart):
    """One pre-norm decoder layer (Llama's): x + attn(norm(x)), then h + ff(norm(h)), with RMSNorms named
    input_layernorm / post_attention_layernorm; scanned over the stacked layer axis (carry = hidden states). A family
    overrides `attention` (its attention module, named self_attn) and `feed_forward` (its MLP and that MLP's name)."""

    def attention(self) -> nn.Module:
        return RopeAttention(self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                             name="self_attn")

    def feed_forward(self, x_BxTxD, lora) -> tuple[jax.Array, Any]:
        """(MLP output, per-layer aux output or None)."""
        mlp = GatedMLP(self.cfg, self.dtype, self.param_dtype, self.deterministic, name="mlp")
        return mlp(x_BxTxD, lora.get("mlp")), None

    @nn.compact
    def __call__(self, x_BxTxD, lora, cos, sin, mask, cache=None, cache_index=None):
        c, lora = self.cfg, lora or {}
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", None, None))
        norm = lambda name: RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn_out = self.attention()(norm("input_layernorm")(x_BxTxD), cos, sin, mask, lora.get("self_attn"), cache,
                                    cache_index)
        if cache is not None:
            attn_out, cache = attn_out
        h = x_BxTxD + attn_out
        ff_out, aux = self.feed_forward(norm("post_attention_layernorm")(h), lora)
        return h + ff_out.astype(h.dtype), (cache, aux)


class Decoder(LayerStack):
    """Embeddings, the scanned decoder `layers` (`layer_cls`) and the final norm: (hidden states, embedding, KV
    cache, per-layer aux outputs stacked over the layers)."""

    layer_cls: ClassVar[type] = PreNormLayer

    def scale_embeddings(self, x_BxTxD):
        return x_BxTxD

    def rotary(self, positions_BxT) -> tuple[jax.Array, jax.Array]:
        """The layers' (cos, sin) (B, T, rotary dim)."""
        return rope_cos_sin(positions_BxT, self.cfg)

    def attention_mask(self, attention_mask_BxT, t: int, cache_index, cached: bool) -> jax.Array:
        """The layers' mask (`decoder_mask`), with the config's sliding_window if it has one."""
        return decoder_mask(attention_mask_BxT, t, cache_index, cached, getattr(self.cfg, "sliding_window", None))

    def per_layer_inputs(self) -> tuple:
        """Arrays with a leading layer axis, scanned into the layers right after their LoRA slice."""
        return ()

    def final_norm(self) -> nn.Module:
        return RMSNorm(self.cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT, positions_BxT, lora, cache=None, cache_index=None):
        c, lora = self.cfg, lora or {}
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                         name="embed_tokens")
        x = self.scale_embeddings(embed(input_ids_BxT))
        cos, sin = self.rotary(positions_BxT)
        mask = self.attention_mask(attention_mask_BxT, input_ids_BxT.shape[1], cache_index, cache is not None)
        per_layer = self.per_layer_inputs()
        in_axes = (0,) * (1 + len(per_layer)) + (nn.broadcast,) * 3 + (0, nn.broadcast)
        layers = scanned_layers(self.layer_cls, self.remat, c.num_hidden_layers, in_axes)
        x, (cache, aux) = layers(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                                 name="layers")(x, lora.get("layers"), *per_layer, cos, sin, mask, cache, cache_index)
        return self.final_norm()(x), embed, cache, aux


class CausalLM(ModelRoot):
    """The causal LM head over the family's `decoder_cls` (named "model"): the tied embedding or `lm_head`, then the
    config's final_logit_softcapping (cap * tanh(logits / cap)) when it sets one."""

    decoder_cls: ClassVar[type] = Decoder

    def auxiliary_loss(self, layer_aux, attention_mask_BxT) -> jax.Array:
        """The family's auxiliary training loss (a float32 scalar) from its layers' stacked aux outputs."""
        raise NotImplementedError(f"{type(self).__name__} has no auxiliary loss")

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, lora=None,
                 deterministic: bool = True, cache=None, cache_index=None, hidden_only: bool = False,
                 aux_loss: bool = False, select_BxK=None):
        """Logits (B, T, vocab) in the compute dtype; with a KV `cache` (`init_kv_cache`), (logits, updated
        cache); with `hidden_only`, the final hidden states (B, T, D) instead of logits (`Model.loss_sums` then
        applies the head in chunks); with `select_BxK`, only those positions' (B, K); with `aux_loss`, (that output,
        `auxiliary_loss`).

        Decoding: the T tokens go to cache slots cache_index.., `attention_mask_BxT` is then (B, S) over all slots
        (1 = a real token is or will be there) and `positions_BxT` (B, T) must be given.
        """
        c, lora = self.cfg, lora or {}
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        if positions_BxT is None:  # like HF: positions are 0..T-1 whatever the padding
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        model = self.decoder_cls(c, self.dtype, self.param_dtype, self.remat, deterministic, self.attention_impl,
                                 name="model")
        x_BxTxD, embed, cache, layer_aux = model(input_ids_BxT, attention_mask_BxT, positions_BxT, lora.get("model"),
                                                 cache, cache_index)
        x_BxTxD = select_positions(x_BxTxD, select_BxK)
        if hidden_only:
            out = x_BxTxD
        else:
            if c.tie_word_embeddings:
                logits = embed.attend(x_BxTxD)
            else:
                logits = LoraDense(c.vocab_size, ("embed", "vocab"), False, self.dtype, self.param_dtype,
                                   deterministic, name="lm_head")(x_BxTxD, lora.get("lm_head"))
            cap = getattr(c, "final_logit_softcapping", None)
            if cap is not None:
                logits = jnp.tanh(logits / cap) * cap
            out = logits if cache is None else (logits, cache)
        return (out, self.auxiliary_loss(layer_aux, attention_mask_BxT)) if aux_loss else out
