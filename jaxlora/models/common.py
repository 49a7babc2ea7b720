"""What every model family is built from: the LoRA-aware dense layer, the scanned layer stack, the module field
sets, the norms, activations and config helpers more than one family uses, and `Family`, a family's registry record.

Families import from here (the rotary decoder-only LMs also from `jaxlora.models.decoder`, built on this module; and
from jaxlora.losses / sharding / lora.weights / io.hf_checkpoint), never from each other, so a family file can be
read, added or removed on its own; `jaxlora.models.registry` lists the records.

Conventions shared by every family: parameters mirror Hugging Face module names with the layer index folded into a
leading stacked axis (`scanned_layers`, logical axis "layers"), every parameter carries logical axis names
(`nn.with_logical_partitioning`, mapped to mesh axes by `jaxlora.sharding`), and LoRA is not a variable of the
module: the LoRA tree is an *argument* of `__call__`, threaded down to each `LoraDense` (and sliced per layer by the
scan), so adapters are differentiated as plain function inputs and frozen kernels never receive a weight gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora import sharding
from jaxlora.io.hf_checkpoint import NameTable
from jaxlora.losses import next_token_loss_sums
from jaxlora.lora.weights import LoraWeights, dora_norm, low_rank_matmul
from jaxlora.quant.qarray import QArray, dequantize, is_quantized

REMAT_POLICIES = ("none", "full", "save_matmuls")


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family's registry record: everything `Model` needs to know about it, read as fields.

    `architectures` are the HF config.json "architectures" values it loads (the first is what a config without
    "architectures" gets); `model_types` the config.json "model_type" values that name it when "architectures" is
    absent. `objective(logits, labels, per_row) -> (loss sum, count)` is the training loss; `model_inputs(batch,
    config) -> dict` derives the module's further inputs from a batch (T5's decoder inputs); `init_cache(config,
    batch, length, dtype)` a zeroed KV cache whose leaves all have the logical axes `cache_axes` (None: no cached
    generation); `default_targets` PEFT's target_modules when a LoraConfig gives none; `encoder_decoder` marks a
    seq2seq model (its training data has the seq2seq layout); `embedding_path` the input embedding of a causal LM
    whose module can return its final hidden states (`hidden_only=True`), so that the loss applies the head (that
    embedding, tied, or `lm_head/kernel`) over chunks of tokens instead of materializing every logit; such a module
    also takes `select_BxK`, the positions whose logits are wanted (`select_positions`, `model.logits_at_targets`).
    """

    name: str
    config_cls: type
    module_cls: type
    names: NameTable
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    default_targets: tuple[str, ...]
    objective: Callable[..., tuple[jax.Array, jax.Array]] = next_token_loss_sums
    model_inputs: Callable[[dict, Any], dict] | None = None
    init_cache: Callable[..., Any] | None = None
    cache_axes: tuple[str | None, ...] | None = None
    encoder_decoder: bool = False
    embedding_path: tuple[str, ...] | None = None  # a causal LM whose module takes `hidden_only` (returns the final
    #   hidden states) and `select_BxK`: where its tied embedding is; its head is then applied in chunks
    #   (`Model.loss_sums`), or only at the selected positions

    @property
    def causal_lm(self) -> bool:
        """A decoder-only language model trained on next tokens (what `data.packing` can pack)."""
        return self.objective is next_token_loss_sums and not self.encoder_decoder

    def __post_init__(self):
        if not self.architectures or not self.model_types:
            raise ValueError(f"family {self.name!r}: architectures and model_types must not be empty")
        if (self.init_cache is None) != (self.cache_axes is None):
            raise ValueError(f"family {self.name!r}: init_cache and cache_axes go together")


# ------------------------------------------------------------------------------------------ config helpers


def supported_architecture(hf: dict, supported: tuple[str, ...], where: str,
                           by_model_type: dict[str, str] | None = None) -> str:
    """config.json's architecture (else the one its model_type names in `by_model_type`, else the family's first),
    or ValueError listing the supported ones."""
    archs = hf.get("architectures") or []
    if archs:
        arch = archs[0]
    elif by_model_type is not None:
        arch = by_model_type.get(hf.get("model_type", ""), "")
    else:
        arch = supported[0]
    if arch not in supported:
        raise ValueError(f"{where}: unsupported architecture {arch or hf.get('model_type')!r}; "
                         f"supported: {', '.join(supported)}")
    return arch


def hf_field(hf: dict, keys: tuple[str, ...], where: str):
    """The value of the first of `keys` present in config.json (HF configs spell some fields two ways)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise ValueError(f"{where}: missing {' or '.join(keys)}")


# HF ACT2FN names -> jax. The tanh forms (gelu_new, gelu_fast, gelu_pytorch_tanh) are one formula written three ways.
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_activation(act, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up, the gated MLPs' (SwiGLU, GeGLU) middle, with a backward pass that keeps only gate and up and
    recomputes act(gate) and its derivative. Autodiff of the plain product kept act(gate), the activation's inner
    terms and the product as well: six (B, T, F) arrays per layer, stacked over the layer scan, where two remain
    (one more, the product, is kept by down_proj's LoRA branch). Measured on SmolLM2-135M, a packed 2 x 512 step,
    in one process alternating with the plain product (2-core AMD EPYC): 4.87 -> 4.56 s (1.07x), the same losses."""
    return act(gate) * up


