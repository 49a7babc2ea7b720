"""The `jaxlora` command line. Thin: parsing here, the work in `jaxlora.training.trainer`, `peft_format`, `generation`.

    jaxlora train  --config configs/smollm2_135m_cpu.yaml [--set optim.learning_rate=1e-4 ...]
    jaxlora eval   --config configs/smollm2_135m_cpu.yaml [--step N | --base]
    jaxlora export --config configs/smollm2_135m_cpu.yaml --out merged/ [--step N] [--format merged|peft]
    jaxlora import-peft --model DIR --adapter DIR          (validates a PEFT adapter against a model, prints a summary)
    jaxlora plan --config configs/X.yaml --target v5p-32|h100x8 [--slices 2] [--set ...]   (or: jaxlora plan --table)
    jaxlora generate --model DIR [--adapter DIR] --prompt "..." [--prompt ...] [--max-new-tokens N] [--chat]

Errors a user can cause (bad config, data, model folder, checkpoint) end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys

from jaxlora.backends import skip_tpu_backend_without_tpu


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlora", description="LoRA fine-tuning of Hugging Face LMs in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "fine-tune with LoRA"), ("eval", "held-out loss (and accuracy with data.label_words) of a run's checkpoint"),
                            ("export", "write merged HF safetensors (base + LoRA)")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--config", required=True, help="YAML run config (see configs/)")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.learning_rate=1e-4 (repeatable)")
        c.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name != "train":
            c.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        else:
            c.add_argument("--resume-step", type=int, default=None, metavar="N",
                           help="resume from the checkpoint of step N instead of the newest (newer checkpoints are "
                                "moved to <output_dir>/superseded-checkpoints/)")
        if name == "eval":
            c.add_argument("--base", action="store_true", help="evaluate the base model without the adapter")
        if name == "export":
            c.add_argument("--out", required=True, help="output folder (written atomically)")
            c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
            c.add_argument("--format", choices=("merged", "peft"), default="merged",
                           help="merged: HF safetensors with the adapter folded in; peft: a PEFT adapter folder "
                                "for the original base (LoRA-GA adapters converted)")
    c = sub.add_parser("import-peft", help="check a PEFT adapter against a model and print its summary")
    c.add_argument("--model", required=True, help="HF model folder (or hub id) of the adapter's base")
    c.add_argument("--adapter", required=True, help="PEFT adapter folder")
    c.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    c = sub.add_parser("generate", help="generate text with a model (and a PEFT adapter)")
    c.add_argument("--model", required=True, help="HF model folder (or hub id)")
    c.add_argument("--adapter", default=None, help="PEFT adapter folder (e.g. a run's adapter/)")
    c.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: generated as a batch)")
    c.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (the API's default too)")
    c.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    c.add_argument("--top-k", type=int, default=0, help="0: no limit")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--chat", action="store_true", help="wrap each prompt with the tokenizer's chat template")
    c.add_argument("--dtype", default="float32", help="compute dtype, e.g. bfloat16")
    c.add_argument("--quantization", choices=("int8", "nf4"), default=None,
                   help="hold the base's layer kernels quantized (QLoRA's nf4, or int8), as a quantized run trained")
    c.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    c = sub.add_parser("plan", help="AOT-compile the train step and LoRA-GA estimation for a TPU topology or a GPU "
                                    "host: memory, "
                                    "fit, FLOPs, largest micro-batch (no weights, no accelerator needed)")
    from jaxlora.plan import add_plan_arguments
    add_plan_arguments(c)
    return p


def _load_adapter(model, adapter_dir):
    """(lora, lora_config, params with the adapter's modules_to_save swapped in)."""
    from jaxlora import lora as lora_lib
    from jaxlora.io.peft import import_peft
    lora, cfg, full = import_peft(model, adapter_dir, modules_to_save=True)
    return lora, cfg, lora_lib.overlay(model.params, full)


def _import_peft(args) -> None:
    from jaxlora.models.model import from_pretrained
    from jaxlora.io.peft import describe, import_peft
    model = from_pretrained(args.model)
    lora, cfg, full = import_peft(model, args.adapter, modules_to_save=True)
    print(json.dumps(describe(model, lora, cfg, full), indent=2))


def _generate(args) -> None:
    from jaxlora.generation import generate
    from jaxlora.models.model import from_pretrained
    model = from_pretrained(args.model, args.dtype, quantization=args.quantization)
    lora, params = None, model.params
    if args.adapter:
        lora, _, params = _load_adapter(model, args.adapter)
    texts = generate(model, params, model.tokenizer(), args.prompt, lora=lora, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                     chat=args.chat)
    for prompt, text in zip(args.prompt, texts):
        print(json.dumps({"prompt": prompt, "completion": text}))


@contextlib.contextmanager
def _jaxlora_logging(verbose: bool):
    """jaxlora's own messages at INFO (DEBUG with -v) for the command's duration, whatever other libraries did to the
    root logger first: importing orbax leaves a root handler at the default WARNING level, which makes
    logging.basicConfig a no-op, so the level is set on the "jaxlora" logger itself (its records then reach the root's
    handlers, whose own level is NOTSET). Restored on return: the CLI is also called in-process."""
    logger = logging.getLogger("jaxlora")
    before = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(before)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file operation at INFO
    if not args.verbose:  # a failed checkpoint write: one line from us, not a traceback per orbax thread
        _quiet_orbax_background_errors()
    with _jaxlora_logging(args.verbose):
        return _run(args)


def _run(args) -> int:
    try:
        if args.command == "plan":
            from jaxlora.plan import run_plan_command
            return run_plan_command(args)  # CPU by default (plan.targets._prepare_runtime): no TPU backend starts
        skip_tpu_backend_without_tpu()
        if args.command in ("import-peft", "generate"):
            (_import_peft if args.command == "import-peft" else _generate)(args)
            return 0
        from jaxlora.config import load_run_config
        config = load_run_config(args.config, args.overrides)
        if args.command == "train":
            result = importlib.import_module("jaxlora.training.trainer").train(config, args.resume_step)
            print(f"adapter: {result.adapter_dir}\ncheckpoints: {result.output_dir / 'checkpoints'}\n"
                  f"metrics: {result.output_dir / 'metrics.jsonl'}")
        elif args.command == "eval":
            evaluation = importlib.import_module("jaxlora.training.evaluation")
            print(json.dumps(evaluation.evaluate_run(config, args.step, args.base)))
        else:
            export = importlib.import_module("jaxlora.training.export")
            write = export.export_peft_run if args.format == "peft" else export.export_merged
            what = "PEFT adapter" if args.format == "peft" else "merged model"
            print(f"{what}: {write(config, args.out, args.step, args.overwrite)}")
    except KeyboardInterrupt:
        print(f"\njaxlora {args.command}: interrupted (Ctrl-C); nothing half-written is kept", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted below: ours are one line, a full disk is one line, others raise
        return _report(args, e)
    return 0


def _report(args, e: Exception) -> int:
    """One line on stderr and the exit code for an error a user can act on; anything else propagates."""
    from jaxlora.training.run_folder import disk_full_message
    interrupted = getattr(e, "exit_code", None)  # TrainingInterrupted: stopped on a signal after saving
    full = disk_full_message(e, lambda: getattr(args, "out", None) or _output_dir(args))
    if interrupted is not None or full is not None:
        print(f"jaxlora {args.command}: {e if full is None else 'error: ' + full}", file=sys.stderr)
        return interrupted or 2
    if not isinstance(e, (ValueError, OSError, RuntimeError)) or args.verbose:  # ours derive from these
        raise e
    print(f"jaxlora {args.command}: error: {e}", file=sys.stderr)
    return 2


def _orbax_error_record(record: logging.LogRecord) -> bool:
    """False for an ERROR that orbax logs from its background writer threads; the same error is raised to the
    checkpoint call, which the trainer lets through and `_report` says in one line (`-v` shows them all)."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _unretrieved_task_record(record: logging.LogRecord) -> bool:
    """False for asyncio's report, at exit, of the abandoned writer tasks of a failed checkpoint write."""
    return not record.getMessage().startswith(("Task exception was never retrieved", "Future exception was never"))


def _quiet_orbax_background_errors() -> None:
    """A failed write (a full disk) makes orbax log a traceback from each of its writer threads, and asyncio report
    "Event loop is closed" from callbacks that outlive the loop and, at exit, every abandoned writer task: hundreds of
    lines around the one that says what happened. Drop those kinds only; every other error and warning shows."""
    logging.getLogger("absl").addFilter(_orbax_error_record)  # addFilter keeps one copy of a filter
    logging.getLogger("asyncio").addFilter(_unretrieved_task_record)
    if getattr(sys.unraisablehook, "_jaxlora_quiet", False):  # main() runs once per command, in-process too
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)
    hook._jaxlora_quiet = True
    sys.unraisablehook = hook


def _output_dir(args) -> str | None:
    """The run's output folder, for messages about the disk it is on (None when the config does not load)."""
    try:
        from jaxlora.config import load_run_config
        return load_run_config(args.config, args.overrides).train.output_dir
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
