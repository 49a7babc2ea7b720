"""Adapters in PEFT's on-disk format: adapter_config.json + adapter_model.safetensors, both ways.

    ours:  lora["model"]["layers"]["self_attn"]["q_proj"] = LoraWeights(a=(L, in, r), b=(L, r, out), scale)
    PEFT:  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  (r, in)   = a[i].T
           base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  (out, r)  = b[i].T

`target_modules` is written as the explicit list of module names (never null: PEFT would then fall back to its
per-model default, q/v on Llama, and silently drop the other adapters). Fully trained modules (modules_to_save) are
written in PEFT's saved form `base_model.model.<module>.weight`, which `PeftModel.from_pretrained` loads into its
trainable copy of the module.

An adapter whose update is relative to its initial factors (LoRA-GA: s*x@(a@b - a0@b0) on the untouched base W0) is
exported as a plain adapter on W0, so PEFT on the unmodified checkpoint reproduces it:

    W0 + s*[a, a0] @ [b; -b0] = W0 + s*(a@b - a0@b0)        a' (in, 2r), b' (2r, out), s unchanged

so r doubles and alpha doubles (alpha/r) or grows by sqrt(2) (rsLoRA, alpha/sqrt(r)); pattern entries likewise.
Whatever the config says, every module's exported rank and scale are checked against the tree and pinned with an
explicit rank_pattern/alpha_pattern entry where PEFT would otherwise compute a different one. PiSSA and OLoRA
(`jaxlora.lora.inits`) are exported the same way. A DoRA adapter (use_dora) adds PEFT's
`<module>.lora_magnitude_vector` (out,) per module, both ways.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora.io import hf_checkpoint
from jaxlora.io.hf_checkpoint import CheckpointError
from jaxlora.lora import (LoraConfig, matches, pattern_value, linear_modules, lora_items, module_names,
                          overlay, split_modules_to_save)
from jaxlora.lora.targets import num_experts_of
from jaxlora.lora.inits.dora import magnitude_sharding
from jaxlora.lora.weights import LoraWeights

log = logging.getLogger(__name__)

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# adapter_config.json fields whose non-default values this library cannot represent (field -> default).
_UNSUPPORTED = {"fan_in_fan_out": False, "layers_to_transform": None, "lora_bias": False,
                "use_qalora": False, "target_parameters": None, "trainable_token_indices": None,
                "alora_invocation_tokens": None, "megatron_config": None}


class PeftFormatError(CheckpointError):
    pass


def _hf_module_names(model, path) -> list[str]:
    """One name per layer (per layer and expert for stacked experts, layer-major, as the factors' leading axes)."""
    stack = model.names.stack_name
    kernel = linear_modules(model.abstract_params).get(tuple(path))
    experts = num_experts_of(tuple(path), kernel.shape, stack) if kernel is not None else 0
    return module_names(path, model.config.num_hidden_layers, stack, experts)


def _short_name(model, path) -> str:
    """The module name without its layer index ("self_attn.q_proj", "lm_head")."""
    stack = model.names.stack_name
    return ".".join(path[path.index(stack) + 1:] if stack in path else path)


# ----------------------------------------------------------------------------------------------- export


def _factors(w: LoraWeights) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) relative to the original base: [a, a0] and [b, -b0] for a base-modifying init."""
    a, b, a0, b0 = (None if x is None else np.asarray(jax.device_get(hf_checkpoint._gather(x)))
                    for x in (w.a, w.b, w.a0, w.b0))
    if w.relative_to_base:
        a, b = np.concatenate([a, a0.astype(a.dtype)], axis=-1), np.concatenate([b, -b0.astype(b.dtype)], axis=-2)
    return a, b


def peft_tensors(model, lora, modules_to_save=None) -> dict[str, np.ndarray]:
    """PEFT-keyed tensors of a LoRA tree (relative to the original base) and of fully trained modules."""
    out = {}
    for path, w in lora_items(lora):
        a, b = _factors(w)
        a, b = a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:])  # (layers [x experts] or 1, .., ..)
        for i, name in enumerate(_hf_module_names(model, path)):
            ai, bi = a[i], b[i]
            out[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            out[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
        if w.dora:  # DoRA's magnitude per output channel (PEFT's key, no ".weight")
            m = np.asarray(jax.device_get(hf_checkpoint._gather(w.m)))
            for i, name in enumerate(_hf_module_names(model, path)):
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(m.reshape(-1, m.shape[-1])[i])
    if modules_to_save:
        for key, value in hf_checkpoint.iter_hf_tensors(modules_to_save, model.names,
                                                        model.config.num_hidden_layers):
            out[f"{PREFIX}{key}"] = value
    return out


def _target_list(model, lora) -> list[str]:
    """Explicit target names: the last name where no untargeted module shares it, else the layer-relative name."""
    paths = [p for p, _ in lora_items(lora)]
    last_of_all = [p[-1] for p in linear_modules(model.abstract_params)]
    return sorted({p[-1] if last_of_all.count(p[-1]) == 1 else _short_name(model, p) for p in paths})


def _rank_alpha(model, lora, cfg: LoraConfig) -> dict:
    """r, lora_alpha, rank_pattern, alpha_pattern that give every exported module its rank and scale in PEFT."""
    items = lora_items(lora)
    double = bool(items) and all(w.relative_to_base for _, w in items)
    f_r, f_alpha = (2, math.sqrt(2.0) if cfg.use_rslora else 2.0) if double else (1, 1.0)
    r, alpha = cfg.r * f_r, cfg.lora_alpha * f_alpha
    ranks = {k: v * f_r for k, v in cfg.rank_pattern.items()}
    alphas = {k: v * f_alpha for k, v in cfg.alpha_pattern.items()}
    pinned_r, pinned_alpha = {}, {}
    for path, w in items:
        rank = w.rank * (2 if w.relative_to_base else 1)
        key = re.escape(_short_name(model, path))
        for name in _hf_module_names(model, path):
            if pattern_value(ranks, name, r) != rank:
                pinned_r[key] = rank
            got_alpha = pattern_value(alphas, name, alpha)
            if not math.isclose(cfg.scale(rank, got_alpha), w.scale, rel_tol=1e-9):
                pinned_alpha[key] = w.scale * (math.sqrt(rank) if cfg.use_rslora else rank)
    # PEFT takes the first pattern that matches: pinned entries go first (and win over an equal user key)
    first = lambda pinned, user: {**pinned, **{k: v for k, v in user.items() if k not in pinned}}
    return {"r": r, "lora_alpha": alpha, "rank_pattern": first(pinned_r, ranks),
            "alpha_pattern": first(pinned_alpha, alphas)}


def _saved_module_names(model, modules_to_save) -> list[str] | None:
    if not modules_to_save:
        return None
    names = set()
    for m in hf_checkpoint.plan_mapping(model.names, modules_to_save, model.config.num_hidden_layers):
        names.update(k.rsplit(".", 1)[0] for k in m.hf_keys)
    return sorted(names)


def peft_task_type(model) -> str:
    """PEFT's TaskType for what the model is: SEQ_2_SEQ_LM for an encoder-decoder (T5), SEQ_CLS for a sequence
    classifier (BERT), else CAUSAL_LM. (PEFT 0.21's SEQ_2_SEQ_LM wrapper, PeftModelForSeq2SeqLM, fails to build on
    transformers 5: load such an adapter there with a config whose task_type is None, a plain PeftModel.)"""
    if model.is_encoder_decoder:
        return "SEQ_2_SEQ_LM"
    if any(name.endswith("ForSequenceClassification")
           for name in (model.config.architecture, type(model.module).__name__)):
        return "SEQ_CLS"
    return "CAUSAL_LM"


def peft_config_dict(model, lora, lora_config: LoraConfig, modules_to_save=None) -> dict:
    """adapter_config.json for PEFT's LoraConfig (explicit target list, ranks and scales pinned to the tree)."""
    return {
        "peft_type": "LORA", "task_type": peft_task_type(model), "base_model_name_or_path": model.source,
        **_rank_alpha(model, lora, lora_config), "lora_dropout": lora_config.lora_dropout,
        "target_modules": _target_list(model, lora), "use_rslora": lora_config.use_rslora, "bias": "none",
        "modules_to_save": _saved_module_names(model, modules_to_save), "init_lora_weights": True,
        "fan_in_fan_out": False, "inference_mode": True,
        "use_dora": any(w.dora for _, w in lora_items(lora)),
    }


