"""BERT-style encoders in Flax linen with a sequence-classification head (BertModel, BertForSequenceClassification).

Same conventions as every family (`jaxlora.models.common`): parameters mirror HF module names with the layer index
folded into a leading stacked axis (HF's `encoder.layer`, run under `nn.scan`), so PEFT's module names and targets
work unchanged:

    HF:   bert.encoder.layer.3.attention.self.query.weight  (out, in)
    ours: params["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"][3]  (in, out)

Post-LN layers: h = LN(x + attn(x)); out = LN(h + W_o act(W_i h)). Positions are 0..T-1 whatever the padding (as
HF without position_ids); padded keys are masked. The head is HF's: pooler (dense + tanh on [CLS]) then `classifier`
(hidden -> num_labels). A BertModel checkpoint (no `bert.` prefix, no classifier, like all-MiniLM-L6-v2) loads into
the same module: the classifier (and a missing pooler) start fresh, as transformers does, and are trained fully via
`LoraConfig.modules_to_save=["classifier"]`. The objective (`loss_sums`) is cross entropy of (B,) class ids. HF's
hidden/attention/classifier dropouts are not applied (deterministic, as HF at inference); LoRA dropout is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.io.hf_checkpoint import NameRule, NameTable
from jaxlora.losses import IGNORE_INDEX, masked_cross_entropy_sums
from jaxlora.models.attention import dot_product_attention
from jaxlora.models.common import (ACTIVATIONS, Family, LayerPart, LayerStack, LoraDense, ModelRoot, hf_field,
                                   layer_norm, scanned_layers, supported_architecture)

SUPPORTED_ARCHITECTURES = ("BertModel", "BertForSequenceClassification")  # the first: config.json without one

NAMES = NameTable(rules=(
    NameRule(r"bert/embeddings/(\w+_embeddings)/embedding", "bert.embeddings.{0}.weight"),
    NameRule(r"bert/embeddings/LayerNorm/scale", "bert.embeddings.LayerNorm.weight"),
    NameRule(r"bert/embeddings/LayerNorm/bias", "bert.embeddings.LayerNorm.bias"),
    # attention.self.{query,key,value} and attention.output.dense (3 levels); intermediate.dense and output.dense (2)
    NameRule(r"bert/encoder/layer/(\w+)/(\w+)/kernel", "bert.encoder.layer.{layer}.{0}.{1}.weight", transpose=True),
    NameRule(r"bert/encoder/layer/(\w+)/(\w+)/(\w+)/kernel", "bert.encoder.layer.{layer}.{0}.{1}.{2}.weight",
             transpose=True),
    NameRule(r"bert/encoder/layer/(\w+)/(?!LayerNorm/)(\w+)/bias", "bert.encoder.layer.{layer}.{0}.{1}.bias"),
    NameRule(r"bert/encoder/layer/(\w+)/(\w+)/(?!LayerNorm/)(\w+)/bias", "bert.encoder.layer.{layer}.{0}.{1}.{2}.bias"),
    # output.LayerNorm (1 level) and attention.output.LayerNorm (2)
    NameRule(r"bert/encoder/layer/(\w+)/LayerNorm/scale", "bert.encoder.layer.{layer}.{0}.LayerNorm.weight"),
    NameRule(r"bert/encoder/layer/(\w+)/LayerNorm/bias", "bert.encoder.layer.{layer}.{0}.LayerNorm.bias"),
    NameRule(r"bert/encoder/layer/(\w+)/(\w+)/LayerNorm/scale", "bert.encoder.layer.{layer}.{0}.{1}.LayerNorm.weight"),
    NameRule(r"bert/encoder/layer/(\w+)/(\w+)/LayerNorm/bias", "bert.encoder.layer.{layer}.{0}.{1}.LayerNorm.bias"),
    NameRule(r"bert/pooler/dense/kernel", "bert.pooler.dense.weight", transpose=True),
    NameRule(r"bert/pooler/dense/bias", "bert.pooler.dense.bias"),
    NameRule(r"classifier/kernel", "classifier.weight", transpose=True),
    NameRule(r"classifier/bias", "classifier.bias"),
), ignore=(r"(bert\.)?embeddings\.position_ids",),  # a buffer of older checkpoints
    stack_name="layer", base_prefix="bert.", output_module="classifier",
    optional=(r"classifier/.*", r"bert/pooler/.*"))  # a BertModel checkpoint has no head (some no pooler)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture hyperparameters, read from a Hugging Face config.json (see `from_hf_dict`)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    num_labels: int = 2  # classifier outputs: HF's num_labels / len(id2label), 2 when absent (BertModel)
    architecture: str = "BertForSequenceClassification"
    model_type: str = "bert"
    tie_word_embeddings: bool = False  # no LM head: nothing tied (read by from_pretrained)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {self.num_labels}")

    @classmethod
    def from_hf_dict(cls, hf: dict, where: str = "config.json") -> "BertConfig":
        arch = supported_architecture(hf, SUPPORTED_ARCHITECTURES, where)
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} is not supported "
                             f"(only 'absolute')")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError(f"{where}: BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        if hf.get("problem_type") not in (None, "single_label_classification"):
            raise ValueError(f"{where}: problem_type {hf['problem_type']!r} is not supported (only "
                             f"single_label_classification: one class id per example)")
        labels = hf.get("num_labels") or len(hf.get("id2label") or {}) or 2
        get = lambda *keys: hf_field(hf, keys, where)
        try:
            return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                       num_hidden_layers=get("num_hidden_layers"), num_attention_heads=get("num_attention_heads"),
                       intermediate_size=get("intermediate_size"),
                       max_position_embeddings=hf.get("max_position_embeddings", 512),
                       type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                       hidden_act=hf.get("hidden_act", "gelu"), num_labels=int(labels), architecture=arch,
                       model_type=hf.get("model_type", "bert"))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings, pooler and classifier included), for logs."""
        d, f = self.hidden_size, self.intermediate_size
        per_layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        embeds = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
        return self.num_hidden_layers * per_layer + embeds + (d * d + d) + (d + 1) * self.num_labels

    def export_fields(self) -> dict:
        """config.json fields of the exported model: always a BertForSequenceClassification (it has a head)."""
        id2label = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        return {"architectures": ["BertForSequenceClassification"], "id2label": id2label,
                "label2id": {v: int(k) for k, v in id2label.items()}}


