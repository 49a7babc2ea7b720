"""The Phi-3 family in Flax linen (`Phi3ForCausalLM`, model_type "phi3": Phi-3/3.5-mini, Phi-3-medium, Phi-4-mini).

Llama-like pre-norm decoder (RMSNorm, rotary GQA attention, gated SiLU MLP) whose projections are fused as the HF
checkpoint stores them, and kept fused so LoRA targets and PEFT adapters use HF's module names:

    HF:   model.layers.7.self_attn.qkv_proj.weight   ((N + 2K) * H, D): rows [q heads | k heads | v heads]
    ours: params["model"]["layers"]["self_attn"]["qkv_proj"]["kernel"][7]   (D, (N + 2K) * H), same column order
    HF:   model.layers.7.mlp.gate_up_proj.weight      (2 * F, D): rows [gate | up]

A LoRA factor b of the fused kernel, (r, (N + 2K) * H), is PEFT's lora_B.weight.T as is (as BLOOM's
query_key_value), and LoRA-GA sees one fused kernel like any other.

Rotary embeddings: default, or LongRoPE ("longrope", older configs "su"; transformers' Phi3Config also renames
"yarn" to it) exactly as transformers' `_compute_longrope_parameters` + `dynamic_rope_update`: inverse frequencies
1 / (ext * theta^(2i/d)) with ext = long_factor when max(position) + 1 > original_max_position_embeddings in the
batch, short_factor otherwise (decided per call, from the positions given, as HF does per forward), and cos/sin
multiplied by the attention factor (config's attention_factor, else sqrt(1 + ln(f) / ln(original)) with f = factor or
max_position_embeddings / original_max_position_embeddings, 1 when f <= 1). partial_rotary_factor < 1 rotates only
the first int(head_dim * factor) channels of each head (Phi-4-mini). Positions come from `positions_BxT` (packing
passes them), the mask from `common.causal_padding_mask`, with the config's sliding_window when it sets one.

Not applied: resid_pdrop / embd_pdrop / attention_dropout (training-time dropout on the base; LoRA dropout is).
Generation that crosses original_max_position_embeddings keeps the short-factor keys already in the cache (HF's
`prepare_inputs_for_generation` instead re-encodes the whole sequence at that point). Refused with a ValueError
naming the field: any other rope type, a longrope config without its factors, hidden_act not in common.ACTIVATIONS.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.attention import dot_product_attention
from jaxlora.models.common import ACTIVATIONS, LayerPart, LoraDense, gated_activation, supported_architecture
from jaxlora.models.decoder import (PROJ_KERNEL_RULE, CausalLM, Decoder, DecoderDims, PreNormLayer, apply_rope,
                                    decoder_family, decoder_fields, decoder_names, with_cache)

ARCHITECTURES = ("Phi3ForCausalLM",)
LONGROPE_NAMES = ("longrope", "su", "yarn")  # transformers' Phi3Config maps "su" and "yarn" to "longrope"


@dataclasses.dataclass(frozen=True)
class Phi3Config(DecoderDims):
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" or "longrope"
    partial_rotary_factor: float = 1.0
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to original_max_position_embeddings
    long_factor: tuple[float, ...] = ()  # longrope: beyond it
    original_max_position_embeddings: int = 4096
    attention_factor: float = 1.0  # longrope: cos/sin multiplier
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    architecture: str = "Phi3ForCausalLM"
    model_type: str = "phi3"

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> Phi3Config:
        arch = supported_architecture(hf, ARCHITECTURES, where, {"phi3": "Phi3ForCausalLM"})
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        dims = decoder_fields(hf, rms_norm_eps=1e-5, max_position_embeddings=4096)
        rope = _rope_from_hf(hf, dims["head_dim"], dims["max_position_embeddings"], where)
        return cls(**dims, hidden_act=act, sliding_window=hf.get("sliding_window"), architecture=arch,
                   model_type=hf.get("model_type", "phi3"), **rope)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings and norms included), as transformers counts it."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        per_layer = d * h * (n + 2 * k) + n * h * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_hidden_layers * per_layer + self.vocab_size * d + d + head


def _rope_from_hf(hf: dict, head_dim: int, max_pos: int, where: str) -> dict:
    """Phi3Config's rope fields from config.json's rope_parameters (transformers >= 5) or rope_scaling + rope_theta."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(field) or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = dict(rope_theta=theta, partial_rotary_factor=partial)
    if kind == "default":
        return out
    if kind not in LONGROPE_NAMES:
        raise ValueError(f"{where}: {field} rope type {kind!r} is not supported for Phi-3; supported: "
                         f"('default', 'longrope', 'su')")
    half = int(head_dim * partial) // 2
    for name in ("short_factor", "long_factor"):
        if len(rope.get(name) or ()) != half:
            raise ValueError(f"{where}: {field} {kind} needs {name}, a list of {half} numbers (rotary dim / 2), "
                             f"got {rope.get(name)!r}")
    original = rope.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if not original:
        raise ValueError(f"{where}: {field} {kind} needs original_max_position_embeddings")
    factor = rope.get("factor") or max_pos / original
    attention = rope.get("attention_factor")
    if attention is None:  # transformers' default: the LongRoPE paper's
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(out, rope_type="longrope", short_factor=tuple(map(float, rope["short_factor"])),
                long_factor=tuple(map(float, rope["long_factor"])), original_max_position_embeddings=int(original),
                attention_factor=float(attention))


