"""Functional LoRA: which kernels to adapt, the adapter leaf and its math, initialization, merge and unmerge.

LoRA is tree surgery driven by a module-name matcher with PEFT's semantics. The base params stay one frozen
pytree; `init_lora` builds a second, much smaller tree at the paths of the targeted kernels:

    before:  params = {"model": {"layers": {"self_attn": {"q_proj": {"kernel": (L, in, out)}, ...}}}}
    after:   lora   = {"model": {"layers": {"self_attn": {"q_proj": LoraWeights(a=(L, in, r), b=(L, r, out))}}}}

    config.py    LoraConfig, LoraGAConfig, EvaConfig, CordaConfig
    targets.py   PEFT's matching of target_modules / exclude_modules / rank_pattern / alpha_pattern
    weights.py   LoraWeights (the leaf) and the low-rank branch
    tree.py      init_lora, merge, unmerge, modules_to_save
    ga.py        LoRA-GA (gradient estimation, factorization, init)
    inits/       PiSSA, OLoRA (from the weights), LoRA-One (one rank-r gradient step), EVA, CorDA (from activations)
"""

from jaxlora.lora.config import (CORDA_METHODS, DATA_INITS, DIRECTIONS, INIT_METHODS, METHODS, RELATIVE_INITS, SCALES,
                                 CordaConfig, EvaConfig, LoraConfig, LoraConfigError, LoraGAConfig, LoraGAError,
                                 pissa_niter, valid_init)
from jaxlora.lora.targets import (Target, build_lora_tree, linear_modules, lora_axes, matches, module_names,
                                  pattern_value, resolve_targets)
from jaxlora.lora.tree import (init_factors, init_lora, lora_items, merge, num_lora_params, overlay,
                               split_modules_to_save, split_offsets, unmerge, with_offsets)
from jaxlora.lora.weights import LoraWeights, is_lora_leaf, low_rank_matmul

__all__ = ["CORDA_METHODS", "DATA_INITS", "DIRECTIONS", "INIT_METHODS", "METHODS", "RELATIVE_INITS", "SCALES",
           "CordaConfig", "EvaConfig", "LoraConfig", "LoraConfigError", "LoraGAConfig",
           "LoraGAError", "LoraWeights", "Target", "build_lora_tree", "init_factors", "init_lora", "is_lora_leaf",
           "linear_modules", "lora_axes", "lora_items", "low_rank_matmul", "matches", "merge", "module_names",
           "num_lora_params", "overlay", "pattern_value", "resolve_targets", "split_modules_to_save", "split_offsets", "unmerge",
           "pissa_niter", "valid_init", "with_offsets"]
