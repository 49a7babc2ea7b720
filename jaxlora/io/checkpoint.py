"""Training checkpoints with orbax-checkpoint: adapter-sized, atomic, restored straight into their shardings.

A checkpoint holds the train state (trainable tree = LoRA factors + modules_to_save, LoRA-GA's frozen a0/b0,
optimizer state, step, RNG) and
a JSON `meta` item (the model's and the LoRA tree's signature, the data position, the run config). It never holds
the frozen base. Orbax writes each step to a temporary folder and renames it when complete, so a crash never leaves a
half-written checkpoint, and keeps the last `keep` steps.

On resume the saved signature is compared with the current run first, so resuming a checkpoint made for another
model or another LoRA shape is one clear error instead of a shape mismatch deep inside orbax.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import serialization


class ResumeError(ValueError):
    pass


def state_signature(model_config, state) -> dict:
    """What must match for a checkpoint to be resumable: architecture and every trainable leaf's shape/dtype."""
    leaves = jax.tree_util.tree_leaves_with_path(state.trainable)
    shapes = {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in leaves}
    frozen = jax.tree_util.tree_leaves_with_path(getattr(state, "frozen", None) or {})  # LoRA-GA's a0/b0
    shapes.update({"frozen" + jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in frozen})
    return {"model": {k: v for k, v in vars(model_config).items() if isinstance(v, (int, float, str, bool))},
            "trainable": shapes}


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
