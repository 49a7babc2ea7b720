"""The GPT-2 family in Flax linen (openai-community/gpt2*, distilgpt2 and other GPT2LMHeadModel checkpoints).

Same conventions as every family (`jaxlora.models.common`); the scanned stack is HF's `h`, so LoRA module names are
PEFT's (`transformer.h.3.attn.c_attn`). HF's GPT-2 uses Conv1D, whose weight is already (in, out): the name table
maps it without a transpose, and the fused c_attn keeps HF's column order [q | k | v] (each D wide, heads inside):

    HF:   transformer.h.7.attn.c_attn.weight  (D, 3*D)  Conv1D
    ours: params["transformer"]["h"]["attn"]["c_attn"]["kernel"][7]  (D, 3*D)  same tensor

A LoRA factor is then PEFT's (fan_in_fan_out=True) lora_A.weight.T / lora_B.weight.T, as for any Linear. Learned
absolute positions (wpe) are 0..T-1 whatever the padding, as in HF when no position_ids are given. The dropouts
(embd/attn/resid_pdrop) are not applied (as HF at inference); LoRA dropout is.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jaxlora import sharding
from jaxlora.io.hf_checkpoint import NameRule, NameTable
from jaxlora.models.attention import dot_product_attention
from jaxlora.models.common import (ACTIVATIONS, BiasedMLP, Family, LayerPart, LayerStack, LoraDense, ModelRoot,
                                   causal_padding_mask, hf_field, layer_norm, scanned_layers, select_positions,
                                   supported_architecture)

SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel",)

NAMES = NameTable(rules=(
    NameRule(r"transformer/(wte|wpe)/embedding", "transformer.{0}.weight"),
    NameRule(r"transformer/h/(attn|mlp)/(\w+)/kernel", "transformer.h.{layer}.{0}.{1}.weight"),  # Conv1D: (in, out)
    NameRule(r"transformer/h/(attn|mlp)/(\w+)/bias", "transformer.h.{layer}.{0}.{1}.bias"),
    NameRule(r"transformer/h/(ln_1|ln_2)/scale", "transformer.h.{layer}.{0}.weight"),
    NameRule(r"transformer/h/(ln_1|ln_2)/bias", "transformer.h.{layer}.{0}.bias"),
    NameRule(r"transformer/ln_f/scale", "transformer.ln_f.weight"),
    NameRule(r"transformer/ln_f/bias", "transformer.ln_f.bias"),
    NameRule(r"lm_head/kernel", "lm_head.weight", transpose=True),  # nn.Linear, only when untied
), ignore=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",),  # causal-mask buffers of older checkpoints
    stack_name="h", base_prefix="transformer.")

@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

    vocab_size: int
    hidden_size: int  # HF n_embd
    num_hidden_layers: int  # HF n_layer
    num_attention_heads: int  # HF n_head
    intermediate_size: int  # HF n_inner, default 4 * n_embd
    max_position_embeddings: int = 1024  # HF n_positions
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True  # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # scores also / (layer index + 1)
    tie_word_embeddings: bool = True
    architecture: str = "GPT2LMHeadModel"
    model_type: str = "gpt2"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"n_embd {self.hidden_size} is not divisible by n_head {self.num_attention_heads}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation_function!r} is not supported; supported: "
                             f"{', '.join(ACTIVATIONS)}")

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> "GPT2Config":
        arch = supported_architecture(hf, SUPPORTED_ARCHITECTURES, where)
        if hf.get("add_cross_attention", False):
            raise ValueError(f"{where}: add_cross_attention=true (GPT-2 as a decoder of an encoder-decoder model) "
                             f"is not supported")
        get = lambda *keys: hf_field(hf, keys, where)
        d = get("n_embd", "hidden_size")
        try:
            return cls(vocab_size=hf["vocab_size"], hidden_size=d,
                       num_hidden_layers=get("n_layer", "num_hidden_layers"),
                       num_attention_heads=get("n_head", "num_attention_heads"),
                       intermediate_size=hf.get("n_inner") or 4 * d,
                       max_position_embeddings=get("n_positions", "max_position_embeddings"),
                       layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                       activation_function=hf.get("activation_function", "gelu_new"),
                       scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
                       scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
                       tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), architecture=arch,
                       model_type=hf.get("model_type", "gpt2"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included), for MFU estimates and logs."""
        d, f = self.hidden_size, self.intermediate_size
        per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        embeds = (self.vocab_size + self.max_position_embeddings) * d
        return self.num_hidden_layers * per_layer + embeds + 2 * d + head


