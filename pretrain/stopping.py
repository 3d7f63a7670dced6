"""When and why the training loop stops: one policy, fed by signals and the step statistics.

Every reason to stop is decided here, in one order of priority:

    non-finite steps in a row  exit 3: a diverged run must not be requeued, even if a signal came too
    stop signal                SIGTERM / SIGUSR1 (SLURM preemption): finish the step, save, exit 0
    time budget                train.max_time_s (counted from process start: it is the job's budget)
    limits                     train.max_steps, train.max_tokens

The signal and the time budget are local observations; the loop agrees on them over the ranks
(:meth:`StopPolicy.requests`, pretrain.dist.LateAgreement) so every rank takes the same decision
at the same step. The count of non-finite steps comes from pretrain.stepstats, already agreed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

EXIT_NONFINITE = 3


@dataclass(frozen=True)
class Stop:
    reason: str
    exit_code: int = 0
    preempted: bool = False  # a signal: no final evaluation inside the short grace period


STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_early: list[str] = []  # stop signals received before the loop's handler was installed


def _record_early(signum, frame) -> None:
    _early.append(signal.Signals(signum).name)


def _install(handler) -> dict:
    """Set ``handler`` for the stop signals; returns the handlers it replaced. Only the main thread
    may set handlers (a loop run from another thread keeps the process's)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, handler)
    return previous


def catch_stop_signals_early() -> None:
    """Record SIGTERM / SIGUSR1 from process start until :class:`StopSignals` takes over.

    SLURM warns of preemption once; a warning that arrives while torch and DeepSpeed import would
    otherwise be lost (ignored under the SLURM script's ``trap "" USR1``, fatal without it).
    """
    _install(_record_early)


class StopSignals:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._previous = _install(self._handle)
        if _early:  # came during start-up, before this handler existed
            self._handle(signal.Signals[_early[-1]], None)
            _early.clear()
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving and exiting", self.received)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StopPolicy:
    """Decides, from values every rank agrees on, whether the loop stops and why."""

    def __init__(self, train_cfg: Any, signals: StopSignals, started: float):
        self.t = train_cfg
        self.signals = signals
        self.started = started  # time.monotonic() at process start

    def requests(self) -> tuple[bool, bool]:
        """This rank's local observations (signal received, time budget spent), to all-reduce."""
        over_time = self.t.max_time_s is not None and time.monotonic() - self.started >= self.t.max_time_s
        return self.signals.received is not None, over_time

    def limit(self, state: Any) -> Stop | None:
        """The deterministic limits (same on every rank without communication)."""
        if state.step >= self.t.max_steps:
            return Stop(f"reached train.max_steps={self.t.max_steps}")
        if self.t.max_tokens is not None and state.tokens_seen >= self.t.max_tokens:
            return Stop(f"reached train.max_tokens={self.t.max_tokens}")
        return None

    def after_step(self, agreed: tuple[bool, bool], nonfinite_in_a_row: int) -> Stop | None:
        """The decision after a step from the agreed requests and the longest run of non-finite
        steps read since the last decision (0 when not read; the limits are checked by
        :meth:`limit` before the next one); divergence wins over everything."""
        by_signal, by_time = agreed
        if nonfinite_in_a_row >= self.t.max_nonfinite_in_a_row:
            return Stop(f"{nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_in_a_row="
                        f"{self.t.max_nonfinite_in_a_row}); lower optim.lr, check the data, or resume from an "
                        "earlier checkpoint", EXIT_NONFINITE, preempted=by_signal)
        if by_signal:
            return Stop("stop signal (SIGTERM/SIGUSR1)", preempted=True)
        if by_time:
            return Stop(f"reached train.max_time_s={self.t.max_time_s}")
        return None

    def after_pause(self, agreed_signal: bool) -> Stop | None:
        """After an evaluation or a save: a signal that came meanwhile stops the run there (the
        checkpoint just written is current) instead of one step and another save later."""
        if agreed_signal:
            return Stop("stop signal (SIGTERM/SIGUSR1) during evaluation or a save", preempted=True)
        return None
