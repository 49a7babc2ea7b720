"""Held-out metrics of a run: the loss (and perplexity), and the accuracy for data with label words.

`Evaluator` is what the training loop calls every `eval_every` steps (with the run's own jitted eval step);
`evaluate_run` is `jaxlora eval`: a run's checkpoint (or the bare base model) on the held-out data.
"""

from __future__ import annotations

import math

import jax

from jaxlora import sharding
from jaxlora.config import RunConfig
from jaxlora.models.model import Model
from jaxlora.tasks import t5_glue
from jaxlora.training import data as data_lib, step as step_lib
from jaxlora.training.export import restore_adapters
from jaxlora.training.setup import TrainingError, load_data, load_model, make_loader, resolve_data_layout


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
        self.loader = make_loader(config, eval_data, tokenizer, config.train.micro_batch_size, evaluation=True)
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
            "examples": evaluator.loader.examples_in(eval_steps(evaluator.loader, config.train.eval_batches))}
