"""Thin entry point: `python scripts/plan.py --config configs/X.yaml --target v5p-32 [--slices 2] [--set k=v]`,
or `python scripts/plan.py --table` for the README table. All logic lives in `jaxlora.plan`."""

import sys

from jaxlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
