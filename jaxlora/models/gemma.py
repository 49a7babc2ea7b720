"""The Gemma 2 and Gemma 3 (text) family in Flax linen: `Gemma2ForCausalLM` (model_type "gemma2") and
`Gemma3ForCausalLM` (model_type "gemma3_text"), as transformers' modeling_gemma2.py / modeling_gemma3.py compute them.

Both are Llama-like decoders (GQA with rotary positions, a gated MLP, tied embeddings) with Gemma's changes:

- RMSNorm scales by (1 + w) and is computed in float32 before casting back (`GemmaRMSNorm`; HF stores w, and so do
  we), around both sub-blocks: input_layernorm -> attention -> post_attention_layernorm -> residual,
  pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm -> residual;
- the MLP is GeGLU: down(act(gate(x)) * up(x)) with `hidden_activation` (gelu_pytorch_tanh);
- embeddings are multiplied by sqrt(hidden_size), the normalizer cast to the embedding dtype first (as HF does);
- attention scores are scaled by query_pre_attn_scalar**-0.5 (not head_dim**-0.5);
- layers alternate between sliding-window ("sliding_attention") and global ("full_attention") attention, per HF's
  `layer_types` (when config.json lacks it: Gemma 2 every other layer from the first, Gemma 3 five local to one global,
  `sliding_window_pattern`). The stack is one `nn.scan`: each layer gets its type as a scanned int (0 global,
  1 sliding) and picks its mask (and, for Gemma 3, its rotary table) from the two computed once per forward;
- Gemma 2: tanh soft-capping of the attention scores (attn_logit_softcapping) and of the final logits
  (final_logit_softcapping);
- Gemma 3: an RMSNorm (1 + w) over head_dim on every query and key head (q_norm, k_norm) before the rotation; separate
  rotary bases for local (rope_local_base_freq, or rope_parameters["sliding_attention"]) and global layers
  (rope_theta, or rope_parameters["full_attention"]), rope scaling (linear, llama3) read per layer type; final logit
  soft-capping when configured.

Parameters mirror HF module names with the layer index folded into a leading stacked axis:

    HF:   model.layers.7.pre_feedforward_layernorm.weight  (hidden,)
    ours: params["model"]["layers"]["pre_feedforward_layernorm"]["scale"][7]

Generation uses decoder.py's KV cache (every layer caches every slot; a sliding layer masks slots outside its window).

Not implemented, and refused with a ValueError naming the field: use_bidirectional_attention, attention_dropout > 0,
layer types other than sliding/full attention, rope types other than default/linear/llama3, hidden activations
jaxlora does not have, and (Gemma 3) attn_logit_softcapping, which transformers' Gemma 3 does not apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import sharding
from jaxlora.models.attention import dot_product_attention
from jaxlora.models.common import ACTIVATIONS, LayerPart, LoraDense, gated_activation, supported_architecture
from jaxlora.models.decoder import (PROJ_BIAS_RULE, PROJ_KERNEL_RULE, QK_NORM_RULE, CausalLM, Decoder, DecoderDims,
                                    apply_rope, decoder_family, decoder_fields, decoder_mask, decoder_names,
                                    rope_cos_sin, rope_from_hf, with_cache)

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
ARCHITECTURE_OF_MODEL_TYPE = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
LAYER_TYPES = ("full_attention", "sliding_attention")  # index = the scanned per-layer type
# transformers' config defaults for fields a config.json may omit (Gemma2Config, Gemma3TextConfig)
_DEFAULTS = {
    "Gemma2ForCausalLM": dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rope_theta=10000.0,
                              max_position_embeddings=8192),
    "Gemma3ForCausalLM": dict(final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=1_000_000.0,
                              max_position_embeddings=131_072),
}


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderDims):
    """Architecture hyperparameters of a Gemma 2 or Gemma 3 text model, read from config.json (`from_hf_dict`)."""

    layer_types: tuple[str, ...]  # per layer: "sliding_attention" or "full_attention"
    sliding_window: int | None = 4096
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_theta: float = 10000.0  # global (full-attention) layers
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs, hashable
    rope_local_theta: float = 10000.0  # sliding-window layers
    rope_local_scaling: tuple[tuple[str, Any], ...] = ()
    qk_norm: bool = False  # Gemma 3
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    architecture: str = "Gemma2ForCausalLM"
    model_type: str = "gemma2"

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> GemmaConfig:
        arch = supported_architecture(hf, ARCHITECTURES, where, ARCHITECTURE_OF_MODEL_TYPE)
        gemma3, defaults = arch == "Gemma3ForCausalLM", _DEFAULTS[arch]
        field = lambda key: hf.get(key, defaults[key])
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{where}: use_bidirectional_attention=true is not supported (causal attention only)")
        if hf.get("attention_dropout"):
            raise ValueError(f"{where}: attention_dropout={hf['attention_dropout']} is not supported (only 0)")
        if gemma3 and hf.get("attn_logit_softcapping") is not None:
            raise ValueError(f"{where}: attn_logit_softcapping={hf['attn_logit_softcapping']} is not supported for "
                             f"Gemma 3 (transformers' Gemma 3 does not apply it); set it to null")
        layers = hf["num_hidden_layers"]
        layer_types = tuple(hf.get("layer_types") or _default_layer_types(hf, layers, gemma3))
        if len(layer_types) != layers or set(layer_types) - set(LAYER_TYPES):
            raise ValueError(f"{where}: layer_types must be {layers} of {LAYER_TYPES}, got {list(layer_types)}")
        window = hf.get("sliding_window", 4096)
        if "sliding_attention" in layer_types and not window:
            raise ValueError(f"{where}: sliding_window={window!r} but layer_types has sliding_attention layers")
        if gemma3:
            (theta, scaling), (local_theta, local_scaling) = _gemma3_ropes(hf, where)
        else:
            theta, scaling = rope_from_hf({**hf, "rope_theta": field("rope_theta")}, where)
            local_theta, local_scaling = theta, scaling
        dims = decoder_fields(hf, rms_norm_eps=1e-6, max_position_embeddings=field("max_position_embeddings"),
                              tie_word_embeddings=True)
        dims.update(num_key_value_heads=hf.get("num_key_value_heads", 4),  # Gemma's defaults, not HF's fallbacks
                    head_dim=hf.get("head_dim", 256) or hf["hidden_size"] // hf["num_attention_heads"])
        return cls(
            **dims, layer_types=layer_types, sliding_window=window, hidden_activation=act,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=None if gemma3 else field("attn_logit_softcapping"),
            final_logit_softcapping=field("final_logit_softcapping"), rope_theta=theta, rope_scaling=scaling,
            rope_local_theta=local_theta, rope_local_scaling=local_scaling, qk_norm=gemma3,
            attention_bias=bool(hf.get("attention_bias", False)), architecture=arch,
            model_type=hf.get("model_type") or ("gemma3_text" if gemma3 else "gemma2"))

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings, norms and biases included), as transformers counts it."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        attn = d * h * (2 * n + 2 * k) + (h * (n + 2 * k) + d if self.attention_bias else 0)
        per_layer = attn + (2 * h if self.qk_norm else 0) + 3 * d * f + 4 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_hidden_layers * per_layer + self.vocab_size * d + d + head

    def rope(self, layer_type: str) -> GemmaConfig:
        """This config with the rotary base and scaling of `layer_type` as rope_theta / rope_scaling (decoder's rope
        reads those)."""
        if layer_type == "full_attention":
            return self
        return dataclasses.replace(self, rope_theta=self.rope_local_theta, rope_scaling=self.rope_local_scaling)


def _default_layer_types(hf: dict, layers: int, gemma3: bool) -> list[str]:
    """HF's rule when config.json has no layer_types: every `pattern`-th layer global, the others sliding."""
    pattern = (hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6) if gemma3 else 2
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]


