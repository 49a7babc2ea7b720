"""`jaxlora plan`: will this run fit? Ahead-of-time compilation of the exact steps `jaxlora train` runs.

No weights and no accelerator are needed. The model is built from its HF config alone (abstract params), and the
trainer's own training build, `build_training(model, config, abstract=True)`, gives the adapters, optimizer state and
jitted train step as `jax.ShapeDtypeStruct`s carrying their shardings: what `jaxlora train` runs, by construction.
With LoRA-GA's own steps (`lora_ga.make_estimate_step`, `lora_ga.make_sketch_step`) they are lowered and compiled for
the target:

    target "v5p-32"      compile-only TPU devices from libtpu (`jax.experimental.topologies`), 16 chips
    target "v5:2x2x4"    the same, by topology name; num_slices=2 for two slices over DCN
    target "h100x8"      8 H100s of one host, from the CUDA PJRT plugin given the GPU's description (no GPU)
    target "cpu8"        8 host CPU devices (works without libtpu)

The compiled program's `memory_analysis()` gives per-chip argument / output / alias / temporary bytes; a TPU
compile that would not fit fails with RESOURCE_EXHAUSTED, reported as "does not fit" (a GPU's budget is XLA's pool,
XLA_PYTHON_CLIENT_MEM_FRACTION of its memory). The largest micro-batch per chip that fits is predicted from the
compiled memory of two small batches and confirmed by compiling it (`search.py`). XLA's FLOP count is reported next to
the analytic one (`metrics.train_flops_per_token`): XLA counts the body of a scanned loop (the layers, the
gradient-accumulation micro-batches) once, so it undercounts by about the number of layers.

    targets.py   TPU chip and GPU tables, target names -> Target, the target's (compile-only) devices, PlanError, GiB
    shapes.py    built-in model shapes, a model's HF config, the abstract model
    compile.py   Planner (the steps, lowered from shapes), compile_step
    search.py    the largest micro-batch that fits: predicted from two compiles, confirmed by one (or exhaustive)
    report.py    StepPlan, Memory, BatchSearch, PlanReport, fmt_bytes, fmt_fit
    command.py   plan(), the remat / mesh search, the README table, `jaxlora plan`'s arguments
"""

from jaxlora.plan.command import TABLE_MODELS, TABLE_TARGETS, add_plan_arguments, plan, run_plan_command, table, \
    table_config
from jaxlora.plan.compile import Planner, compile_step
from jaxlora.plan.report import BatchSearch, Memory, PlanReport, StepPlan, fmt_bytes, fmt_fit
from jaxlora.plan.shapes import SHAPES, build_model, hf_config_of
from jaxlora.plan.search import exhaustive as exhaustive_search, predicted as predicted_search
from jaxlora.plan.targets import CHIPS, CUDA_PIP, GPUS, LIBTPU_PIP, TARGET_FORMS, GiB, PlanError, Target, \
    cuda_plugin_installed, resolve_target, target_devices

__all__ = ["CHIPS", "CUDA_PIP", "GPUS", "LIBTPU_PIP", "SHAPES", "TABLE_MODELS", "TABLE_TARGETS", "TARGET_FORMS",
           "BatchSearch", "GiB", "Memory", "PlanError", "PlanReport", "Planner", "StepPlan", "Target",
           "add_plan_arguments", "build_model", "compile_step", "cuda_plugin_installed", "exhaustive_search",
           "fmt_bytes", "fmt_fit", "hf_config_of", "plan", "predicted_search", "resolve_target", "run_plan_command",
           "table", "table_config", "target_devices"]
