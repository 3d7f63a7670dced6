"""Step statistics on the device: recorded without a host sync, read once per logging step."""

import math

import torch

from pretrain.bench.dispatch_count import DispatchCounter
from pretrain.stepstats import StepStats


def _record(stats, loss, skipped, norm=1.0):
    stats.record(torch.tensor(loss), torch.tensor(1.0 if skipped else 0.0), torch.tensor(norm))


def test_record_never_syncs_and_read_reports_runs_and_skips():
    stats = StepStats("bf16", "cpu", 1)
    with DispatchCounter() as c:
        for loss, skipped in [(7.0, False), (float("nan"), True), (float("nan"), True), (float("nan"), True),
                              (6.9, False)]:
            _record(stats, loss, skipped)
    assert c.syncs == 0, c.sync_names
    r = stats.read()
    assert (r.skipped_steps, r.nonfinite_in_a_row, r.longest_nonfinite_run, r.applied_nonfinite) == (3, 0, 3, 0)
    assert math.isclose(r.loss, 6.9, rel_tol=1e-6)
    _record(stats, 6.8, False)
    r = stats.read()  # the run ended before the previous read: not reported again
    assert (r.skipped_steps, r.longest_nonfinite_run) == (3, 0)
    _record(stats, float("nan"), True)
    r = stats.read()
    _record(stats, float("nan"), True)
    r = stats.read()  # a run across a read keeps counting
    assert (r.nonfinite_in_a_row, r.longest_nonfinite_run, r.skipped_steps) == (2, 2, 5)


def test_a_nonfinite_loss_whose_update_was_applied_is_reported():
    stats = StepStats("bf16", "cpu", 1)
    _record(stats, float("inf"), skipped=False)
    assert stats.read().applied_nonfinite == 1


def test_fp16_loss_scale_calibration_is_not_divergence():
    """DeepSpeed skips every fp16 overflow (grad norm inf); starting at 2**16 the scaler overflows
    several steps in a row, which must not count towards max_nonfinite_in_a_row."""
    fp16 = StepStats("fp16", "cpu", 1)
    for _ in range(7):
        _record(fp16, 7.5, skipped=True, norm=float("inf"))
    r = fp16.read()
    assert (r.skipped_steps, r.longest_nonfinite_run) == (7, 0)
    _record(fp16, float("nan"), skipped=True, norm=float("inf"))
    assert fp16.read().nonfinite_in_a_row == 1
    bf16 = StepStats("bf16", "cpu", 1)
    _record(bf16, 7.5, skipped=True, norm=float("inf"))
    assert bf16.read().nonfinite_in_a_row == 1
