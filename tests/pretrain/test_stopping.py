"""The stop policy: every reason the loop stops, its priority and exit status; signals."""

import os
import signal
import time
from types import SimpleNamespace

from pretrain.stopping import (
    EXIT_NONFINITE,
    Stop,
    StopPolicy,
    StopSignals,
    catch_stop_signals_early,
)


def _policy(received=None, max_time_s=60.0, started=None, **kw):
    t = SimpleNamespace(**{"max_time_s": max_time_s, "max_nonfinite_in_a_row": 3, "max_steps": 10, "max_tokens": None, **kw})
    signals = SimpleNamespace(received=received)
    return StopPolicy(t, signals, time.monotonic() if started is None else started)


def test_stop_priority_and_exit_status():
    p = _policy()
    assert p.after_step((False, False), 2) is None
    diverged = p.after_step((False, False), 3)
    assert diverged.exit_code == EXIT_NONFINITE and "train.max_nonfinite_in_a_row=3" in diverged.reason
    assert p.after_step((False, True), 2) == Stop("reached train.max_time_s=60.0")  # the budget saves, exits 0
    assert p.after_step((True, True), 2) == Stop("stop signal (SIGTERM/SIGUSR1)", 0, preempted=True)
    both = p.after_step((True, True), 3)
    assert both.exit_code == EXIT_NONFINITE and both.preempted  # no requeue of a diverged run, no final eval
    assert p.after_pause(False) is None
    assert p.after_pause(True).preempted and "during evaluation or a save" in p.after_pause(True).reason


def test_limits_steps_and_tokens():
    p = _policy(max_tokens=1000)
    assert p.limit(SimpleNamespace(step=9, tokens_seen=999)) is None
    assert p.limit(SimpleNamespace(step=10, tokens_seen=0)) == Stop("reached train.max_steps=10")
    assert p.limit(SimpleNamespace(step=3, tokens_seen=1000)) == Stop("reached train.max_tokens=1000")


def test_requests_report_the_signal_and_the_spent_budget():
    assert _policy().requests() == (False, False)
    assert _policy(received="SIGTERM").requests() == (True, False)
    assert _policy(started=time.monotonic() - 61).requests() == (False, True)
    assert _policy(max_time_s=None, started=0.0).requests() == (False, False)


def test_stop_signals_sets_the_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert s.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_during_start_up_is_kept_for_the_loop():
    """SLURM's one preemption warning may come while torch imports: recorded, then the loop sees it."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        catch_stop_signals_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # not fatal, not lost
        with StopSignals() as signals:
            assert signals.received == "SIGUSR1"
        with StopSignals() as signals:  # taken once: a later run in this process starts clean
            assert signals.received is None
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_train_command_catches_stop_signals_before_heavy_imports():
    """The early catch is armed before `pretrain.trainer` (torch, DeepSpeed) is imported."""
    import inspect

    import pretrain.__main__ as cli

    src = inspect.getsource(cli.main)
    assert src.index("catch_stop_signals_early()") < src.index("from pretrain.trainer import train")
