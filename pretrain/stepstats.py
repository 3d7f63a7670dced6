"""What the loop needs to know about its steps, kept on the device until a logging step.

Reading any value the device computed (``float(loss)``, a NaN test, a gradient norm) makes the
host wait for every kernel queued before it, so the host can no longer run ahead and the GPU
idles while the next step is launched. :class:`StepStats` therefore accumulates, with a handful
of device ops per step and no read:

- the last step's loss (this rank's) and global gradient norm;
- updates skipped (the optimizer step's ``found_inf``, identical on every rank: the norm is global);
- the current run of non-finite steps and the longest run since the last read.

:meth:`StepStats.read` is the one host sync, on logging steps and before any decision that needs
the counts (a save, a stop): with several ranks two all-reduces (the summed loss for the mean; the
largest counts, so every rank decides alike), then one ``tolist``.

A step is non-finite when its loss is NaN/Inf or its update was skipped. With fp16 a skipped update
with a finite loss is the loss scaler calibrating, not a failure (a start at 2**16 overflows several
steps in a row); a real fp16 divergence ends in DeepSpeed's own error at its minimum loss scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """Host values of :class:`StepStats` at one read, identical on every rank."""

    loss: float  # the mean over ranks of the last step's loss
    grad_norm: float  # the last step's global gradient norm (pre-clip; NaN/Inf when skipped)
    skipped_steps: int  # updates skipped since the stats began (a resumed run adds its own)
    nonfinite_in_a_row: int  # non-finite steps ending with the last one
    longest_nonfinite_run: int  # the longest such run since the previous read
    applied_nonfinite: int  # since the previous read: non-finite losses whose update was applied (must stay 0)


class StepStats:
    """Device-side per-step accounting (see module doc); one per training loop."""

    def __init__(self, precision: str, device: str, world_size: int):
        self.precision = precision
        self.world_size = world_size
        # [skipped, non-finite in a row, longest run since read, applied although non-finite since read]
        self._counts = torch.zeros(4, dtype=torch.float64, device=device)
        self._loss = torch.zeros((), dtype=torch.float32, device=device)
        self._norm = torch.zeros((), dtype=torch.float32, device=device)
        self.steps_unread = 0  # steps recorded since the last read (a host count)

    def record(self, loss: torch.Tensor, found_inf: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Account one optimizer step; device ops only."""
        self._loss = loss.detach().float()
        self._norm = grad_norm.float()
        skipped = found_inf.double()
        nonfinite_loss = torch.isfinite(self._loss).logical_not().double()
        bad = nonfinite_loss if self.precision == "fp16" else torch.maximum(nonfinite_loss, skipped)
        c = self._counts
        self.steps_unread += 1
        in_a_row = (c[1] + 1) * bad
        self._counts = torch.stack([c[0] + skipped, in_a_row, torch.maximum(c[2], in_a_row),
                                    c[3] + nonfinite_loss * (1 - skipped)])

    def read(self) -> StepReport:
        """The host values (the one host sync; see module doc); starts the next read's window."""
        counts = self._counts
        loss = self._loss.double().reshape(1)  # a new tensor: the all-reduce leaves _loss as it is
        if self.world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            counts = counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        loss_v, norm_v, skipped, in_a_row, longest, applied_bad = torch.cat(
            [loss / self.world_size, self._norm.double().reshape(1), counts]).tolist()
        c = self._counts
        self._counts = torch.stack([c[0], c[1], c[1], torch.zeros_like(c[3])])
        self.steps_unread = 0
        report = StepReport(loss_v, norm_v, int(skipped), int(in_a_row), int(longest), int(applied_bad))
        if report.applied_nonfinite:
            log.error("%d step(s) with a non-finite loss had their update applied", report.applied_nonfinite)
        return report
