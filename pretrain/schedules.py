"""Learning-rate schedules as pure functions of the optimizer step.

A schedule is ``lr_at(step)``: linear warmup from ``lr / warmup_steps`` to ``lr``, then one of

- ``cosine``: half a cosine from ``lr`` down to ``min_lr`` at ``max_steps``;
- ``wsd`` (warmup-stable-decay): ``lr`` until the last ``decay_fraction`` of ``max_steps``, then a
  linear decay to ``min_lr`` (lets a run be extended or branched from any stable checkpoint);
- ``constant``: ``lr`` forever.

Past ``max_steps`` the rate stays at its final value. Being pure, schedules are unit-tested
exactly; the engine turns one into a table of rates the device step reads by the number of
applied updates (``pretrain.optimizer.LRSchedule``, whose state, that number, DeepSpeed checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the first update uses ``lr_at(0)``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(max_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    # wsd: the decay phase is the last decay_fraction of the run, never overlapping warmup.
    decay_steps = int(round(decay_fraction * max_steps))
    decay_start = max(max_steps - decay_steps, warmup_steps)
    if step < decay_start or decay_steps == 0:
        return lr
    progress = min((step - decay_start) / max(max_steps - decay_start, 1), 1.0)
    return lr + (min_lr - lr) * progress


def lr_multiplier(optim_cfg, max_steps: int) -> Callable[[int], float]:
    """``step -> lr_at(step) / optim.lr``: the factor of the peak rate at each step."""
    peak = optim_cfg.lr

    def factor(step: int) -> float:
        return (
            lr_at(
                step,
                lr=peak,
                min_lr=optim_cfg.min_lr,
                warmup_steps=optim_cfg.warmup_steps,
                max_steps=max_steps,
                schedule=optim_cfg.schedule,
                decay_fraction=optim_cfg.decay_fraction,
            )
            / peak
        )

    return factor
