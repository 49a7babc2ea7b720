"""`jaxlora.Model`: a Flax module, its config, its frozen params and their shardings, loaded from Hugging Face.

    model = jaxlora.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")     # hub id or local folder
    logits = model.apply(model.params, input_ids, attention_mask, lora=lora)

Loading follows eval_shape -> shardings -> per-tensor placement (see `hf_checkpoint`), so parameters land on the
mesh directly. `save_pretrained` writes HF safetensors + config.json that transformers' AutoModelForCausalLM loads.
Everything family-specific (module, name table, objective, extra inputs, KV cache, default LoRA targets) is read off
the model's `family` record (`jaxlora.models.registry`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from jaxlora import lora as lora_lib, quant as quant_lib, sharding
from jaxlora.io import hf_checkpoint
from jaxlora.io.hf_checkpoint import CheckpointError, NameTable
from jaxlora.losses import IGNORE_INDEX, chunked_cross_entropy_sums, chunked_next_token_loss_sums, \
    masked_cross_entropy_sums
from jaxlora.models.common import Family
from jaxlora.models.registry import architecture_of, by_architecture, family_for  # noqa: F401 (architecture_of: public)

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def _dtype(x) -> Any:
    return jnp.dtype(x) if x is not None else None


class Model:
    """A causal LM, a classifier or an encoder-decoder: `module` (Flax), `config`, frozen `params` (sharded over
    `mesh`), its `family` record (`jaxlora.models.registry`; by default the one of config.architecture), and how to
    apply them.

    With `quantization` (a `jaxlora.quant.QuantConfig`), the blocks' linear kernels are `QArray`s: `abstract_params`
    and `param_shardings` describe the params as they are (quantized), `dense_abstract_params` and
    `dense_param_shardings` the dense model they stand for (e.g. for gradients w.r.t. the dequantized kernels);
    `param_axes` are the dense kernels' logical axes. Without it the dense_* attributes are the same objects."""

    def __init__(self, config, module: nn.Module, names: NameTable, mesh: Mesh, rules=sharding.DEFAULT_RULES,
                 params=None, source: str | None = None, hf_config: dict | None = None, family: Family | None = None,
                 quantization: quant_lib.QuantConfig | None = None, loss_chunk: int = 0):
        self.config, self.module, self.names, self.mesh, self.rules = config, module, names, mesh, rules
        self.loss_chunk = loss_chunk  # tokens per chunk of the causal LM head in `loss_sums` (0: all logits at once)
        self.family = family or by_architecture(config.architecture)
        self.params, self.source, self.hf_config = params, source, hf_config or {}
        boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
        self.param_axes = jax.tree.map(lambda b: b.names, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        self.abstract_params = nn.meta.unbox(boxed)
        self.param_shardings = sharding.tree_shardings(self.param_axes, self.abstract_params, mesh, rules)
        self.dense_abstract_params, self.dense_param_shardings = self.abstract_params, self.param_shardings
        self.quantization, self.quantized_paths = quantization, []
        if quantization is not None:
            self.abstract_params, self.param_shardings, self.quantized_paths = quant_lib.quantized_layout(
                self.abstract_params, self.param_axes, self.param_shardings, mesh, rules, names.stack_name,
                quantization)

    def _init_boxed(self, rng):
        ids = jnp.zeros((1, 8), jnp.int32)
        return self.module.init(rng, ids)["params"]

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def random(cls, hf_config: dict, *, dtype="float32", param_dtype="float32", mesh: Mesh | None = None,
               seed: int = 0, quantization: str | None = None, double_quant: bool = False, loss_chunk: int = 0,
               **module_kwargs) -> "Model":
        """A randomly initialized model for an HF config dict (tests, benchmarks, AOT planning); with
        `quantization`, the random dense kernels quantized."""
        model = cls._build(hf_config, dtype, param_dtype, mesh, quantization=quantization, double_quant=double_quant,
                           loss_chunk=loss_chunk, **module_kwargs)
        init = jax.jit(lambda rng: nn.meta.unbox(model._init_boxed(rng)), out_shardings=model.dense_param_shardings)
        model.params = init(jax.random.key(seed))
        if model.quantization is not None:
            model.params = quant_lib.quantize_params(model.params, model.quantized_paths, model.quantization,
                                                     model.param_shardings)
        return model

    @classmethod
    def _build(cls, hf_config: dict, dtype, param_dtype, mesh, where: str = "config.json", remat: str = "none",
               attention_impl: str | None = None, rules=sharding.DEFAULT_RULES, quantization: str | None = None,
               double_quant: bool = False, loss_chunk: int = 0) -> "Model":
        family = family_for(hf_config, where)
        config = family.config_cls.from_hf_dict(hf_config, where)
        module = family.module_cls(config, dtype=_dtype(dtype), param_dtype=_dtype(param_dtype or dtype), remat=remat,
                                   attention_impl=attention_impl)
        return cls(config, module, family.names, mesh or sharding.make_mesh(), rules, hf_config=hf_config,
                   family=family, quantization=quant_lib.QuantConfig.of(quantization, double_quant),
                   loss_chunk=loss_chunk)

    def _fresh(self, paths: list[tuple[str, ...]], seed: int) -> dict:
        """Freshly initialized params at `paths` (flat {path: array}, in their shardings): what a checkpoint lacks."""
        flat_sh = traverse_util.flatten_dict(self.param_shardings)
        log.warning("%s: not in the checkpoint, newly initialized: %s", self.source or "model",
                    ", ".join("/".join(p) for p in paths))

        def init(rng):
            flat = traverse_util.flatten_dict(nn.meta.unbox(self._init_boxed(rng)))
            return {"/".join(p): flat[p] for p in paths}  # XLA drops the rest of the init

        out = jax.jit(init, out_shardings={"/".join(p): flat_sh[p] for p in paths})(jax.random.key(seed))
        return {p: out["/".join(p)] for p in paths}

    # ------------------------------------------------------------------------------------------ use

    def apply(self, params, input_ids, attention_mask=None, lora=None, *, positions=None,
              deterministic: bool = True, dropout_rng: jax.Array | None = None, **inputs) -> jax.Array:
        """Logits (B, T, vocab); a classifier's (B, num_labels); an encoder-decoder's decoder logits (B, L, vocab).
        `lora` is a LoRA tree (or None); dropout runs only when deterministic=False; `inputs` are the family's further
        module inputs (T5's decoder_input_ids_BxL)."""
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
        with sharding.activation_sharding(self.mesh, self.rules):
            return self.module.apply({"params": params}, input_ids, attention_mask, positions, lora,
                                     deterministic=deterministic, rngs=rngs, **inputs)

    def loss_sums(self, params, batch: dict, lora=None, *, per_row: bool = False, deterministic: bool = True,
                  dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The training loss of one batch as (sum over labelled targets, their count), float32; per batch row with
        `per_row`. Training (`jaxlora.training.step`) and LoRA-GA's gradient estimation both call this. The loss is
        the family's `objective(logits, labels, per_row)`: next-token cross entropy where labels are not -100 for a
        causal LM, cross entropy over rows of (B,) class ids for a classifier (BERT). A family whose module takes
        more inputs than input_ids/attention_mask derives them from the batch with its `model_inputs(batch, config)`
        (T5: decoder inputs = labels shifted right).

        A config with a nonzero `aux_loss_coef` (Mixtral's router load balancing) has the module return its auxiliary
        loss too (`aux_loss=True`), and coef * aux * count is added to the sum: the batch's mean is then
        CE + coef * aux, as transformers computes it.

        A batch with `target_positions` (B, K) (`model.logits_at_targets`: the positions that predict a labelled
        token, -1 padded; `jaxlora.training.data.targets`) has a causal LM apply its head at those positions only:
        the same loss, without the logits of prompt and padding positions."""
        family = self.family
        inputs = family.model_inputs(batch, self.config) if family.model_inputs is not None else {}
        head = self._chunked_head(params, lora)
        if head is not None:  # the module stops at the hidden states; the head is applied in chunks of tokens
            inputs["hidden_only"] = True
        select = batch.get("target_positions") if family.embedding_path is not None else None
        if select is not None:  # logits only where a target is predicted; the targets aligned with them
            inputs["select_BxK"] = at = jnp.maximum(select, 0)  # -1 padding reads position 0, its target dropped
            aligned = jnp.where(select >= 0, jnp.take_along_axis(batch["labels"], at + 1, axis=1), IGNORE_INDEX)
        coef = getattr(self.config, "aux_loss_coef", 0.0)
        if coef:
            inputs["aux_loss"] = True
        out = self.apply(params, batch["input_ids"], batch["attention_mask"], lora=lora,
                         positions=batch.get("positions"),  # packed rows (`data.packing`) restart them
                         deterministic=deterministic, dropout_rng=dropout_rng, **inputs)
        if coef:
            out, aux = out
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if head is None and select is None:
            total, count = family.objective(out, batch["labels"], per_row=per_row)
        elif head is None:
            total, count = masked_cross_entropy_sums(out, aligned, per_row=per_row)
        elif select is None:
            weight, vocab_major = head
            total, count = chunked_next_token_loss_sums(
                out, weight, batch["labels"], vocab_major=vocab_major, dtype=self.module.dtype, chunk=self.loss_chunk,
                softcap=softcap, per_row=per_row)
        else:
            weight, vocab_major = head
            total, count = chunked_cross_entropy_sums(out, weight, aligned, vocab_major=vocab_major,
                                                      dtype=self.module.dtype, chunk=self.loss_chunk, softcap=softcap,
                                                      per_row=per_row)
        if coef:
            total = total + coef * aux * count
        return total, count

    def _chunked_head(self, params, lora):
        """(head weight, vocab_major) when `loss_sums` can apply the head in chunks: `loss_chunk` set, a family
        whose module returns its hidden states, and a plain head (no LoRA on lm_head, not quantized); else None."""
        path = self.family.embedding_path
        if not self.loss_chunk or path is None or (lora or {}).get("lm_head") is not None:
            return None
        tied = self.config.tie_word_embeddings
        flat = traverse_util.flatten_dict(params)
        weight = flat.get(path if tied else ("lm_head", "kernel"))
        if weight is None or quant_lib.is_quantized(weight):
            return None
        return weight, tied

    @property
    def is_encoder_decoder(self) -> bool:
        """True for an encoder-decoder (T5): its training data has the seq2seq layout (`DataConfig.seq2seq`)."""
        return self.family.encoder_decoder

    def apply_cached(self, params, input_ids, cache_mask, positions, cache, cache_index, lora=None):
        """One prefill or decode step with a KV cache: (logits (B, T, vocab), updated cache).

        `input_ids`/`positions` (B, T) go to cache slots cache_index..cache_index+T-1; `cache_mask` (B, S) marks the
        slots that hold (or will hold) real tokens. See `init_cache` and `jaxlora.generate`.
        """
        with sharding.activation_sharding(self.mesh, self.rules):
            return self.module.apply({"params": params}, input_ids, cache_mask, positions, lora,
                                     cache=cache, cache_index=cache_index)

    def init_cache(self, batch: int, length: int):
        """A zeroed KV cache for `batch` rows of `length` slots, in the compute dtype, and its logical axes."""
        family = self.family
        if family.init_cache is None:
            raise NotImplementedError(f"{self.config.architecture}: generation with a KV cache is not implemented")
        cache = family.init_cache(self.config, batch, length, self.module.dtype)
        return cache, jax.tree.map(lambda _: family.cache_axes, cache)

    def lora_targets(self, lora_config) -> list[lora_lib.Target]:
        return lora_lib.resolve_targets(self.abstract_params, lora_config, self.config.num_hidden_layers,
                                        self.family.default_targets, self.names.stack_name,
                                        self.names.output_module)

    def lora_axes(self, targets):
        """Logical axes tree of the LoRA tree (a LoraWeights of axis tuples per target)."""
        flat_axes = traverse_util.flatten_dict(self.param_axes)
        return {t.path: lora_lib.lora_axes(flat_axes[t.path + ("kernel",)]) for t in targets}

    def lora_shardings(self, targets, lora_config) -> dict:
        """NamedShardings for the LoRA tree: a follows its kernel's input dim, b its output dim (and fsdp when its
        kernel's rules leave fsdp unused, `sharding.with_unused_axis`)."""
        axes = self.lora_axes(targets)
        kernels = lora_lib.linear_modules(self.abstract_params)

        def make(t):
            *lead, d_in, d_out = kernels[t.path].shape
            ax_a, ax_b = axes[t.path]
            shape_b = (*lead, t.rank, d_out)
            spec_b = sharding.with_unused_axis(sharding.logical_to_spec(ax_b, shape_b, self.mesh, self.rules),
                                               shape_b, self.mesh)
            return lora_lib.LoraWeights(
                sharding.named_sharding(ax_a, (*lead, d_in, t.rank), self.mesh, self.rules),
                NamedSharding(self.mesh, spec_b),
                scale=t.scale, dropout=lora_config.lora_dropout)
        return lora_lib.build_lora_tree(targets, make)

    def tokenizer(self):
        """The HF tokenizer saved beside the weights (transformers' AutoTokenizer)."""
        from transformers import AutoTokenizer
        if self.source is None:
            raise ValueError("this model was not loaded from a folder; it has no tokenizer")
        return AutoTokenizer.from_pretrained(self.source)

    # ------------------------------------------------------------------------------------------ export

    def save_pretrained(self, out_dir: str | os.PathLike, params=None, *, overwrite: bool = False,
                        max_shard_bytes: int = 5 * 2**30) -> Path | None:
        """Writes HF safetensors + config.json (+ the tokenizer files of the source folder).

        `params` defaults to the model's own; pass `jaxlora.merge(params, lora)` for a merged export. Tensors are
        gathered one at a time; with several processes all take part and process 0 writes.
        """
        params = self.params if params is None else params
        if quant_lib.has_quantized(params):
            raise ValueError("save_pretrained writes dense weights, and these params hold quantized kernels: pass "
                             "jaxlora.quant.dequantize_params(params) (a merged export of a quantized base merges "
                             "into the dequantized params)")
        tensors = hf_checkpoint.iter_hf_tensors(params, self.names, self.config.num_hidden_layers)
        if jax.process_index() != 0:
            for _ in tensors:  # take part in each gather
                pass
            return None

        def write(tmp: Path):
            hf_checkpoint.write_safetensors(tensors, tmp, max_shard_bytes)
            hf = dict(self.hf_config)
            hf["torch_dtype"] = hf["dtype"] = str(jax.tree.leaves(params)[0].dtype)
            hf.update(getattr(self.config, "export_fields", dict)())  # e.g. a classifier's architecture and labels
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            for name in _TOKENIZER_FILES if self.source else ():
                if (Path(self.source) / name).exists():
                    shutil.copy(Path(self.source) / name, tmp / name)

        return hf_checkpoint.atomic_folder(out_dir, write, overwrite)


def resolve_folder(path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (config, safetensors, tokenizer) where the hub is up."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise CheckpointError(f"model folder {path} does not exist (nor is it a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                                  "*.jinja", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown repo, gated: one clear message
        raise CheckpointError(f"model {path}: not a local folder and the hub download failed: {e}") from None


def read_hf_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None


def from_pretrained(path: str | os.PathLike, dtype="float32", *, param_dtype=None, mesh: Mesh | None = None,
                    remat: str = "none", attention_impl: str | None = None,
                    rules=sharding.DEFAULT_RULES, num_labels: int | None = None, seed: int = 0,
                    quantization: str | None = None, double_quant: bool = False, loss_chunk: int = 0) -> Model:
    """Loads a Hugging Face causal LM (local folder or hub id) into a sharded `jaxlora.Model`.

    Args:
      path: a folder with config.json and *.safetensors, or a hub id.
      dtype: compute dtype (e.g. "bfloat16" on accelerators).
      param_dtype: storage dtype of the frozen weights (default: dtype).
      mesh: device mesh (default: all devices on the data axis).
      remat: "none", "full" or "save_matmuls" (keep matmul outputs, recompute the rest).
      attention_impl: None (XLA picks), "xla" or "cudnn" (flash attention on NVIDIA GPUs).
      num_labels: classifiers (BERT): the head's classes, overriding config.json's (a new head starts fresh).
      seed: initializes what the checkpoint lacks (a classifier head over a bare encoder).
      quantization: None, "int8" or "nf4": the blocks' linear kernels are quantized as they load, tensor by tensor
        into their shardings (`jaxlora.quant`); embeddings, norms and the heads keep param_dtype.
      double_quant: nf4 only: also quantize the block scales (8-bit, blocks of 256; QLoRA's double quantization).
      loss_chunk: a causal LM's training loss applies the head to this many tokens at a time (0: all at once).
    """
    folder = resolve_folder(path)
    hf_config = read_hf_config(folder)
    if num_labels is not None:
        hf_config = _with_num_labels(hf_config, num_labels, folder)
    model = Model._build(hf_config, dtype, param_dtype, mesh, where=str(folder / "config.json"), remat=remat,
                         attention_impl=attention_impl, rules=rules, quantization=quantization,
                         double_quant=double_quant, loss_chunk=loss_chunk)
    model.source = str(folder)
    if model.config.tie_word_embeddings:  # some tied checkpoints still carry a copy of the embedding
        model.names = dataclasses.replace(model.names, ignore=model.names.ignore + (r"lm_head\.weight",))
    model.params = hf_checkpoint.load_params(folder, model.names, model.abstract_params, model.param_shardings,
                                             model.config.num_hidden_layers, lambda paths: model._fresh(paths, seed),
                                             quantized=_quantized_loaders(model))
    return model


def _quantized_loaders(model: Model) -> dict:
    """{path: place(keys, read) -> QArray} for the quantized kernels (`jaxlora.quant.apply.loader`)."""
    if model.quantization is None:
        return {}
    from jaxlora.quant.apply import loader
    dense, dense_sh = (traverse_util.flatten_dict(t) for t in (model.dense_abstract_params,
                                                                model.dense_param_shardings))
    q_sh = traverse_util.flatten_dict(model.param_shardings)
    stack = model.names.stack_name
    return {p: loader(model.quantization, dense[p], dense_sh[p], q_sh[p], stack in p) for p in model.quantized_paths}


def _with_num_labels(hf_config: dict, num_labels: int, folder) -> dict:
    """config.json with the classifier's label count replaced (a checkpoint head of another size fails to load)."""
    config_cls = family_for(hf_config, str(folder / "config.json")).config_cls
    if "num_labels" not in {f.name for f in dataclasses.fields(config_cls)}:
        raise ValueError(f"{folder}: num_labels={num_labels} is for classifiers; {config_cls.__name__} has no "
                         f"classifier head")
    id2label = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    return {**hf_config, "num_labels": num_labels, "id2label": id2label,
            "label2id": {v: int(k) for k, v in id2label.items()}}
