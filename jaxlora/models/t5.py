"""T5 encoder-decoders in Flax linen (T5ForConditionalGeneration): T5 v1.0 and T5 v1.1 / FLAN-T5.

Same conventions as every family (`jaxlora.models.common`): parameters mirror HF module names with the block index
folded into a leading stacked axis (HF's `encoder.block` / `decoder.block`, each run under `nn.scan`), so PEFT's T5
module names and targets (q, k, v, o, wi / wi_0 / wi_1, wo) work unchanged:

    HF:   decoder.block.3.layer.1.EncDecAttention.q.weight  (out, in)
    ours: params["decoder"]["block"]["layer"]["1"]["EncDecAttention"]["q"]["kernel"][3]  (in, out)

Pre-norm blocks with T5's RMS LayerNorm (no mean, no bias); attention is unscaled (T5 folds 1/sqrt(d_kv) into the
init). Relative position bias: HF keeps the bucket table in block 0 only (`has_relative_attention_bias`) and passes
the bias to every block of the stack; here the table is a parameter of the stack (`encoder/relative_attention_bias`,
exported as block 0's), the bias is computed once outside the scan and broadcast to all blocks. Buckets are
bidirectional in the encoder, causal in the decoder; cross-attention has no position bias. The feed-forward is
v1.0's `wo(act(wi x))` or the gated `wo(act(wi_0 x) * wi_1 x)` (config.feed_forward_proj "gated-gelu" etc.).
The lm_head is the shared embedding scaled by d_model**-0.5 when tied (v1.0), a separate unscaled `lm_head` when
not (v1.1, FLAN).

The objective (`model_inputs` + `loss_sums`, in the `FAMILY` record, called by `Model.loss_sums`): the batch's
input_ids / attention_mask feed the encoder, its labels (-100 ignored) are the decoder targets and the decoder inputs
are the labels shifted right (decoder_start_token_id first, -100 -> pad), so loss = token cross entropy on the decoder
logits with no further shift. HF's dropouts are not applied (deterministic, as HF at inference); LoRA dropout is.
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
from jaxlora.losses import IGNORE_INDEX, masked_cross_entropy_sums
from jaxlora.models.attention import dot_product_attention
from jaxlora.models.common import (ACTIVATIONS, Family, LayerPart, LoraDense, ModelRoot, RMSNorm, hf_field,
                                   scanned_layers, supported_architecture)

SUPPORTED_ARCHITECTURES = ("T5ForConditionalGeneration",)

_STACK = r"(encoder|decoder)/block/layer/(\d)"
NAMES = NameTable(rules=(
    NameRule(r"shared/embedding", "shared.weight"),
    NameRule(r"(encoder|decoder)/relative_attention_bias/embedding",
             "{0}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    NameRule(_STACK + r"/(SelfAttention|EncDecAttention|DenseReluDense)/(\w+)/kernel",
             "{0}.block.{layer}.layer.{1}.{2}.{3}.weight", transpose=True),
    NameRule(_STACK + r"/layer_norm/scale", "{0}.block.{layer}.layer.{1}.layer_norm.weight"),
    NameRule(r"(encoder|decoder)/final_layer_norm/scale", "{0}.final_layer_norm.weight"),
    NameRule(r"lm_head/kernel", "lm_head.weight", transpose=True),
), ignore=(r"(encoder|decoder)\.embed_tokens\.weight",  # copies of shared.weight in some checkpoints
           r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"),  # unused (HF ignores it)
    stack_name="block", output_module="lm_head")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True  # v1.0: lm_head = shared (outputs scaled by d_model**-0.5); v1.1/FLAN: False
    pad_token_id: int = 0
    decoder_start_token_id: int = 0
    architecture: str = "T5ForConditionalGeneration"
    model_type: str = "t5"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not '<act>' or 'gated-<act>'")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: activation {self.dense_act_fn!r} is not "
                             f"supported; supported: {', '.join(ACTIVATIONS)}")

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> "T5Config":
        arch = supported_architecture(hf, SUPPORTED_ARCHITECTURES, where)
        get = lambda *keys: hf_field(hf, keys, where)
        layers = get("num_layers", "num_hidden_layers")
        dec_layers = hf.get("num_decoder_layers") or layers
        if dec_layers != layers:  # module names and LoRA trees assume one block count for both stacks
            raise ValueError(f"{where}: num_decoder_layers {dec_layers} != num_layers {layers}; T5 models with "
                             f"encoder and decoder of different depths are not supported")
        pad = hf.get("pad_token_id", 0)
        start = hf.get("decoder_start_token_id")
        try:
            return cls(vocab_size=get("vocab_size"), d_model=get("d_model", "hidden_size"), d_kv=get("d_kv"),
                       d_ff=get("d_ff"), num_layers=layers, num_heads=get("num_heads", "num_attention_heads"),
                       relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
                       relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
                       layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
                       feed_forward_proj=hf.get("feed_forward_proj", "relu"),
                       tie_word_embeddings=hf.get("tie_word_embeddings", True) is not False,
                       pad_token_id=0 if pad is None else pad,
                       decoder_start_token_id=(0 if pad is None else pad) if start is None else start,
                       architecture=arch, model_type=hf.get("model_type", "t5"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def dense_act_fn(self) -> str:
        if self.feed_forward_proj == "gated-gelu":  # HF's backward compatibility: gelu_new (tanh approximation)
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    # names the rest of jaxlora reads off any family's config
    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def num_params(self) -> int:
        """Parameter count (shared embedding, bias tables and an untied lm_head included), for logs."""
        d, inner = self.d_model, self.num_heads * self.d_kv
        attn = 4 * d * inner
        ff = (3 if self.is_gated_act else 2) * d * self.d_ff
        enc = self.num_layers * (attn + ff + 2 * d) + d
        dec = self.num_layers * (2 * attn + ff + 3 * d) + d
        tables = 2 * self.relative_attention_num_buckets * self.num_heads
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + enc + dec + tables + head

    def export_fields(self) -> dict:
        return {"architectures": [self.architecture], "tie_word_embeddings": self.tie_word_embeddings}


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """HF's `T5Attention._relative_position_bucket` (int64; the log in float32, as torch computes it)."""
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(np.int64) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    with np.errstate(divide="ignore"):  # log(0) where is_small picks the exact bucket anyway
        large = np.log(relative_position.astype(np.float32) / np.float32(max_exact))
    large = large / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = max_exact + np.where(is_small, 0, large).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, relative_position, large)


