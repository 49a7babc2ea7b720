"""The Llama family in Flax linen: Llama 2/3, Mistral, Qwen2/2.5, SmolLM2.

One implementation covers every variant; the differences are read from the HF config.json into `LlamaConfig`
(rope theta and scaling, GQA head counts, head_dim, q/k/v biases, tied embeddings, sliding window).

Parameters mirror Hugging Face module names with the layer index folded into a leading stacked axis, so the
decoder layers run under `nn.scan` and compile time does not grow with depth:

    HF:   model.layers.7.self_attn.q_proj.weight  (out, in)
    ours: params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][7]  (in, out)

Every parameter carries logical axis names (`nn.with_logical_partitioning`); `jaxlora.sharding` maps them to
mesh axes. LoRA is not a variable of this module: the LoRA tree is an *argument* of `__call__`, threaded down to
each `LoraDense` (`jaxlora.models.common`; sliced per layer by the scan), so adapters are differentiated as plain
function inputs and the frozen kernel never receives a weight gradient. The forward adds `s * dropout(x) @ a @ b`
and never forms `W + s*a@b`; for LoRA-GA the kernel stays the loaded W0 and the branch computes
`x @ (a@b - a0@b0)` (zero at step 0), with dropout on that whole update (`LoraDense._lora_branch`).

Generation passes a KV cache (`common.init_kv_cache`: (layers, B, S, kv_heads, head_dim) keys and values, scanned
with the layers): the new tokens' keys/values are written at slot `cache_index` and attention runs over all S slots
under a (B, S) slot mask. With `cache=None` (training, evaluation) the forward is exactly the one above.
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
from jaxlora.models.common import rope_inv_freq  # noqa: F401  (moved to common; kept importable from here)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# A config.json without "architectures" names its variant by model_type.
ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs of HF's rope_scaling, hashable
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 and Llama attention_bias
    o_bias: bool = False  # Llama attention_bias only
    mlp_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> "LlamaConfig":
        """Builds the config from a parsed HF config.json, for any supported Llama-family architecture."""
        arch = supported_architecture(hf, SUPPORTED_ARCHITECTURES, where, ARCHITECTURE_OF_MODEL_TYPE)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        theta, rope_scaling = rope_from_hf(hf, where)
        heads = hf["num_attention_heads"]
        is_qwen = arch == "Qwen2ForCausalLM"
        window = hf.get("sliding_window")
        if is_qwen:  # Qwen2 windows only layers >= max_window_layers; a per-layer window is not implemented
            if hf.get("use_sliding_window", False):
                raise ValueError(f"{where}: Qwen2 use_sliding_window=true (windowed attention in some layers "
                                 f"only) is not supported; set it to false for full attention in every layer")
            window = None
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen else bool(hf.get("attention_bias", False)),
            o_bias=False if is_qwen else bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)), sliding_window=window,
            architecture=arch, model_type=hf.get("model_type", "llama"))

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included), for MFU estimates and logs."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
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
        attn = RopeAttention(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                             name="self_attn")
        attn_out = attn(norm("input_layernorm")(x_BxTxD), cos, sin, mask, lora.get("self_attn"), cache, cache_index)
        if cache is not None:
            attn_out, cache = attn_out
        h = x_BxTxD + attn_out
        mlp = GatedMLP(c, self.dtype, self.param_dtype, self.deterministic, use_bias=c.mlp_bias, name="mlp")
        return h + mlp(norm("post_attention_layernorm")(h), lora.get("mlp")), cache


class LlamaModel(LayerStack):
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
            mask = causal_padding_mask(attention_mask_BxT, c.sliding_window)
        else:  # attention_mask covers the cache slots (B, S); the T new tokens sit at slots cache_index..
            mask = cached_causal_mask(attention_mask_BxT, input_ids_BxT.shape[1], cache_index, c.sliding_window)
        layers = scanned_layers(DecoderLayer, self.remat, c.num_hidden_layers,
                                (0, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast))
        x, cache = layers(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                          name="layers")(x, lora.get("layers"), cos, sin, mask, cache, cache_index)
        return RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x), embed, cache


class LlamaForCausalLM(ModelRoot):
    """Causal LM head over `LlamaModel`; returns logits (B, T, vocab) in the compute dtype."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, lora=None,
                 deterministic: bool = True, cache=None, cache_index=None, hidden_only: bool = False):
        """Logits (B, T, vocab); with a KV `cache` (see `init_cache`), (logits, updated cache).

        Decoding: the T tokens go to cache slots cache_index.., `attention_mask_BxT` is then (B, S) over all slots
        (1 = a real token is or will be there) and `positions_BxT` (B, T) must be given.
        """
        lora = lora or {}
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        if positions_BxT is None:  # like HF: positions are 0..T-1 whatever the padding
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        model = LlamaModel(self.cfg, self.dtype, self.param_dtype, self.remat, deterministic,
                           self.attention_impl, name="model")
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


LLAMA_NAMES = NameTable(rules=(
    NameRule(r"model/embed_tokens/embedding", "model.embed_tokens.weight"),
    NameRule(r"model/layers/(self_attn|mlp)/(\w+)/kernel", "model.layers.{layer}.{0}.{1}.weight", transpose=True),
    NameRule(r"model/layers/(self_attn|mlp)/(\w+)/bias", "model.layers.{layer}.{0}.{1}.bias"),
    NameRule(r"model/layers/(\w+)/scale", "model.layers.{layer}.{0}.weight"),
    NameRule(r"model/norm/scale", "model.norm.weight"),
    NameRule(r"lm_head/kernel", "lm_head.weight", transpose=True),
), ignore=(r".*rotary_emb\.inv_freq",), base_prefix="model.")

FAMILY = Family(
    name="llama", config_cls=LlamaConfig, module_cls=LlamaForCausalLM, names=LLAMA_NAMES,
    architectures=SUPPORTED_ARCHITECTURES, model_types=tuple(ARCHITECTURE_OF_MODEL_TYPE),
    default_targets=("q_proj", "v_proj"), init_cache=init_kv_cache, cache_axes=KV_CACHE_AXES,
    embedding_path=("model", "embed_tokens", "embedding"))
