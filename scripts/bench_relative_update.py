"""What LoRA-GA's base-relative update costs: one train step of a LoRA-GA adapter three ways, timed in one run.

    residual    the old design's step: a rank-r branch s*x@a@b on a rewritten base W0 - s*a0@b0 (the base's values
                do not change the step's cost, so it is timed on W0)
    relative    today's step: the base untouched, the update s*x@(a@b - a0@b0) as one rank-2r product
                x@[a, a0]@[b; -b0] with a0/b0 frozen (`jaxlora.models.common.LoraDense`)
    rank-2r     the exported PEFT form, [a, a0] and [b, -b0] as one trained rank-2r adapter (all of it trained)

All three are built by `jaxlora.training.build.build_training` on the same model, batch and targets; the steps are
timed alternating (median of --repeats after a warm-up), and each compiled step's temporary memory is read from XLA.

    python scripts/bench_relative_update.py                         # SmolLM2-135M from the offline assets (CPU)
    python scripts/bench_relative_update.py --model PATH --batch 8 --seq 256 --r 8
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: the demo's SmolLM2-135M-Instruct)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlora
    from bench_common import machine_info
    from jaxlora import lora as lora_lib, sharding
    from jaxlora.config import RunConfig
    from jaxlora.lora import LoraConfig, LoraGAConfig, LoraWeights
    from jaxlora.training import optim
    from jaxlora.training.build import build_training
    from jaxlora.training.step import place_batch

    path = args.model
    if path is None:
        import assets
        path = str(assets.smollm2_path())
    from jaxlora.backends import skip_tpu_backend_without_tpu
    skip_tpu_backend_without_tpu()  # no libtpu noise on a CPU/GPU host
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    model = jaxlora.from_pretrained(path, "float32", mesh=mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    host = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    cfg = LoraConfig(r=args.r, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                     init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(batch_size=2, num_batches=2, svd_method="streaming"))
    small = {k: v[:2] for k, v in host.items()}
    lora = jaxlora.lora_ga_init(model, cfg, [small, small], progress=False)
    stacked = lambda f: jax.tree.map(f, lora, is_leaf=lora_lib.is_lora_leaf)
    variants = {
        "residual": stacked(lambda w: LoraWeights(w.a, w.b, scale=w.scale)),
        "relative": lora,
        "rank-2r": stacked(lambda w: LoraWeights(jnp.concatenate([w.a, w.a0], -1), jnp.concatenate([w.b, -w.b0], -2),
                                                 scale=w.scale)),
    }
    run = RunConfig(lora=cfg, optim=optim.OptimConfig(learning_rate=1e-5, schedule="constant"))
    batch = place_batch(host, mesh)
    steps, states, temp = {}, {}, {}
    for name, tree in variants.items():
        training = build_training(model, run, total_steps=10, lora=tree)
        compiled = training.train_step.lower(training.params, training.state, batch).compile()
        mem = compiled.memory_analysis()
        temp[name] = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
        steps[name], states[name] = compiled, training.state
        states[name], m = compiled(model.params, states[name], batch)  # warm-up
        jax.block_until_ready(m)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            t0 = time.perf_counter()
            states[name], m = steps[name](model.params, states[name], batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["residual"])
    info = machine_info()
    print(f"# base-relative LoRA-GA update vs the residual design ({info['nproc']} x {info['cpu']}, load "
          f"{info['loadavg'][0]:.1f}, jax {jax.__version__} {jax.default_backend()})")
    print(f"model {path}, batch {args.batch} x seq {args.seq}, r={args.r}, all linear layers, float32, 1 device, "
          f"median of {args.repeats} alternating steps\n")
    print("| step | median s | vs residual | XLA temp memory |")
    print("|---|---|---|---|")
    for name in variants:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.3f} | {med / base:.3f}x | {temp[name] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
