"""LoRA-GA's statistics: the mean gradient of the targeted kernels over the estimation batches, or its sketches.

Both are one jitted, sharded step, compiled once and kept on the model (`jaxlora plan` compiles the same steps).
Estimation batches are packed so the mesh's batch axes divide them (`pack_batches`), leaving the statistic the same:
the mean over batches of each batch's mean-loss gradient. Sketches are gradients of zero-effect LoRA branches
(a = 0 or b = 0), so a sketch pass costs a LoRA backward at the sketch rank (see `factorize.streaming_factorize`).

With float16 compute the exact estimate is loss-scaled as fp16 training is (`jaxlora.training.step`): a mean loss of
~1 over thousands of tokens gives per-token cotangents of ~1e-5 and below, under float16's smallest normal (6e-5),
so an unscaled backward flushes or rounds them away. Each batch's loss is multiplied by the scale (`FP16_LOSS_SCALE`,
DeepSpeed's initial 2^16) and its gradient divided by it in float32; a batch whose scaled gradient is not finite
is added nothing and run again at half the scale, down to 1, where the error names the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxlora import lora as lora_lib, sharding
from jaxlora.lora.config import LoraGAConfig, LoraGAError
from jaxlora.lora.weights import LoraWeights
from jaxlora.losses import IGNORE_INDEX
from jaxlora.quant import is_quantized

log = logging.getLogger(__name__)

FP16_LOSS_SCALE = 2.0 ** 16  # the fp16 estimate's first loss scale: DeepSpeed's (optim.OptimConfig.loss_scale_init)


def is_expert_kernel(model, target) -> bool:
    """Whether a target is a stack of expert kernels (Mixtral's w1/w2/w3: (layers, experts, in, out)), which LoRA-GA
    does not estimate."""
    kernel = traverse_util.flatten_dict(model.abstract_params)[target.path + ("kernel",)]
    return kernel.ndim > 2 + int(target.stacked)


def check_targets(model, targets, ga: LoraGAConfig) -> None:
    flat = traverse_util.flatten_dict(model.abstract_params)
    for t in targets:
        kernel = flat[t.path + ("kernel",)]
        name = lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)[0]
        if is_expert_kernel(model, t):
            raise LoraGAError(f"LoRA-GA is not implemented for stacked expert kernels ({name}, shape {kernel.shape});"
                              f" give LoRA-GA the attention projections only, or use a plain LoRA init")
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise LoraGAError(f"LoRA-GA needs floating-point base weights; {name} is {kernel.dtype} "
                              f"(quantized or integer weights have no usable gradient)")
        d_in, d_out = kernel.shape[-2:]
        if 2 * t.rank > min(d_in, d_out):
            raise LoraGAError(f"LoRA-GA needs 2r <= min(in, out); {name} is {d_in}x{d_out} and r={t.rank}")


def first_batches(batches, ga: LoraGAConfig, missing: str) -> list[dict]:
    """The first `ga.num_batches` of `batches` (shallow copies), the estimation batches every data-driven init reads;
    LoraGAError(`missing`) when there are none."""
    out = [dict(b) for _, b in zip(range(ga.num_batches), batches or ())]
    if not out:
        raise LoraGAError(missing)
    return out


@functools.partial(jax.jit, static_argnums=1)
def _statistic_flags(value, stacked: bool):
    """(all finite, any nonzero) per layer (stacked) or for the whole array."""
    axes = tuple(range(1 if stacked else 0, value.ndim))
    return jnp.all(jnp.isfinite(value), axis=axes), jnp.any(value != 0, axis=axes)


def check_statistic(names: list[str], value, stacked: bool) -> None:
    """Raises naming the first layer whose statistic (a gradient, or singular values) is non-finite or all zero.
    Checked per layer of a stacked target (on the device, so no full-size gradient is copied to the host)."""
    finite, nonzero = (np.atleast_1d(x) for x in jax.device_get(_statistic_flags(value, stacked)))
    for name, ok, nz in zip(names, finite, nonzero):
        if not ok:
            raise LoraGAError(f"LoRA-GA: the estimated gradient of {name} is not finite (NaN/inf); check the data "
                              f"and the model's dtype")
        if not nz:
            raise LoraGAError(f"LoRA-GA: the estimated gradient of {name} is all zero (is every label masked, or "
                              f"does the layer not affect the loss?)")


def mean_loss(model, params, lora, batch, groups: int = 1):
    """Sum over the batch's `groups` (its "group" row ids; all rows one group without) of each group's mean token
    loss, as training computes it per batch; and the token count."""
    if "group" not in batch:
        total, count = model.loss_sums(params, batch, lora)
        return total / jnp.maximum(count, 1.0), count
    total_r, count_r = model.loss_sums(params, batch, lora, per_row=True)
    total_g = jax.ops.segment_sum(total_r, batch["group"], groups)
    count_g = jax.ops.segment_sum(count_r, batch["group"], groups)
    return jnp.sum(total_g / jnp.maximum(count_g, 1.0)), jnp.sum(count_g)


BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def pack_factor(rows: int, divisor: int) -> int:
    """How many `rows`-row estimation batches one packed global batch holds: the fewest whose rows the mesh's
    batch axes (`divisor` = data x fsdp) divide."""
    return divisor // math.gcd(rows, divisor)


def pack_batches(batches: list[dict], divisor: int) -> tuple[list[dict], int]:
    """Estimation batches (this process's rows) -> packed batches the mesh divides, and the groups per packed batch.

    LoRA-GA's statistic is the mean over batches of each batch's mean-loss gradient (the official code samples
    2-example batches). A 2-row batch does not split over a pod slice's chips, so each chip would run it whole and
    hold all its activations. Packing k consecutive batches into one global batch (k = `pack_factor`) gives every
    chip rows / chips of it and leaves the statistic exactly the same: each row carries its batch's index ("group")
    and the loss is the sum over groups of each group's mean (gradients are linear). Batches of different lengths are
    right-padded to the longest (mask 0, labels -100: causal attention never sees them); the last packed batch is
    completed with empty groups (every label -100), which add nothing.
    """
    rows = batches[0]["input_ids"].shape[0]
    k = pack_factor(rows * jax.process_count(), divisor)
    keys = BATCH_KEYS + (("positions",) if "positions" in batches[0] else ())  # packed sequences carry positions
    if k == 1:
        return [{key: b[key] for key in keys} for b in batches], 1
    packed = []
    for start in range(0, len(batches), k):
        chunk = batches[start:start + k]
        chunk = chunk + [{**chunk[0], "labels": np.full_like(chunk[0]["labels"], IGNORE_INDEX)}] \
            * (k - len(chunk))
        fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX, "positions": 0}
        fill = {key: fill[key] for key in keys}

        def right_pad(key):  # (rows, T) arrays to the longest of the chunk (a seq2seq model's labels have their own
            arrays = [np.asarray(b[key]) for b in chunk]  # length); (rows,) labels (a classifier's) as they are
            if arrays[0].ndim != 2:
                return np.concatenate(arrays)
            t = max(x.shape[1] for x in arrays)
            return np.concatenate([np.pad(x, ((0, 0), (0, t - x.shape[1])), constant_values=fill[key])
                                   for x in arrays])
        packed.append({key: right_pad(key) for key in fill} | {"group": np.repeat(np.arange(k, dtype=np.int32), rows)})
    return packed, k


def kernel_subtree(params, targets) -> dict:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({t.path + ("kernel",): flat[t.path + ("kernel",)] for t in targets})


def _steps(model) -> dict:
    """Jitted steps kept on the model, so a second init (another config, the error paths, every streaming pass)
    reuses their compilation instead of compiling the backward pass again."""
    return vars(model).setdefault("_lora_ga_steps", {})


def is_fp16(model) -> bool:
    """Whether the model computes in float16 (LoRA-GA's exact estimate is then loss-scaled)."""
    return jnp.dtype(model.module.dtype) == jnp.float16


def make_estimate_step(model, targets, rows: int, groups: int = 1):
    """jit(acc, count, params, batch, scale) -> (acc + dL/dK, count + tokens, finite) for `rows`-row global batches
    packing `groups` estimation batches: the exact estimation's one compiled step (float32 accumulators sharded like
    their kernels). A quantized kernel (`jaxlora.quant`) is dequantized first: the gradient is w.r.t. the
    dequantized weight. The loss is multiplied by `scale` (a float32 scalar: the fp16 loss scale, else 1) and the
    gradient divided by it in float32; `finite` says whether it is finite. In float16 a non-finite gradient is not
    added (acc and count come back unchanged, so the batch can run again at a smaller scale); otherwise it is, and
    `check_statistic` names the layer. `jaxlora.plan` compiles it."""
    kernel_sh = kernel_subtree(model.dense_param_shardings, targets)
    key = ("gradient", tuple(t.path for t in targets), rows, groups)
    skip_non_finite = is_fp16(model)

    def accumulate(acc, count, params, batch, scale):
        def loss(kernels32):
            total, n = mean_loss(model, lora_lib.overlay(params, kernels32), None, batch, groups)
            return total * scale, n  # scaled before the (float16) backward, as fp16 training does
        kernels32 = jax.tree.map(lambda k: k.astype(jnp.float32), kernel_subtree(params, targets),
                                 is_leaf=is_quantized)  # a QArray's astype dequantizes
        (_, n), g = jax.value_and_grad(loss, has_aux=True)(kernels32)
        g = jax.tree.map(lambda x: x / scale, g)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]))
        new_acc, new_count = jax.tree.map(jnp.add, acc, g), count + n
        if skip_non_finite:
            new_acc = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_acc, acc)
            new_count = jnp.where(finite, new_count, count)
        return new_acc, new_count, finite

    rep = sharding.replicated(model.mesh)
    if key not in _steps(model):
        _steps(model)[key] = jax.jit(accumulate, in_shardings=(kernel_sh, rep, model.param_shardings,
                                                               sharding.batch_sharding(model.mesh, batch_size=rows),
                                                               rep),
                                     out_shardings=(kernel_sh, rep, rep), donate_argnums=(0, 1))
    return _steps(model)[key]


