"""Which kernels a `LoraConfig` adapts: PEFT's module-name matching over the model's HF module names.

Module names are Hugging Face's, per layer ("model.layers.3.self_attn.q_proj"), so `target_modules`,
`exclude_modules`, `rank_pattern` and `alpha_pattern` written for PEFT work unchanged. Layers are stacked and
scanned, so a pattern must select (and give one rank/alpha to) a module in every layer or in none.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flax import traverse_util

from jaxlora.lora.config import LoraConfig, LoraConfigError

@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: its param path (without 'kernel'), rank and scale, and whether layers are stacked."""

    path: tuple[str, ...]
    rank: int
    scale: float
    stacked: bool


def matches(spec: str | Sequence[str], name: str) -> bool:
    """PEFT's check_target_module_exists: a string is a full regex match, a list matches names or suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def pattern_value(patterns: Mapping[str, Any], name: str, default):
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


EXPERT_STACK = "experts"  # a module of stacked experts (Mixtral): its kernels carry an expert axis after "layers"


def module_names(path: tuple[str, ...], num_layers: int, stack_name: str = "layers", num_experts: int = 0
                 ) -> list[str]:
    """HF module names of a param path: one per layer when the path goes through the stacked layers, and one per
    (layer, expert), layer-major, when it also goes through `EXPERT_STACK` with `num_experts` experts
    ("model.layers.3.block_sparse_moe.experts.5.w1")."""
    layers = range(num_layers) if stack_name in path else [None]
    experts = range(num_experts) if num_experts and EXPERT_STACK in path else [None]
    i = path.index(stack_name) + 1 if stack_name in path else None
    j = path.index(EXPERT_STACK) + 1 if experts[0] is not None else None
    names = []
    for layer in layers:
        for expert in experts:
            parts = []
            for k, part in enumerate(path, 1):
                parts += [part] + ([str(layer)] if k == i else []) + ([str(expert)] if k == j else [])
            names.append(".".join(parts))
    return names


def num_experts_of(path: tuple[str, ...], kernel_shape: tuple[int, ...], stack_name: str = "layers") -> int:
    """The expert count of a kernel under `EXPERT_STACK` ((layers,) experts, in, out), else 0."""
    if EXPERT_STACK not in path:
        return 0
    return kernel_shape[1 if stack_name in path else 0]


def linear_modules(abstract_params) -> dict[tuple[str, ...], Any]:
    """Module path -> kernel (shape struct) for every dense kernel of the model."""
    flat = traverse_util.flatten_dict(abstract_params)
    return {p[:-1]: x for p, x in flat.items() if p[-1] == "kernel"}


def resolve_targets(abstract_params, cfg: LoraConfig, num_layers: int, default_targets: Sequence[str] = (),
                    stack_name: str = "layers", output_module: str = "lm_head") -> list[Target]:
    """The kernels `cfg` adapts, with each one's rank and scale, validated against the model's module names."""
    kernels = linear_modules(abstract_params)
    spec = cfg.target_modules
    if spec is None:
        spec = list(default_targets)  # PEFT's per-architecture default (the family's registry record)
        if not spec:
            raise LoraConfigError("target_modules is required for this model (it has no default targets)")
    targets, all_names = [], []
    for path, kernel in kernels.items():
        names = module_names(path, num_layers, stack_name, num_experts_of(path, kernel.shape, stack_name))
        all_names.extend(names)
        if spec == "all-linear":
            hits = [path[-1] != output_module for _ in names]
        else:
            hits = [matches(spec, n) for n in names]
        if cfg.exclude_modules:
            hits = [h and not matches(cfg.exclude_modules, n) for h, n in zip(hits, names)]
        if not any(hits):
            continue
        if not all(hits):
            raise LoraConfigError(
                f"target_modules selects {path[-1]} in some layers only ({[n for n, h in zip(names, hits) if h][:3]}"
                f"...); layers are scanned, so a module is adapted in every layer or in none")
        ranks = {pattern_value(cfg.rank_pattern, n, cfg.r) for n in names}
        alphas = {pattern_value(cfg.alpha_pattern, n, cfg.lora_alpha) for n in names}
        if len(ranks) > 1 or len(alphas) > 1:
            raise LoraConfigError(f"rank_pattern/alpha_pattern give {path[-1]} different values across layers "
                                  f"(ranks {sorted(ranks)}, alphas {sorted(alphas)}); layers are scanned")
        rank, alpha = ranks.pop(), alphas.pop()
        d_in, d_out = kernel.shape[-2:]
        if rank > min(d_in, d_out):
            raise LoraConfigError(f"r={rank} is larger than a dimension of {names[0]} (kernel {d_in}x{d_out})")
        targets.append(Target(path, rank, cfg.scale(rank, alpha), stacked=stack_name in path))
    unique = sorted({n.split(".")[-1] for n in all_names})
    if not targets:
        raise LoraConfigError(f"target_modules {spec!r} matches no module; module names end in: "
                              f"{', '.join(unique)} (e.g. {all_names[0]})")
    if cfg.target_modules is not None and not isinstance(spec, str):  # an explicit list: every entry must exist
        missing = [t for t in spec if not any(matches([t], n) for n in all_names)]
        if missing:
            raise LoraConfigError(f"target_modules entry {missing[0]!r} matches no module of this model; module "
                                  f"names end in: {', '.join(unique)}")
    return targets


def lora_axes(kernel_axes: tuple[str | None, ...]) -> tuple[tuple, tuple]:
    """Logical axes of a and b: a takes the kernel's input axis, b its output axis, rank replicated."""
    *lead, ax_in, ax_out = kernel_axes
    return (*lead, ax_in, "lora_rank"), (*lead, "lora_rank", ax_out)


def build_lora_tree(targets: Sequence[Target], make: callable) -> dict:
    """Nested dict with `make(target)` (a LoraWeights) at each target's path."""
    return traverse_util.unflatten_dict({t.path: make(t) for t in targets})
