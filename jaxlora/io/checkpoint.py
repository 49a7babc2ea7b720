"""Training checkpoints with orbax-checkpoint: adapter-sized, atomic, restored straight into their shardings.

A checkpoint holds the train state (trainable tree = LoRA factors + modules_to_save, LoRA-GA's frozen a0/b0,
optimizer state, step, RNG) and
a JSON `meta` item (the model's and the LoRA tree's signature, the data position, the run config). It never holds
the frozen base. Orbax writes each step to a temporary folder and renames it when complete, so a crash never leaves a
half-written checkpoint, and keeps the last `keep` steps.

On resume the saved signature is compared with the current run first, so resuming a checkpoint made for another
model, another LoRA shape or another LoRA scale (lora_alpha) is one clear error instead of a shape mismatch deep inside
orbax (or a silently different model).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import serialization


class ResumeError(ValueError):
    pass


# LoraConfig fields that change the adapted model's function (beyond the shapes): a resume or an export that changes
# one of them is refused. The optimizer's settings only change how training goes on (logged on resume, trainer.py).
LORA_FUNCTION_KEYS = ("lora_alpha", "use_rslora", "alpha_pattern")


def state_signature(model_config, state, lora_config=None) -> dict:
    """What must match for a checkpoint to be resumable: architecture, every trainable leaf's shape/dtype, each LoRA
    target's scale and (with `lora_config`) the LoRA settings that define the function (LORA_FUNCTION_KEYS)."""
    from jaxlora.lora import lora_items
    leaves = jax.tree_util.tree_leaves_with_path(state.trainable)
    shapes = {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in leaves}
    frozen = jax.tree_util.tree_leaves_with_path(getattr(state, "frozen", None) or {})  # LoRA-GA's a0/b0
    shapes.update({"frozen" + jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in frozen})
    signature = {"model": {k: v for k, v in vars(model_config).items() if isinstance(v, (int, float, str, bool))},
                 "trainable": shapes,
                 "scale": {"/".join(p): float(w.scale) for p, w in lora_items(state.trainable.get("lora", {}))}}
    if lora_config is not None:
        signature["lora"] = json.loads(json.dumps({k: getattr(lora_config, k) for k in LORA_FUNCTION_KEYS}))
    return signature


class Checkpointer:
    """Saves and restores train states under `directory` (every `save_every` steps, keeping the last `keep`)."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(serialization.to_state_dict(state)),
            meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str)))), force=True)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def delete(self, step: int) -> None:
        """Removes checkpoint `step` (after any save in flight is complete)."""
        self.manager.wait_until_finished()
        self.manager.delete(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, step: int, template_state, expected_signature: dict):
        """Restores `step` into the shardings of `template_state` (an initialized state of the current run)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        _check_signature(meta.get("signature", {}), expected_signature, self.directory / str(step))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                serialization.to_state_dict(template_state))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return serialization.from_state_dict(template_state, restored["state"]), meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_signature(saved: dict, expected: dict, where: Path) -> None:
    for key, value in expected.get("model", {}).items():
        if saved.get("model", {}).get(key) != value:
            raise ResumeError(f"checkpoint {where} was made for another model: {key} is "
                              f"{saved.get('model', {}).get(key)!r} there, {value!r} now")
    saved_tr, now_tr = saved.get("trainable", {}), expected.get("trainable", {})
    for key in sorted(set(saved_tr) | set(now_tr)):
        if saved_tr.get(key) != now_tr.get(key):
            raise ResumeError(f"checkpoint {where} has another LoRA shape: {key} is {saved_tr.get(key)} there, "
                              f"{now_tr.get(key)} in this run (rank, targets or modules_to_save changed?)")
    # checkpoints from before these entries existed have neither: nothing to compare
    saved_lora, now_lora = saved.get("lora"), expected.get("lora")
    if saved_lora is not None and now_lora is not None:
        for key in LORA_FUNCTION_KEYS:
            if key in saved_lora and saved_lora[key] != now_lora.get(key):
                raise ResumeError(f"checkpoint {where} was trained with lora.{key}={saved_lora[key]!r}, this run has "
                                  f"lora.{key}={now_lora.get(key)!r}: that changes the model's function; set it back "
                                  f"(or use a new train.output_dir)")
    saved_scale, now_scale = saved.get("scale"), expected.get("scale")
    if saved_scale is not None and now_scale is not None:
        for key in sorted(set(saved_scale) & set(now_scale)):
            if saved_scale[key] != now_scale[key]:
                raise ResumeError(f"checkpoint {where} has another LoRA scale: {key} is scaled by {saved_scale[key]} "
                                  f"there, {now_scale[key]} in this run (lora_alpha, use_rslora or alpha_pattern "
                                  f"changed?)")