class Attention(LayerPart):
    @nn.compact
    def __call__(self, x_BxTxD, layer_idx, mask_Bx1xTxT, lora):
        c, lora = self.cfg, lora or {}
        n, h, d = c.num_attention_heads, c.head_dim, c.hidden_size
        b, t, _ = x_BxTxD.shape

        def proj(features, axes, name, x):
            layer = LoraDense(features, axes, True, self.dtype, self.param_dtype, self.deterministic, name=name)
            return layer(x, lora.get(name))

        qkv_BxTx3xNxH = proj(3 * d, ("embed", "heads"), "c_attn", x_BxTxD).reshape(b, t, 3, n, h)
        q, k, v = (qkv_BxTx3xNxH[:, :, i] for i in range(3))
        scale = h ** -0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:  # the layer index is a scanned value, so it scales q, not `scale`
            q = q / (layer_idx + 1).astype(q.dtype)
        out = dot_product_attention(q, k, v, mask_Bx1xTxT, scale=scale, causal=True,
                                    implementation=self.attention_impl)
        return proj(d, ("heads", "embed"), "c_proj", out.reshape(b, t, d))


class GPT2Block(LayerPart):
    """One pre-norm GPT-2 layer; scanned over the stacked layer axis (carry = hidden states)."""

    @nn.compact
    def __call__(self, x_BxTxD, lora, layer_idx, mask):
        c, lora = self.cfg, lora or {}
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", None, None))
        norm = lambda name: layer_norm(c.layer_norm_epsilon, self.dtype, self.param_dtype, name)
        attn = Attention(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl, name="attn")
        h = x_BxTxD + attn(norm("ln_1")(x_BxTxD), layer_idx, mask, lora.get("attn"))
        mlp = BiasedMLP(c, self.dtype, self.param_dtype, self.deterministic, names=("c_fc", "c_proj"),
                        activation=ACTIVATIONS[c.activation_function], name="mlp")
        return h + mlp(norm("ln_2")(h), lora.get("mlp")), None


class GPT2Model(LayerStack):
    """Token + learned position embeddings, the scanned `h` blocks and `ln_f`: (hidden states, wte)."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT, positions_BxT, lora):
        c, lora = self.cfg, lora or {}
        embed = lambda num, axes, name: nn.Embed(
            num, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))
        wte = embed(c.vocab_size, ("vocab", "embed"), "wte")
        # positions are few and always gathered whole: replicated on that axis
        x = wte(input_ids_BxT) + embed(c.max_position_embeddings, (None, "embed"), "wpe")(positions_BxT)
        mask = causal_padding_mask(attention_mask_BxT, None)
        layers = scanned_layers(GPT2Block, self.remat, c.num_hidden_layers, (0, 0, nn.broadcast))
        x, _ = layers(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                      name="h")(x, lora.get("h"), jnp.arange(c.num_hidden_layers), mask)
        return layer_norm(c.layer_norm_epsilon, self.dtype, self.param_dtype, "ln_f")(x), wte


class GPT2LMHeadModel(ModelRoot):
    """Causal LM head over `GPT2Model` (tied to wte unless the config says otherwise)."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, lora=None,
                 deterministic: bool = True, hidden_only: bool = False, select_BxK=None):
        lora = lora or {}
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        if positions_BxT is None:  # like HF: positions are 0..T-1 whatever the padding
            if input_ids_BxT.shape[1] > self.cfg.max_position_embeddings:  # a gather past wpe would give NaNs
                raise ValueError(f"sequence length {input_ids_BxT.shape[1]} exceeds GPT-2's n_positions "
                                 f"{self.cfg.max_position_embeddings}")
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        model = GPT2Model(self.cfg, self.dtype, self.param_dtype, self.remat, deterministic, self.attention_impl,
                          name="transformer")
        x_BxTxD, wte = model(input_ids_BxT, attention_mask_BxT, positions_BxT, lora.get("transformer"))
        x_BxTxD = select_positions(x_BxTxD, select_BxK)  # the loss's positions only (model.logits_at_targets)
        if hidden_only:  # the final hidden states: `Model.loss_sums` applies the head in chunks
            return x_BxTxD
        if self.cfg.tie_word_embeddings:
            return wte.attend(x_BxTxD)
        return LoraDense(self.cfg.vocab_size, ("embed", "vocab"), False, self.dtype, self.param_dtype,
                         deterministic, name="lm_head")(x_BxTxD, lora.get("lm_head"))


FAMILY = Family(name="gpt2", config_cls=GPT2Config, module_cls=GPT2LMHeadModel, names=NAMES,
                architectures=SUPPORTED_ARCHITECTURES, model_types=("gpt2",), default_targets=("c_attn",),
                embedding_path=("transformer", "wte", "embedding"))
