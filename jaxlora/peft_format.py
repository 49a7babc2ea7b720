"""Adapters in PEFT's on-disk format: adapter_config.json + adapter_model.safetensors.

    ours:  lora["model"]["layers"]["self_attn"]["q_proj"] = LoraWeights(a=(L, in, r), b=(L, r, out), scale)
    PEFT:  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  (r, in)   = a[i].T
           base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  (out, r)  = b[i].T

`target_modules` is written as the explicit list of module names (never null: PEFT would then fall back to its
per-model default, q/v on Llama, and silently drop the other adapters). Fully trained modules (modules_to_save) are
written in PEFT's saved form `base_model.model.<module>.weight`, which `PeftModel.from_pretrained` loads into its
trainable copy of the module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from jaxlora import hf_checkpoint
from jaxlora.lora import LoraConfig, lora_items, module_names


def _hf_module_names(model, path) -> list[str]:
    return module_names(path, model.config.num_hidden_layers, model.names.stack_name)


def peft_tensors(model, lora, modules_to_save=None) -> dict[str, np.ndarray]:
    """PEFT-keyed float tensors of a LoRA tree (and of fully trained modules)."""
    out = {}
    for path, w in lora_items(lora):
        a, b = np.asarray(jax.device_get(w.a)), np.asarray(jax.device_get(w.b))
        stacked = model.names.stack_name in path
        for i, name in enumerate(_hf_module_names(model, path)):
            ai, bi = (a[i], b[i]) if stacked else (a, b)
            out[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            out[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
    if modules_to_save:
        for key, value in hf_checkpoint.iter_hf_tensors(modules_to_save, model.names,
                                                        model.config.num_hidden_layers):
            out[f"base_model.model.{key}"] = value
    return out


def peft_config_dict(model, lora, lora_config: LoraConfig, modules_to_save=None) -> dict:
    """adapter_config.json for PEFT's LoraConfig (explicit target list, patterns, rsLoRA)."""
    targets = sorted({_hf_module_names(model, p)[0].split(".")[-1] for p, _ in lora_items(lora)})
    saved = sorted({p[-2] for p in traverse_util.flatten_dict(modules_to_save)}) if modules_to_save else None
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model.source,
        "r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "lora_dropout": lora_config.lora_dropout,
        "target_modules": targets, "use_rslora": lora_config.use_rslora, "bias": "none",
        "rank_pattern": dict(lora_config.rank_pattern), "alpha_pattern": dict(lora_config.alpha_pattern),
        "modules_to_save": saved, "init_lora_weights": True, "fan_in_fan_out": False, "inference_mode": True,
        "use_dora": False,
    }


def export_peft(model, lora, lora_config: LoraConfig, out_dir: str | os.PathLike, *, modules_to_save=None,
                overwrite: bool = False) -> Path:
    """Writes the adapter so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`
    loads it. Written to a temporary folder and renamed: never half-written."""
    tensors = peft_tensors(model, lora, modules_to_save)
    config = peft_config_dict(model, lora, lora_config, modules_to_save)

    def write(tmp: Path):
        from safetensors.numpy import save_file
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))

    if jax.process_index() != 0:
        return Path(out_dir)
    return hf_checkpoint.atomic_folder(out_dir, write, overwrite)