def estimate_gradients(model, params, targets, batches: list[dict], progress: bool = True,
                       loss_scale: float | None = None):
    """float32 mean over batches of dL/dK for the targeted kernels only (nothing else is differentiated).

    `loss_scale`: the first loss scale of a float16 model (default `FP16_LOSS_SCALE`; 1 turns scaling off); it
    halves on a batch whose scaled gradient is not finite, which then runs again (see the module docstring). Other
    dtypes run unscaled."""
    kernel_sh = kernel_subtree(model.dense_param_shardings, targets)
    n_batches = len(batches)
    batches, groups = pack_batches(batches, sharding.batch_divisor(model.mesh))
    rows = batches[0]["input_ids"].shape[0] * jax.process_count()
    step = make_estimate_step(model, targets, rows, groups)
    zeros = jax.jit(lambda: jax.tree.map(lambda k: jnp.zeros(k.shape, jnp.float32),
                                         kernel_subtree(model.dense_abstract_params, targets)),
                    out_shardings=kernel_sh)
    rep = sharding.replicated(model.mesh)
    fp16 = is_fp16(model)
    scale = (FP16_LOSS_SCALE if loss_scale is None else float(loss_scale)) if fp16 else 1.0
    if not scale >= 1.0:
        raise LoraGAError(f"LoRA-GA: the float16 estimate's loss scale must be >= 1, got {loss_scale}")
    first_scale = scale
    # committed replicated like the step's output: an uncommitted first count compiled the step a second time
    acc, count = zeros(), jax.device_put(jnp.zeros((), jnp.float32), rep)
    for i, batch in enumerate(progress_bar(batches, "LoRA-GA gradients", progress)):
        batch = sharding.place_batch(batch, model.mesh)
        while True:
            acc, count, finite = step(acc, count, params, batch, jax.device_put(jnp.float32(scale), rep))
            if not fp16 or bool(finite):
                break
            if scale <= 1.0:
                first, last = i * groups, min((i + 1) * groups, n_batches) - 1
                which = f"batch {first}" if first == last else f"batches {first}-{last} (packed together)"
                raise LoraGAError(f"LoRA-GA: the float16 gradient of estimation {which} is not finite even at loss "
                                  f"scale 1 (starting from {first_scale:g}): NaN/inf in the forward pass, not an "
                                  f"overflow of the scale; check that batch, or estimate in bfloat16/float32")
            scale = max(scale / 2, 1.0)
            log.debug("LoRA-GA: float16 gradient of packed batch %d overflowed; loss scale -> %g", i, scale)
    if fp16 and scale < first_scale:
        log.info("LoRA-GA: float16 loss scale lowered from %g to %g by overflows", first_scale, scale)
    if float(count) == 0:
        raise LoraGAError("LoRA-GA: every label of the estimation batches is masked (-100); no gradient")
    return jax.tree.map(lambda g: g / n_batches, acc)


