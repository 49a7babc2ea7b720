"""The Mixtral family in Flax linen (`MixtralForCausalLM`, model_type "mixtral": Mixtral-8x7B, 8x22B).

Mistral attention (common.py's rotary GQA attention, sliding window if the config sets one, KV cache) with the MLP
replaced by a sparse mixture of experts: a router picks `num_experts_per_tok` of `num_local_experts` SwiGLU experts
per token. Routing is transformers' MixtralTopKRouter: softmax over all experts in float32, top-k, renormalized
over the k chosen.

Experts run as dense einsums over a stacked expert axis, no Python loop over experts: every expert computes every
token and the router's weights (zero off the top k) combine them. That costs E/k times the routed FLOPs (4x for
8 experts, top 2), the price of static shapes with no dispatch; it folds the combine into w2's contraction (one
(tokens, E*F) x (E*F, D) matmul), so no (tokens, E, D) tensor is formed. Expert kernels carry the logical axis
"expert", split over the mesh's tensor axis (`jaxlora.sharding` rules: expert parallelism).

Parameters mirror the HF checkpoint's (transformers-4 layout, which transformers 5 still writes and reads):

    HF:   model.layers.7.block_sparse_moe.experts.5.w1.weight     (F, D)
    ours: params["model"]["layers"]["block_sparse_moe"]["experts"]["w1"]["kernel"][7, 5]    (D, F)
    HF:   model.layers.7.block_sparse_moe.gate.weight              (E, D)
    ours: params["model"]["layers"]["block_sparse_moe"]["gate"]["weight"][7]              (D, E)

LoRA targets HF module names: attention (q/k/v/o_proj) and each expert's w1/w2/w3, with per-expert adapters
a (E, in, r), b (E, r, out) (stacked (L, E, ..) in the LoRA tree); PEFT names them
"model.layers.N.block_sparse_moe.experts.E.w1", the form PEFT converts onto transformers 5's fused experts when it
loads the adapter. The router is a plain weight, not a LoRA target (in transformers 5 it is no nn.Linear either).

Not implemented, and refused with a ValueError naming the field: the router load-balancing loss
(output_router_logits=true: set it false to train on the LM loss alone), router_jitter_noise > 0 (training-time
noise), rope types other than default/linear/llama3, hidden_act other than silu.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora import sharding
from jaxlora.io.hf_checkpoint import NameRule, NameTable
from jaxlora.lora.weights import LoraWeights
from jaxlora.quant.qarray import dequantize, is_quantized
from jaxlora.models.common import (KV_CACHE_AXES, Family, LayerPart, LayerStack, LoraDense, ModelRoot, RMSNorm,
                                   RopeAttention, cached_causal_mask, causal_padding_mask, init_kv_cache,
                                   rope_cos_sin, rope_from_hf, scanned_layers, supported_architecture)

ARCHITECTURES = ("MixtralForCausalLM",)


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of each expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs of HF's rope parameters, hashable
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    architecture: str = "MixtralForCausalLM"
    model_type: str = "mixtral"

    qkv_bias = False  # read by common.RopeAttention
    o_bias = False

    def __post_init__(self):
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_local_experts "
                             f"({self.num_local_experts})")

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> MixtralConfig:
        arch = supported_architecture(hf, ARCHITECTURES, where, {"mixtral": "MixtralForCausalLM"})
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("output_router_logits", False):
            raise ValueError(f"{where}: output_router_logits=true (the router load-balancing auxiliary loss) is not "
                             f"implemented; set it to false to train on the language-model loss alone")
        if hf.get("router_jitter_noise", 0.0):
            raise ValueError(f"{where}: router_jitter_noise={hf['router_jitter_noise']} (multiplicative noise on "
                             f"the router input in training) is not supported; set it to 0")
        theta, rope_scaling = rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", 1e6)}, where)
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            num_local_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 32768), sliding_window=hf.get("sliding_window"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), architecture=arch,
            model_type=hf.get("model_type", "mixtral"))

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings, router and norms included), as transformers counts it."""
        d, f, h, e = self.hidden_size, self.intermediate_size, self.head_dim, self.num_local_experts
        attn = d * h * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + d * e + 3 * e * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_hidden_layers * per_layer + self.vocab_size * d + d + head


