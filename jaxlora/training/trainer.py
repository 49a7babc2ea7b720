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
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlora import lora as lora_lib, sharding
from jaxlora.config import RunConfig
from jaxlora.io import checkpoint as ckpt_lib
from jaxlora.models.model import Model, from_pretrained
from jaxlora.tasks import t5_glue
from jaxlora.training import data as data_lib, step as step_lib
from jaxlora.training.build import build_training
from jaxlora.training.metrics import MetricsLogger, measure_peak_flops, train_flops_per_token

log = logging.getLogger("jaxlora")


class TrainingError(RuntimeError):
    pass


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


def maybe_initialize_distributed(cfg) -> None:
    """jax.distributed.initialize for multi-process runs (explicit coordinator, or automatic on TPU pods)."""
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return
    if cfg.coordinator_address:
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def load_model(config: RunConfig, mesh) -> Model:
    m = config.model
    return from_pretrained(m.path, m.dtype, param_dtype=m.param_dtype, mesh=mesh, remat=m.remat,
                           attention_impl=m.attention_impl)


def resolve_data_layout(config: RunConfig, model: Model) -> RunConfig:
    """`config` with data.seq2seq set to what the model needs (an encoder-decoder reads prompt -> input_ids,
    response -> labels); an explicit setting that contradicts the model is an error naming both."""
    want, got = model.is_encoder_decoder, config.data.seq2seq
    kind = "an encoder-decoder" if want else "a decoder-only model"
    if got is not None and got != want:
        raise TrainingError(f"data.seq2seq={got} but {config.model.path} is {kind} "
                            f"({model.config.architecture}); leave data.seq2seq unset to follow the model")
    if config.data.label_words and not want:
        raise TrainingError(f"data.label_words scores label words as decoder targets, which needs an encoder-decoder "
                            f"(T5); {config.model.path} is {kind} ({model.config.architecture})")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, seq2seq=want))


def load_data(config: RunConfig, tokenizer):
    train_data = data_lib.load_tokenized(config.data, tokenizer, "train")
    eval_data = None
    if config.data.eval_path or config.data.eval_fraction > 0:
        eval_data = data_lib.load_tokenized(config.data, tokenizer, "eval")
    return train_data, eval_data


def make_loader(config: RunConfig, data, tokenizer, batch_size: int, shuffle: bool = True,
                seed: int | None = None) -> data_lib.BatchLoader:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    targets = data_lib.target_bucket_lengths(config.data) if data.seq2seq else None
    return data_lib.BatchLoader(data, batch_size, data_lib.bucket_lengths(config.data), pad,
                                seed=config.train.seed if seed is None else seed, process_index=jax.process_index(),
                                process_count=jax.process_count(), shuffle=shuffle, label_bucket_lengths=targets)


def lora_ga_batches(config: RunConfig, data, tokenizer) -> list[dict]:
    """LoRA-GA's estimation batches: the first batch_size * num_batches training examples, in order (as the
    official code), padded to the training buckets; each process keeps its rows."""
    ga = config.lora.lora_ga_config
    loader = make_loader(config, data, tokenizer, ga.batch_size, shuffle=False, seed=0)
    return [loader.batch(i) for i in range(ga.num_batches)]


def eval_steps(loader, max_batches: int | None) -> int:
    """Held-out batches one evaluation reads: all of them, or at most `max_batches` (train.eval_batches)."""
    return loader.steps_per_epoch if max_batches is None else min(max_batches, loader.steps_per_epoch)


def evaluate(eval_fn, params, trainable, loader, mesh, max_batches: int | None) -> float:
    total, count = 0.0, 0.0
    for i in range(eval_steps(loader, max_batches)):
        s, c = eval_fn(params, trainable, step_lib.place_batch(loader.batch(i), mesh))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


