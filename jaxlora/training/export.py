"""A run's checkpoint out of the run: its adapters, a merged HF model, a PEFT adapter folder.

Exports never land on the run they read: an output folder that is, contains or lies inside the run's checkpoints or
the base model is refused before anything is written (`--overwrite` would delete it), and every export is written
to a temporary folder and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxlora import lora as lora_lib, sharding
from jaxlora.config import RunConfig
from jaxlora.io import checkpoint as ckpt_lib
from jaxlora.models.model import Model
from jaxlora.quant import dequantize_params
from jaxlora.training.build import build_training
from jaxlora.training.run_folder import check_export_target
from jaxlora.training.setup import load_model


def restore_adapters(config: RunConfig, model: Model, step: int | None = None):
    """The adapters ({"lora" with LoRA-GA's a0/b0 joined, "full"}) of a run's checkpoint (latest by default), in their
    shardings, and the step. A missing or unreadable checkpoint is one ResumeError naming the others."""
    training = build_training(model, config, total_steps=1, template=True)
    checkpointer = ckpt_lib.Checkpointer(Path(config.train.output_dir) / "checkpoints")
    try:
        steps = checkpointer.all_steps()
        step = (steps[-1] if steps else None) if step is None else step
        if step is None:
            raise ckpt_lib.ResumeError(f"no checkpoint in {checkpointer.directory}")
        if step not in steps:
            raise ckpt_lib.ResumeError(f"no checkpoint of step {step} in {checkpointer.directory} (there are: "
                                       f"{', '.join(map(str, steps))})")
        try:
            state, _ = checkpointer.restore(step, training.state,
                                            ckpt_lib.state_signature(model.config, training.state, config.lora))
        except ckpt_lib.CorruptCheckpointError as e:
            others = [s for s in steps if s != step]
            raise ckpt_lib.ResumeError(f"{e}; " + (f"pass --step {others[-1]} for another checkpoint (there are: "
                                                   f"{', '.join(map(str, others))})" if others else
                                                   "there is no other checkpoint")) from None
    finally:
        checkpointer.close()
    return training.adapters(state), step


def check_export_out(config: RunConfig, out_dir: str | Path) -> None:
    """Refuses an export folder on, in or around the run's checkpoints or the base model (local folder)."""
    protected = {"the run's checkpoints": Path(config.train.output_dir) / "checkpoints"}
    if Path(config.model.path).expanduser().is_dir():
        protected["the base model"] = config.model.path
    check_export_target(out_dir, protected)


def export_merged(config: RunConfig, out_dir: str | Path, step: int | None = None, overwrite: bool = False) -> Path:
    """Writes base + s*a@b (and modules_to_save) as HF safetensors that AutoModelForCausalLM loads. A quantized base
    (model.quantization) is dequantized first: the export is dense, in model.param_dtype (the quantization error of
    the base stays in it; the PEFT export is the lossless way to ship a QLoRA adapter)."""
    check_export_out(config, out_dir)
    mesh = sharding.make_mesh(config.mesh)
    model = load_model(config, mesh)
    trainable, _ = restore_adapters(config, model, step)
    base = dequantize_params(model.params)  # a quantized base is merged dense: HF weights in the model's dtype
    params = lora_lib.merge(lora_lib.overlay(base, trainable["full"]), trainable["lora"])
    params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, base)
    return model.save_pretrained(out_dir, params, overwrite=overwrite)


def export_peft_run(config: RunConfig, out_dir: str | Path, step: int | None = None, overwrite: bool = False) -> Path:
    """A run's checkpoint as a PEFT adapter folder for the original base model."""
    from jaxlora.io.peft import export_peft
    check_export_out(config, out_dir)
    model = load_model(config, sharding.make_mesh(config.mesh))
    trainable, _ = restore_adapters(config, model, step)
    return export_peft(model, trainable["lora"], config.lora, out_dir, modules_to_save=trainable["full"],
                       overwrite=overwrite)
