"""The Qwen3 family in Flax linen (`Qwen3ForCausalLM`, model_type "qwen3").

Llama-like (common.py's rotary GQA attention, gated SiLU MLP and KV cache) with an RMSNorm over head_dim on every
query and key head (`q_norm`, `k_norm`), applied after the projection and before the rotation as transformers'
modeling_qwen3.py does; head_dim from the config (not hidden / heads); q/k/v/o biases only when `attention_bias`.

Parameters mirror HF module names with the layer index folded into a leading stacked axis:

    HF:   model.layers.7.self_attn.q_norm.weight  (head_dim,)
    ours: params["model"]["layers"]["self_attn"]["q_norm"]["scale"][7]

Not implemented, and refused with a ValueError naming the field: use_sliding_window=true (windowed attention only in
layers >= max_window_layers), layer_types other than full attention, rope types other than default/linear/llama3,
hidden_act other than silu.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxlora import sharding
from jaxlora.io.hf_checkpoint import NameRule, NameTable
from jaxlora.models.common import (KV_CACHE_AXES, Family, GatedMLP, LayerPart, LayerStack, LoraDense, ModelRoot,
                                   RMSNorm, RopeAttention, cached_causal_mask, causal_padding_mask, init_kv_cache,
                                   rope_cos_sin, rope_from_hf, scanned_layers, supported_architecture)

ARCHITECTURES = ("Qwen3ForCausalLM",)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs of HF's rope parameters, hashable
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v/o_proj
    architecture: str = "Qwen3ForCausalLM"
    model_type: str = "qwen3"

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> Qwen3Config:
        arch = supported_architecture(hf, ARCHITECTURES, where, {"qwen3": "Qwen3ForCausalLM"})
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{where}: Qwen3 use_sliding_window=true (windowed attention in layers >= "
                             f"max_window_layers only) is not supported; set it to false for full attention")
        other = sorted(set(hf.get("layer_types") or ()) - {"full_attention"})
        if other:
            raise ValueError(f"{where}: layer_types {other} are not supported (only 'full_attention')")
        theta, rope_scaling = rope_from_hf(hf, where)
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)), architecture=arch,
            model_type=hf.get("model_type", "qwen3"))

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings, norms and biases included), as transformers counts it."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        attn = d * h * (2 * n + 2 * k) + 2 * h + (h * (n + 2 * k) + d if self.attention_bias else 0)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_hidden_layers * per_layer + self.vocab_size * d + d + head


class DecoderLayer(LayerPart):
    """One pre-norm decoder layer; scanned over the stacked layer axis (carry = hidden states)."""

    @nn.compact
    def __call__(self, x_BxTxD, lora, cos, sin, mask, cache=None, cache_index=None):
        c, lora = self.cfg, lora or {}
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", None, None))
        norm = lambda name: RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn = RopeAttention(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl, qk_norm=True,
                             name="self_attn")
        attn_out = attn(norm("input_layernorm")(x_BxTxD), cos, sin, mask, lora.get("self_attn"), cache, cache_index)
        if cache is not None:
            attn_out, cache = attn_out
        h = x_BxTxD + attn_out
        mlp = GatedMLP(c, self.dtype, self.param_dtype, self.deterministic, name="mlp")
        return h + mlp(norm("post_attention_layernorm")(h), lora.get("mlp")), cache


class Qwen3Model(LayerStack):
    """Embeddings, the scanned decoder `layers` and the final norm: (hidden states, embedding, KV cache)."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT, positions_BxT, lora, cache=None, cache_index=None):
        c, lora = self.cfg, lora or {}
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                         name="embed_tokens")
        x = embed(input_ids_BxT)
        cos, sin = rope_cos_sin(positions_BxT, c)
        if cache is None:
            mask = causal_padding_mask(attention_mask_BxT, None)
        else:  # attention_mask covers the cache slots (B, S); the T new tokens sit at slots cache_index..
            mask = cached_causal_mask(attention_mask_BxT, input_ids_BxT.shape[1], cache_index, None)
        layers = scanned_layers(DecoderLayer, self.remat, c.num_hidden_layers,
                                (0, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast))
        x, cache = layers(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                          name="layers")(x, lora.get("layers"), cos, sin, mask, cache, cache_index)
        return RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x), embed, cache


class Qwen3ForCausalLM(ModelRoot):
    """Causal LM head over `Qwen3Model`; returns logits (B, T, vocab) in the compute dtype."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, lora=None,
                 deterministic: bool = True, cache=None, cache_index=None, hidden_only: bool = False):
        """Logits (B, T, vocab); with a KV `cache` (`common.init_kv_cache`), (logits, updated cache). Decoding as
        in llama.py: `attention_mask_BxT` is then (B, S) over all cache slots and `positions_BxT` must be given."""
        lora = lora or {}
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        if positions_BxT is None:  # like HF: positions are 0..T-1 whatever the padding
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        model = Qwen3Model(self.cfg, self.dtype, self.param_dtype, self.remat, deterministic, self.attention_impl,
                           name="model")
        x_BxTxD, embed, cache = model(input_ids_BxT, attention_mask_BxT, positions_BxT, lora.get("model"),
                                      cache, cache_index)
        if hidden_only:  # the final hidden states: `Model.loss_sums` applies the head in chunks
            return x_BxTxD
        if self.cfg.tie_word_embeddings:
            logits = embed.attend(x_BxTxD)
        else:
            logits = LoraDense(self.cfg.vocab_size, ("embed", "vocab"), False, self.dtype, self.param_dtype,
                               deterministic, name="lm_head")(x_BxTxD, lora.get("lm_head"))
        return logits if cache is None else (logits, cache)


QWEN3_NAMES = NameTable(rules=(
    NameRule(r"model/embed_tokens/embedding", "model.embed_tokens.weight"),
    NameRule(r"model/layers/(self_attn|mlp)/(\w+_proj)/kernel", "model.layers.{layer}.{0}.{1}.weight",
             transpose=True),
    NameRule(r"model/layers/(self_attn|mlp)/(\w+_proj)/bias", "model.layers.{layer}.{0}.{1}.bias"),
    NameRule(r"model/layers/self_attn/(q_norm|k_norm)/scale", "model.layers.{layer}.self_attn.{0}.weight"),
    NameRule(r"model/layers/(\w+)/scale", "model.layers.{layer}.{0}.weight"),
    NameRule(r"model/norm/scale", "model.norm.weight"),
    NameRule(r"lm_head/kernel", "lm_head.weight", transpose=True),
), ignore=(r".*rotary_emb\.inv_freq",), base_prefix="model.")

FAMILY = Family(
    name="qwen3", config_cls=Qwen3Config, module_cls=Qwen3ForCausalLM, names=QWEN3_NAMES,
    architectures=ARCHITECTURES, model_types=("qwen3",), default_targets=("q_proj", "v_proj"),
    init_cache=init_kv_cache, cache_axes=KV_CACHE_AXES, embedding_path=("model", "embed_tokens", "embedding"))
