"""The training loop: `jaxlora.train(config)` and `jaxlora train --config ...`.

Loads the base model straight into its shardings, tokenizes the data (cached; seq2seq for an encoder-decoder),
builds everything it trains with in one call (`jaxlora.training.build.build_training`: the LoRA tree, optimizer,
shardings and the jitted step), then runs the step with a progress bar, JSONL metrics
(optionally TensorBoard), periodic held-out evaluation (loss; accuracy too for data with `label_words`) and orbax
checkpoints. Resuming from the latest checkpoint in output_dir is exact: the
data order is a pure function of the step, and the RNG and optimizer state are restored.

A checkpoint only holds finite parameters whose next loss is finite when it is known. The loss of step N is the
loss of the parameters before update N, so: a non-finite loss at step N stops the run before anything is written for
step N, and removes the checkpoint of step N - 1 if there is one (those are the parameters that gave that loss); the
parameters after update N are checked finite (one jitted reduction) before step N is saved. Either stop names the step
and the last good checkpoint, which a rerun resumes from. Only the final checkpoint's next loss is never known.
Multi-host: every process runs this same loop on its slice of each global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlora import lora as lora_lib, sharding
from jaxlora.config import RunConfig
from jaxlora.io import checkpoint as ckpt_lib
from jaxlora.io.configfile import dump_config, to_dict
from jaxlora.training import data as data_lib, step as step_lib
from jaxlora.training.build import build_training
from jaxlora.training.evaluation import Evaluator
from jaxlora.training.metrics import MetricsLogger, measure_peak_flops, read_metrics, train_flops_per_token
from jaxlora.training.preemption import StopSignals, TrainingInterrupted
from jaxlora.training.run_folder import RunLock
from jaxlora.training.setup import (TrainingError, lora_ga_batches, load_data, load_model, make_loader,
                                    maybe_initialize_distributed, report_dropped, resolve_data_layout)

log = logging.getLogger("jaxlora")


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    steps: int
    losses: list[float]  # training loss of every step run in this call
    eval_loss: float | None
    tokens_per_second: float
    compiles: int  # distinct compilations of the train step
    eval_accuracy: float | None = None  # data with label_words: held-out accuracy (every label word scored)
    labelled_tokens_per_second: float = 0.0  # the tokens the loss was computed on, per second


def log_optim_changes(saved: dict | None, now, step: int) -> None:
    """A resume with other optimizer settings than the checkpoint's is allowed (it changes how training goes on, not
    the model's function) but said, naming each key's old and new value."""
    if not saved:
        return  # a checkpoint from before the optimizer config was recorded
    current = json.loads(json.dumps(dataclasses.asdict(now), default=str))
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            log.warning("resuming at step %d with optim.%s=%r; the checkpoint was trained with optim.%s=%r", step, key,
                        current.get(key), key, saved.get(key))


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every leaf of `tree` is finite everywhere: one reduction, one scalar to the host."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def prepare_output_dir(out: Path) -> None:
    """Creates the run's folder, or says in one line why it cannot."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot create train.output_dir {out}: {e.strerror or e}") from None


def resume(checkpointer, template_state, signature: dict, step: int | None):
    """(state, meta, step) to resume from: `step` if given (checkpoints after it are moved to
    <run>/superseded-checkpoints/), else the newest checkpoint that reads back; newer unreadable ones are moved to
    <run>/corrupt-checkpoints/ (single process; a multi-host run stops instead, naming --resume-step)."""
    steps = checkpointer.all_steps()
    if step is not None:
        if step not in steps:
            raise TrainingError(f"--resume-step {step}: no checkpoint of step {step} in {checkpointer.directory} "
                                f"(there are: {', '.join(map(str, steps)) or 'none'})")
        state, meta = checkpointer.restore(step, template_state, signature)  # first: a refused resume moves nothing
        if jax.process_index() == 0:
            for newer in (s for s in steps if s > step):
                dest = checkpointer.move_aside(newer, "superseded-checkpoints")
                log.warning("checkpoint step %d moved to %s: resuming from the older step %d", newer, dest, step)
        checkpointer.sync_after_move()
        return state, meta, step

    found = checkpointer.restore_newest_intact(template_state, signature)
    if found is None:
        raise TrainingError(f"none of the checkpoints in {checkpointer.directory} (steps "
                            f"{', '.join(map(str, steps))}) reads back; nothing was moved. Move the folder away to "
                            f"start from step 0")
    state, meta, step, unreadable = found
    if unreadable and jax.process_count() > 1:  # moving folders needs one process to decide for all: say how instead
        raise TrainingError(f"{unreadable[0]}; resume from the intact one with --resume-step {step}")
    for error in unreadable:
        dest = checkpointer.move_aside(int(error.where.name), "corrupt-checkpoints")
        log.warning("%s: moved to %s; resuming from the checkpoint of step %d", error, dest, step)
    return state, meta, step