def shift_right(labels_BxL: jax.Array, decoder_start_token_id: int, pad_token_id: int) -> jax.Array:
    """HF's `_shift_right`: decoder inputs = [start, labels[:-1]], with -100 replaced by the pad id."""
    shifted = jnp.concatenate([jnp.full_like(labels_BxL[:, :1], decoder_start_token_id), labels_BxL[:, :-1]], axis=1)
    return jnp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)


class T5Attention(LayerPart):
    """HF's T5Attention without the bias table: unscaled dot-product attention with an additive position bias."""

    @nn.compact
    def __call__(self, x_BxTxD, kv_BxSxD, bias, mask, lora):
        c, lora = self.cfg, lora or {}
        n, h = c.num_heads, c.d_kv
        b, t, _ = x_BxTxD.shape
        s = kv_BxSxD.shape[1]
        dense = lambda f, axes, name, x: LoraDense(f, axes, False, self.dtype, self.param_dtype, self.deterministic,
                                                   name=name)(x, lora.get(name))
        q = dense(n * h, ("embed", "heads"), "q", x_BxTxD).reshape(b, t, n, h)
        k = dense(n * h, ("embed", "heads"), "k", kv_BxSxD).reshape(b, s, n, h)
        v = dense(n * h, ("embed", "heads"), "v", kv_BxSxD).reshape(b, s, n, h)
        out = dot_product_attention(q, k, v, mask, bias=bias, scale=1.0, implementation=self.attention_impl)
        return dense(c.d_model, ("heads", "embed"), "o", out.reshape(b, t, n * h))


