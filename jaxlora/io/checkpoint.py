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


class CorruptCheckpointError(ResumeError):
    """A checkpoint folder that does not read back (truncated, bit-flipped or emptied): one line, not orbax's."""

    def __init__(self, where: Path, cause: BaseException):
        first = (str(cause).strip().splitlines() or [""])[0]
        self.where, self.reason = where, f"{type(cause).__name__}: {first[:160]}" if first else type(cause).__name__
        super().__init__(f"checkpoint {where} is unreadable ({self.reason})")


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
                 "trainable": shapes, "loss_scale": getattr(state, "loss_scale", None) is not None,
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
        """Restores `step` into the shardings of `template_state` (an initialized state of the current run).

        Raises ResumeError when the checkpoint belongs to another run (model, LoRA shape or function), and
        CorruptCheckpointError, with one short line instead of orbax's and tensorstore's, when it cannot be read."""
        where = self.directory / str(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for a damaged folder
            raise CorruptCheckpointError(where, e) from None
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(where, ValueError("its meta item is not a JSON object"))
        _check_signature(meta.get("signature", {}), expected_signature, where)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                serialization.to_state_dict(template_state))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            state = serialization.from_state_dict(template_state, restored["state"])
        except Exception as e:  # noqa: BLE001
            if "tree structures do not match" in str(e):  # intact, but laid out by another jaxlora version
                raise ResumeError(f"checkpoint {where} holds a train state laid out otherwise than this version of "
                                  f"jaxlora's (it was written by another version); resume it with that version, or "
                                  f"use a new train.output_dir") from None
            raise CorruptCheckpointError(where, e) from None
        return state, meta

    def restore_newest_intact(self, template_state, expected_signature: dict):
        """(state, meta, step, unreadable) for the newest checkpoint that reads back, with the newer ones that did
        not as [CorruptCheckpointError]; None when none reads back. A ResumeError (a checkpoint of another run)
        is not corruption and propagates."""
        unreadable = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, template_state, expected_signature)
                return state, meta, step, unreadable
            except CorruptCheckpointError as e:
                unreadable.append(e)
        return None

    def move_aside(self, step: int, into: str) -> Path:
        """Moves checkpoint `step` out of the checkpoints folder into <run>/<into>/ (kept, not deleted, for
        inspection), so later saves can reuse its step number. Process 0 only; then all call `sync_after_move`."""
        self.manager.wait_until_finished()
        dest_root = self.directory.parent / into
        dest_root.mkdir(exist_ok=True)
        dest, n = dest_root / str(step), 1
        while dest.exists():
            dest, n = dest_root / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(dest)
        self.manager.reload()
        return dest

    def sync_after_move(self) -> None:
        """Every process sees the steps as process 0 left them."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxlora checkpoints moved")
        self.manager.reload()

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
    if "loss_scale" in saved and saved["loss_scale"] != expected.get("loss_scale"):
        dtype = "float16 (with a loss scale)" if saved["loss_scale"] else "bfloat16 or float32 (no loss scale)"
        raise ResumeError(f"checkpoint {where} was trained with model.dtype {dtype}; resume it with that "
                          f"model.dtype, or use a new train.output_dir")
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