def export_peft(model, lora, lora_config: LoraConfig, out_dir: str | os.PathLike, *, modules_to_save=None,
                overwrite: bool = False) -> Path:
    """Writes the adapter so `PeftModel.from_pretrained(AutoModelFor...(base), out_dir)` loads it (task_type:
    `peft_task_type`), `base` being the ORIGINAL checkpoint even for a base-modifying init (LoRA-GA).

    Args:
      model: the `jaxlora.Model` the adapter was trained on.
      lora: the LoRA tree.
      lora_config: its config (r, alpha, rsLoRA, patterns, dropout); each module's rank and scale are taken from
        the tree and pinned in the patterns where the config would give PEFT another value.
      out_dir: the adapter folder, written to a temporary sibling and renamed: never half-written.
      modules_to_save: the fully trained modules' params (a sub-tree of the model's params), e.g. lm_head. A
        sequence classifier (task_type SEQ_CLS) always gets its head written too (from model.params unless given
        here): PEFT's PeftModelForSequenceClassification treats the head as a saved module and needs its weights.
      overwrite: replace a non-empty out_dir.
    Returns:
      out_dir. With several processes all gather each tensor and process 0 writes.
    """
    if peft_task_type(model) == "SEQ_CLS":  # PEFT's SEQ_CLS wrapper always trains, saves and loads the head
        modules_to_save = overlay(split_modules_to_save(model.params, [model.names.output_module]),
                                  modules_to_save or {})
    tensors = peft_tensors(model, lora, modules_to_save)
    config = peft_config_dict(model, lora, lora_config, modules_to_save)
    if jax.process_index() != 0:
        return Path(out_dir)

    def write(tmp: Path):
        from safetensors.numpy import save_file
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    return hf_checkpoint.atomic_folder(out_dir, write, overwrite)


