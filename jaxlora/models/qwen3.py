"""The Qwen3 family in Flax linen (`Qwen3ForCausalLM`, model_type "qwen3").

Llama-like (decoder.py's rotary GQA attention, gated SiLU MLP and KV cache) with an RMSNorm over head_dim on every
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

from jaxlora.models.common import supported_architecture
from jaxlora.models.decoder import (PROJ_BIAS_RULE, PROJ_KERNEL_RULE, QK_NORM_RULE, CausalLM, Decoder, DecoderDims,
                                    PreNormLayer, RopeAttention, decoder_family, decoder_fields, decoder_names,
                                    require_silu, rope_from_hf)

ARCHITECTURES = ("Qwen3ForCausalLM",)


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderDims):
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

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
        require_silu(hf, where)
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{where}: Qwen3 use_sliding_window=true (windowed attention in layers >= "
                             f"max_window_layers only) is not supported; set it to false for full attention")
        other = sorted(set(hf.get("layer_types") or ()) - {"full_attention"})
        if other:
            raise ValueError(f"{where}: layer_types {other} are not supported (only 'full_attention')")
        theta, rope_scaling = rope_from_hf(hf, where)
        return cls(
            **decoder_fields(hf, rms_norm_eps=1e-6, max_position_embeddings=32768),
            rope_theta=theta, rope_scaling=rope_scaling, attention_bias=bool(hf.get("attention_bias", False)),
            architecture=arch, model_type=hf.get("model_type", "qwen3"))

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


class DecoderLayer(PreNormLayer):
    """One pre-norm decoder layer whose attention normalizes each query and key head (q_norm, k_norm)."""

    def attention(self):
        return RopeAttention(self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                             qk_norm=True, name="self_attn")


class Qwen3Model(Decoder):
    """Embeddings, the scanned decoder `layers` and the final norm (`decoder.Decoder`)."""

    layer_cls = DecoderLayer


class Qwen3ForCausalLM(CausalLM):
    """Causal LM head over `Qwen3Model` (`decoder.CausalLM`); returns logits (B, T, vocab) in the compute dtype."""

    decoder_cls = Qwen3Model


QWEN3_NAMES = decoder_names(PROJ_KERNEL_RULE, PROJ_BIAS_RULE, QK_NORM_RULE, ignore=(r".*rotary_emb\.inv_freq",))

FAMILY = decoder_family(
    name="qwen3", config_cls=Qwen3Config, module_cls=Qwen3ForCausalLM, names=QWEN3_NAMES,
    architectures=ARCHITECTURES, model_types=("qwen3",), default_targets=("q_proj", "v_proj"))