def _lora_tree(targets, make) -> dict:
    return lora_lib.build_lora_tree(targets, make)


def sketch_shardings(model, targets) -> dict:
    """Shardings of the scale-1 sketch branches: a follows its kernel's input dim, b its output dim (as LoRA)."""
    sh = model.lora_shardings(targets, lora_lib.LoraConfig())
    return jax.tree.map(lambda w: dataclasses.replace(w, scale=1.0), sh, is_leaf=lambda x: isinstance(x, LoraWeights))


def make_sketch_step(model, targets=None, rows: int | None = None, groups: int = 1):
    """jit(acc, params, lora, batch) -> acc + dLoss/dlora: one compilation serves every sketch pass.

    With `targets` and `rows` (the global batch rows, packing `groups` estimation batches) every input and output has
    a fixed sharding; without, the jit is keyed on whatever shardings its arguments carry, and an uncommitted first
    accumulator, the committed accumulators of later batches and the range/co-range factors each cost another
    compilation (6 for 4 passes)."""
    def accumulate(acc, params, lora, batch):
        grads = jax.grad(lambda lora: mean_loss(model, params, lora, batch, groups)[0])(lora)
        return jax.tree.map(jnp.add, acc, grads)
    if targets is None:
        key, shardings = ("sketch", groups), {}
    else:
        sh = sketch_shardings(model, targets)
        key = ("sketch", tuple(t.path for t in targets), rows, groups)
        batch_sh = sharding.batch_sharding(model.mesh, batch_size=rows)
        shardings = dict(in_shardings=(sh, model.param_shardings, sh, batch_sh), out_shardings=sh)
    if key not in _steps(model):
        _steps(model)[key] = jax.jit(accumulate, donate_argnums=(0,), **shardings)
    return _steps(model)[key]