def _gated_activation_fwd(act, gate, up):
    return act(gate) * up, (gate, up)


def _gated_activation_bwd(act, residuals, d_out):
    gate, up = residuals
    activated, act_vjp = jax.vjp(act, gate)
    (d_gate,) = act_vjp(d_out * up)
    return d_gate, d_out * activated


gated_activation.defvjp(_gated_activation_fwd, _gated_activation_bwd)


# ------------------------------------------------------------------------------------------ layers


@functools.partial(jax.checkpoint, static_argnums=(2,), prevent_cse=False)
def _quantized_dot(x, kernel: QArray, dtype):
    """x @ dequantize(kernel), rematerialized: the backward dequantizes the kernel again instead of keeping it, so
    a scanned stack never holds more than one layer's dense kernel (autodiff would otherwise save every layer's
    dequantized kernel as a residual for dx = dy @ W^T: the whole model in the compute dtype)."""
    return jnp.dot(x, dequantize(kernel, dtype))


class LoraDense(nn.Module):
    """A frozen-able dense layer (kernel (in, out)) with an optional LoRA branch passed in as an argument. The kernel
    may be quantized (int8 / nf4, `jaxlora.quant`): it is then dequantized to the compute dtype inside the matmul."""

    features: int
    kernel_axes: tuple[str, str]
    use_bias: bool
    dtype: Any
    param_dtype: Any
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, lora: LoraWeights | None = None):
        x = sharding.constrain(x, sharding.activation_axes(x.ndim, self.kernel_axes[0]))
        kernel = self._kernel(x.shape[-1])
        if is_quantized(kernel):
            y = _quantized_dot(x.astype(self.dtype), kernel, jnp.dtype(self.dtype))
        else:
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if lora is not None and lora.m is not None:  # DoRA also rescales x@W: before the bias, as PEFT
            y = y + self._dora_delta(x, kernel, y, lora).astype(y.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        if lora is not None and lora.m is None:
            y = y + (lora.scale * self._lora_branch(x, lora)).astype(y.dtype)
        return sharding.constrain(y, sharding.activation_axes(y.ndim, self.kernel_axes[1]))

    def _dora_delta(self, x, kernel, y_base, lora: LoraWeights):
        """DoRA's change to x@W, PEFT's DoraLinearVariant: (g - 1) * x_d@W + g * s * x_d@a@b with x_d = dropout(x) and
        g = m / ||W + s*a@b||_c (the norm detached, DoRA §4.3, computed without forming W + s*a@b: `dora_norm`)."""
        if is_quantized(kernel):
            raise ValueError(f"{'/'.join(self.scope.path)}: DoRA needs a dense base kernel, this one is quantized")
        cast = lambda t: t.astype(self.dtype)
        x_in = cast(nn.Dropout(rate=lora.dropout)(x, deterministic=self.deterministic))
        if lora.dropout > 0 and not self.deterministic:  # PEFT: the rescaled base term sees the dropped input too
            y_base = jnp.dot(x_in, cast(kernel))
        norm = jax.lax.stop_gradient(dora_norm(kernel, lora.a, lora.b, lora.scale))
        g = cast(lora.m.astype(jnp.float32) / norm).reshape((1,) * (y_base.ndim - 1) + (-1,))
        return (g - 1) * y_base + g * (lora.scale * low_rank_matmul(x_in, cast(lora.a), cast(lora.b)))

    def _kernel(self, d_in: int):
        """The kernel (in, out): a quantized one (`jaxlora.quant.QArray`, frozen) where the params hold one, else the
        dense param (also where a dense kernel is given in place of a quantized one, as LoRA-GA's estimation does)."""
        if self.has_variable("params", "kernel"):
            given = self.get_variable("params", "kernel")
            if is_quantized(given):
                if given.shape != (d_in, self.features):
                    raise ValueError(f"{'/'.join(self.scope.path)}: quantized kernel of shape {given.shape}, the "
                                     f"layer expects {(d_in, self.features)}")
                return given
        return self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.kernel_axes),
                          (d_in, self.features), self.param_dtype)

    def _lora_branch(self, x, lora: LoraWeights):
        """x @ a @ b with LoRA dropout on the input; for an init relative to the base (LoRA-GA), the update
        x @ (a @ b - a0 @ b0) as one rank-2r product x @ [a, a0] @ [b; -b0], so the frozen kernel stays the loaded W0.

        a0/b0 are frozen (no gradient, no optimizer state). At step 0 a = a0 and b = b0, so the update cancels to
        rounding (the two halves of one dot of length 2r) and the model is the base. One rank-2r product costs ~0.4% of
        a SmolLM2 LoRA step over the rank-r branch; two rank-r products (exactly zero at step 0) cost 10%
        (`python scripts/bench_relative_update.py`). Dropout acts on the whole update, as PEFT's dropout does on the
        exported rank-2r adapter (a' = [a, a0], b' = [b, -b0] on W0): no special case.
        """
        cast = lambda t: t.astype(self.dtype)
        x_in = cast(nn.Dropout(rate=lora.dropout)(x, deterministic=self.deterministic))
        a, b = cast(lora.a), cast(lora.b)
        if lora.a0 is not None:
            a0, b0 = jax.lax.stop_gradient((lora.a0, lora.b0))
            a = jnp.concatenate([a, cast(a0)], axis=-1)
            b = jnp.concatenate([b, -cast(b0)], axis=-2)
        return low_rank_matmul(x_in, a, b)