def _gemma3_ropes(hf: dict, where: str):
    """((theta, scaling) of the global layers, (theta, scaling) of the local ones), from rope_parameters keyed by
    layer type (transformers >= 5) or the older rope_theta / rope_local_base_freq / rope_scaling (global only)."""
    params = hf.get("rope_parameters")
    if params:
        if not set(params) <= set(LAYER_TYPES):
            raise ValueError(f"{where}: rope_parameters must be keyed by layer type {LAYER_TYPES} for Gemma 3, "
                             f"got keys {sorted(params)}")
        full, local = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
        return (rope_from_hf({"rope_parameters": full}, f"{where}: rope_parameters['full_attention']"),
                rope_from_hf({"rope_parameters": local}, f"{where}: rope_parameters['sliding_attention']"))
    full = {"rope_scaling": hf.get("rope_scaling"), "rope_theta": hf.get("rope_theta", 1_000_000.0)}
    return rope_from_hf(full, where), (float(hf.get("rope_local_base_freq", 10000.0)), ())


# ------------------------------------------------------------------------------------------ the module


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + w), all in float32, then cast to the input dtype (HF's Gemma2RMSNorm / Gemma3RMSNorm;
    common.RMSNorm scales by w after the cast). w starts at zero."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + w.astype(jnp.float32)).reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