class Evaluator:
    """Held-out metrics of a run: the loss, and for data with `label_words` the accuracy of picking the label word the
    decoder finds most probable (`jaxlora.tasks.t5_glue`: every class scored, normalized over the classes)."""

    def __init__(self, model: Model, config: RunConfig, tokenizer, eval_data, eval_step=None):
        """`eval_step`: the run's (`build_training`'s, with fixed shardings); default: jit without fixed shardings."""
        self.mesh, self.max_batches = model.mesh, config.train.eval_batches
        self.loader = make_loader(config, eval_data, tokenizer, config.train.micro_batch_size)
        self.loss_fn = eval_step or jax.jit(step_lib.make_eval_step(model))
        self.label_ids = data_lib.label_word_ids(config.data, tokenizer) if config.data.label_words else None
        self.accuracy_fn = jax.jit(t5_glue.make_accuracy_step(model, self.label_ids)) if self.label_ids else None

    def __call__(self, params, adapters) -> dict:
        """Held-out metrics of the model with `adapters` ({"lora", "full"}, as `Training.adapters` joins them)."""
        trainable = adapters
        out = {"eval_loss": evaluate(self.loss_fn, params, trainable, self.loader, self.mesh, self.max_batches)}
        if self.accuracy_fn is not None:
            correct = total = 0.0
            for i in range(eval_steps(self.loader, self.max_batches)):
                host = self.loader.batch(i)
                batch = {"input_ids": host["input_ids"], "attention_mask": host["attention_mask"],
                         "class": t5_glue.classes_of_labels(host["labels"], self.label_ids)}
                c, k = self.accuracy_fn(params, trainable, step_lib.place_batch(batch, self.mesh))
                correct, total = correct + float(c), total + float(k)
            out["eval_accuracy"] = correct / max(total, 1.0)
        return out


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