def phi3_rope_cos_sin(positions_BxT: jax.Array, cfg: Phi3Config) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, rotary_dim) as HF's Phi3RotaryEmbedding: default, or LongRoPE with the long factors when
    max(position) + 1 exceeds original_max_position_embeddings, and the attention factor on both."""
    dim = cfg.rotary_dim
    shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    if cfg.rope_type == "longrope":
        base = np.float32(cfg.rope_theta) ** shape
        short = (1.0 / (np.asarray(cfg.short_factor, np.float32) * base)).astype(np.float32)
        long = (1.0 / (np.asarray(cfg.long_factor, np.float32) * base)).astype(np.float32)
        use_long = jnp.max(positions_BxT) + 1 > cfg.original_max_position_embeddings
        inv = jnp.where(use_long, jnp.asarray(long), jnp.asarray(short))
    else:
        inv = jnp.asarray((1.0 / (cfg.rope_theta ** shape)).astype(np.float32))
    freqs_BxTxR2 = positions_BxT[..., None].astype(jnp.float32) * inv[None, None, :]
    emb_BxTxR = jnp.concatenate([freqs_BxTxR2, freqs_BxTxR2], axis=-1)
    scale = jnp.float32(cfg.attention_factor if cfg.rope_type == "longrope" else 1.0)
    return jnp.cos(emb_BxTxR) * scale, jnp.sin(emb_BxTxR) * scale


def partial_rope(x_BxTxNxH: jax.Array, cos_BxTxR: jax.Array, sin_BxTxR: jax.Array) -> jax.Array:
    """Rotates the first R channels of each head (HF's apply_rotary_pos_emb with rotary_dim = R), passes the rest."""
    r = cos_BxTxR.shape[-1]
    if r == x_BxTxNxH.shape[-1]:
        return apply_rope(x_BxTxNxH, cos_BxTxR, sin_BxTxR)
    rotated = apply_rope(x_BxTxNxH[..., :r], cos_BxTxR, sin_BxTxR)
    return jnp.concatenate([rotated, x_BxTxNxH[..., r:]], axis=-1)


class Phi3Attention(LayerPart):
    """GQA self-attention from the fused `qkv_proj` (columns [q | k | v]) and `o_proj`. With a `cache`: (out, cache)."""

    @nn.compact
    def __call__(self, x_BxTxD, cos, sin, mask, lora, cache=None, cache_index=None):
        c, lora = self.cfg, lora or {}
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b, t, _ = x_BxTxD.shape

        def proj(features, axes, name, x):
            layer = LoraDense(features, axes, False, self.dtype, self.param_dtype, self.deterministic, name=name)
            return layer(x, lora.get(name))

        qkv = proj((n + 2 * k) * h, ("embed", "heads"), "qkv_proj", x_BxTxD)
        q = qkv[..., :n * h].reshape(b, t, n, h)
        kk = qkv[..., n * h:(n + k) * h].reshape(b, t, k, h)
        v = qkv[..., (n + k) * h:].reshape(b, t, k, h)
        q, kk = partial_rope(q, cos, sin), partial_rope(kk, cos, sin)
        kk, v, cache, impl = with_cache(cache, kk, v, cache_index, self.attention_impl)
        out = dot_product_attention(q, kk, v, mask, causal=cache is None, implementation=impl)
        out = proj(c.hidden_size, ("heads", "embed"), "o_proj", out.reshape(b, t, n * h))
        return out if cache is None else (out, cache)


class Phi3MLP(LayerPart):
    """down(up * act(gate)) with [gate | up] from the fused `gate_up_proj` (HF's Phi3MLP)."""

    @nn.compact
    def __call__(self, x_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        dense = lambda f, axes, name, x: LoraDense(f, axes, False, self.dtype, self.param_dtype, self.deterministic,
                                                   name=name)(x, lora.get(name))
        gate_up = dense(2 * c.intermediate_size, ("embed", "mlp"), "gate_up_proj", x_BxTxD)
        gate, up = gate_up[..., :c.intermediate_size], gate_up[..., c.intermediate_size:]
        activated = gated_activation(ACTIVATIONS[c.hidden_act], gate, up)
        return dense(c.hidden_size, ("mlp", "embed"), "down_proj", activated)


class DecoderLayer(PreNormLayer):
    """One pre-norm decoder layer of the fused attention and MLP."""

    def attention(self):
        return Phi3Attention(self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                             name="self_attn")

    def feed_forward(self, x_BxTxD, lora):
        return Phi3MLP(self.cfg, self.dtype, self.param_dtype, self.deterministic, name="mlp")(x_BxTxD,
                                                                                             lora.get("mlp")), None


class Phi3Model(Decoder):
    """Embeddings, the scanned decoder `layers` and the final norm (`decoder.Decoder`), with Phi-3's rotary table."""

    layer_cls = DecoderLayer

    def rotary(self, positions_BxT):
        cos, sin = phi3_rope_cos_sin(positions_BxT, self.cfg)
        return cos.astype(self.dtype), sin.astype(self.dtype)  # HF casts cos/sin to the activations' dtype


class Phi3ForCausalLM(CausalLM):
    """Causal LM head over `Phi3Model` (`decoder.CausalLM`); returns logits (B, T, vocab) in the compute dtype."""

    decoder_cls = Phi3Model


PHI3_NAMES = decoder_names(PROJ_KERNEL_RULE, ignore=(r".*rotary_emb\..*inv_freq",))

FAMILY = decoder_family(
    name="phi3", config_cls=Phi3Config, module_cls=Phi3ForCausalLM, names=PHI3_NAMES, architectures=ARCHITECTURES,
    model_types=("phi3",), default_targets=())  # PEFT has no default for phi3: target_modules must be given