class GemmaAttention(LayerPart):
    """GQA self-attention (q_proj, k_proj, v_proj, o_proj) with rotary positions, Gemma's query_pre_attn_scalar
    scaling, Gemma 2's score soft-capping and Gemma 3's per-head q/k norms. With a `cache`: (output, cache)."""

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, mask, lora, cache=None, cache_index=None):
        c, lora = self.cfg, lora or {}
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b, t, _ = x_BxTxD.shape

        def proj(features, axes, name, x):
            layer = LoraDense(features, axes, c.attention_bias, self.dtype, self.param_dtype, self.deterministic,
                              name=name)
            return layer(x, lora.get(name))

        q = proj(n * h, ("embed", "heads"), "q_proj", x_BxTxD).reshape(b, t, n, h)
        kk = proj(k * h, ("embed", "kv_heads"), "k_proj", x_BxTxD).reshape(b, t, k, h)
        v = proj(k * h, ("embed", "kv_heads"), "v_proj", x_BxTxD).reshape(b, t, k, h)
        if c.qk_norm:
            q = GemmaRMSNorm(c.rms_norm_eps, self.param_dtype, name="q_norm")(q)
            kk = GemmaRMSNorm(c.rms_norm_eps, self.param_dtype, name="k_norm")(kk)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        kk, v, cache, impl = with_cache(cache, kk, v, cache_index, self.attention_impl)
        scale = c.query_pre_attn_scalar ** -0.5
        out = dot_product_attention(q, kk, v, mask, scale=scale, softcap=c.attn_logit_softcapping,
                                    causal=cache is None, implementation=impl)
        out = proj(c.hidden_size, ("heads", "embed"), "o_proj", out.reshape(b, t, n * h))
        return out if cache is None else (out, cache)


