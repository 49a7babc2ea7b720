"""Multi-process training on one machine: 2 processes x 4 simulated CPU devices (gloo collectives) train the tiny
model and log the same losses as 1 process x 8 devices.

Each worker (tests/multihost_worker.py) is a real `jaxlora.train` run: the config's coordinator fields make it call
`jax.distributed.initialize`, the data loader hands each process its half of every global batch, the model is
loaded with make_array_from_callback across both processes, and checkpoints/exports are collective.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tiny
from jaxlora import config as config_lib
from jaxlora.training.trainer import train

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 150  # a quiet 2-core machine needs ~15 s; leave room for a loaded one
# The same run for the 2-process workers and the 1-process reference (global batch 16 = 8 rows per process). The
# (data=2, fsdp=2, tensor=2) mesh puts the data axis across the processes and shards parameters, adapters and
# checkpoints over fsdp/tensor inside each.
COMMON = ["mesh.fsdp=2", "mesh.tensor=2", "data.max_length=32", "train.micro_batch_size=8", "train.grad_accum_steps=2",
          "train.max_steps=3", "train.save_every=2", "optim.learning_rate=3e-3", "lora.lora_dropout=0.1",
          "train.progress_bar=false", "train.peak_tflops_per_device=1", "train.log_every=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(n: int, model: Path, data: Path, out: Path) -> list[dict]:
    """Starts `n` workers, waits for all, returns each one's JSON report.

    If a worker fails or the time runs out, all are killed (a survivor would wait for its peer forever) and the
    test fails with every worker's stderr tail. Output goes to files: a full pipe would block a worker.
    """
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")])}
    address = f"localhost:{free_port()}"
    procs, logs = [], []
    for i in range(n):
        cmd = [sys.executable, str(WORKER), "--process-id", str(i), "--num-processes", str(n),
               "--coordinator", address, "--model", str(model), "--data", str(data), "--out", str(out)]
        cmd += [x for o in COMMON for x in ("--set", o)]
        logs.append((out.parent / f"{out.name}.worker{i}.out", out.parent / f"{out.name}.worker{i}.err"))
        with open(logs[-1][0], "w") as stdout, open(logs[-1][1], "w") as stderr:
            procs.append(subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    status = [p.returncode for p in procs]
    if status != [0] * n:
        why = f" (killed after {TIMEOUT_S} s)" if time.monotonic() > deadline else ""
        tails = "".join(f"\n\n--- worker {i} stderr tail:\n{err.read_text()[-3000:]}"
                        for i, (_, err) in enumerate(logs))
        pytest.fail(f"workers exited with {status}{why}{tails}")
    return [json.loads(o.read_text().strip().splitlines()[-1]) for o, _ in logs]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("multihost")
    tiny.tiny_model_dir(d / "model")
    tiny.write_jsonl(d / "train.jsonl", tiny.instruction_records(64))
    return d


def test_two_processes_match_one(assets):
    # Reference first: it also fills the tokenized-data cache the workers then read.
    cfg = config_lib.load_run_config(None, [f"model.path={assets / 'model'}", f"data.path={assets / 'train.jsonl'}",
                                            f"train.output_dir={assets / 'single'}", *COMMON])
    single = train(cfg)
    assert len(single.losses) == 3

    reports = run_workers(2, assets / "model", assets / "train.jsonl", assets / "multi")

    assert sorted(r["process_id"] for r in reports) == [0, 1]
    for r in reports:
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4), r
        np.testing.assert_allclose(r["losses"], single.losses, rtol=1e-5,
                                   err_msg=f"process {r['process_id']} vs the 1-process, 8-device run")
    steps = sorted(int(p.name) for p in (assets / "multi" / "checkpoints").iterdir())
    assert steps == [2, 3]  # the collective checkpoint saves completed
    assert (assets / "multi" / "adapter" / "adapter_model.safetensors").exists()
