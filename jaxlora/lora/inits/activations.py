"""Statistics of the targeted kernels' INPUTS over a few batches: what EVA and CorDA are computed from.

PEFT registers torch forward hooks on the targeted layers. Here the model's own forward (no LoRA) runs in one jitted,
sharded step under a Flax method interceptor: each call of a targeted `LoraDense` hands its input x (B, T, in) and
the batch's keep-mask (B, T) to a statistic, and sows the result into the "intermediates" collection, which the
layer scan stacks per layer (`jaxlora.models.common.scanned_layers`):

    kind "moments"   (EVA)    sum over kept tokens of x x^T (in, in) and of x (in,)        -> the centered covariance
    kind "row_gram"  (CorDA)  sum over rows of x_r^T x_r / max(x_r)^2, x_r a row's kept tokens (PEFT's per-sample scale)

and the step adds them to float32 accumulators sharded like the kernels' input dim (donated, compiled once). The
training program is untouched: the interceptor exists only inside this step, and nothing sows unless the collection is
mutable (the lowered training step is the same text with or without this module). A quantized kernel is dequantized
inside the matmul as in training; the statistics are of the inputs, so they need no dense kernel.

Batches are the estimation batches of LoRA-GA (`lora_ga_config.batch_size/num_batches`, the trainer's
`lora_ga_batches`), packed like LoRA-GA's (`jaxlora.lora.ga.estimate.pack_batches`) so the mesh divides them: the
keep-mask travels as the labels (0 kept, -100 not), so padded rows and the packing's filler rows count for nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlora import lora as lora_lib, sharding
from jaxlora.lora.config import LoraGAError
from jaxlora.lora.ga.estimate import pack_batches, progress_bar
from jaxlora.losses import IGNORE_INDEX
from jaxlora.models.common import LoraDense

KINDS = ("moments", "row_gram")
_HI = jax.lax.Precision.HIGHEST


def keep_mask(batch: dict, label_mask_value: int | None = None) -> np.ndarray:
    """(B, T) bool: real tokens (attention_mask > 0), and with `label_mask_value` only those whose label differs
    from it (PEFT's EVA `use_label_mask`; labels aligned with input_ids, as PEFT's)."""
    keep = np.asarray(batch["attention_mask"]) > 0
    labels = np.asarray(batch["labels"])
    if label_mask_value is not None and labels.shape == keep.shape:
        keep &= labels != label_mask_value
    return keep


def _moments(x_BxTxI, keep_BxT):
    x = jnp.where(keep_BxT[..., None], x_BxTxI.astype(jnp.float32), 0.0)
    return jnp.einsum("bti,btj->ij", x, x, precision=_HI), jnp.sum(x, axis=(0, 1))


def _row_gram(x_BxTxI, keep_BxT):
    x = x_BxTxI.astype(jnp.float32)
    top_B = jnp.abs(jnp.max(jnp.where(keep_BxT[..., None], x, -jnp.inf), axis=(1, 2)))  # torch.max(input).abs()
    top_B = jnp.where(jnp.isfinite(top_B) & (top_B > 0), top_B, 1.0)  # a row with nothing kept adds zeros
    x = jnp.where(keep_BxT[..., None], x / top_B[:, None, None], 0.0)
    return (jnp.einsum("bti,btj->ij", x, x, precision=_HI),)


_STATISTICS = {"moments": _moments, "row_gram": _row_gram}


def _interceptor(paths: set, keep_BxT, statistic, names: dict):
    """Sows statistic(x, keep) for every call of a targeted LoraDense (its scope path is its params path)."""
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, LoraDense) and context.method_name == "__call__" and module.scope.path in paths:
            x = args[0] if args else kwargs["x"]
            if x.shape[:-1] != keep_BxT.shape:
                raise LoraGAError(f"{names[module.scope.path]}: its input has shape {x.shape}, not (batch, tokens, "
                                  f"in) like the batch's {keep_BxT.shape}: EVA/CorDA need per-token inputs")
            module.sow("intermediates", "input_statistics", statistic(x, keep_BxT))
        return next_fun(*args, **kwargs)
    return intercept


def _zeros(model, targets, kind: str):
    """Abstract accumulators {path: (gram (..., in, in)[, sum (..., in)])} and their shardings (the kernel's)."""
    flat = traverse_util.flatten_dict(model.dense_abstract_params)
    flat_sh = traverse_util.flatten_dict(model.dense_param_shardings)
    shapes, shards = {}, {}
    for t in targets:
        kernel = flat[t.path + ("kernel",)]
        *lead, d_in, _ = kernel.shape
        spec = tuple(flat_sh[t.path + ("kernel",)].spec) + (None,) * kernel.ndim
        lead_spec, in_spec = spec[:len(lead)], spec[len(lead)]
        shapes[t.path] = ((*lead, d_in, d_in),) + (((*lead, d_in),) if kind == "moments" else ())
        shards[t.path] = (NamedSharding(model.mesh, P(*lead_spec, in_spec, None)),) + \
            ((NamedSharding(model.mesh, P(*lead_spec, in_spec)),) if kind == "moments" else ())
    return shapes, shards


def _steps(model) -> dict:
    return vars(model).setdefault("_activation_steps", {})


def make_statistics_step(model, targets, kind: str, rows: int):
    """jit(acc, counts, params, batch) -> (acc + this batch's statistics, counts + [kept tokens, rows with one]) for
    `rows`-row global batches (compiled once per targets, kind and rows; kept on the model)."""
    key = (kind, tuple(t.path for t in targets), rows)
    if key in _steps(model):
        return _steps(model)[key]
    _, acc_sh = _zeros(model, targets, kind)
    paths = {t.path for t in targets}
    names = {t.path: lora_lib.module_names(t.path, model.config.num_hidden_layers, model.names.stack_name)[0]
             for t in targets}
    family = model.family
    # a causal LM's head is not needed unless it is a target: stop at the hidden states (as the chunked loss does)
    head_free = family.embedding_path is not None and not any(p[-1] == "lm_head" for p in paths)

    def accumulate(acc, counts, params, batch):
        keep = batch["labels"] != IGNORE_INDEX
        inputs = {"hidden_only": True} if head_free else {}
        with nn.intercept_methods(_interceptor(paths, keep, _STATISTICS[kind], names)), \
                sharding.activation_sharding(model.mesh, model.rules):
            _, sown = model.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                         batch.get("positions"), None, mutable=["intermediates"], **inputs)
        flat = traverse_util.flatten_dict(sown.get("intermediates", {}))
        out = {}
        for path in acc:
            calls = flat.get(path + ("input_statistics",))
            if calls is None:
                raise LoraGAError(f"{names[path]} was not called as a LoraDense in the forward pass; EVA/CorDA "
                                  f"cannot see its inputs")
            out[path] = tuple(a + sum(c[i] for c in calls) for i, a in enumerate(acc[path]))
        tokens, rows_kept = jnp.sum(keep.astype(jnp.float32)), jnp.sum(jnp.any(keep, axis=1).astype(jnp.float32))
        return out, counts + jnp.stack([tokens, rows_kept])

    rep = sharding.replicated(model.mesh)
    batch_sh = sharding.batch_sharding(model.mesh, batch_size=rows)
    _steps(model)[key] = jax.jit(accumulate, in_shardings=(acc_sh, rep, model.param_shardings, batch_sh),
                                 out_shardings=(acc_sh, rep), donate_argnums=(0, 1))
    return _steps(model)[key]


