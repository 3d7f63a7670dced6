"""When and why the training loop stops: one policy, fed by signals and non-finite accounting.

Every reason to stop is decided here, in one order of priority:

    non-finite steps in a row  exit 3: a diverged run must not be requeued, even if a signal came too
    stop signal                SIGTERM / SIGUSR1 (SLURM preemption): finish the step, save, exit 0
    time budget                train.max_time_s (counted from process start: it is the job's budget)
    limits                     train.max_steps, train.max_tokens

The signal and the time budget are local observations; the loop all-reduces them
(:meth:`StopPolicy.requests`) so every rank takes the same decision at the same step.
"""

from __future__ import annotations

import logging
import math
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


class StopSignals:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves and exits 0."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving and exiting", self.received)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class NonFinite:
    """Skipped updates and the current run of non-finite steps (identical on every rank)."""

    precision: str
    in_a_row: int = 0

    def account(self, state: Any, step: int, loss: float, applied: bool, gnorm: float | None) -> bool:
        """Update the counters after a step; returns True when the step was non-finite.

        DeepSpeed already skipped the update on every rank (see engine.py). With fp16 a skip with
        a finite loss is the loss scaler calibrating, not a failure, even though DeepSpeed then
        reports an infinite gradient norm (a start at 2**16 overflows several steps in a row); a
        real fp16 divergence ends in DeepSpeed's own error at its minimum loss scale.
        """
        if self.precision == "fp16":
            nonfinite = not math.isfinite(loss)
        else:
            nonfinite = not math.isfinite(loss) or not applied or (gnorm is not None and not math.isfinite(gnorm))
        if not applied:
            state.skipped_steps += 1
        if not nonfinite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s): update skipped (%d in a row)",
                    step, loss, gnorm, self.in_a_row)
        if applied:
            log.error("step %d: non-finite loss but DeepSpeed applied the update", step)
        return True


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
        """The decision after a step from the agreed requests (the limits are checked by
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
