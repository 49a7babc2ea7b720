"""Functional LoRA: which kernels to adapt, how to initialize their factors, merge and unmerge.

LoRA is tree surgery driven by a module-name matcher with PEFT's semantics. The base params stay one frozen
pytree; `init_lora` builds a second, much smaller tree at the paths of the targeted kernels:

    before:  params = {"model": {"layers": {"self_attn": {"q_proj": {"kernel": (L, in, out)}, ...}}}}
    after:   lora   = {"model": {"layers": {"self_attn": {"q_proj": LoraWeights(a=(L, in, r), b=(L, r, out))}}}}

Module names are Hugging Face's, per layer ("model.layers.3.self_attn.q_proj"), so `target_modules`,
`exclude_modules`, `rank_pattern` and `alpha_pattern` written for PEFT work unchanged. Layers are stacked and
scanned, so a pattern must select (and give one rank/alpha to) a module in every layer or in none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxlora.lora_weights import LoraWeights, is_lora_leaf

INIT_METHODS = (True, False, "gaussian", "lora_ga")
# PEFT's per-architecture default when target_modules is None (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
                   "bloom": ("query_key_value",), "gpt2": ("c_attn",), "bert": ("query", "value"),
                   "t5": ("q", "v")}


class LoraConfigError(ValueError):
    pass


class LoraGAError(ValueError):
    pass


DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
METHODS = ("exact", "randomized", "streaming")


@dataclasses.dataclass(frozen=True)
class LoraGAConfig:
    """LoRA-GA options (PEFT's LoraGAConfig names; defaults follow the official code)."""

    batch_size: int = 2  # examples per estimation batch (official default 2)
    num_batches: int = 64  # estimation batches (official default 64: 128 samples)
    direction: str = "ArB2r"  # which singular vectors go to a and b: ArB2r, A2rBr, ArBr, random
    scale: str = "stable"  # stable (c = out^0.25 / sqrt(gamma) on a and b), weight_svd, gd_scale, unit
    stable_gamma: float = 16.0  # gamma of the stable scale
    svd_method: str = "randomized"  # exact, randomized (like torch.svd_lowrank, as the official code), streaming
    oversampling: int | None = None  # sketch columns beyond 2r; None: 2r for randomized (q = 4r, as
    #                                  svd_lowrank(q=4r)), 4r for streaming (q = 6r; see power_iters)
    power_iterations: int | None = None  # None: 4 for randomized (svd_lowrank niter=4), 1 for streaming
    singular_values_in_b: bool = False  # PEFT 0.21's variant: b = diag(S) V^T, stable scale on b only, same
    #                                     indices for "random", weight_svd = S_W[0]/S_B[0]; factors cast to the base
    #                                     dtype before the offset. Off = the official code.
    factors_dtype: str = "float32"  # dtype of a0/b0 and so of the trained adapters
    seed: int = 0  # sketches and the "random" direction
    cache_dir: str | None = None  # save the statistics and the init here; a second run with the same inputs reuses them

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise LoraGAError(f"lora_ga_config.direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale not in SCALES:
            raise LoraGAError(f"lora_ga_config.scale must be one of {SCALES}, got {self.scale!r}")
        if self.svd_method not in METHODS:
            raise LoraGAError(f"lora_ga_config.svd_method must be one of {METHODS}, got {self.svd_method!r}")
        if self.batch_size <= 0 or self.num_batches <= 0:
            raise LoraGAError("lora_ga_config.batch_size and num_batches must be positive")

    def power_iters(self) -> int:
        if self.power_iterations is not None:
            return self.power_iterations
        # streaming: passes over the data dominate its cost (2 + 2p). On SmolLM2's real gradients
        # (docs/loraga_subspace.md) oversampling 4r with 1 power iteration (4 passes) matches the exact subspaces
        # LoRA-GA uses as well as 2r with 2 iterations (6 passes): mean overlap 0.999.
        return 1 if self.svd_method == "streaming" else 4


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyperparameters, with PEFT's field names and meanings."""

    r: int = 8  # rank of the update
    lora_alpha: float = 8.0  # scale numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    target_modules: str | list[str] | None = None  # names matched as suffixes, a regex in full, or "all-linear"
    exclude_modules: str | list[str] | None = None  # same matching; excluded even if targeted
    use_rslora: bool = False  # rank-stabilized scale alpha / sqrt(r)
    init_lora_weights: bool | str = True  # True: a kaiming-uniform, b zero (PEFT); "gaussian"; False: b random too
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)  # module regex -> rank
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)  # module regex -> alpha
    modules_to_save: list[str] | None = None  # modules trained fully (e.g. lm_head, norms), matched as suffixes
    lora_dtype: str = "float32"  # dtype of a and b (and so of their optimizer state)
    lora_ga_config: LoraGAConfig | None = None  # LoRA-GA options when init_lora_weights == "lora_ga"

    def __post_init__(self):
        if self.r <= 0:
            raise LoraConfigError(f"r must be positive, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoraConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in INIT_METHODS:
            raise LoraConfigError(f"init_lora_weights must be one of {INIT_METHODS}, got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise LoraConfigError("target_modules is an empty list")
        if self.init_lora_weights == "lora_ga" and self.lora_ga_config is None:
            object.__setattr__(self, "lora_ga_config", LoraGAConfig())

    def scale(self, r: int, alpha: float) -> float:
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: its param path (without 'kernel'), rank and scale, and whether layers are stacked."""

    path: tuple[str, ...]
    rank: int
    scale: float
    stacked: bool


def _matches(spec: str | Sequence[str], name: str) -> bool:
    """PEFT's check_target_module_exists: a string is a full regex match, a list matches names or suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _pattern_value(patterns: Mapping[str, Any], name: str, default):
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_names(path: tuple[str, ...], num_layers: int, stack_name: str = "layers") -> list[str]:
    """HF module names of a param path: one per layer when the path goes through the stacked layers."""
    if stack_name in path:
        i = path.index(stack_name) + 1
        return [".".join(path[:i] + (str(layer),) + path[i:]) for layer in range(num_layers)]
    return [".".join(path)]


def linear_modules(abstract_params) -> dict[tuple[str, ...], Any]:
    """Module path -> kernel (shape struct) for every dense kernel of the model."""
    flat = traverse_util.flatten_dict(abstract_params)
    return {p[:-1]: x for p, x in flat.items() if p[-1] == "kernel"}


def resolve_targets(abstract_params, cfg: LoraConfig, num_layers: int, model_type: str = "llama",
                    stack_name: str = "layers", output_module: str = "lm_head") -> list[Target]:
    """The kernels `cfg` adapts, with each one's rank and scale, validated against the model's module names."""
    kernels = linear_modules(abstract_params)
    spec = cfg.target_modules
    if spec is None:
        spec = list(DEFAULT_TARGETS.get(model_type, ()))
        if not spec:
            raise LoraConfigError(f"target_modules is required for model type {model_type!r}")
    targets, all_names = [], []
    for path, kernel in kernels.items():
        names = module_names(path, num_layers, stack_name)
        all_names.extend(names)
        if spec == "all-linear":
            hits = [path[-1] != output_module for _ in names]
        else:
            hits = [_matches(spec, n) for n in names]
        if cfg.exclude_modules:
            hits = [h and not _matches(cfg.exclude_modules, n) for h, n in zip(hits, names)]
        if not any(hits):
            continue
        if not all(hits):
            raise LoraConfigError(
                f"target_modules selects {path[-1]} in some layers only ({[n for n, h in zip(names, hits) if h][:3]}"
                f"...); layers are scanned, so a module is adapted in every layer or in none")
        ranks = {_pattern_value(cfg.rank_pattern, n, cfg.r) for n in names}
        alphas = {_pattern_value(cfg.alpha_pattern, n, cfg.lora_alpha) for n in names}
        if len(ranks) > 1 or len(alphas) > 1:
            raise LoraConfigError(f"rank_pattern/alpha_pattern give {path[-1]} different values across layers "
                                  f"(ranks {sorted(ranks)}, alphas {sorted(alphas)}); layers are scanned")
        rank, alpha = ranks.pop(), alphas.pop()
        d_in, d_out = kernel.shape[-2:]
        if rank > min(d_in, d_out):
            raise LoraConfigError(f"r={rank} is larger than a dimension of {names[0]} (kernel {d_in}x{d_out})")
        targets.append(Target(path, rank, cfg.scale(rank, alpha), stacked=stack_name in path))
    if not targets:
        unique = sorted({n.split(".")[-1] for n in all_names})
        raise LoraConfigError(f"target_modules {spec!r} matches no module; module names end in: "
                              f"{', '.join(unique)} (e.g. {all_names[0]})")
    return targets


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


def lora_axes(kernel_axes: tuple[str | None, ...]) -> tuple[tuple, tuple]:
    """Logical axes of a and b: a takes the kernel's input axis, b its output axis, rank replicated."""
    *lead, ax_in, ax_out = kernel_axes
    return (*lead, ax_in, "lora_rank"), (*lead, "lora_rank", ax_out)


def build_lora_tree(targets: Sequence[Target], make: callable) -> dict:
    """Nested dict with `make(target)` (a LoraWeights) at each target's path."""
    return traverse_util.unflatten_dict({t.path: make(t) for t in targets})


def init_lora(model, lora_config: LoraConfig, rng: jax.Array) -> dict:
    """Initializes the LoRA tree for `model`, directly into the shardings of the kernels it adapts.

    Args:
      model: a `jaxlora.Model` (from `from_pretrained` or `Model.random`).
      lora_config: which modules to adapt and how.
      rng: PRNG key.
    Returns:
      The LoRA tree: `LoraWeights` leaves at the targeted module paths. For init_lora_weights="lora_ga" use
      `jaxlora.lora_ga_init`, which also returns the residual base.
    """
    if lora_config.init_lora_weights == "lora_ga":
        raise LoraConfigError("init_lora_weights='lora_ga' needs gradients: call jaxlora.lora_ga_init(model, "
                              "lora_config, batches) instead of init_lora")
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
    return cache[key](rng)


def lora_items(lora) -> list[tuple[tuple[str, ...], LoraWeights]]:
    """(module path, LoraWeights) pairs of a LoRA tree."""
    flat = traverse_util.flatten_dict(lora, is_leaf=lambda p, x: is_lora_leaf(x))
    return list(flat.items())


def _fold(params, lora, sign: float):
    flat = traverse_util.flatten_dict(params)
    for path, w in lora_items(lora):
        kernel = flat[path + ("kernel",)]
        delta = jnp.matmul(w.a.astype(jnp.float32), w.b.astype(jnp.float32)) * (sign * w.scale)
        flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


_fold_jit = jax.jit(_fold, static_argnums=2)


def merge(params, lora, lora_config: LoraConfig | None = None):
    """W + s * a @ b for every adapted kernel (computed in float32, cast back to the base dtype).

    The scale comes from each LoraWeights leaf; `lora_config` is accepted for symmetry with PEFT and unused.
    """
    del lora_config
    return _fold_jit(params, lora, 1.0)


def unmerge(params, lora, lora_config: LoraConfig | None = None):
    """Inverse of `merge`: W - s * a @ b."""
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
