"""One process of the multi-process test (tests/test_multihost.py): trains the tiny model and prints its losses.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py \
        --process-id 0 --num-processes 2 --coordinator localhost:PORT --model DIR --data FILE --out DIR [--set k=v ...]

The run config's train.coordinator_address / num_processes / process_id make `jaxlora.training.trainer.train` call
`jax.distributed.initialize`; CPU collectives across processes need gloo, chosen before that. The last stdout line
is one JSON object: {"process_id", "process_count", "device_count", "local_device_count", "losses"}.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True, help="host:port of process 0")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], help="extra dotted config overrides")
    args = parser.parse_args()

    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before jax.distributed.initialize

    from jaxlora import config as config_lib
    from jaxlora.training.trainer import train

    cfg = config_lib.load_run_config(None, [
        f"model.path={args.model}", f"data.path={args.data}", f"train.output_dir={args.out}",
        f"train.coordinator_address={args.coordinator}", f"train.num_processes={args.num_processes}",
        f"train.process_id={args.process_id}", *args.set])
    result = train(cfg)
    print(json.dumps({"process_id": jax.process_index(), "process_count": jax.process_count(),
                      "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
                      "losses": result.losses}), flush=True)


if __name__ == "__main__":
    main()