class SelfAttention(LayerPart):
    """HF's attention.self: query/key/value projections and scaled dot-product attention over unpadded keys."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_Bx1x1xT, lora):
        c, lora = self.cfg, lora or {}
        n, h = c.num_attention_heads, c.head_dim
        b, t, _ = x_BxTxD.shape
        q, k, v = (LoraDense(c.hidden_size, ("embed", "heads"), True, self.dtype, self.param_dtype,
                             self.deterministic, name=name)(x_BxTxD, lora.get(name)).reshape(b, t, n, h)
                   for name in ("query", "key", "value"))
        out_BxTxNxH = dot_product_attention(q, k, v, mask_Bx1x1xT, implementation=self.attention_impl)
        return out_BxTxNxH.reshape(b, t, n * h)


class ResidualOutput(LayerPart):
    """HF's attention.output and output: dense, then LayerNorm(dense + residual)."""

    in_axis: str = "heads"

    @nn.compact
    def __call__(self, x_BxTxF, residual_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        y = LoraDense(c.hidden_size, (self.in_axis, "embed"), True, self.dtype, self.param_dtype, self.deterministic,
                      name="dense")(x_BxTxF, lora.get("dense"))
        return layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "LayerNorm")(y + residual_BxTxD)


class Attention(LayerPart):
    @nn.compact
    def __call__(self, x_BxTxD, mask_Bx1x1xT, lora):
        lora = lora or {}
        args = (self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl)
        ctx = SelfAttention(*args, name="self")(x_BxTxD, mask_Bx1x1xT, lora.get("self"))
        return ResidualOutput(*args, name="output")(ctx, x_BxTxD, lora.get("output"))


class Intermediate(LayerPart):
    @nn.compact
    def __call__(self, x_BxTxD, lora):
        c, lora = self.cfg, lora or {}
        up = LoraDense(c.intermediate_size, ("embed", "mlp"), True, self.dtype, self.param_dtype, self.deterministic,
                       name="dense")(x_BxTxD, lora.get("dense"))
        return ACTIVATIONS[c.hidden_act](up)


class BertLayer(LayerPart):
    """One post-LN encoder layer; scanned over the stacked layer axis (carry = hidden states)."""

    @nn.compact
    def __call__(self, x_BxTxD, lora, mask_Bx1x1xT):
        lora = lora or {}
        args = (self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl)
        h = Attention(*args, name="attention")(x_BxTxD, mask_Bx1x1xT, lora.get("attention"))
        ff = Intermediate(*args, name="intermediate")(h, lora.get("intermediate"))
        return ResidualOutput(*args, in_axis="mlp", name="output")(ff, h, lora.get("output")), None


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    cfg: BertConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, input_ids_BxT, positions_BxT, token_type_ids_BxT):
        c = self.cfg
        embed = lambda num, axes, name: nn.Embed(
            num, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes))
        x_BxTxD = (embed(c.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids_BxT)
                   # positions and token types are few and always gathered whole: replicated on that axis
                   + embed(c.max_position_embeddings, (None, "embed"), "position_embeddings")(positions_BxT)
                   + embed(c.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids_BxT))
        return layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "LayerNorm")(x_BxTxD)


class Encoder(LayerStack):
    """HF's encoder: the layers, stacked and scanned (module `layer`, logical axis "layers")."""

    @nn.compact
    def __call__(self, x_BxTxD, mask_Bx1x1xT, lora):
        layers = scanned_layers(BertLayer, self.remat, self.cfg.num_hidden_layers, (0, nn.broadcast))
        x_BxTxD, _ = layers(self.cfg, self.dtype, self.param_dtype, self.deterministic, self.attention_impl,
                            name="layer")(x_BxTxD, (lora or {}).get("layer"), mask_Bx1x1xT)
        return x_BxTxD