class GegluMLP(LayerPart):
    """down(act(gate(x)) * up(x)) with the config's hidden_activation (HF's Gemma2MLP / Gemma3MLP)."""

    @nn.compact
    def __call__(self, x_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        dense = lambda f, axes, name, x: LoraDense(f, axes, False, self.dtype, self.param_dtype, self.deterministic,
                                                   name=name)(x, lora.get(name))
        gate = dense(c.intermediate_size, ("embed", "mlp"), "gate_proj", x_BxTxD)
        up = dense(c.intermediate_size, ("embed", "mlp"), "up_proj", x_BxTxD)
        return dense(c.hidden_size, ("mlp", "embed"), "down_proj",
                     gated_activation(ACTIVATIONS[c.hidden_activation], gate, up))


class DecoderLayer(LayerPart):
    """One sandwich-norm decoder layer; scanned over the stacked layer axis (carry = hidden states). `layer_type`
    (scanned, 0 global / 1 sliding) picks this layer's mask and rotary table out of the stacked pairs."""

    @nn.compact
    def __call__(self, x_BxTxD, lora, layer_type, cos_2xBxTxH, sin_2xBxTxH, mask_2xBx1xTxS, cache=None,
                 cache_index=None):
        c, lora = self.cfg, lora or {}
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", None, None))
        pick = lambda pair: jax.lax.dynamic_index_in_dim(pair, layer_type, axis=0, keepdims=False)
        norm = lambda name: GemmaRMSNorm(c.rms_norm_eps, self.param_dtype, name=name)
        attn = GemmaAttention(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                              name="self_attn")
        attn_out = attn(norm("input_layernorm")(x_BxTxD), pick(cos_2xBxTxH), pick(sin_2xBxTxH), pick(mask_2xBx1xTxS),
                        lora.get("self_attn"), cache, cache_index)
        if cache is not None:
            attn_out, cache = attn_out
        h = x_BxTxD + norm("post_attention_layernorm")(attn_out)
        mlp = GegluMLP(c, self.dtype, self.param_dtype, self.deterministic, name="mlp")
        mlp_out = mlp(norm("pre_feedforward_layernorm")(h), lora.get("mlp"))
        return h + norm("post_feedforward_layernorm")(mlp_out), (cache, None)


class GemmaModel(Decoder):
    """Scaled embeddings, the scanned decoder `layers` and the final norm (`decoder.Decoder`). Every layer gets both
    layer types' rotary tables and masks, stacked, and its own type as a scanned int to pick them with."""

    layer_cls = DecoderLayer

    def scale_embeddings(self, x_BxTxD):
        # HF multiplies by sqrt(hidden) cast to the embedding (parameter) dtype
        normalizer = jnp.asarray(np.float32(self.cfg.hidden_size ** 0.5), self.param_dtype).astype(self.dtype)
        return x_BxTxD * normalizer

    def rotary(self, positions_BxT):
        ropes = [rope_cos_sin(positions_BxT, self.cfg.rope(kind)) for kind in LAYER_TYPES]
        return jnp.stack([r[0] for r in ropes]), jnp.stack([r[1] for r in ropes])

    def attention_mask(self, attention_mask_BxT, t, cache_index, cached):
        windows = (None, self.cfg.sliding_window)  # in LAYER_TYPES order
        return jnp.stack([decoder_mask(attention_mask_BxT, t, cache_index, cached, w) for w in windows])

    def per_layer_inputs(self):
        return (jnp.asarray([LAYER_TYPES.index(kind) for kind in self.cfg.layer_types], jnp.int32),)

    def final_norm(self):
        return GemmaRMSNorm(self.cfg.rms_norm_eps, self.param_dtype, name="norm")


class GemmaForCausalLM(CausalLM):
    """Causal LM head over `GemmaModel` (`decoder.CausalLM`: tied or `lm_head`, with final logit soft-capping when
    configured); returns logits (B, T, vocab) in the compute dtype."""

    decoder_cls = GemmaModel


GEMMA_NAMES = decoder_names(PROJ_KERNEL_RULE, PROJ_BIAS_RULE, QK_NORM_RULE,
                            ignore=(r".*rotary_emb\..*inv_freq", r".*embed_scale"))

FAMILY = decoder_family(
    name="gemma", config_cls=GemmaConfig, module_cls=GemmaForCausalLM, names=GEMMA_NAMES,
    architectures=ARCHITECTURES, model_types=tuple(ARCHITECTURE_OF_MODEL_TYPE),
    default_targets=("q_proj", "v_proj"))  # PEFT's mapping for gemma2 and gemma3_text
