"""LoRA vs full fine-tuning cost of one train step: compiled FLOPs (XLA cost analysis) and optimizer-state bytes.

    python scripts/lora_cost.py                                   # tiny random Llama (2 layers, hidden 64)
    python scripts/lora_cost.py --model "$(python -c 'import assets as a; print(a.smollm2_path())')" --seq 512

Both steps are the library's own (`jaxlora.training.step`): LoRA trains {"lora": adapters, "full": {}}, full fine-tuning
trains {"lora": {}, "full": every base parameter}. Nothing is run or even allocated beyond the (random or loaded)
base: each step is lowered from shape structs on a 1-device mesh and compiled, so the FLOPs are the whole step's.
Expect LoRA at about 2/3 of full fine-tuning (the frozen kernels skip their weight-gradient matmuls) plus the
adapters' own small matmuls, and optimizer state = 2 x adapter bytes (Adam's mu and nu) instead of 2 x the base.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def nbytes(tree) -> int:
    import jax
    import numpy as np
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def num_params(tree) -> int:
    import jax
    import numpy as np
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def step_cost(model, run_config, batch: int, seq: int, trainable=None) -> dict:
    """FLOPs and optimizer-state bytes of the compiled train step `build_training` makes for `run_config` (or for an
    explicit `trainable` of shape structs, e.g. full fine-tuning), built from shapes only."""
    import jax
    import jax.numpy as jnp
    from jaxlora import sharding
    from jaxlora.training import optim
    from jaxlora.training.build import build_training

    tx, _ = optim.make_optimizer(optim.OptimConfig(), 1000)
    training = build_training(model, run_config, total_steps=1000, trainable=trainable, abstract=True, tx=tx)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.batch_sharding(model.mesh))
    batch_ = {"input_ids": tokens, "attention_mask": tokens, "labels": tokens}
    compiled = training.train_step.lower(training.params, training.state, batch_).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state = training.state
    return {"flops": float(cost["flops"]), "trainable_params": num_params(state.trainable),
            "trainable_bytes": nbytes(state.trainable), "opt_bytes": nbytes(state.opt_state)}


def human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.4g} {prefix}{unit}" if prefix else f"{n:.4g} {unit}"
        n /= 1000
    return ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model folder (default: a tiny random Llama)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--targets", default="all-linear", help="lora.target_modules (comma list or all-linear)")
    args = parser.parse_args(argv)

    import jax
    from jaxlora import sharding
    from jaxlora.config import RunConfig
    from jaxlora.lora import LoraConfig
    from jaxlora.models.model import Model, from_pretrained

    from jaxlora.backends import skip_tpu_backend_without_tpu
    skip_tpu_backend_without_tpu()  # no libtpu noise on a CPU/GPU host
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    if args.model:
        model, name = from_pretrained(args.model, mesh=mesh), args.model
    else:
        model, name = Model.random(TINY_LLAMA, mesh=mesh), "tiny random Llama"
    targets_spec = args.targets if args.targets == "all-linear" else args.targets.split(",")
    lora_config = LoraConfig(r=args.r, lora_alpha=2.0 * args.r, target_modules=targets_spec)
    targets = model.lora_targets(lora_config)
    lora_cost = step_cost(model, RunConfig(lora=lora_config), args.batch, args.seq)
    full_cost = step_cost(model, RunConfig(lora=lora_config), args.batch, args.seq,
                          trainable={"lora": {}, "full": model.abstract_params})
    base_bytes = nbytes(model.abstract_params)

    c = model.config
    print(f"model: {name} ({c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
          f"{human(num_params(model.abstract_params), '')} params, {human(base_bytes)})")
    print(f"step: batch {args.batch} x seq {args.seq}, AdamW, 1 device; LoRA r={args.r} on {args.targets} "
          f"({len(targets)} stacked kernels)\n")
    rows = [("trainable params", "trainable_params", ""), ("trainable bytes", "trainable_bytes", "B"),
            ("optimizer-state bytes", "opt_bytes", "B"), ("step FLOPs", "flops", "FLOP")]
    print(f"{'':24}{'LoRA':>14}{'full FT':>14}{'LoRA / full':>14}")
    for label, key, unit in rows:
        lo, fu = lora_cost[key], full_cost[key]
        print(f"{label:24}{human(lo, unit):>14}{human(fu, unit):>14}{lo / fu:>14.4f}")
    print(f"\nfrozen base bytes: {human(base_bytes)}")
    print(f"optimizer state / trainable bytes: LoRA {lora_cost['opt_bytes'] / lora_cost['trainable_bytes']:.4f}, "
          f"full FT {full_cost['opt_bytes'] / full_cost['trainable_bytes']:.4f}  (Adam mu + nu = 2, + step counters)")
    print(f"LoRA optimizer state / base bytes: {lora_cost['opt_bytes'] / base_bytes:.4%}")


if __name__ == "__main__":
    main()
