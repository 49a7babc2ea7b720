"""Stopping a run cleanly on SIGTERM (preemption) and SIGINT (Ctrl-C).

TPU VMs and cloud schedulers preempt with SIGTERM and a short grace period; Python's default for SIGTERM kills the
process at once (abandoning a checkpoint being written) and Ctrl-C raises KeyboardInterrupt wherever the program
happens to be. While training runs, `StopSignals` turns the first SIGTERM or SIGINT into a request the loop reads
between steps: the loop finishes the step in flight, saves a checkpoint at it, waits for the write and stops with one
line saying where to resume (`TrainingInterrupted`). A second signal means "now": one line, and the process exits
with 128 + the signal number without waiting (the checkpoints already completed are intact: orbax renames a
checkpoint into place only once it is whole).

Handlers are installed only in the main thread (Python allows no other) and the previous ones are restored on exit,
so `jaxlora.train` called from a notebook or a test leaves the process as it found it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


class TrainingInterrupted(RuntimeError):
    """The run stopped on a signal after saving; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """Context manager: records the first SIGTERM/SIGINT in `.received` (its name) instead of dying."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def received(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: exit now
            sys.stderr.write(f"\njaxlora: second {signal.Signals(signum).name}: exiting now, without a checkpoint "
                             f"of the current step\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"\njaxlora: {signal.Signals(signum).name} received: saving a checkpoint after the current "
                         f"step, then stopping (send it again to exit at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