def route(router_logits_BxTxE: jax.Array, k: int) -> jax.Array:
    """(B, T, E) float32 combine weights: transformers' softmax over all experts (float32), top-k, renormalized over
    the k; zero for the experts not chosen."""
    probs = jax.nn.softmax(router_logits_BxTxE.astype(jnp.float32), axis=-1)
    top_BxTxK, idx_BxTxK = jax.lax.top_k(probs, k)
    top_BxTxK = top_BxTxK / jnp.sum(top_BxTxK, axis=-1, keepdims=True)
    onehot_BxTxKxE = jax.nn.one_hot(idx_BxTxK, probs.shape[-1], dtype=jnp.float32)
    return jnp.einsum("btk,btke->bte", top_BxTxK, onehot_BxTxKxE)


class _Kernel(nn.Module):
    """One stacked expert kernel (E, in, out) as a param "kernel" (so LoRA targets it by its HF module name), in the
    compute dtype; a quantized one (QLoRA, `jaxlora.quant`) is dequantized here, one layer's experts at a time."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self):
        if self.has_variable("params", "kernel") and is_quantized(self.get_variable("params", "kernel")):
            given = self.get_variable("params", "kernel")
            if given.shape != self.shape:
                raise ValueError(f"{'/'.join(self.scope.path)}: quantized kernel of shape {given.shape}, the layer "
                                 f"expects {self.shape}")
            return dequantize(given, jnp.dtype(self.dtype))
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
                            self.shape, self.param_dtype)
        return kernel.astype(self.dtype)


class Experts(LayerPart):
    """E SwiGLU experts w2(silu(w1 x) * w3 x) on every token, combined with the router's weights, plus per-expert
    LoRA branches s * x a_e b_e on w1/w2/w3."""

    @nn.compact
    def __call__(self, x_BxTxD, combine_BxTxE, lora):
        c, lora = self.cfg, lora or {}
        e, d, f = c.num_local_experts, c.hidden_size, c.intermediate_size
        cast = lambda t: t.astype(self.dtype)
        x = cast(x_BxTxD)
        kernel = lambda shape, axes, name: _Kernel(shape, axes, self.dtype, self.param_dtype, name=name)()
        w1, w3 = (kernel((e, d, f), ("expert", "embed", "mlp"), name) for name in ("w1", "w3"))
        w2 = kernel((e, f, d), ("expert", "mlp", "embed"), "w2")
        h1 = jnp.einsum("btd,edf->btef", x, w1) + self._lora(x, lora.get("w1"), "btd,edr->bter", "bter,erf->btef")
        h3 = jnp.einsum("btd,edf->btef", x, w3) + self._lora(x, lora.get("w3"), "btd,edr->bter", "bter,erf->btef")
        h_BxTxExF = sharding.constrain(nn.silu(h1) * h3, ("batch", None, "expert", "mlp"))
        # the combine folded into w2's input: sum_e g_e (h_e w2_e) = (g * h) contracted over (e, f) at once
        hw = h_BxTxExF * cast(combine_BxTxE)[..., None]
        out = jnp.einsum("btef,efd->btd", hw, w2) + self._lora(hw, lora.get("w2"), "btef,efr->bter", "bter,erd->btd")
        return sharding.constrain(out, ("batch", None, None))

    def _lora(self, x, w: LoraWeights | None, eq_a: str, eq_b: str):
        """s * dropout(x) a_e b_e per expert through einsums `eq_a`, `eq_b` (LoraDense's branch with an expert axis;
        for an init relative to the base, the rank-2r [a, a0] [b; -b0]). For w2 the input is already per expert and
        eq_b sums the experts' outputs."""
        if w is None:
            return 0.0
        if getattr(w, "m", None) is not None:
            raise ValueError(f"{'/'.join(self.scope.path)}: DoRA is not implemented on stacked experts; use plain "
                             f"LoRA on w1/w2/w3 (DoRA works on the attention projections)")
        cast = lambda t: t.astype(self.dtype)
        x_in = nn.Dropout(rate=w.dropout)(x, deterministic=self.deterministic)
        a, b = cast(w.a), cast(w.b)
        if w.a0 is not None:
            a0, b0 = jax.lax.stop_gradient((w.a0, w.b0))
            a, b = jnp.concatenate([a, cast(a0)], axis=-1), jnp.concatenate([b, -cast(b0)], axis=-2)
        return w.scale * jnp.einsum(eq_b, jnp.einsum(eq_a, x_in, a), b)


