"""Training processes die with the launcher that started them.

torchrun starts each worker in a session of its own, so when torchrun's agent is SIGKILLed (the
OOM killer, a node agent) nothing reaches the workers: they would train on as orphans, and a
restart would run two trainers on one run directory. A worker therefore asks the kernel to
SIGKILL it when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, Linux), at process start.

Why SIGKILL and not SIGTERM: SIGTERM means "finish the step, save and exit" in this framework; an
orphan must not save (its peers may be gone; the last complete checkpoint stays the newest).

Why the kernel and not only a polling thread: it also works while the Python main thread is stuck
in C code holding the GIL, and costs nothing. A thread that polls ``getppid()`` once a second is
the fallback where ``prctl`` is missing (macOS).

Who is "the parent": the process that exec'd us -- torchrun's agent, the ``deepspeed`` launcher's
per-node ``launch`` process, or ``slurmstepd`` under srun. Only processes started by a launcher
(RANK / LOCAL_RANK / WORLD_SIZE / SLURM_PROCID set) are armed: a plain ``python -m pretrain train``
is the user's own process, and ``nohup ... &`` followed by closing the shell must keep it running.

DataLoader worker processes need nothing from us: torch's worker loop checks every 5 s that its
parent (the trainer) is still alive and exits when it is not (``ManagerWatchdog``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

from pretrain.errors import stderr_line

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "TORCHELASTIC_RUN_ID")


def started_by_launcher(environ: dict | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(k in env for k in LAUNCHER_ENV)


def arm_parent_death(parent_pid: int, poll_s: float = 1.0) -> str:
    """Make this process die (SIGKILL) when ``parent_pid``, its parent, dies; returns how.

    ``parent_pid`` is ``os.getppid()`` read as early as possible in the process: if the parent
    died before ``prctl`` ran, the kernel will never send the signal, so it is compared with the
    current parent afterwards and the process kills itself at once.
    """
    how = "prctl" if _prctl_pdeathsig(signal.SIGKILL) else "thread"
    if how == "thread":
        threading.Thread(target=_watch_parent, args=(parent_pid, poll_s), name="parent-watchdog", daemon=True).start()
    if os.getppid() != parent_pid:
        _die(parent_pid)
    return how


def _prctl_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    _die(parent_pid)


def _die(parent_pid: int) -> None:
    """An orphan: no save, no exit handlers (they could write to the run directory)."""
    stderr_line(f"pretrain: parent process {parent_pid} is gone; exiting without saving")
    os.kill(os.getpid(), signal.SIGKILL)