class DenseReluDense(LayerPart):
    """HF's T5DenseActDense (wi, wo) or T5DenseGatedActDense (wi_0, wi_1, wo)."""

    @nn.compact
    def __call__(self, x_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        dense = lambda f, axes, name, x: LoraDense(f, axes, False, self.dtype, self.param_dtype, self.deterministic,
                                                   name=name)(x, lora.get(name))
        act = ACTIVATIONS[c.dense_act_fn]
        if c.is_gated_act:
            h = act(dense(c.d_ff, ("embed", "mlp"), "wi_0", x_BxTxD)) * dense(c.d_ff, ("embed", "mlp"), "wi_1", x_BxTxD)
        else:
            h = act(dense(c.d_ff, ("embed", "mlp"), "wi", x_BxTxD))
        return dense(c.d_model, ("mlp", "embed"), "wo", h)


class SubLayer(LayerPart):
    """One of HF's T5LayerSelfAttention / T5LayerCrossAttention / T5LayerFF: x + f(layer_norm(x))."""

    kind: str = "ff"  # "self", "cross" or "ff"

    @nn.compact
    def __call__(self, x_BxTxD, lora, bias=None, mask=None, enc_BxSxD=None):
        lora = lora or {}
        args = (self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl)
        h = RMSNorm(self.cfg.layer_norm_epsilon, self.dtype, self.param_dtype, name="layer_norm")(x_BxTxD)
        if self.kind == "ff":
            return x_BxTxD + DenseReluDense(*args[:4], name="DenseReluDense")(h, lora.get("DenseReluDense"))
        name = "SelfAttention" if self.kind == "self" else "EncDecAttention"
        kv = h if self.kind == "self" else enc_BxSxD
        return x_BxTxD + T5Attention(*args, name=name)(h, kv, bias, mask, lora.get(name))


class BlockLayers(LayerPart):
    """HF's `block.{i}.layer`: 0 self-attention, (decoder) 1 cross-attention, then the feed-forward."""

    is_decoder: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, lora, bias, self_mask, enc_BxSxD, cross_mask):
        lora = lora or {}
        args = (self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl)
        x_BxTxD = SubLayer(*args, kind="self", name="0")(x_BxTxD, lora.get("0"), bias, self_mask)
        if self.is_decoder:
            x_BxTxD = SubLayer(*args, kind="cross", name="1")(x_BxTxD, lora.get("1"), None, cross_mask, enc_BxSxD)
        ff = "2" if self.is_decoder else "1"
        return SubLayer(*args, kind="ff", name=ff)(x_BxTxD, lora.get(ff))


class Block(LayerPart):
    """One T5 block; scanned over the stacked block axis (carry = hidden states)."""

    is_decoder: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, lora, bias, self_mask, enc_BxSxD, cross_mask):
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", None, None))
        layers = BlockLayers(self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                             is_decoder=self.is_decoder, name="layer")
        return layers(x_BxTxD, (lora or {}).get("layer"), bias, self_mask, enc_BxSxD, cross_mask), None


