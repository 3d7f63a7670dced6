"""Fault injection at named points of the checkpoint protocol, for crash and disk-full tests.

Production code calls :func:`fault_point` where a real failure would hurt most; nothing happens
unless ``PRETRAIN_CKPT_FAULT`` is set (also for subprocesses such as torchrun ranks)::

    PRETRAIN_CKPT_FAULT=POINT[@STEP][%RANK][:ACTION]

``POINT`` is one of :data:`POINTS`; ``@STEP`` limits it to the save (or training step) of that
step; ``%RANK`` to the process whose ``RANK`` environment variable (torchrun's global rank; 0 when
unset) is RANK, so one rank of a job fails while the others go on; ``ACTION`` is ``kill`` (the
default: SIGKILL, as a node failure would), ``enospc`` (raise ``OSError(ENOSPC)``, as a full disk
would) or ``stop`` (SIGSTOP: the process stalls there, as on a hung node or filesystem, until the
test sends SIGCONT; a lease test takes the run directory over meanwhile). Examples:
``after_shards@4``, ``after_rank_file:enospc``, ``after_engine@4%1:enospc``, ``before_marker@4%0:stop``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass

from pretrain.errors import UserError

log = logging.getLogger(__name__)

FAULT_ENV = "PRETRAIN_CKPT_FAULT"

# In the order a save reaches them ("step" is in Checkpointer.due, right after a training step).
POINTS = (
    "step",  # after a training step, outside any save
    "before_engine",  # step directory created, nothing written yet
    "after_engine",  # engine (DeepSpeed) shards of this rank written
    "after_rank_file",  # this rank's rank_NNNNN.json written
    "after_shards",  # every shard and rank file of this rank written (and run files on rank 0), no marker
    "before_marker",  # payload hashed, rank 0 about to write COMPLETE.json
    "after_marker",  # marker written, `latest` not moved
    "after_latest",  # `latest` moved, old checkpoints not pruned yet
)
ACTIONS = ("kill", "enospc", "stop")


@dataclass(frozen=True)
class Fault:
    point: str
    step: int | None = None  # None: at every step
    action: str = "kill"
    rank: int | None = None  # None: on every rank

    def matches(self, point: str, step: int) -> bool:
        return (point == self.point and (self.step is None or self.step == step)
                and (self.rank is None or self.rank == int(os.environ.get("RANK", "0"))))


def parse(spec: str) -> Fault:
    """``POINT[@STEP][%RANK][:ACTION]`` -> Fault; UserError naming the variable when malformed."""
    where, _, action = spec.partition(":")
    where, pct, rank = where.partition("%")
    point, _, at = where.partition("@")
    action = action or "kill"
    if (point not in POINTS or action not in ACTIONS or (at and not at.isdigit())
            or (pct and not rank.isdigit())):
        raise UserError(f"{FAULT_ENV}={spec!r}: expected POINT[@STEP][%RANK][:ACTION] with POINT one of "
                        f"{', '.join(POINTS)} and ACTION one of {', '.join(ACTIONS)}")
    return Fault(point, int(at) if at else None, action, int(rank) if pct else None)


def active() -> Fault | None:
    """The fault the environment asks for, if any (read at each call: tests set and unset it)."""
    spec = os.environ.get(FAULT_ENV, "")
    return parse(spec) if spec else None


def fault_point(point: str, step: int) -> None:
    """Fail here, at ``step``, when the environment's fault names this point; otherwise nothing."""
    assert point in POINTS, f"unknown fault point {point!r}"
    fault = active()
    if fault is None or not fault.matches(point, step):
        return
    if fault.action == "enospc":
        log.warning("fault injection %s: no space left on device at %s, step %d", FAULT_ENV, point, step)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {FAULT_ENV} at {point})")
    if fault.action == "stop":
        log.warning("fault injection %s: stopping this process at %s, step %d (until SIGCONT)", FAULT_ENV, point, step)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    log.warning("fault injection %s: killing this process at %s, step %d", FAULT_ENV, point, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
