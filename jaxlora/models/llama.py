"""The Llama family in Flax linen: Llama 2/3, Mistral, Qwen2/2.5, SmolLM2.

One implementation covers every variant; the differences are read from the HF config.json into `LlamaConfig`
(rope theta and scaling, GQA head counts, head_dim, q/k/v biases, tied embeddings, sliding window). The decoder
itself is `jaxlora.models.decoder`'s (pre-norm layers of its rotary GQA attention and gated SiLU MLP), as
Llama defines it; this file is the config and the name table.

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

Generation passes a KV cache (`decoder.init_kv_cache`: (layers, B, S, kv_heads, head_dim) keys and values, scanned
with the layers): the new tokens' keys/values are written at slot `cache_index` and attention runs over all S slots
under a (B, S) slot mask. With `cache=None` (training, evaluation) the forward is exactly the one above.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxlora.models.common import supported_architecture
from jaxlora.models.decoder import (PROJ_BIAS_RULE, PROJ_KERNEL_RULE, CausalLM, Decoder, DecoderDims, GatedMLP,
                                    PreNormLayer, decoder_family, decoder_fields, decoder_names, require_silu,
                                    rope_from_hf)
from jaxlora.models.decoder import rope_inv_freq  # noqa: F401  (moved to decoder; kept importable from here)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# A config.json without "architectures" names its variant by model_type.
ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                              "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderDims):
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

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
        require_silu(hf, where)
        theta, rope_scaling = rope_from_hf(hf, where)
        is_qwen = arch == "Qwen2ForCausalLM"
        window = hf.get("sliding_window")
        if is_qwen:  # Qwen2 windows only layers >= max_window_layers; a per-layer window is not implemented
            if hf.get("use_sliding_window", False):
                raise ValueError(f"{where}: Qwen2 use_sliding_window=true (windowed attention in some layers "
                                 f"only) is not supported; set it to false for full attention in every layer")
            window = None
        return cls(
            **decoder_fields(hf, rms_norm_eps=1e-6, max_position_embeddings=2048),
            rope_theta=theta, rope_scaling=rope_scaling,
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


class DecoderLayer(PreNormLayer):
    """One pre-norm decoder layer; its MLP has biases when the config's mlp_bias says so."""

    def feed_forward(self, x_BxTxD, lora):
        mlp = GatedMLP(self.cfg, self.dtype, self.param_dtype, self.deterministic, use_bias=self.cfg.mlp_bias,
                       name="mlp")
        return mlp(x_BxTxD, lora.get("mlp")), None


class LlamaModel(Decoder):
    """Embeddings, the scanned decoder `layers` and the final norm (`decoder.Decoder`)."""

    layer_cls = DecoderLayer


class LlamaForCausalLM(CausalLM):
    """Causal LM head over `LlamaModel` (`decoder.CausalLM`); returns logits (B, T, vocab) in the compute dtype."""

    decoder_cls = LlamaModel


LLAMA_NAMES = decoder_names(PROJ_KERNEL_RULE, PROJ_BIAS_RULE, ignore=(r".*rotary_emb\.inv_freq",))

FAMILY = decoder_family(
    name="llama", config_cls=LlamaConfig, module_cls=LlamaForCausalLM, names=LLAMA_NAMES,
    architectures=SUPPORTED_ARCHITECTURES, model_types=tuple(ARCHITECTURE_OF_MODEL_TYPE),
    default_targets=("q_proj", "v_proj"))
