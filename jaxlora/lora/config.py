"""LoRA's configuration: `LoraConfig` (PEFT's field names and meanings), `LoraGAConfig` (LoRA-GA's options, and the
estimation batches of every data-driven init), `EvaConfig` and `CordaConfig` (PEFT's options of EVA and CorDA).

Typed, frozen dataclasses validated in `__post_init__`; a run config's `lora:` section fills `LoraConfig`.
"""

from __future__ import annotations

import dataclasses
import re

# "pissa_niter_K" (K >= 0 power iterations of a randomized SVD) is accepted besides these (`valid_init`).
INIT_METHODS = (True, False, "gaussian", "lora_ga", "pissa", "olora", "lora_one", "eva", "corda")
# inits computed on estimation batches (lora_ga_config's batch_size / num_batches): a gradient (LoRA-GA, LoRA-One) or
# the targeted layers' inputs (EVA, CorDA)
DATA_INITS = ("lora_ga", "lora_one", "eva", "corda")
RELATIVE_INITS = ("lora_ga", "pissa", "olora", "corda")  # frozen a0/b0 offsets (besides "pissa_niter_K")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def valid_init(method) -> bool:
    return method in INIT_METHODS or (isinstance(method, str) and _PISSA_NITER.fullmatch(method) is not None)


def pissa_niter(method) -> int | None:
    """K of "pissa_niter_K" (a randomized SVD with K power iterations); None for exact "pissa" or another init."""
    m = _PISSA_NITER.fullmatch(method) if isinstance(method, str) else None
    return int(m.group(1)) if m else None


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
    lora_one_gamma: float = 64.0  # LoRA-One: the init is one rank-r gradient step W0 - (s/gamma) [G]_r / S_1
    #                               (normalized by G's top singular value; 64 as the official code's README runs it)
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
        if not self.lora_one_gamma > 0:
            raise LoraGAError(f"lora_ga_config.lora_one_gamma must be positive, got {self.lora_one_gamma}")

    def power_iters(self) -> int:
        if self.power_iterations is not None:
            return self.power_iterations
        # streaming: passes over the data dominate its cost (2 + 2p). On SmolLM2's real gradients
        # (docs/loraga_subspace.md) oversampling 4r with 1 power iteration (4 passes) matches the exact subspaces
        # LoRA-GA uses as well as 2r with 2 iterations (6 passes): mean overlap 0.999.
        return 1 if self.svd_method == "streaming" else 4


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    """EVA's options (`jaxlora.lora.inits.eva`), PEFT's EvaConfig names; rho defaults to 1 here (PEFT: 2)."""

    rho: float = 1.0  # rank redistribution across layers (PEFT: max rank r*rho); only 1 (none) is implemented: the
    #                   layers of a scanned stack share one rank, so per-layer ranks cannot be represented
    tau: float = 0.99  # PEFT's convergence threshold of its incremental PCA; the PCA here is exact (no iteration)
    use_label_mask: bool = True  # drop the tokens whose label is label_mask_value (besides padding)
    label_mask_value: int = -100
    whiten: bool = False  # components divided by the square roots of their singular values
    adjust_scaling_factors: bool = True  # PEFT rescales alpha of layers whose rank rho moved; no effect at rho = 1

    def __post_init__(self):
        if self.rho < 1.0:
            raise LoraConfigError(f"eva_config.rho must be >= 1, got {self.rho}")
        if self.rho > 1.0:
            raise LoraConfigError(f"eva_config.rho={self.rho} (rank redistribution) is not supported: the layers of a "
                                  f"scanned stack share one rank; use eva_config.rho=1")
        if not 0.0 <= self.tau <= 1.0:
            raise LoraConfigError(f"eva_config.tau must be in [0, 1], got {self.tau}")


CORDA_METHODS = ("ipm", "kpm")


@dataclasses.dataclass(frozen=True)
class CordaConfig:
    """CorDA's options (`jaxlora.lora.inits.corda`), PEFT's CordaConfig names (its cache files are not kept)."""

    corda_method: str = "ipm"  # "ipm": adapters from the largest r components of W C; "kpm": from the smallest r

    def __post_init__(self):
        if self.corda_method not in CORDA_METHODS:
            raise LoraConfigError(f"corda_config.corda_method must be one of {CORDA_METHODS}, got "
                                  f"{self.corda_method!r}")


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
    use_dora: bool = False  # DoRA: a trained magnitude per output channel times the normalized W + s*a@b (PEFT's)
    lora_ga_config: LoraGAConfig | None = None  # LoRA-GA options when init_lora_weights == "lora_ga"; its estimation
    #                                             options (batches, svd_method, seed) and lora_one_gamma for "lora_one";
    #                                             the batches (batch_size, num_batches) of "eva" and "corda" too
    eva_config: EvaConfig | None = None  # EVA's options when init_lora_weights == "eva" (default EvaConfig())
    corda_config: CordaConfig | None = None  # CorDA's options when init_lora_weights == "corda" (default CordaConfig())

    def __post_init__(self):
        if self.r <= 0:
            raise LoraConfigError(f"r must be positive, got {self.r}")
        if not self.lora_alpha > 0:  # 0 trains (and exports) an adapter that changes nothing
            raise LoraConfigError(f"lora_alpha must be positive (the adapter's scale is lora_alpha / r), "
                                  f"got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoraConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not valid_init(self.init_lora_weights):
            raise LoraConfigError(f"init_lora_weights must be one of {INIT_METHODS} or 'pissa_niter_K' (K an integer), "
                                  f"got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise LoraConfigError("target_modules is an empty list")
        init = self.init_lora_weights
        relative = init in RELATIVE_INITS or pissa_niter(init) is not None  # frozen a0/b0 offsets
        if self.use_dora and relative:
            raise LoraConfigError(f"use_dora with init_lora_weights={self.init_lora_weights!r} is not supported (an "
                                  f"init relative to the base); use DoRA with True, False, 'gaussian', 'lora_one' or "
                                  f"'eva'")
        if self.init_lora_weights in DATA_INITS and self.lora_ga_config is None:
            object.__setattr__(self, "lora_ga_config", LoraGAConfig())
        if init == "eva" and self.eva_config is None:
            object.__setattr__(self, "eva_config", EvaConfig())
        if init == "corda" and self.corda_config is None:
            object.__setattr__(self, "corda_config", CordaConfig())

    def scale(self, r: int, alpha: float) -> float:
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r