class LayerPart(nn.Module):
    """Fields shared by the parts of a layer (attention, MLP, the layer itself)."""

    cfg: Any
    dtype: Any
    param_dtype: Any
    deterministic: bool
    attention_impl: str | None = None


class BiasedMLP(LayerPart):
    """down(activation(up(x))) with biases, the MLP of BLOOM and GPT-2 (HF module names in `names`: (up, down))."""

    names: tuple[str, str] = ("", "")
    activation: Any = None

    @nn.compact
    def __call__(self, x_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        dense = lambda f, axes, name, x: LoraDense(f, axes, True, self.dtype, self.param_dtype,
                                                   self.deterministic, name=name)(x, lora.get(name))
        up = dense(c.intermediate_size, ("embed", "mlp"), self.names[0], x_BxTxD)
        return dense(c.hidden_size, ("mlp", "embed"), self.names[1], self.activation(up))


def layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with scale and bias, float32 statistics (two-pass variance, like torch), logical axes 'norm'."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis with a scale and no bias (Llama's RMSNorm, T5's LayerNorm, Qwen3's
    per-head q/k norms), float32 statistics."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before multiplying by the weight.
        return scale.astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * normed.astype(self.dtype)


# ------------------------------------------------------------------------------------------ the layer stack


def _remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {name!r}")
    return {"full": jax.checkpoint_policies.nothing_saveable,
            "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}.get(name)


def scanned_layers(layer_cls, remat: str, length: int, in_axes: tuple):
    """`layer_cls` run over a stacked layer axis, as every family's stack is: rematerialized per `remat`, params
    stacked on axis 0 (logical name "layers"), fresh param and dropout rngs per layer, `in_axes` for the arguments
    after the carry (0: sliced per layer, nn.broadcast: shared)."""
    if remat != "none":
        layer_cls = nn.remat(layer_cls, policy=_remat_policy(remat), prevent_cse=False)
    # "intermediates": what a layer sows is stacked per layer too (EVA/CorDA's activation statistics,
    # `jaxlora.lora.inits.activations`); nothing sows unless that collection is mutable, so training is unchanged
    return nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=length,
                   metadata_params={nn.PARTITION_NAME: "layers"})


class LayerStack(nn.Module):
    """The fields of a module that owns a scanned layer stack (the families' `*Model`s): its family's config, the
    compute and parameter dtypes, the remat policy, dropout off or on, and the attention implementation."""

    cfg: Any
    dtype: Any
    param_dtype: Any
    remat: str
    deterministic: bool
    attention_impl: str | None


class ModelRoot(nn.Module):
    """The fields every family's top module gets from `Model._build`: its config dataclass, the compute and
    parameter dtypes, the remat policy and the attention implementation."""

    cfg: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str | None = None


def select_positions(x_BxTxD: jax.Array, select_BxK: jax.Array | None) -> jax.Array:
    """The final hidden states at the (B, K) positions `select_BxK` (those whose logits the loss needs: the ones that
    predict a labelled token, `model.logits_at_targets`), so the head computes K logits per row instead of T; all of
    them when None."""
    if select_BxK is None:
        return x_BxTxD
    return jnp.take_along_axis(x_BxTxD, select_BxK[..., None].astype(jnp.int32), axis=1)


def causal_padding_mask(attention_mask_BxT: jax.Array, sliding_window: int | None) -> jax.Array:
    """(B, 1, T, T) boolean: query i sees key j iff j <= i, j is not padding, i - j < window, and both are in the
    same segment.

    `attention_mask` is 0 on padding and otherwise a segment id: all 1 for one sequence per row (HF's mask), 1, 2,
    ... for the examples of a packed row (`jaxlora.training.data.packing`), whose attention is then block-diagonal.
    A padding query (0) sees every real key before it, as with HF's mask (its output is never used).
    """
    t = attention_mask_BxT.shape[1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    allowed_TxT = j <= i
    if sliding_window is not None:
        allowed_TxT &= (i - j) < sliding_window
    segment_BxT = attention_mask_BxT.astype(jnp.int32)
    query, key = segment_BxT[:, None, :, None], segment_BxT[:, None, None, :]
    return allowed_TxT[None, None] & (key != 0) & ((query == key) | (query == 0))