def train(config: RunConfig, resume_step: int | None = None) -> TrainResult:
    """Fine-tunes `config.model.path` with LoRA on `config.data`; returns where the outputs went and the losses.

    `resume_step`: resume from that checkpoint instead of the newest (newer ones are moved aside, not deleted)."""
    tc = config.train
    maybe_initialize_distributed(tc)
    out = Path(tc.output_dir)
    prepare_output_dir(out)
    with contextlib.ExitStack() as stack:  # the lock, checkpointer, logger and signal handlers are undone on any exit
        if jax.process_index() == 0:
            stack.callback(RunLock(out).release)
        mesh = sharding.make_mesh(config.mesh)
        t0 = time.perf_counter()
        model = load_model(config, mesh)
        config = resolve_data_layout(config, model)
        tokenizer = model.tokenizer()
        log.info("loaded %s (%.1fM params) in %.1fs on mesh %s", config.model.path, model.config.num_params / 1e6,
                 time.perf_counter() - t0, dict(mesh.shape))

        train_data, eval_data = load_data(config, tokenizer)
        for part, data in (("training", train_data), ("held-out", eval_data)):
            if data is not None:
                report_dropped(part, data, config.data.max_length)
        batch_size = tc.micro_batch_size * tc.grad_accum_steps
        loader = make_loader(config, train_data, tokenizer, batch_size)
        if config.data.packing:
            log.info("packed %d examples into %d rows of %d tokens (%.1f%% real tokens)", len(train_data),
                     len(loader.bins), config.data.max_length, 100 * loader.fill)
        total_steps = tc.max_steps or max(1, int(tc.epochs * loader.steps_per_epoch))

        divisor = sharding.batch_divisor(mesh)
        if tc.micro_batch_size % divisor:
            raise TrainingError(f"train.micro_batch_size={tc.micro_batch_size} must be a multiple of the mesh's "
                                f"data x fsdp = {divisor} (mesh {dict(mesh.shape)})")
        checkpointer = stack.enter_context(contextlib.closing(
            ckpt_lib.Checkpointer(out / "checkpoints", keep=tc.keep_checkpoints)))
        resuming = resume_step is not None or (tc.resume and checkpointer.latest_step() is not None)
        is_ga = config.lora.init_lora_weights in lora_lib.DATA_INITS  # LoRA-GA, LoRA-One, EVA, CorDA: batches
        t_init = time.perf_counter()
        training = build_training(
            model, config, total_steps=total_steps, template=resuming, progress=tc.progress_bar,
            lora_ga_batches=lora_ga_batches(config, train_data, tokenizer) if is_ga and not resuming else None)
        if is_ga and not resuming:
            names = {"lora_ga": "LoRA-GA", "lora_one": "LoRA-One", "eva": "EVA", "corda": "CorDA"}
            log.info("%s initialization: %.1fs", names.get(
                config.lora.init_lora_weights, config.lora.init_lora_weights), time.perf_counter() - t_init)
        params, state, train_step, targets = training.params, training.state, training.train_step, training.targets
        evaluator = (Evaluator(model, config, tokenizer, eval_data, training.eval_step) if eval_data is not None
                     else None)

        signature = ckpt_lib.state_signature(model.config, state, config.lora)
        start = 0
        if resuming:
            state, saved_meta, start = resume(checkpointer, state, signature, resume_step)
            log.info("resumed from %s at step %d", checkpointer.directory, start)
            log_optim_changes(saved_meta.get("optim"), config.optim, start)
        if jax.process_index() == 0:  # the run is accepted: its config may be recorded now
            dump_config(config, out / "config.yaml")

        n_lora = lora_lib.num_lora_params(state.trainable["lora"])
        log.info("training %d steps (%d/epoch) of %d %s x %d tokens max; LoRA params %.2fM (%.3f%% of base), "
                 "%d targets", total_steps, loader.steps_per_epoch, batch_size,
                 "packed rows" if config.data.packing else "examples", config.data.max_length, n_lora / 1e6,
                 100 * n_lora / model.config.num_params, len(targets))
        if tc.peak_tflops_per_device:
            peak = tc.peak_tflops_per_device * 1e12 * jax.device_count()
        else:  # simulated CPU devices share the host's cores: the host's measured matmul rate is the whole peak
            peak = measure_peak_flops() * jax.process_count() if jax.default_backend() == "cpu" else None
        logger = stack.enter_context(contextlib.closing(MetricsLogger(
            out, total_steps, start, tc.progress_bar, tc.tensorboard, peak_flops=peak, log_every=tc.log_every)))
        meta = {"signature": signature, "config": to_dict(config), "model": config.model.path,
                "optim": dataclasses.asdict(config.optim)}

        losses: list[float] = []
        pending = None  # metrics of the step in flight: fetched after the next dispatch, so the host never stalls XLA
        eval_metrics: dict = {}
        last_good = start if start else None
        executables: dict[tuple, tuple] = {}  # batch shape -> (compiled step, its FLOPs): bounded by the buckets

        def stop(reason: str):
            raise TrainingError(f"{reason}; stopped. Last good checkpoint: "
                                + (f"step {last_good} in {checkpointer.directory}" if last_good is not None
                                   else "none (no checkpoint with finite parameters and loss was saved)"))

        def finish(step_done: int, metrics, tokens: int, flops):
            nonlocal last_good
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                reason = f"loss is {loss} at step {step_done}"
                if last_good is not None and last_good == step_done - 1:  # that checkpoint's parameters gave the loss
                    checkpointer.delete(last_good)
                    reason += f" (the loss of the parameters checkpointed at step {last_good}: that checkpoint was " \
                              f"removed)"
                    older = [s for s in checkpointer.all_steps() if s < last_good]
                    last_good = older[-1] if older else None
                stop(reason)
            if float(metrics.get("loss_scale_exhausted", 0.0)):
                stop(f"float16 gradients overflow at step {step_done} even at the minimum loss scale "
                     f"(optim.loss_scale_min={config.optim.loss_scale_min}); use model.dtype bfloat16 or float32, or a "
                     f"lower learning rate")
            losses.append(loss)
            logger.log_step(step_done, {k: float(v) for k, v in metrics.items()}, tokens, flops)

        def save(done: int):
            nonlocal last_good
            if not bool(all_finite(state.trainable)):
                stop(f"the parameters are not finite after step {done} (its loss, of the parameters before it, was "
                     f"{losses[-1]:.4g}); step {done} was not saved")
            checkpointer.save(done, state, {**meta, "step": done})
            last_good = done

        signals = stack.enter_context(StopSignals()) if jax.process_count() == 1 else None
        for step in range(start, total_steps):
            host_batch = loader.batch(step)
            batch = step_lib.place_batch(host_batch, mesh)
            shape = host_batch["input_ids"].shape
            if shape not in executables:
                compiled = train_step.lower(params, state, batch).compile()
                rows, length = shape[0] * jax.process_count(), shape[1]
                executables[shape] = (compiled, rows * length * train_flops_per_token(model, length))
            compiled, flops = executables[shape]
            state, metrics = compiled(params, state, batch)
            if pending is not None:
                finish(*pending)
            pending = (step + 1, metrics, data_lib.count_tokens(host_batch) * jax.process_count(), flops)
            done = step + 1
            is_last = done == total_steps
            save_now = (tc.save_every and done % tc.save_every == 0) or is_last
            eval_now = eval_data is not None and ((tc.eval_every and done % tc.eval_every == 0) or is_last)
            preempted = not is_last and (signals.received if signals else reached_preemption(done))
            if save_now or eval_now or preempted:  # never checkpoint (or evaluate) a step whose loss is unchecked
                finish(*pending)
                pending = None
            if eval_now:
                with logger.not_training():
                    eval_metrics = evaluator(params, training.adapters(state))
                logger.log_eval(done, **eval_metrics)
            if save_now or preempted:
                with logger.not_training():
                    save(done)
            if preempted:
                checkpointer.wait()
                why = signals.received if signals else "preemption"
                raise TrainingInterrupted(
                    f"stopped by {why} after step {done} of {total_steps}: checkpoint saved in "
                    f"{checkpointer.directory}; run the same command again to resume from step {done}",
                    signals.signum if signals else 15)
        if pending is not None:
            finish(*pending)
        checkpointer.wait()

    from jaxlora.io.peft import export_peft
    final = training.adapters(state)
    adapter_dir = export_peft(model, final["lora"], config.lora, out / "adapter", modules_to_save=final["full"],
                              overwrite=True)
    compiles = len(executables)
    log.info("done: %d steps, final loss %.4f%s; %.0f tokens/s (%.0f labelled); adapter in %s; %d train-step "
             "compilations", total_steps, losses[-1] if losses else float("nan"),
             "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in eval_metrics.items()),
             logger.tokens_per_second(), logger.labelled_tokens_per_second(), adapter_dir, compiles)
    return TrainResult(out, adapter_dir, total_steps, losses, eval_metrics.get("eval_loss"),
                       logger.tokens_per_second(), compiles, eval_metrics.get("eval_accuracy"),
                       logger.labelled_tokens_per_second())


def reached_preemption(step: int) -> bool:
    """Multi-host: whether all processes reached the step at which jax's preemption sync (SIGTERM to any host)
    says to save; False when the preemption service is not running."""
    from jax.experimental import multihost_utils
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:
        return False


def loss_history(output_dir: str | Path) -> list[dict]:
    """The metrics.jsonl of a run, parsed, as its history stands after any resume (`metrics.read_metrics`)."""
    return read_metrics(output_dir)
