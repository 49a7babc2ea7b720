"""The BLOOM family in Flax linen (bigscience/bloom*, bloomz*): ALiBi, fused query_key_value, LayerNorm with bias.

Same conventions as every family (`jaxlora.models.common`): HF module names, layers stacked on a leading axis and
run under `nn.scan` (the stack is HF's `h`, so LoRA module names are PEFT's
`transformer.h.3.self_attention.query_key_value`), logical axis names on every parameter, and the LoRA tree passed in
as an argument to each `LoraDense`.

    HF:   transformer.h.7.self_attention.query_key_value.weight  (3*D, D), rows per head interleaved [q, k, v]
    ours: params["transformer"]["h"]["self_attention"]["query_key_value"]["kernel"][7]  (D, 3*D), same column order

The fused kernel keeps HF's column order, so a LoRA factor b (r, 3*D) is PEFT's lora_B.weight.T as is; the output
is split per head as HF does, viewed (N, 3, H). Head-major columns also make a "heads" split over the tensor axis
hand each device whole heads.

ALiBi follows HF's `build_alibi_tensor`: the bias of key j is slope_n * position_j, the same for every query (a
per-row constant added to true ALiBi's -slope*(i-j), which softmax ignores), with position_j = cumsum(mask) - 1 on
real tokens and 0 on padding. So a left-padded row gives the logits of the same row unpadded (a per-row offset
cancels in the softmax anyway), and pads inside a row do not count as distance. hidden_dropout and
attention_dropout are not applied (as HF at inference); LoRA dropout is.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import sharding
from jaxlora.io.hf_checkpoint import NameRule, NameTable
from jaxlora.models.attention import dot_product_attention
from jaxlora.models.common import (BiasedMLP, Family, LayerPart, LayerStack, LoraDense, ModelRoot, causal_padding_mask,
                                   hf_field, layer_norm, scanned_layers, select_positions, supported_architecture)

SUPPORTED_ARCHITECTURES = ("BloomForCausalLM",)

NAMES = NameTable(rules=(
    NameRule(r"transformer/word_embeddings/embedding", "transformer.word_embeddings.weight"),
    NameRule(r"transformer/(word_embeddings_layernorm|ln_f)/scale", "transformer.{0}.weight"),
    NameRule(r"transformer/(word_embeddings_layernorm|ln_f)/bias", "transformer.{0}.bias"),
    NameRule(r"transformer/h/(self_attention|mlp)/(\w+)/kernel", "transformer.h.{layer}.{0}.{1}.weight",
             transpose=True),
    NameRule(r"transformer/h/(self_attention|mlp)/(\w+)/bias", "transformer.h.{layer}.{0}.{1}.bias"),
    NameRule(r"transformer/h/(\w+_layernorm)/scale", "transformer.h.{layer}.{0}.weight"),
    NameRule(r"transformer/h/(\w+_layernorm)/bias", "transformer.h.{layer}.{0}.bias"),
    NameRule(r"lm_head/kernel", "lm_head.weight", transpose=True),
), stack_name="h", base_prefix="transformer.")


@dataclasses.dataclass(frozen=True)
class BloomConfig:
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int  # HF n_layer
    num_attention_heads: int  # HF n_head
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False  # residual taken after the layer norm (BLOOM-176B: no)
    tie_word_embeddings: bool = True
    architecture: str = "BloomForCausalLM"
    model_type: str = "bloom"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_head {self.num_attention_heads}")

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> "BloomConfig":
        arch = supported_architecture(hf, SUPPORTED_ARCHITECTURES, where)
        get = lambda *keys: hf_field(hf, keys, where)
        return cls(vocab_size=hf["vocab_size"], hidden_size=get("hidden_size", "n_embed"),
                   num_hidden_layers=get("n_layer", "num_hidden_layers"),
                   num_attention_heads=get("n_head", "num_attention_heads"),
                   layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                   apply_residual_connection_post_layernorm=bool(
                       hf.get("apply_residual_connection_post_layernorm", False)),
                   tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), architecture=arch,
                   model_type=hf.get("model_type", "bloom"))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return 4 * self.hidden_size

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included), for MFU estimates and logs."""
        d, f = self.hidden_size, self.intermediate_size
        per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_hidden_layers * per_layer + self.vocab_size * d + 4 * d + head


def alibi_slopes(num_heads: int) -> np.ndarray:
    """HF's `_get_alibi_slopes`: geometric slopes for the closest power of 2, then every other slope of the next
    power of 2 for the remaining heads (float32)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = base ** np.arange(1, 1 + closest, dtype=np.float32)
    if closest != num_heads:
        extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        remaining = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 1 + 2 * remaining, 2, dtype=np.float32)])
    return slopes.astype(np.float32)


def alibi_bias(positions_BxT: jax.Array, num_heads: int, dtype) -> jax.Array:
    """(B, N, 1, T): slope_n * position of key j, broadcast over queries; cast to the compute dtype like HF."""
    slopes_N = jnp.asarray(alibi_slopes(num_heads))
    bias = slopes_N[None, :, None, None] * positions_BxT.astype(jnp.float32)[:, None, None, :]
    return bias.astype(dtype)


def bloom_gelu(x: jax.Array) -> jax.Array:
    """BLOOM's tanh GELU with HF's constants (bloom_gelu_forward)."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


