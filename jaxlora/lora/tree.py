"""The LoRA tree: initializing its factors (PEFT's inits) into their shardings, merging and unmerging it.

LoRA is tree surgery driven by a module-name matcher with PEFT's semantics. The base params stay one frozen
pytree; `init_lora` builds a second, much smaller tree at the paths of the targeted kernels:

    before:  params = {"model": {"layers": {"self_attn": {"q_proj": {"kernel": (L, in, out)}, ...}}}}
    after:   lora   = {"model": {"layers": {"self_attn": {"q_proj": LoraWeights(a=(L, in, r), b=(L, r, out))}}}}

Which kernels are targeted is `jaxlora.lora.targets`; the leaf type and the branch's math are `jaxlora.lora.weights`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlora.lora.config import LoraConfig, LoraConfigError
from jaxlora.lora.targets import build_lora_tree, linear_modules
from jaxlora.lora.weights import LoraWeights, is_lora_leaf


def _target_key(rng: jax.Array, path: tuple[str, ...]) -> jax.Array:
    """A per-target key from the path's name, so adding a target does not change the others' init."""
    digest = int.from_bytes(hashlib.sha256("/".join(path).encode()).digest()[:4], "little")
    return jax.random.fold_in(rng, digest)


def init_factors(key: jax.Array, kernel_shape: tuple[int, ...], rank: int, method, dtype) -> tuple[jax.Array, jax.Array]:
    """a (..., in, r) and b (..., r, out) for one kernel (..., in, out), as PEFT initializes lora_A / lora_B."""
    *lead, d_in, d_out = kernel_shape
    ka, kb = jax.random.split(key)
    if method == "gaussian":  # PEFT: nn.init.normal_(lora_A, std=1/r)
        a = jax.random.normal(ka, (*lead, d_in, rank), dtype) / rank
    else:  # PEFT: kaiming_uniform_(lora_A, a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / (d_in ** 0.5)
        a = jax.random.uniform(ka, (*lead, d_in, rank), dtype, -bound, bound)
    if method is False:  # PEFT's init_lora_weights=False: B random too (the adapter is not a no-op)
        b = jax.random.uniform(kb, (*lead, rank, d_out), dtype, -1.0 / rank ** 0.5, 1.0 / rank ** 0.5)
    else:
        b = jnp.zeros((*lead, rank, d_out), dtype)
    return a, b


def init_lora(model, lora_config: LoraConfig, rng: jax.Array) -> dict:
    """Initializes the LoRA tree for `model`, directly into the shardings of the kernels it adapts.

    Args:
      model: a `jaxlora.Model` (from `from_pretrained` or `Model.random`).
      lora_config: which modules to adapt and how.
      rng: PRNG key.
    Returns:
      The LoRA tree: `LoraWeights` leaves at the targeted module paths (with DoRA's magnitudes m = ||W + s*a@b||_c
      if lora_config.use_dora). For init_lora_weights="lora_ga" use `jaxlora.lora_ga_init(model, lora_config,
      batches)`; for PiSSA, OLoRA and LoRA-One, `jaxlora.lora.inits`.
    """
    if lora_config.init_lora_weights == "lora_ga":
        raise LoraConfigError("init_lora_weights='lora_ga' needs gradients: call jaxlora.lora_ga_init(model, "
                              "lora_config, batches) instead of init_lora")
    if lora_config.init_lora_weights not in (True, False, "gaussian"):  # PiSSA, OLoRA, LoRA-One, EVA, CorDA
        raise LoraConfigError(f"init_lora_weights={lora_config.init_lora_weights!r} is computed from the weights or "
                              f"the data: call jaxlora.lora.inits.initial_tree(model, lora_config, batches=...) "
                              f"instead of init_lora (batches for LoRA-One, EVA and CorDA)")
    targets = model.lora_targets(lora_config)
    key = (tuple(targets), lora_config.init_lora_weights, lora_config.lora_dtype, lora_config.lora_dropout)
    cache = model.__dict__.setdefault("_lora_init_fns", {})  # one compiled init per LoRA layout and model
    if key not in cache:
        dtype = jnp.dtype(lora_config.lora_dtype)
        kernels = linear_modules(model.abstract_params)

        def make_all(rng):
            return build_lora_tree(targets, lambda t: LoraWeights(
                *init_factors(_target_key(rng, t.path), kernels[t.path].shape, t.rank,
                              lora_config.init_lora_weights, dtype), scale=t.scale, dropout=lora_config.lora_dropout))

        cache[key] = jax.jit(make_all, out_shardings=model.lora_shardings(targets, lora_config))
    if lora_config.use_dora:  # DoRA's magnitudes from the model's weights (jaxlora.lora.inits.dora)
        from jaxlora.lora.inits.dora import add_magnitudes
        return add_magnitudes(model, cache[key](rng))
    return cache[key](rng)


def lora_items(lora) -> list[tuple[tuple[str, ...], LoraWeights]]:
    """(module path, LoraWeights) pairs of a LoRA tree."""
    flat = traverse_util.flatten_dict(lora, is_leaf=lambda p, x: is_lora_leaf(x))
    return list(flat.items())


def _fold(params, lora, sign: float):
    flat = traverse_util.flatten_dict(params)
    for path, w in lora_items(lora):
        kernel = flat[path + ("kernel",)]
        delta = jnp.matmul(w.a.astype(jnp.float32), w.b.astype(jnp.float32))
        if w.a0 is not None:  # an init relative to the base (LoRA-GA): the update is s*(a@b - a0@b0)
            delta = delta - jnp.matmul(w.a0.astype(jnp.float32), w.b0.astype(jnp.float32))
        delta = delta * (sign * w.scale)
        merged = kernel.astype(jnp.float32) + delta
        if w.m is not None:  # DoRA: each output channel rescaled to its magnitude, m * (W + s*a@b) / ||W + s*a@b||_c
            if sign < 0:
                raise LoraConfigError("unmerge is not defined for DoRA: the merged kernel no longer holds the "
                                      "column norms of W + s*a@b; keep the base weights and merge again instead")
            merged = merged * (w.m.astype(jnp.float32) / jnp.linalg.norm(merged, axis=-2))[..., None, :]
        flat[path + ("kernel",)] = merged.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


_fold_jit = jax.jit(_fold, static_argnums=2)


def merge(params, lora, lora_config: LoraConfig | None = None):
    """W + s * a @ b for every adapted kernel (computed in float32, cast back to the base dtype); W + s*(a@b - a0@b0)
    for an adapter whose init is relative to the base (LoRA-GA, PiSSA, OLoRA); m * (W + s*a@b) / ||W + s*a@b||_c per
    output channel for DoRA.

    The scale comes from each LoraWeights leaf; `lora_config` is accepted for symmetry with PEFT and unused.
    """
    del lora_config
    return _fold_jit(params, lora, 1.0)


def unmerge(params, lora, lora_config: LoraConfig | None = None):
    """Inverse of `merge`: W - s * a @ b (not defined for DoRA: an error)."""
    del lora_config
    return _fold_jit(params, lora, -1.0)


def num_lora_params(lora) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(lora))


def split_modules_to_save(params, names: Sequence[str] | None) -> dict:
    """The sub-tree of `params` trained fully: every module whose path, or an enclosing module's, ends with one of
    `names` (PEFT's suffix match, so "pooler" takes bert.pooler.dense)."""
    if not names:
        return {}
    flat = traverse_util.flatten_dict(params)
    picked = {p: x for p, x in flat.items()
              if any(".".join(p[:i]).endswith(n) for n in names for i in range(1, len(p)))}
    if not picked:
        modules = sorted({p[-2] for p in flat})
        raise LoraConfigError(f"modules_to_save {list(names)} matches no module; modules: {', '.join(modules)}")
    return traverse_util.unflatten_dict(picked)


def overlay(params, replacement: Mapping) -> dict:
    """`params` with the leaves present in `replacement` swapped in (used for modules_to_save)."""
    if not replacement:
        return params
    flat = traverse_util.flatten_dict(params)
    flat.update(traverse_util.flatten_dict(replacement))
    return traverse_util.unflatten_dict(flat)


def split_offsets(lora) -> tuple[dict, dict]:
    """(the trainable LoRA tree: a, b only; the frozen offsets: {path: LoraWeights(a=a0, b=b0)} of the targets whose
    init is relative to the base (LoRA-GA), empty otherwise). `with_offsets` joins them again."""
    trainable, offsets = {}, {}
    for path, w in lora_items(lora):
        trainable[path] = w.replace(a0=None, b0=None)
        if w.a0 is not None:
            offsets[path] = LoraWeights(w.a0, w.b0, scale=w.scale, dropout=w.dropout)
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(offsets)


def with_offsets(lora, offsets) -> dict:
    """The LoRA tree with each target's frozen offsets (a0, b0) set from `offsets` (see `split_offsets`)."""
    if not offsets:
        return lora
    frozen = dict(lora_items(offsets))
    flat = {p: (w.replace(a0=frozen[p].a, b0=frozen[p].b) if p in frozen else w) for p, w in lora_items(lora)}
    return traverse_util.unflatten_dict(flat)