# ----------------------------------------------------------------------------------------------- import


def read_peft_config(adapter_dir: Path) -> LoraConfig:
    """The LoraConfig of an adapter_config.json, refusing what jaxlora cannot apply exactly."""
    path = adapter_dir / CONFIG_FILE
    if not path.exists():
        raise PeftFormatError(f"{adapter_dir}: no {CONFIG_FILE} (is this a PEFT adapter folder?)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise PeftFormatError(f"{path}: must hold one JSON object (PEFT's LoraConfig), not a {type(raw).__name__}")
    _check_types(raw, path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise PeftFormatError(f"{path}: peft_type {raw['peft_type']!r} is not supported (only LORA)")
    if raw.get("bias", "none") != "none":
        raise PeftFormatError(f"{path}: bias={raw['bias']!r} is not supported (only 'none')")
    for field, default in _UNSUPPORTED.items():
        if raw.get(field, default) not in (default, [], {}):
            raise PeftFormatError(f"{path}: {field}={raw[field]!r} is not supported")
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):  # e.g. "pissa" saved without conversion: relative to a residual base
        log.warning("%s: init_lora_weights=%r; the adapter is applied to the base as given (PEFT does the same). "
                    "If it was saved without converting to the original base, its base weights differ.", path, init)
    try:
        return LoraConfig(
            r=raw["r"], lora_alpha=raw.get("lora_alpha", 8), lora_dropout=raw.get("lora_dropout", 0.0) or 0.0,
            target_modules=raw.get("target_modules"), exclude_modules=raw.get("exclude_modules"),
            use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
            init_lora_weights=init if init in (True, False, "gaussian") else True,
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            modules_to_save=raw.get("modules_to_save"))
    except (KeyError, ValueError) as e:
        raise PeftFormatError(f"{path}: invalid LoRA config: {e}") from None


# adapter_config.json fields read as numbers: (JSON types accepted, what the message says is expected)
_NUMERIC_FIELDS = {"r": ((int,), "a positive integer"), "lora_alpha": ((int, float), "a number"),
                   "lora_dropout": ((int, float, type(None)), "a number in [0, 1)")}


def _check_types(raw: dict, path: Path) -> None:
    """Each numeric field of adapter_config.json is a JSON number (PEFT would fail later, deep in its code)."""
    for field, (types, expected) in _NUMERIC_FIELDS.items():
        if field in raw and (isinstance(raw[field], bool) or not isinstance(raw[field], types)):
            raise PeftFormatError(f"{path}: {field} is {raw[field]!r}; expected {expected}")
    for field in ("rank_pattern", "alpha_pattern"):
        value = raw.get(field) or {}
        if not isinstance(value, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                              for v in value.values()):
            raise PeftFormatError(f"{path}: {field} must map module names to numbers, got {value!r}")


class _FiniteTensors:
    """The adapter's safetensors, refusing any tensor with a NaN or an infinity (checked once per tensor)."""

    def __init__(self, files, where: Path):
        self.files, self.where, self.checked = files, where, set()

    def keys(self) -> set[str]:
        return self.files.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files.shape(key)

    def get(self, key: str) -> np.ndarray:
        x = self.files.get(key)
        if key not in self.checked:
            bad = np.size(x) - np.count_nonzero(np.isfinite(x))
            if bad:
                raise PeftFormatError(f"{self.where}: {key} has {bad} non-finite values (NaN or inf); the adapter "
                                      f"is corrupt or diverged")
            self.checked.add(key)
        return x


def _check_target_names(model, cfg: LoraConfig, where: Path) -> None:
    """Every name in an explicit target list must name a module of this model (PEFT would only warn)."""
    if not isinstance(cfg.target_modules, list):
        return
    names = [n for p in linear_modules(model.abstract_params) for n in _hf_module_names(model, p)]
    for t in cfg.target_modules:
        if not any(matches([t], n) for n in names):
            endings = sorted({n.split(".")[-1] for n in names})
            raise PeftFormatError(f"{where}: target_modules names {t!r}, which this {model.config.architecture} "
                                  f"model lacks (its linear modules end in: {', '.join(endings)})")


def _open_weights(adapter_dir: Path) -> hf_checkpoint.SafetensorsFolder:
    if not (adapter_dir / WEIGHTS_FILE).exists():
        if (adapter_dir / "adapter_model.bin").exists():
            raise PeftFormatError(f"{adapter_dir}: only adapter_model.bin (a pickle) is present; only safetensors "
                                  f"adapters are read (re-save with save_pretrained(safe_serialization=True))")
        raise PeftFormatError(f"{adapter_dir}: no {WEIGHTS_FILE}")
    try:
        return hf_checkpoint.SafetensorsFolder(adapter_dir)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as e:
        raise PeftFormatError(f"{adapter_dir / WEIGHTS_FILE}: not a safetensors file ({e})") from None


def _expect_shape(files, key: str, shape: tuple[int, ...], where: Path) -> None:
    if files.shape(key) != tuple(shape):
        raise PeftFormatError(f"{where}: {key} has shape {files.shape(key)}, this model expects {tuple(shape)} "
                              f"(an adapter for another model size or vocabulary?)")


def _place(shape, sharding, dtype, read) -> jax.Array:
    """A global array built from `read(layer_or_None)` host tensors, each device reading only its slice."""
    return jax.make_array_from_callback(shape, sharding, lambda index: np.asarray(read(index), dtype))


def _load_lora(model, cfg: LoraConfig, files, where: Path) -> tuple[dict, set[str]]:
    targets = model.lora_targets(cfg)
    shardings = traverse_util.flatten_dict(model.lora_shardings(targets, cfg),
                                           is_leaf=lambda p, x: isinstance(x, LoraWeights))
    kernels = linear_modules(model.abstract_params)
    dtype = np.dtype(jnp.dtype(cfg.lora_dtype))
    used, out = set(), {}
    for t in targets:
        names = _hf_module_names(model, t.path)
        *lead, d_in, d_out = kernels[t.path].shape
        keys_a = [f"{PREFIX}{n}.lora_A.weight" for n in names]
        keys_b = [f"{PREFIX}{n}.lora_B.weight" for n in names]
        for key, shape in [(k, (t.rank, d_in)) for k in keys_a] + [(k, (d_out, t.rank)) for k in keys_b]:
            if key not in files.keys():
                raise PeftFormatError(f"{where}: missing {key} (adapter_config.json targets {names[0]})")
            _expect_shape(files, key, shape, where)
        used.update(keys_a + keys_b)
        keys_m = [f"{PREFIX}{n}.lora_magnitude_vector" for n in names] if cfg.use_dora else []
        for key in keys_m:
            if key not in files.keys():
                raise PeftFormatError(f"{where}: missing {key} (adapter_config.json has use_dora=true: a "
                                      f"DoRA adapter needs the magnitude of every adapted module)")
            _expect_shape(files, key, (d_out,), where)
        used.update(keys_m)

        def reader(keys, index, lead=tuple(lead)):
            if not lead:
                return files.get(keys[0]).T[index]
            which = np.arange(len(keys)).reshape(lead)[index[:len(lead)]]  # the (layer[, expert]) slice
            parts = [files.get(keys[i]).T[index[len(lead):]] for i in which.ravel()]
            return np.stack(parts).reshape(which.shape + parts[0].shape)

        sh = shardings[t.path]
        out[t.path] = LoraWeights(
            _place((*lead, d_in, t.rank), sh.a, dtype, lambda i, k=keys_a: reader(k, i)),
            _place((*lead, t.rank, d_out), sh.b, dtype, lambda i, k=keys_b: reader(k, i)),
            m=_place((*lead, d_out), magnitude_sharding(sh.b, len(lead) + 2), dtype,
                     lambda i, k=keys_m: reader(k, i)) if keys_m else None,
            scale=t.scale, dropout=cfg.lora_dropout)
    return traverse_util.unflatten_dict(out), used


def _load_full(model, cfg: LoraConfig, files, keys: set[str], where: Path) -> dict:
    """modules_to_save weights (float32, in the model's shardings) from their `base_model.model.<key>` tensors."""
    mapping = hf_checkpoint.plan_mapping(model.names, model.abstract_params, model.config.num_hidden_layers)
    by_key = {k: m for m in mapping for k in m.hf_keys}
    flat_abs = traverse_util.flatten_dict(model.abstract_params)
    flat_sh = traverse_util.flatten_dict(model.param_shardings)
    hf_keys = {k[len(PREFIX):] for k in keys}
    for key in sorted(hf_keys):
        if key not in by_key:
            raise PeftFormatError(f"{where}: {PREFIX}{key} is for module {key.rsplit('.', 1)[0]}, which this "
                                  f"{model.config.architecture} model lacks")
    out = {}
    for m in {id(by_key[k]): by_key[k] for k in hf_keys}.values():
        missing = [k for k in m.hf_keys if k not in hf_keys]
        if missing:
            raise PeftFormatError(f"{where}: missing {PREFIX}{missing[0]} (modules_to_save covers all layers)")
        target = flat_abs[m.path]
        per_layer = target.shape[1:] if m.stacked else target.shape
        for k in m.hf_keys:
            _expect_shape(files, PREFIX + k, per_layer[::-1] if m.transpose else per_layer, where)

        def read(index, m=m):
            get = lambda k, idx: (files.get(PREFIX + k).T if m.transpose else files.get(PREFIX + k))[idx]
            if not m.stacked:
                return get(m.hf_keys[0], index)
            return np.stack([get(m.hf_keys[i], index[1:]) for i in range(len(m.hf_keys))[index[0]]])

        out[m.path] = _place(target.shape, flat_sh[m.path], np.dtype(jnp.dtype(cfg.lora_dtype)), read)
    return traverse_util.unflatten_dict(out)


def import_peft(model, adapter_dir: str | os.PathLike, *, modules_to_save: bool = False):
    """Reads a PEFT LoRA adapter folder into a LoRA tree for `model`, placed in the LoRA shardings.

    Args:
      model: the `jaxlora.Model` of the adapter's base.
      adapter_dir: a folder with adapter_config.json and adapter_model.safetensors.
      modules_to_save: also return the fully trained modules (a params sub-tree, float32); apply them with
        `jaxlora.lora.overlay(model.params, full)`. Without it an adapter that has some is refused rather than
        silently applied without them.
    Returns:
      (lora, lora_config), or (lora, lora_config, full) with modules_to_save=True. The tree applies with
      `model.apply(params, ids, lora=lora)` and can keep training.
    Raises:
      PeftFormatError (a ValueError) naming the file and key for anything that does not fit the model: an
      unsupported adapter type (other PEFT methods, biases, LoRA on embeddings), modules the model lacks, a shape or
      vocabulary mismatch, a truncated or missing weights file.
    """
    where = Path(adapter_dir)
    if not where.is_dir():
        raise PeftFormatError(f"adapter folder {where} does not exist")
    cfg = read_peft_config(where)
    files = _FiniteTensors(_open_weights(where), where / WEIGHTS_FILE)
    embed_keys = sorted(k for k in files.keys() if "lora_embedding" in k)
    if embed_keys:
        raise PeftFormatError(f"{where / WEIGHTS_FILE}: {embed_keys[0]}: LoRA on embeddings is not supported")
    magnitudes = sorted(k for k in files.keys() if "lora_magnitude" in k)
    if magnitudes and not cfg.use_dora:
        raise PeftFormatError(f"{where / WEIGHTS_FILE}: {magnitudes[0]} is a DoRA magnitude but {CONFIG_FILE} has "
                              f"use_dora=false")
    _check_target_names(model, cfg, where / CONFIG_FILE)
    lora, used = _load_lora(model, cfg, files, where / WEIGHTS_FILE)
    rest = files.keys() - used
    stray = sorted(k for k in rest if ".lora_" in k or not k.startswith(PREFIX))
    if stray:
        raise PeftFormatError(f"{where / WEIGHTS_FILE}: {stray[0]} matches no module adapted by "
                              f"{CONFIG_FILE}'s target_modules in this model")
    full = _load_full(model, cfg, files, rest, where / WEIGHTS_FILE) if rest else {}
    if modules_to_save:
        return lora, cfg, full
    if full:
        raise PeftFormatError(f"{where}: the adapter also holds fully trained modules ({cfg.modules_to_save}); "
                              f"call import_peft(..., modules_to_save=True) and apply them with lora.overlay")
    return lora, cfg


def describe(model, lora, cfg: LoraConfig, full=None) -> dict:
    """A summary of an imported adapter (targets, ranks, scales, parameter counts)."""
    items = lora_items(lora)
    return {
        "targets": {_short_name(model, p): {"rank": w.rank, "scale": w.scale} for p, w in items},
        "layers": model.config.num_hidden_layers, "use_rslora": cfg.use_rslora,
        "lora_params": sum(int(x.size) for x in jax.tree.leaves(lora)),
        "modules_to_save": sorted("/".join(p) for p in traverse_util.flatten_dict(full or {})),
        "base_params": model.config.num_params,
    }

