"""The optimizer step that never waits on the host: clipping, the non-finite skip and the learning
rate are tensors on the device.

DeepSpeed's optimizer wrappers decide "was this gradient finite?" on the host: a per-parameter
``amax``/``amin``/norm loop, then ``.item()``, which blocks the host until every kernel of the
backward pass has run. The GPU then idles while the host launches the optimizer's kernels one by
one. Here the same decision stays on the device, the way ``torch.amp.GradScaler`` hands it to the
fused AdamW kernel:

- :class:`StepGuard` turns the step's global gradient norm into ``found_inf`` (1.0 when the norm is
  NaN/Inf) and the clip divisor ``max(1, norm / grad_clip)``;
- :class:`GuardedAdamW` is ``torch.optim.AdamW(fused=True)`` fed with both: the kernel divides the
  gradients by the clip divisor and, when ``found_inf`` is set, leaves parameters, moments and its
  step counter untouched: the update is skipped on the device, identically on every rank (the norm
  is global);
- :class:`LRSchedule` is the learning rate as a device tensor, looked up from a table by the number
  of updates applied so far, so a skipped update does not advance the schedule either.

The loop learns about skipped steps when it reads the step's statistics on a logging step
(:mod:`pretrain.stepstats`). Where DeepSpeed runs its own step (see
:func:`pretrain.engine.precision_path`), the same classes run in host mode: DeepSpeed decides the
skip, calls the optimizer only for applied updates and the schedule advances on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CLIP_EPS = 1e-6  # DeepSpeed's: the clip divisor is (norm + eps) / grad_clip


class StepGuard:
    """The step's global gradient norm and, derived on the device, ``found_inf`` and the clip divisor."""

    def __init__(self, grad_clip: float, device: torch.device | str):
        self.grad_clip = grad_clip
        self.norm = torch.zeros((), dtype=torch.float32, device=device)  # pre-clip global norm
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)  # 1.0: skip this update
        self.clip_divisor: torch.Tensor | None = None  # None without clipping

    def set_norm(self, norm: torch.Tensor) -> None:
        """Record the step's global norm; the NaN/Inf test and the clip divisor follow on the device."""
        self.norm = norm.float()
        self.found_inf = torch.isfinite(self.norm).logical_not().float()
        if self.grad_clip > 0:
            self.clip_divisor = ((self.norm + CLIP_EPS) / self.grad_clip).clamp(min=1.0)

    def set_squared_norm(self, squared: torch.Tensor) -> None:
        self.set_norm(squared.sqrt())


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all ``tensors`` as one fp64 scalar: one multi-tensor kernel, not a loop per
    tensor, accumulated in fp64 as DeepSpeed's norms are (fp32 sums over millions of elements
    drift: 1e-4 relative on the CPU test model)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square().sum()


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all ``tensors`` as one vector (see :func:`squared_norm`)."""
    return squared_norm(tensors).sqrt()


class GuardedAdamW(torch.optim.AdamW):
    """Fused AdamW whose clipping and non-finite skip happen inside the kernel (see module doc).

    ``owns_norm``: the optimizer computes the global norm from its own gradients (ZeRO-0, where
    DeepSpeed calls it directly with all-reduced gradients); otherwise the caller sets ``guard``'s
    norm first (ZeRO-1/2: the norm spans every rank's partition). ``guard=None`` is host mode:
    DeepSpeed clipped and decided the skip itself.
    """

    def __init__(self, params, guard: StepGuard | None, owns_norm: bool = False, **kw):
        super().__init__(params, fused=True, **kw)
        self.guard = guard
        self.owns_norm = owns_norm
        self.schedule: LRSchedule | None = None  # set by LRSchedule
        self.overflow = False  # DeepSpeed's engine reads it; with a guard the skip happens on the device

    @torch.no_grad()
    def step(self, closure=None):
        if self.schedule is not None:
            self.schedule.link(self.param_groups)  # a checkpoint load replaces the groups' values
        if self.guard is not None:
            if self.owns_norm:
                grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
                self.guard.set_norm(global_norm(grads))
            self.found_inf = self.guard.found_inf  # read by AdamW.step (GradScaler's protocol)
            self.grad_scale = self.guard.clip_divisor
            self._global_grad_norm = self.guard.norm  # read by DeepSpeed's engine after step()
        return super().step(closure)


class LRSchedule:
    """``optim.lr`` x schedule, by updates applied so far; DeepSpeed's ``lr_scheduler`` contract.

    Device mode (``guard`` given): ``lr`` is one float32 device tensor shared by every parameter
    group; after each optimizer step DeepSpeed calls :meth:`step`, which adds ``1 - found_inf`` to
    the applied count and looks the next rate up in a precomputed table, all on the device. Host
    mode (``guard=None``): DeepSpeed calls :meth:`step` only after an applied update and the
    groups get Python floats (DeepSpeed's CPU Adam reads them as such).

    The state saved with a checkpoint is the applied count; a checkpoint of the former
    ``LambdaLR`` (its ``last_epoch`` counted applied updates too) loads as well.
    """

    def __init__(self, optimizer, factor: Callable[[int], float], base_lr: float, horizon: int,
                 guard: StepGuard | None, device: torch.device | str):
        self.optimizer = optimizer
        self.guard = guard
        self.horizon = horizon  # the schedule is flat past its last step
        rates = [base_lr * factor(i) for i in range(horizon + 1)]
        self.host_rates = rates
        optimizer.schedule = self
        if guard is None:
            self.applied: torch.Tensor | int = 0
            self.lr: torch.Tensor | float = rates[0]
        else:
            self.table = torch.tensor(rates, dtype=torch.float32, device=device)
            self.applied = torch.zeros((), dtype=torch.int64, device=device)
            self.lr = self.table[0].clone()
        self.link(optimizer.param_groups)

    def link(self, groups) -> None:
        """Point every parameter group at the current rate (cheap: dict assignments)."""
        for g in groups:
            g["lr"] = self.lr

    def step(self, *args, **kwargs) -> None:
        if self.guard is None:
            self.applied += 1
            self.lr = self.host_rates[min(self.applied, self.horizon)]
        else:
            self.applied += 1 - self.guard.found_inf.long()
            self.lr.copy_(torch.take(self.table, self.applied.clamp(max=self.horizon)))
        self.link(self.optimizer.param_groups)

    def current(self) -> torch.Tensor | float:
        """The rate the next update uses (a copy: :meth:`step` updates the device tensor in place)."""
        return self.lr.clone() if isinstance(self.lr, torch.Tensor) else self.lr

    def get_lr(self) -> list:
        return [self.lr for _ in self.optimizer.param_groups]

    def get_last_lr(self) -> list:
        return self.get_lr()

    def state_dict(self) -> dict:
        return {"applied": int(self.applied)}  # a host read: checkpoints are written between steps

    def load_state_dict(self, state: dict) -> None:
        self.set_applied(int(state["applied"] if "applied" in state else state["last_epoch"]))

    def set_applied(self, applied: int) -> None:
        if self.guard is None:
            self.applied = applied
            self.lr = self.host_rates[min(applied, self.horizon)]
        else:
            self.applied.fill_(applied)
            self.lr.copy_(self.table[min(applied, self.horizon)])
        self.link(self.optimizer.param_groups)