class SparseMoeBlock(LayerPart):
    """Router `gate` and the `experts` (HF's block_sparse_moe)."""

    @nn.compact
    def __call__(self, x_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        gate = _Router(c.hidden_size, c.num_local_experts, self.param_dtype, name="gate")()
        logits_BxTxE = jnp.dot(x_BxTxD.astype(self.dtype), gate.astype(self.dtype))
        combine_BxTxE = route(logits_BxTxE, c.num_experts_per_tok)
        experts = Experts(c, self.dtype, self.param_dtype, self.deterministic, name="experts")
        return experts(x_BxTxD, combine_BxTxE, lora.get("experts"))


class _Router(nn.Module):
    """The router's weight (D, E), a plain param named "weight" (not a LoRA target)."""

    d: int
    e: int
    param_dtype: Any

    @nn.compact
    def __call__(self):
        return self.param("weight", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
                          (self.d, self.e), self.param_dtype)


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
        moe = SparseMoeBlock(c, self.dtype, self.param_dtype, self.deterministic, name="block_sparse_moe")
        return h + moe(norm("post_attention_layernorm")(h), lora.get("block_sparse_moe")).astype(h.dtype), cache


class MixtralModel(LayerStack):
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


class MixtralForCausalLM(ModelRoot):
    """Causal LM head over `MixtralModel`; returns logits (B, T, vocab) in the compute dtype."""

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
        model = MixtralModel(self.cfg, self.dtype, self.param_dtype, self.remat, deterministic, self.attention_impl,
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


MIXTRAL_NAMES = NameTable(rules=(
    NameRule(r"model/embed_tokens/embedding", "model.embed_tokens.weight"),
    NameRule(r"model/layers/self_attn/(\w+_proj)/kernel", "model.layers.{layer}.self_attn.{0}.weight",
             transpose=True),
    NameRule(r"model/layers/block_sparse_moe/gate/weight", "model.layers.{layer}.block_sparse_moe.gate.weight",
             transpose=True),
    NameRule(r"model/layers/block_sparse_moe/experts/(w1|w2|w3)/kernel",
             "model.layers.{layer}.block_sparse_moe.experts.{expert}.{0}.weight", transpose=True),
    NameRule(r"model/layers/(\w+)/scale", "model.layers.{layer}.{0}.weight"),
    NameRule(r"model/norm/scale", "model.norm.weight"),
    NameRule(r"lm_head/kernel", "lm_head.weight", transpose=True),
), ignore=(r".*rotary_emb\..*inv_freq",), base_prefix="model.")

FAMILY = Family(
    name="mixtral", config_cls=MixtralConfig, module_cls=MixtralForCausalLM, names=MIXTRAL_NAMES,
    architectures=ARCHITECTURES, model_types=("mixtral",), default_targets=("q_proj", "v_proj"),  # PEFT's default
    init_cache=init_kv_cache, cache_axes=KV_CACHE_AXES, embedding_path=("model", "embed_tokens", "embedding"))