class Pooler(LayerPart):
    """HF's pooler: tanh(dense(hidden state of the first token, [CLS]))."""

    @nn.compact
    def __call__(self, x_BxTxD, lora):
        dense = LoraDense(self.cfg.hidden_size, ("embed", None), True, self.dtype, self.param_dtype,
                          self.deterministic, name="dense")
        return jnp.tanh(dense(x_BxTxD[:, 0], (lora or {}).get("dense")))


class BertModel(LayerStack):
    """Embeddings, encoder and pooler: (hidden states (B, T, D), pooled [CLS] (B, D))."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT, positions_BxT, token_type_ids_BxT, lora):
        c, lora = self.cfg, lora or {}
        x_BxTxD = Embeddings(c, self.dtype, self.param_dtype, name="embeddings")(
            input_ids_BxT, positions_BxT, token_type_ids_BxT)
        mask_Bx1x1xT = attention_mask_BxT.astype(bool)[:, None, None, :]  # every query sees the unpadded keys
        x_BxTxD = Encoder(c, self.dtype, self.param_dtype, self.remat, self.deterministic, self.attention_impl,
                          name="encoder")(x_BxTxD, mask_Bx1x1xT, lora.get("encoder"))
        pooled_BxD = Pooler(c, self.dtype, self.param_dtype, self.deterministic, name="pooler")(
            x_BxTxD, lora.get("pooler"))
        return x_BxTxD, pooled_BxD


class BertForSequenceClassification(ModelRoot):
    """`classifier` over BERT's pooled [CLS]: logits (B, num_labels) in the compute dtype."""

    @nn.compact
    def __call__(self, input_ids_BxT, attention_mask_BxT=None, positions_BxT=None, lora=None,
                 deterministic: bool = True, token_type_ids_BxT=None, return_hidden: bool = False):
        """Logits (B, num_labels); with `return_hidden`, (logits, last hidden states (B, T, D))."""
        c, lora = self.cfg, lora or {}
        if attention_mask_BxT is None:
            attention_mask_BxT = jnp.ones(input_ids_BxT.shape, jnp.int32)
        if token_type_ids_BxT is None:  # one segment
            token_type_ids_BxT = jnp.zeros(input_ids_BxT.shape, jnp.int32)
        if positions_BxT is None:  # like HF: positions are 0..T-1 whatever the padding
            if input_ids_BxT.shape[1] > c.max_position_embeddings:  # a gather past the table would give NaNs
                raise ValueError(f"sequence length {input_ids_BxT.shape[1]} exceeds BERT's max_position_embeddings "
                                 f"{c.max_position_embeddings}")
            positions_BxT = jnp.broadcast_to(jnp.arange(input_ids_BxT.shape[1]), input_ids_BxT.shape)
        bert = BertModel(c, self.dtype, self.param_dtype, self.remat, deterministic, self.attention_impl, name="bert")
        x_BxTxD, pooled_BxD = bert(input_ids_BxT, attention_mask_BxT, positions_BxT, token_type_ids_BxT,
                                   lora.get("bert"))
        logits_BxC = LoraDense(c.num_labels, ("embed", None), True, self.dtype, self.param_dtype, deterministic,
                               name="classifier")(pooled_BxD, lora.get("classifier"))
        return (logits_BxC, x_BxTxD) if return_hidden else logits_BxC


def loss_sums(logits_BxC: jax.Array, labels_B: jax.Array, per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """The classifier's objective: sum over rows of cross entropy of (B,) class ids, and the row count (float32);
    with `per_row`, both per row (B,). Labels must lie in [0, num_labels) (see `check_labels`); rows labelled -100
    are ignored, as tokens are in causal LM batches."""
    if labels_B.ndim != 1:
        raise ValueError(f"classification labels must be one class id per row, shape (B,); got {labels_B.shape}")
    num_labels = logits_BxC.shape[-1]
    if not isinstance(labels_B, jax.core.Tracer):  # concrete labels: checked here; traced ones by the data side
        check_labels(np.asarray(labels_B), num_labels)
    return masked_cross_entropy_sums(logits_BxC, labels_B, per_row)  # rows labelled -100 count for nothing


def check_labels(labels, num_labels: int) -> None:
    """Raises unless every label is an integer class id in [0, num_labels)."""
    labels = np.asarray(labels)
    labels = labels[labels != IGNORE_INDEX] if np.issubdtype(labels.dtype, np.integer) else labels
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"classification labels must be integer class ids, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"labels range over [{labels.min()}, {labels.max()}] ({len(np.unique(labels))} classes) but "
                         f"the classifier head has num_labels={num_labels}; load the model with "
                         f"num_labels={int(labels.max()) + 1} (or fix the labels)")


# A bare BertModel gets a fresh classifier head; a config.json without "architectures" is a BertModel.
FAMILY = Family(name="bert", config_cls=BertConfig, module_cls=BertForSequenceClassification, names=NAMES,
                architectures=SUPPORTED_ARCHITECTURES, model_types=("bert",), default_targets=("query", "value"),
                objective=loss_sums)
