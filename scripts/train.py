"""Thin entry point for pod and host launch scripts: `python scripts/train.py --config configs/X.yaml [--set k=v]`.

On a TPU pod slice run the same command on every host (e.g. `gcloud compute tpus tpu-vm ssh ... --worker=all`):
jax.distributed initializes automatically there. Elsewhere pass train.coordinator_address / num_processes /
process_id. All logic lives in the jaxlora package; this file only forwards to its CLI.
"""

import sys

from jaxlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
