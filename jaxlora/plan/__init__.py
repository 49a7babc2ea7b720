"""`jaxlora plan`: will this run fit? Ahead-of-time compilation of the exact steps `jaxlora train` runs.

No weights and no accelerator are needed. The model is built from its HF config alone (abstract params), and the
trainer's own training build, `build_training(model, config, abstract=True)`, gives the adapters, optimizer state and
jitted train step as `jax.ShapeDtypeStruct`s carrying their shardings: what `jaxlora train` runs, by construction.
With LoRA-GA's own steps (`lora_ga.make_estimate_step`, `lora_ga.make_sketch_step`) they are lowered and compiled for
the target:

    target "v5p-32"      compile-only TPU devices from libtpu (`jax.experimental.topologies`), 16 chips
    target "v5:2x2x4"    the same, by topology name; num_slices=2 for two slices over DCN
    target "cpu8"        8 host CPU devices (works without libtpu)

The compiled program's `memory_analysis()` gives per-chip argument / output / alias / temporary bytes; a TPU
compile that would not fit fails with RESOURCE_EXHAUSTED, reported as "does not fit". The largest micro-batch per
chip that fits is found by compiling candidates (powers of two, then bisection). XLA's FLOP count is reported next to
the analytic one (`metrics.train_flops_per_token`): XLA counts the body of a scanned loop (the layers, the
gradient-accumulation micro-batches) once, so it undercounts by about the number of layers.

    targets.py   TPU chip table, target names -> Target, the target's (compile-only) devices, PlanError, GiB
    shapes.py    built-in model shapes, a model's HF config, the abstract model
    compile.py   Planner (the steps, lowered from shapes), compile_step
    report.py    StepPlan, Memory, PlanReport, fmt_bytes, fmt_fit
    command.py   plan(), the remat / mesh search, the README table, `jaxlora plan`'s arguments
"""

from jaxlora.plan.command import TABLE_MODELS, TABLE_TARGETS, add_plan_arguments, plan, run_plan_command, table, \
    table_config
from jaxlora.plan.compile import Planner, compile_step
from jaxlora.plan.report import Memory, PlanReport, StepPlan, fmt_bytes, fmt_fit
from jaxlora.plan.shapes import SHAPES, build_model, hf_config_of
from jaxlora.plan.targets import CHIPS, LIBTPU_PIP, TARGET_FORMS, GiB, PlanError, Target, resolve_target, \
    target_devices

__all__ = ["CHIPS", "LIBTPU_PIP", "SHAPES", "TABLE_MODELS", "TABLE_TARGETS", "TARGET_FORMS", "GiB", "Memory",
           "PlanError", "PlanReport", "Planner", "StepPlan", "Target", "add_plan_arguments", "build_model",
           "compile_step", "fmt_bytes", "fmt_fit", "hf_config_of", "plan", "resolve_target", "run_plan_command",
           "table", "table_config", "target_devices"]