def input_statistics(model, params, targets, batches: list[dict], kind: str, *, label_mask_value: int | None = None,
                     progress: bool = False):
    """Accumulated statistics of each target's input over `batches` (this process's rows).

    Args:
      model: a `jaxlora.Model` (a causal LM or encoder; the inputs of an encoder-decoder's decoder are not the
        batch's tokens).
      params: the base params (never modified; quantized kernels as they are).
      targets: the `jaxlora.lora.Target`s whose inputs are summarized.
      batches: dicts of input_ids, attention_mask, labels (numpy (B, T)); positions for packed rows.
      kind: "moments" (EVA) or "row_gram" (CorDA), see the module docstring.
      label_mask_value: drop the tokens whose label is this (EVA's use_label_mask); None keeps every real token.
    Returns:
      ({path: float32 accumulators}, kept tokens, rows with a kept token).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if model.is_encoder_decoder:
        raise LoraGAError(f"EVA/CorDA are not implemented for encoder-decoder models ({model.config.architecture})")
    if not batches:
        raise LoraGAError("EVA/CorDA need batches to compute their input statistics; none were given")
    keyed = [{**{k: b[k] for k in ("input_ids", "attention_mask") + (("positions",) if "positions" in b else ())},
              "labels": np.where(keep_mask(b, label_mask_value), 0, IGNORE_INDEX).astype(np.int32)}
             for b in batches]
    packed, _ = pack_batches(keyed, sharding.batch_divisor(model.mesh))
    rows = packed[0]["input_ids"].shape[0] * jax.process_count()
    step = make_statistics_step(model, targets, kind, rows)
    shapes, acc_sh = _zeros(model, targets, kind)
    zeros = jax.jit(lambda: {p: tuple(jnp.zeros(s, jnp.float32) for s in shapes[p]) for p in shapes},
                    out_shardings=acc_sh)
    acc = zeros()
    counts = jax.device_put(jnp.zeros((2,), jnp.float32), sharding.replicated(model.mesh))
    for batch in progress_bar(packed, f"input statistics ({kind})", progress):
        batch = {k: v for k, v in batch.items() if k != "group"}
        acc, counts = step(acc, counts, params, sharding.place_batch(batch, model.mesh))
    tokens, rows_kept = (float(c) for c in jax.device_get(counts))
    return acc, tokens, rows_kept


def per_layer(fn, stacked: bool, *arrays) -> tuple[np.ndarray, ...]:
    """fn(*one layer's slices of `arrays`) for each layer of a stacked target (once for one that is not), on this
    process's first device, the results stacked as numpy (every process gets the same).

    For the small dense linear algebra after the statistics (eigh, inv, SVD of (in, in) and (in, out) matrices): it
    does not partition, and run replicated over a mesh it is slow (seconds per layer on 8 simulated CPU devices, ms on
    one); one layer at a time keeps a single (in, in) matrix on the device, not a stack of them."""
    device = jax.local_devices()[0]

    def local(x):
        if not x.is_fully_addressable:  # another host holds part of it
            x = multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, device)
    if not stacked:
        return tuple(np.asarray(y) for y in fn(*(local(x) for x in arrays)))
    outs = [fn(*(local(x[i]) for x in arrays)) for i in range(arrays[0].shape[0])]
    return tuple(np.stack([np.asarray(o[j]) for o in outs]) for j in range(len(outs[0])))