class Attention(LayerPart):
    @nn.compact
    def __call__(self, x_BxTxD, bias_BxNx1xT, mask_Bx1xTxT, lora):
        c, lora = self.cfg, lora or {}
        n, h, d = c.num_attention_heads, c.head_dim, c.hidden_size
        b, t, _ = x_BxTxD.shape

        def proj(features, axes, name, x):
            layer = LoraDense(features, axes, True, self.dtype, self.param_dtype, self.deterministic, name=name)
            return layer(x, lora.get(name))

        qkv_BxTxNx3xH = proj(3 * d, ("embed", "heads"), "query_key_value", x_BxTxD).reshape(b, t, n, 3, h)
        q, k, v = (qkv_BxTxNx3xH[:, :, :, i] for i in range(3))
        # HF: alibi + q.k / sqrt(head_dim), then the additive mask; dot_product_attention scales, adds bias, masks.
        out = dot_product_attention(q, k, v, mask_Bx1xTxT, bias=bias_BxNx1xT, causal=True,
                                    implementation=self.attention_impl)
        return proj(d, ("heads", "embed"), "dense", out.reshape(b, t, d))


class BloomBlock(LayerPart):
    """One BLOOM layer (pre-norm; the residual is the normed input when apply_residual_connection_post_layernorm)."""

    @nn.compact
    def __call__(self, x_BxTxD, lora, bias, mask):
        c, lora = self.cfg, lora or {}
        post_ln = c.apply_residual_connection_post_layernorm
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", None, None))
        normed = layer_norm(c.layer_norm_epsilon, self.dtype, self.param_dtype, "input_layernorm")(x_BxTxD)
        attn = Attention(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                         name="self_attention")
        h = attn(normed, bias, mask, lora.get("self_attention")) + (normed if post_ln else x_BxTxD)
        normed = layer_norm(c.layer_norm_epsilon, self.dtype, self.param_dtype, "post_attention_layernorm")(h)
        mlp = BiasedMLP(c, self.dtype, self.param_dtype, self.deterministic, names=("dense_h_to_4h", "dense_4h_to_h"),
                        activation=bloom_gelu, name="mlp")
        return mlp(normed, lora.get("mlp")) + (normed if post_ln else h), None


class BloomModel(LayerStack):
    """Word embeddings (+ their layer norm), the scanned `h` blocks and `ln_f`: (hidden states, embedding)."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT, positions_BxT, lora):
        c, lora = self.cfg, lora or {}
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                         name="word_embeddings")
        x = layer_norm(c.layer_norm_epsilon, self.dtype, self.param_dtype, "word_embeddings_layernorm")(
            embed(input_ids_BxT))
        bias = alibi_bias(positions_BxT, c.num_attention_heads, self.dtype)
        mask = causal_padding_mask(attention_mask_BxT, None)
        layers = scanned_layers(BloomBlock, self.remat, c.num_hidden_layers, (0, nn.broadcast, nn.broadcast))
        x, _ = layers(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                      name="h")(x, lora.get("h"), bias, mask)
        return layer_norm(c.layer_norm_epsilon, self.dtype, self.param_dtype, "ln_f")(x), embed


def alibi_positions(attention_mask_BxT: jax.Array) -> jax.Array:
    """HF's ALiBi positions: (cumsum(mask) - 1) * mask, i.e. 0.. over real tokens whatever the padding."""
    mask = (attention_mask_BxT != 0).astype(jnp.int32)  # a packed row's segment ids count as real tokens
    return (jnp.cumsum(mask, axis=-1) - 1) * mask


class BloomForCausalLM(ModelRoot):
    """Causal LM head over `BloomModel` (tied to the word embeddings unless the config says otherwise)."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, lora=None,
                 deterministic: bool = True, hidden_only: bool = False, select_BxK=None):
        lora = lora or {}
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        if positions_BxT is None:  # ALiBi positions from the mask, as HF's build_alibi_tensor
            positions_BxT = alibi_positions(attention_mask_BxT)
        model = BloomModel(self.cfg, self.dtype, self.param_dtype, self.remat, deterministic, self.attention_impl,
                           name="transformer")
        x_BxTxD, embed = model(input_ids_BxT, attention_mask_BxT, positions_BxT, lora.get("transformer"))
        x_BxTxD = select_positions(x_BxTxD, select_BxK)  # the loss's positions only (model.logits_at_targets)
        if hidden_only:  # the final hidden states: `Model.loss_sums` applies the head in chunks
            return x_BxTxD
        if self.cfg.tie_word_embeddings:
            return embed.attend(x_BxTxD)
        return LoraDense(self.cfg.vocab_size, ("embed", "vocab"), False, self.dtype, self.param_dtype,
                         deterministic, name="lm_head")(x_BxTxD, lora.get("lm_head"))


FAMILY = Family(name="bloom", config_cls=BloomConfig, module_cls=BloomForCausalLM, names=NAMES,
                architectures=SUPPORTED_ARCHITECTURES, model_types=("bloom",), default_targets=("query_key_value",),
                embedding_path=("transformer", "word_embeddings", "embedding"))