class T5Stack(LayerPart):
    """HF's T5Stack: the bias table, the scanned blocks (module `block`, logical axis "layers"), final_layer_norm."""

    is_decoder: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, x_BxTxD, attention_mask_BxT, enc_BxSxD, enc_mask_BxS, lora):
        c, lora = self.cfg, lora or {}
        t = x_BxTxD.shape[1]
        table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="relative_attention_bias",
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.d_model ** -0.5),
                                                                     (None, None)))
        pos = np.arange(t)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], not self.is_decoder,
                                           c.relative_attention_num_buckets, c.relative_attention_max_distance)
        bias_1xNxTxT = jnp.transpose(table(jnp.asarray(buckets, jnp.int32)), (2, 0, 1))[None]
        if self.is_decoder:  # causal; HF's decoder with labels and no decoder_attention_mask masks nothing else
            self_mask = jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None]
            cross_mask = enc_mask_BxS.astype(bool)[:, None, None, :]
        else:
            self_mask, cross_mask = attention_mask_BxT.astype(bool)[:, None, None, :], None
        blocks = scanned_layers(Block, self.remat, c.num_layers,
                                (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast))
        x_BxTxD, _ = blocks(c, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                            is_decoder=self.is_decoder, name="block")(
            x_BxTxD, lora.get("block"), bias_1xNxTxT, self_mask, enc_BxSxD, cross_mask)
        x_BxTxD = sharding.constrain(x_BxTxD, ("batch", None, None))
        return RMSNorm(c.layer_norm_epsilon, self.dtype, self.param_dtype, name="final_layer_norm")(x_BxTxD)


class T5ForConditionalGeneration(ModelRoot):
    """Encoder, decoder and LM head: decoder logits (B, L, vocab) in the compute dtype."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, lora=None,
                 deterministic: bool = True, decoder_input_ids_BxL=None):
        """Decoder logits (B, L, vocab). `decoder_input_ids_BxL` defaults to one decoder_start_token_id per row (the
        first decoding step); training passes the labels shifted right (`model_inputs`)."""
        c, lora = self.cfg, lora or {}
        if positions_BxT is not None:
            raise ValueError("T5 uses relative position buckets; positions cannot be given")
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        if decoder_input_ids_BxL is None:
            decoder_input_ids_BxL = jnp.full((input_ids_BxT.shape[0], 1), c.decoder_start_token_id, jnp.int32)
        shared = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="shared",
                          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                      ("vocab", "embed")))
        args = (c, self.dtype, self.param_dtype, deterministic, self.attention_impl)
        enc_BxTxD = T5Stack(*args, is_decoder=False, remat=self.remat, name="encoder")(
            shared(input_ids_BxT), attention_mask_BxT, None, None, lora.get("encoder"))
        dec_BxLxD = T5Stack(*args, is_decoder=True, remat=self.remat, name="decoder")(
            shared(decoder_input_ids_BxL), None, enc_BxTxD, attention_mask_BxT, lora.get("decoder"))
        if c.tie_word_embeddings:
            return shared.attend(dec_BxLxD * (c.d_model ** -0.5))
        return LoraDense(c.vocab_size, ("embed", "vocab"), False, self.dtype, self.param_dtype, deterministic,
                         name="lm_head")(dec_BxLxD, lora.get("lm_head"))


def model_inputs(batch: dict, cfg: T5Config) -> dict:
    """The module's inputs beyond input_ids/attention_mask for a training batch: labels shifted right."""
    labels = batch["labels"]
    if labels.ndim != 2:
        raise ValueError(f"T5 labels must be decoder target ids of shape (B, L); got shape {labels.shape}")
    return {"decoder_input_ids_BxL": shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)}


def loss_sums(logits_BxLxV: jax.Array, labels_BxL: jax.Array, per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """Cross entropy of the decoder logits against labels at the same positions (no shift; -100 ignored): the sum and
    the count of labelled tokens (float32); with `per_row`, both per row (B,)."""
    return masked_cross_entropy_sums(logits_BxLxV, labels_BxL, per_row)


# encoder_decoder: training data is seq2seq (prompt -> encoder input_ids, response -> decoder labels)
FAMILY = Family(name="t5", config_cls=T5Config, module_cls=T5ForConditionalGeneration, names=NAMES,
                architectures=SUPPORTED_ARCHITECTURES, model_types=("t5",), default_targets=("q", "v"),
                objective=loss_sums, model_inputs=model_inputs, encoder_decoder=True)
