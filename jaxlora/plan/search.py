"""The largest micro-batch per chip that fits: predicted from compiled memory, then confirmed by a compile.

A train step's per-chip memory is close to linear in the micro-batch (weights and optimizer state are fixed,
activations grow per row), so a line through two compiles predicts where the budget is crossed, and a compile there
confirms it. The compiles near the budget are the slow ones (SmolLM2-135M on v5e-4: ~30 CPU-s at 1 row/chip, ~90 at
26), so `predicted` spends as few of them as it can:

    1. compile 1 and 2 rows/chip; the line through them gives the first guess, aimed `FIRST_GUESS_MARGIN` under the
       budget (that line's slope was 2.4% low at 26/chip for SmolLM2 on v5e: aiming at the budget overshoots);
    2. compile the guess; the lines through it and its neighbouring compiles (0.1% off next to it, same case) move
       the guess up or down; stop when m is compiled and fits and m+1 is either compiled and does not fit, or
       predicted by every such line to be over by more than `SLACK_ROWS` of a row's memory (else it is compiled);
       `BatchSearch.next_compiled` says which.

`exhaustive` (powers of two, then bisection: every step a compile) is kept to check the prediction against. Both
assume memory grows with the batch, and judge fit by the compiled peak (a compiler that refuses has no peak).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from jaxlora.plan.report import BatchSearch, StepPlan

FIRST_GUESS_MARGIN = 0.03
SLACK_ROWS = 0.25  # m+1 is only called "does not fit" untried when every line puts it over by > 1/4 row's memory


def _fits(p: StepPlan, budget: int) -> bool:
    return p.memory is not None and p.peak <= budget


class _Compiles:
    """The train step's plans by micro-batch, in the order asked for, and the bracket they set."""

    def __init__(self, train: Callable[[int], StepPlan], budget: int):
        self.train, self.budget, self.plans, self.order = train, budget, {}, []

    def __call__(self, m: int) -> StepPlan:
        if m not in self.plans:
            self.plans[m] = self.train(m)
            self.order.append(m)
        return self.plans[m]

    @property
    def lo(self) -> int:  # largest compiled micro-batch that fits (0: none)
        return max((m for m, p in self.plans.items() if _fits(p, self.budget)), default=0)

    @property
    def hi(self) -> int | None:  # smallest compiled micro-batch that does not fit
        return min((m for m, p in self.plans.items() if not _fits(p, self.budget)), default=None)

    def lines(self) -> list[tuple[float, float]]:
        """(bytes at 0 rows, bytes per row) of the lines next to the bracket: through the two largest compiles that
        fit, and through the largest that fits and the smallest that does not (when it has a peak). Where memory
        is locally convex or concave, the true peak at lo + 1 lies between what the two predict."""
        lo, hi = self.lo, self.hi
        peaks = {m: p.peak for m, p in self.plans.items() if p.memory is not None}
        below = sorted(m for m in peaks if m <= lo)[-2:]
        pairs = ([tuple(below)] if len(below) == 2 else []) + ([(lo, hi)] if lo and hi in peaks and hi > lo else [])
        out = []
        for m0, m1 in pairs:
            slope = (peaks[m1] - peaks[m0]) / (m1 - m0)
            if slope > 0:
                out.append((peaks[m0] - slope * m0, slope))
        return out

    def result(self, method: str, cap: int) -> BatchSearch:
        lo = self.lo
        nxt, lines, line = self.plans.get(lo + 1), self.lines(), None
        if nxt is not None:
            next_peak, next_compiled = nxt.peak, True
        elif lines and lo:
            line = min(lines, key=lambda ln: ln[0] + ln[1] * (lo + 1))  # the lower prediction
            next_peak, next_compiled = int(line[0] + line[1] * (lo + 1)), False
        else:
            next_peak, next_compiled = None, False
        compiled = [(m, self.plans[m].peak, _fits(self.plans[m], self.budget)) for m in self.order]
        return BatchSearch(method, self.budget, cap, compiled, lo, next_peak, next_compiled,
                           line or (lines[-1] if lines else None), capped=lo >= cap)


def predicted(train: Callable[[int], StepPlan], budget: int, cap: int = 256) -> BatchSearch:
    """The largest micro-batch per chip up to `cap` whose compile fits `budget`, found by prediction (see above)."""
    c = _Compiles(train, budget)
    if not _fits(c(1), budget) or cap <= 1:
        return c.result("predicted", cap)
    c(2)
    margin = FIRST_GUESS_MARGIN
    while c.lo < cap and c.hi != c.lo + 1:
        lo, hi, lines = c.lo, c.hi, c.lines()
        if lines:  # the largest batch either line puts under the budget (the lower memory prediction)
            guess = max(math.floor((budget * (1 - margin) - a) / b + 1e-9) for a, b in lines)
            if hi is not None and guess >= hi:  # the lines are off past a compile that did not fit: bisect
                guess = (lo + hi) // 2
        else:  # no usable slope: double, or bisect the bracket
            guess = 2 * lo if hi is None else (lo + hi) // 2
        guess = min(guess, cap, hi - 1 if hi is not None else cap)
        if guess <= lo:
            if margin and lines:  # only the first guess's margin held it back: aim at the budget itself
                margin = 0.0
                continue
            if all(a + b * (lo + 1) > budget + SLACK_ROWS * b for a, b in lines):
                break  # every line puts lo + 1 clearly over the budget
            guess = lo + 1  # too close to call: compile it
        c(guess)
        margin = 0.0
    return c.result("predicted", cap)


def exhaustive(train: Callable[[int], StepPlan], budget: int, cap: int = 256) -> BatchSearch:
    """The same answer by compiling powers of two (and the cap) up to the first that does not fit, then bisecting."""
    c = _Compiles(train, budget)
    if not _fits(c(1), budget):
        return c.result("exhaustive", cap)
    m = 1
    while m < cap:
        m = min(2 * m, cap)
        if not _fits(c(m), budget):
            break
    lo, hi = c.lo, c.hi
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(c(mid), budget) else (lo, mid)
    return c.result("exhaustive", cap)