def sketch_pass(model, params, targets, batches, factors: dict, wrt: str, progress: bool = True,
                step=None, n_batches: int | None = None) -> dict:
    """Mean over batches of the gradient w.r.t. `wrt` ("a" or "b") of zero-effect LoRA branches `factors`.

    `factors[path] = (a, b)` with a = 0 (wrt "a": returns G_K @ b^T) or b = 0 (wrt "b": returns a^T @ G_K).
    The model's output is unchanged by such a branch; the pass costs one LoRA backward per batch at rank q.
    """
    rows = batches[0]["input_ids"].shape[0] * jax.process_count()
    step = step or make_sketch_step(model, targets, rows)
    sh = sketch_shardings(model, targets)  # committed like the step's outputs, so no pass recompiles
    lora = jax.device_put(_lora_tree(targets, lambda t: LoraWeights(*factors[t.path], scale=1.0)), sh)
    acc = jax.device_put(jax.tree.map(jnp.zeros_like, lora), sh)
    for batch in progress_bar(batches, f"LoRA-GA sketch ({wrt})", progress):
        acc = step(acc, params, lora, sharding.place_batch(batch, model.mesh))
    return {p: (getattr(w, wrt) / (n_batches or len(batches))) for p, w in lora_lib.lora_items(acc)}


def progress_bar(items, desc: str, enabled: bool):
    if not enabled or jax.process_index() != 0:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="batch", leave=False)