def train(config: RunConfig) -> TrainResult:
    """Fine-tunes `config.model.path` with LoRA on `config.data`; returns where the outputs went and the losses."""
    tc = config.train
    maybe_initialize_distributed(tc)
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from jaxlora.io.configfile import dump_config
    if jax.process_index() == 0:
        dump_config(config, out / "config.yaml")

    mesh = sharding.make_mesh(config.mesh)
    t0 = time.perf_counter()
    model = load_model(config, mesh)
    config = resolve_data_layout(config, model)
    tokenizer = model.tokenizer()
    log.info("loaded %s (%.1fM params) in %.1fs on mesh %s", config.model.path, model.config.num_params / 1e6,
             time.perf_counter() - t0, dict(mesh.shape))

    train_data, eval_data = load_data(config, tokenizer)
    if train_data.num_truncated:
        log.warning("%d training examples were longer than max_length=%d and were truncated",
                    train_data.num_truncated, config.data.max_length)
    batch_size = tc.micro_batch_size * tc.grad_accum_steps
    loader = make_loader(config, train_data, tokenizer, batch_size)
    total_steps = tc.max_steps or max(1, int(tc.epochs * loader.steps_per_epoch))

    divisor = sharding.batch_divisor(mesh)
    if tc.micro_batch_size % divisor:
        raise TrainingError(f"train.micro_batch_size={tc.micro_batch_size} must be a multiple of the mesh's "
                            f"data x fsdp = {divisor} (mesh {dict(mesh.shape)})")
    with contextlib.ExitStack() as stack:  # the checkpointer and the logger are closed on any exit
        checkpointer = stack.enter_context(contextlib.closing(
            ckpt_lib.Checkpointer(out / "checkpoints", keep=tc.keep_checkpoints)))
        resuming = tc.resume and checkpointer.latest_step() is not None
        is_ga = config.lora.init_lora_weights == "lora_ga"
        t_init = time.perf_counter()
        training = build_training(
            model, config, total_steps=total_steps, template=resuming, progress=tc.progress_bar,
            lora_ga_batches=lora_ga_batches(config, train_data, tokenizer) if is_ga and not resuming else None)
        if is_ga and not resuming:
            log.info("LoRA-GA initialization: %.1fs", time.perf_counter() - t_init)
        params, state, train_step, targets = training.params, training.state, training.train_step, training.targets
        evaluator = (Evaluator(model, config, tokenizer, eval_data, training.eval_step) if eval_data is not None
                     else None)

        signature = ckpt_lib.state_signature(model.config, state, config.lora)
        start = 0
        if resuming:
            start = checkpointer.latest_step()
            state, saved_meta = checkpointer.restore(start, state, signature)
            log.info("resumed from %s at step %d", checkpointer.directory, start)
            log_optim_changes(saved_meta.get("optim"), config.optim, start)

        n_lora = lora_lib.num_lora_params(state.trainable["lora"])
        log.info("training %d steps (%d/epoch) of %d examples x %d tokens max; LoRA params %.2fM (%.3f%% of base), "
                 "%d targets", total_steps, loader.steps_per_epoch, batch_size, config.data.max_length, n_lora / 1e6,
                 100 * n_lora / model.config.num_params, len(targets))
        if tc.peak_tflops_per_device:
            peak = tc.peak_tflops_per_device * 1e12 * jax.device_count()
        else:  # simulated CPU devices share the host's cores: the host's measured matmul rate is the whole peak
            peak = measure_peak_flops() * jax.process_count() if jax.default_backend() == "cpu" else None
        logger = stack.enter_context(contextlib.closing(MetricsLogger(
            out, total_steps, start, tc.progress_bar, tc.tensorboard, peak_flops=peak, log_every=tc.log_every)))
        meta = {"signature": signature, "config_path": str(out / "config.yaml"), "model": config.model.path,
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
            losses.append(loss)
            logger.log_step(step_done, {k: float(v) for k, v in metrics.items()}, tokens, flops)

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
            if save_now or eval_now:  # never checkpoint (or evaluate) a step whose loss is unchecked
                finish(*pending)
                pending = None
            if save_now and not bool(all_finite(state.trainable)):
                stop(f"the parameters are not finite after step {done} (its loss, of the parameters before it, was "
                     f"{losses[-1]:.4g}); step {done} was not saved")
            if eval_now:
                eval_metrics = evaluator(params, training.adapters(state))
                logger.log_eval(done, **eval_metrics)
            if save_now:
                checkpointer.save(done, state, {**meta, "step": done})
                last_good = done
        if pending is not None:
            finish(*pending)

    from jaxlora.io.peft import export_peft
    final = training.adapters(state)
    adapter_dir = export_peft(model, final["lora"], config.lora, out / "adapter", modules_to_save=final["full"],
                              overwrite=True)
    compiles = len(executables)
    log.info("done: %d steps, final loss %.4f%s; adapter in %s; %d train-step compilations",
             total_steps, losses[-1] if losses else float("nan"),
             "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in eval_metrics.items()), adapter_dir, compiles)
    return TrainResult(out, adapter_dir, total_steps, losses, eval_metrics.get("eval_loss"),
                       logger.tokens_per_second(), compiles, eval_metrics.get("eval_accuracy"))


def loss_history(output_dir: str | Path) -> list[dict]:
    """The metrics.jsonl of a run, parsed."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]



def restore_adapters(config: RunConfig, model: Model, step: int | None = None):
    """The adapters ({"lora" with LoRA-GA's a0/b0 joined, "full"}) of a run's checkpoint (latest by default), in their
    shardings, and the step."""
    training = build_training(model, config, total_steps=1, template=True)
    checkpointer = ckpt_lib.Checkpointer(Path(config.train.output_dir) / "checkpoints")
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise ckpt_lib.ResumeError(f"no checkpoint in {checkpointer.directory}")
        state, _ = checkpointer.restore(step, training.state,
                                        ckpt_lib.state_signature(model.config, training.state, config.lora))
    finally:
        checkpointer.close()
    return training.adapters(state), step


def evaluate_run(config: RunConfig, step: int | None = None, base_only: bool = False) -> dict:
    """Held-out loss and perplexity (and accuracy, for data with label_words) of a run's checkpoint, or of the base
    model with base_only."""
    mesh = sharding.make_mesh(config.mesh)
    model = load_model(config, mesh)
    config = resolve_data_layout(config, model)
    tokenizer = model.tokenizer()
    _, eval_data = load_data(config, tokenizer)
    if eval_data is None:
        raise TrainingError("no held-out data: set data.eval_path or data.eval_fraction")
    params = model.params
    if base_only:
        trainable, step = {"lora": {}, "full": {}}, 0
    else:
        trainable, step = restore_adapters(config, model, step)
    evaluator = Evaluator(model, config, tokenizer, eval_data)
    metrics = evaluator(params, trainable)
    return {"step": step, **metrics, "eval_perplexity": math.exp(min(metrics["eval_loss"], 50.0)),
            "examples": eval_steps(evaluator.loader, config.train.eval_batches) * config.train.micro_batch_size}


def export_merged(config: RunConfig, out_dir: str | Path, step: int | None = None, overwrite: bool = False) -> Path:
    """Writes base + s*a@b (and modules_to_save) as HF safetensors that AutoModelForCausalLM loads."""
    mesh = sharding.make_mesh(config.mesh)
    model = load_model(config, mesh)
    trainable, _ = restore_adapters(config, model, step)
    params = lora_lib.merge(lora_lib.overlay(model.params, trainable["full"]), trainable["lora"])
    params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, model.params)
    return model.save_pretrained(out_dir, params, overwrite=overwrite)
