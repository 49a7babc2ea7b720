"""The `jaxlora` command line: train, eval, export. Thin: parsing here, the work in `jaxlora.train`.

    jaxlora train  --config configs/smollm2_135m_cpu.yaml [--set optim.learning_rate=1e-4 ...]
    jaxlora eval   --config configs/smollm2_135m_cpu.yaml [--step N | --base]
    jaxlora export --config configs/smollm2_135m_cpu.yaml --out merged/ [--step N]

Errors a user can cause (bad config, data, model folder, checkpoint) end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlora", description="LoRA fine-tuning of Hugging Face LMs in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "fine-tune with LoRA"), ("eval", "held-out loss of a run's checkpoint"),
                            ("export", "write merged HF safetensors (base + LoRA)")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--config", required=True, help="YAML run config (see configs/)")
        c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.learning_rate=1e-4 (repeatable)")
        c.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name != "train":
            c.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        if name == "eval":
            c.add_argument("--base", action="store_true", help="evaluate the base model without the adapter")
        if name == "export":
            c.add_argument("--out", required=True, help="output folder (written atomically)")
            c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file operation at INFO
    from jaxlora import train as train_lib
    from jaxlora.config import load_run_config
    try:
        config = load_run_config(args.config, args.overrides)
        if args.command == "train":
            result = train_lib.train(config)
            print(f"adapter: {result.adapter_dir}\ncheckpoints: {result.output_dir / 'checkpoints'}\n"
                  f"metrics: {result.output_dir / 'metrics.jsonl'}")
        elif args.command == "eval":
            print(json.dumps(train_lib.evaluate_run(config, args.step, args.base)))
        else:
            print(f"merged model: {train_lib.export_merged(config, args.out, args.step, args.overwrite)}")
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # our error types all derive from these
        if args.verbose:
            raise
        print(f"jaxlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
