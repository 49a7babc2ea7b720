"""What a plan reports: `StepPlan` per compiled step (fit, `Memory` per chip, bytes by part, FLOPs), `BatchSearch`
(which micro-batches were compiled, which only predicted) and the `PlanReport` over them, as text or JSON.

`fmt_bytes` and `fmt_fit` are the one way sizes and fits are written, in the report and in the planner's log.
"""

from __future__ import annotations

import dataclasses

from jaxlora.plan.targets import GiB, Target


@dataclasses.dataclass
class Memory:
    """Per-chip bytes of one compiled program (XLA's memory_analysis)."""

    argument: int
    output: int
    alias: int  # outputs written into donated arguments
    temp: int  # activations, gradients and every other temporary
    code: int
    host: int = 0  # arguments, outputs and temporaries in pinned host memory (optim.offload_state), not in peak

    @property
    def peak(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code


@dataclasses.dataclass
class StepPlan:
    """One compiled step at one batch size: does it fit, how much memory per chip, how many FLOPs."""

    name: str  # "train", "lora_ga_exact" or "lora_ga_streaming"
    rows: int  # global rows per call (train: micro-batch x grad_accum_steps)
    per_chip: int  # micro-batch rows per data shard (per chip when there is no tensor parallelism)
    seq_len: int
    fits: bool
    memory: Memory | None  # None when the compile ran out of memory
    parts: dict[str, int]  # per-chip bytes of the inputs by what they hold (weights, adapters, ...)
    flops: float  # analytic FLOPs of one call (all chips)
    flops_xla: float | None  # XLA's count for one chip (loops counted once)
    compile_s: float
    over_bytes: int = 0  # how far over the per-chip HBM when it does not fit

    @property
    def peak(self) -> int | None:
        return self.memory.peak if self.memory else None


@dataclasses.dataclass
class BatchSearch:
    """How the largest micro-batch was found: which batches were compiled, and what was predicted, not compiled."""

    method: str  # "predicted" (a line through compiled memory, confirmed by compiling) or "exhaustive"
    budget: int
    cap: int  # the search's upper bound per chip
    compiled: list[tuple[int, int | None, bool]]  # (micro-batch/chip, compiled peak or None: refused, fits), in order
    largest: int  # compiled and fits (0: none does)
    next_peak: int | None = None  # peak at largest + 1: compiled, or predicted by `line`
    next_compiled: bool = False
    line: tuple[float, float] | None = None  # (bytes at 0 rows, bytes per row) through two compiles
    capped: bool = False  # the cap itself fits

    def describe(self) -> str:
        done = ", ".join(str(m) for m, _, _ in self.compiled)
        n = len(self.compiled)
        text = f"search ({self.method}): compiled {done}/chip ({n} compile{'s' if n > 1 else ''})"
        if self.line:
            text += f"; memory ~ {fmt_bytes(self.line[0])} + {fmt_bytes(self.line[1])}/row"
        if self.capped:
            return text + f"; the cap {self.cap}/chip fits (--max-micro-batch)"
        if self.largest and self.next_peak is not None:
            how = "compiled" if self.next_compiled else "predicted, not compiled"
            text += f"; {self.largest + 1}/chip: {fmt_bytes(self.next_peak)} ({how}) > {fmt_bytes(self.budget)}"
        elif self.largest and self.next_compiled:
            text += f"; {self.largest + 1}/chip: refused by the compiler (over HBM)"
        return text


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_fit(p: StepPlan) -> str:
    if p.fits:
        return f"fits, {fmt_bytes(p.peak)}/chip"
    peak = f"{fmt_bytes(p.peak)}/chip, " if p.peak else ""
    return f"does not fit ({peak}{fmt_bytes(p.over_bytes)} over)"


@dataclasses.dataclass
class PlanReport:
    target: Target
    model: str
    num_params: int
    mesh: dict[str, int]
    remat: str
    seq_len: int
    hbm_bytes: int  # per-chip budget the plan was checked against
    train: StepPlan  # at the requested micro-batch
    largest: StepPlan | None  # at the largest micro-batch per chip that fits (None: not searched or none fits)
    lora_ga_exact: StepPlan | None = None
    lora_ga_streaming: StepPlan | None = None
    largest_search: BatchSearch | None = None  # how `largest` was found (compiled vs predicted batches)
    search: list[dict] = dataclasses.field(default_factory=list)  # remat / mesh search, best first
    message: str = ""  # why nothing fits, when nothing does
    base: str = ""  # how the frozen base is held: its dtype, or "nf4 (double quant)" / "int8" (QLoRA)

    @property
    def fits(self) -> bool:
        return self.train.fits

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target"] = self.target.describe()
        return d

    def format(self) -> str:
        base = f", base {self.base}" if self.base else ""
        lines = [f"plan: {self.model} ({self.num_params / 1e9:.2f}B params{base}), seq {self.seq_len}, "
                 f"remat {self.remat}",
                 f"target: {self.target.describe()}; mesh {self.mesh}; budget {fmt_bytes(self.hbm_bytes)}/chip"]
        largest = self.largest if self.largest and self.largest.per_chip != self.train.per_chip else None
        for p in (self.train, largest):
            lines += self._step_lines(p)
        if self.largest_search:
            lines.append("    " + self.largest_search.describe())
        for p in (self.lora_ga_exact, self.lora_ga_streaming):
            lines += self._step_lines(p)
        for r in self.search:
            lines.append(f"search: remat {r['remat']}, mesh {r['mesh']}: largest micro-batch/chip "
                         f"{r['largest'] or 'none fits'}" + (f" ({r['peak_gib']:.2f} GiB)" if r['largest'] else ""))
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)

    def _step_lines(self, p: StepPlan | None) -> list[str]:
        if p is None:
            return []
        title = {"train": f"LoRA train step, micro-batch {p.per_chip}/chip ({p.rows} rows x {p.seq_len})",
                 "lora_ga_exact": f"LoRA-GA exact estimation step, packed batch {p.per_chip}/chip "
                                  f"({p.rows} rows x {p.seq_len})",
                 "lora_ga_streaming": f"LoRA-GA streaming (sketch) step, packed batch {p.per_chip}/chip "
                                      f"({p.rows} rows x {p.seq_len})"}[p.name]
        if p is self.largest:
            title = "largest that fits: " + title
        lines = [f"{title}: {fmt_fit(p)}, compiled in {p.compile_s:.1f}s"]
        if p.parts:
            lines.append("    per chip: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.parts.items())
                         + (f"; total {fmt_bytes(p.peak)}" if p.memory else "; temporaries: over HBM")
                         + (f"; in pinned host memory: {fmt_bytes(p.memory.host)}"
                            if p.memory and p.memory.host else ""))
        if p.memory:
            xla = f"{p.flops_xla:.3g}/chip (scans counted once)" if p.flops_xla else "n/a"
            lines.append(f"    FLOPs/step: {p.flops:.3g} analytic (all chips); XLA {xla}")
        return lines
