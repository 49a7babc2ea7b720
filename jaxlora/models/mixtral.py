"""The Mixtral family in Flax linen (`MixtralForCausalLM`, model_type "mixtral": Mixtral-8x7B, 8x22B).

Mistral attention (decoder.py's rotary GQA attention, sliding window if the config sets one, KV cache) with the MLP
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

The router load-balancing loss (Switch Transformer's, transformers' `load_balancing_loss_func`) is an option, off by
default as in transformers: with output_router_logits=true in config.json the layers also return their router logits
and the training loss becomes CE + router_aux_loss_coef * aux, aux = E * sum_e f_e P_e over the real tokens
(attention_mask != 0) of every layer (`load_balancing_loss`). `Model.loss_sums` adds coef * aux * count to a
micro-batch's loss sum (count: its labelled targets), so the micro-batch's mean is exactly transformers' loss on that
batch. With gradient accumulation the step's objective is the token-weighted mean of the micro-batches' losses:
CE over all the step's targets + coef * sum_i (n_i / n) aux_i, aux_i computed on micro-batch i alone, as each
transformers forward computes it on the batch it sees (one aux over the whole accumulated batch would differ: aux is
not linear in the tokens); a micro-batch without labelled targets adds no aux. Evaluation and LoRA-GA's gradient
estimation use the same loss, as transformers' forward with labels does. A packed row's segments all count as real
tokens (transformers would weight them by their segment ids).

Not implemented, and refused with a ValueError naming the field: router_jitter_noise > 0 (training-time noise),
rope types other than default/linear/llama3, hidden_act other than silu.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora import sharding
from jaxlora.io.hf_checkpoint import NameRule
from jaxlora.lora.weights import LoraWeights
from jaxlora.models.common import LayerPart, gated_activation, supported_architecture
from jaxlora.models.decoder import (CausalLM, Decoder, DecoderDims, PreNormLayer, decoder_family, decoder_fields,
                                    decoder_names, require_silu, rope_from_hf)
from jaxlora.quant.qarray import dequantize, is_quantized

ARCHITECTURES = ("MixtralForCausalLM",)


@dataclasses.dataclass(frozen=True)
class MixtralConfig(DecoderDims):
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`); intermediate_size is
    each expert's."""

    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs of HF's rope parameters, hashable
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    output_router_logits: bool = False  # train with the router load-balancing loss (`aux_loss_coef`)
    router_aux_loss_coef: float = 0.001
    architecture: str = "MixtralForCausalLM"
    model_type: str = "mixtral"

    qkv_bias = False  # read by decoder.RopeAttention
    o_bias = False

    def __post_init__(self):
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_local_experts "
                             f"({self.num_local_experts})")

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> MixtralConfig:
        arch = supported_architecture(hf, ARCHITECTURES, where, {"mixtral": "MixtralForCausalLM"})
        require_silu(hf, where)
        if hf.get("router_jitter_noise", 0.0):
            raise ValueError(f"{where}: router_jitter_noise={hf['router_jitter_noise']} (multiplicative noise on "
                             f"the router input in training) is not supported; set it to 0")
        theta, rope_scaling = rope_from_hf({**hf, "rope_theta": hf.get("rope_theta", 1e6)}, where)
        return cls(
            **decoder_fields(hf, rms_norm_eps=1e-5, max_position_embeddings=32768),
            num_local_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            rope_theta=theta, rope_scaling=rope_scaling, sliding_window=hf.get("sliding_window"),
            output_router_logits=bool(hf.get("output_router_logits", False)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
            architecture=arch, model_type=hf.get("model_type", "mixtral"))

    @property
    def aux_loss_coef(self) -> float:
        """The weight of the router load-balancing loss in the training loss (`Model.loss_sums`): transformers'
        router_aux_loss_coef when output_router_logits is set, else 0 (no auxiliary loss)."""
        return self.router_aux_loss_coef if self.output_router_logits else 0.0

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings, router and norms included), as transformers counts it."""
        d, f, h, e = self.hidden_size, self.intermediate_size, self.head_dim, self.num_local_experts
        attn = d * h * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        per_layer = attn + d * e + 3 * e * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_hidden_layers * per_layer + self.vocab_size * d + d + head


def load_balancing_loss(router_logits_LxBxTxE: jax.Array, attention_mask_BxT: jax.Array, k: int) -> jax.Array:
    """transformers' `load_balancing_loss_func` (Switch Transformer eqs. 4-6) over every layer's router logits: with
    N the real tokens (attention_mask != 0) of all layers together, f_e = (top-k picks of expert e) / N and
    P_e = (sum of softmax probabilities of e) / N, the loss is E * sum_e f_e P_e (float32; f_e has no gradient)."""
    e = router_logits_LxBxTxE.shape[-1]
    probs = jax.nn.softmax(router_logits_LxBxTxE.astype(jnp.float32), axis=-1)
    _, idx_LxBxTxK = jax.lax.top_k(probs, k)
    picks_LxBxTxE = jnp.sum(jax.nn.one_hot(idx_LxBxTxK, e, dtype=jnp.float32), axis=-2)
    real = (attention_mask_BxT != 0).astype(jnp.float32)[None, :, :, None]
    n = router_logits_LxBxTxE.shape[0] * jnp.sum(real)
    tokens_per_expert = jnp.sum(picks_LxBxTxE * real, axis=(0, 1, 2)) / n
    prob_per_expert = jnp.sum(probs * real, axis=(0, 1, 2)) / n
    return e * jnp.sum(tokens_per_expert * prob_per_expert)


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
        h_BxTxExF = sharding.constrain(gated_activation(nn.silu, h1, h3), ("batch", None, "expert", "mlp"))
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
    """Router `gate` and the `experts` (HF's block_sparse_moe): (output, router logits (B, T, E))."""

    @nn.compact
    def __call__(self, x_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        gate = _Router(c.hidden_size, c.num_local_experts, self.param_dtype, name="gate")()
        logits_BxTxE = jnp.dot(x_BxTxD.astype(self.dtype), gate.astype(self.dtype))
        combine_BxTxE = route(logits_BxTxE, c.num_experts_per_tok)
        experts = Experts(c, self.dtype, self.param_dtype, self.deterministic, name="experts")
        return experts(x_BxTxD, combine_BxTxE, lora.get("experts")), logits_BxTxE


class _Router(nn.Module):
    """The router's weight (D, E), a plain param named "weight" (not a LoRA target)."""

    d: int
    e: int
    param_dtype: Any

    @nn.compact
    def __call__(self):
        return self.param("weight", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
                          (self.d, self.e), self.param_dtype)


class DecoderLayer(PreNormLayer):
    """One pre-norm decoder layer whose MLP is the sparse mixture of experts (HF's block_sparse_moe); its per-layer
    aux output is the router logits when the config trains with the load-balancing loss."""

    def feed_forward(self, x_BxTxD, lora):
        moe = SparseMoeBlock(self.cfg, self.dtype, self.param_dtype, self.deterministic, name="block_sparse_moe")
        out, router_logits = moe(x_BxTxD, lora.get("block_sparse_moe"))
        return out, router_logits if self.cfg.output_router_logits else None


class MixtralModel(Decoder):
    """Embeddings, the scanned decoder `layers` and the final norm (`decoder.Decoder`)."""

    layer_cls = DecoderLayer


class MixtralForCausalLM(CausalLM):
    """Causal LM head over `MixtralModel` (`decoder.CausalLM`); returns logits (B, T, vocab) in the compute dtype.
    Its auxiliary loss (`aux_loss=True`, output_router_logits set) is the router load-balancing loss."""

    decoder_cls = MixtralModel

    def auxiliary_loss(self, router_logits_LxBxTxE, attention_mask_BxT):
        if router_logits_LxBxTxE is None:
            raise ValueError("the router load-balancing loss needs output_router_logits=true in the config")
        return load_balancing_loss(router_logits_LxBxTxE, attention_mask_BxT, self.cfg.num_experts_per_tok)


MIXTRAL_NAMES = decoder_names(
    NameRule(r"model/layers/self_attn/(\w+_proj)/kernel", "model.layers.{layer}.self_attn.{0}.weight",
             transpose=True),
    NameRule(r"model/layers/block_sparse_moe/gate/weight", "model.layers.{layer}.block_sparse_moe.gate.weight",
             transpose=True),
    NameRule(r"model/layers/block_sparse_moe/experts/(w1|w2|w3)/kernel",
             "model.layers.{layer}.block_sparse_moe.experts.{expert}.{0}.weight", transpose=True),
    ignore=(r".*rotary_emb\..*inv_freq",))

FAMILY = decoder_family(
    name="mixtral", config_cls=MixtralConfig, module_cls=MixtralForCausalLM, names=MIXTRAL_NAMES,
    architectures=ARCHITECTURES, model_types=("mixtral",), default_targets=("q_proj", "v_proj"))  # PEFT's default
