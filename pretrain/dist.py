"""Device, accelerator and process-group set-up shared by every command.

DeepSpeed picks its accelerator when first imported, so :func:`select_accelerator` must run
before ``import deepspeed``: without CUDA it selects DeepSpeed's CPU accelerator and gloo by
itself, so nobody has to remember ``DS_ACCELERATOR=cpu``.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from pretrain.errors import UserError, stderr_line


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: str  # "cuda:N" or "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def select_accelerator() -> str:
    """Choose DeepSpeed's accelerator ('cuda' or 'cpu') before deepspeed is imported."""
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if cuda_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def _env_int(*names: str, default: int) -> int:
    for n in names:
        v = os.environ.get(n, "")
        if v.isdigit():
            return int(v)
    return default


def local_rank() -> int:
    """This process's rank on its node, from the launcher (torchrun/deepspeed: LOCAL_RANK; srun: SLURM_LOCALID)."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU); idempotent.

    Works for plain ``python`` (one process: a local rendezvous is set up), ``torchrun``, the
    ``deepspeed`` launcher and SLURM (SLURM_PROCID/SLURM_NTASKS when RANK is not set).
    ``timeout_s`` bounds every collective (train.collective_timeout_s); on CUDA, NCCL's async
    error handling is on (unless set) so a timed-out collective ends the process instead of hanging.
    """
    accel = select_accelerator()
    import torch
    import torch.distributed as torch_dist

    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = local_rank()
    if world > 1 and "MASTER_ADDR" not in os.environ and _env_int("SLURM_NNODES", default=1) > 1:
        raise UserError(
            f"srun started {world} ranks on {os.environ['SLURM_NNODES']} nodes (SLURM_NNODES) but MASTER_ADDR is not "
            "set, so ranks on other nodes cannot reach rank 0: use launch/slurm.sbatch (torchrun), or export "
            "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) and MASTER_PORT"
        )
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port()) if world == 1 else "29500"
    backend = "nccl" if accel == "cuda" else "gloo"
    if accel == "cuda":
        torch.cuda.set_device(local)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not torch_dist.is_initialized():
        import deepspeed

        timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **timeout)
    device = f"cuda:{local}" if accel == "cuda" else "cpu"
    return DistInfo(torch_dist.get_rank(), local, torch_dist.get_world_size(), backend, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove ``--local_rank=N`` (deepspeed launcher) from argv, recording it in LOCAL_RANK."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


# --------------------------------------------------------------------------------------------
# Collectives that degrade to no-ops in a single process (plain `python`, unit tests)
# --------------------------------------------------------------------------------------------


def dist_on() -> bool:
    """True when more than one rank takes part, i.e. when a collective must really run."""
    import torch.distributed as torch_dist  # torch loads on first use: the CLI parses configs without it

    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def barrier() -> None:
    if dist_on():
        import torch.distributed as torch_dist  # torch loads on first use, see dist_on

        torch_dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (any picklable object)."""
    if not dist_on():
        return obj
    import torch.distributed as torch_dist  # torch loads on first use, see dist_on

    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, indexed by rank, on every rank."""
    if not dist_on():
        return [obj]
    import torch.distributed as torch_dist  # torch loads on first use, see dist_on

    out: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_flag(flag: bool, device: str, src: int = 0) -> bool:
    """Rank ``src``'s boolean on every rank, as a tensor on ``device`` (NCCL needs CUDA tensors)."""
    if not dist_on():
        return flag
    import torch  # torch loads on first use, see dist_on
    import torch.distributed as torch_dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch_dist.broadcast(t, src=src)
    return bool(t.item())


class LateAgreement:
    """Every rank's boolean requests OR-ed over all ranks, delivered one call late, never waiting
    on the device.

    ``exchange(flags)`` returns what the ranks asked for at the previous call and starts an
    asynchronous all-reduce of ``flags`` on a CPU-only (gloo) group. The loop calls it once per
    step on every rank, so by the next step the reduction has long finished and every rank gets
    the same answer at the same step; the buffer is host memory (numpy), so reading it is not a
    device sync even when training runs on GPUs over NCCL. With one rank there is nothing to agree
    on and ``exchange`` returns ``flags`` at once.
    """

    def __init__(self, n: int, timeout_s: float | None = None):
        import numpy as np  # host buffers only: torch loads on first use, see dist_on
        import torch
        import torch.distributed as torch_dist

        self.n = n
        self._all_reduce, self._sum = torch_dist.all_reduce, torch_dist.ReduceOp.SUM
        self._buf = np.zeros(n, dtype=np.int32)
        self._tensor = torch.from_numpy(self._buf)  # shares the buffer: gloo writes, numpy reads
        self._work = None
        self._group = None
        if dist_on():
            timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
            self._group = torch_dist.new_group(backend="gloo", **timeout)

    def exchange(self, flags: tuple[bool, ...]) -> tuple[bool, ...]:
        """The previous call's flags agreed over all ranks (all False on the first call)."""
        if self._group is None:
            return tuple(flags)
        agreed = self._wait()
        self._buf[:] = [1 if f else 0 for f in flags]
        self._work = self._all_reduce(self._tensor, op=self._sum, group=self._group, async_op=True)
        return agreed

    def now(self, flags: tuple[bool, ...]) -> tuple[bool, ...]:
        """Agree on ``flags`` synchronously (between steps: after an evaluation or a save)."""
        if self._group is None:
            return tuple(flags)
        self.exchange(flags)
        return self._wait()

    def close(self) -> None:
        """Finish the reduction in flight (every rank has exactly one), so none is left behind."""
        self._wait()

    def _wait(self) -> tuple[bool, ...]:
        if self._work is None:
            return (False,) * self.n
        self._work.wait()
        self._work = None
        return tuple(bool(v) for v in self._buf)


def exit_process(code: int | str | None) -> NoReturn:
    """End a command's process; one that used torch.distributed skips interpreter finalization.

    DeepSpeed keeps its process groups in module globals, so they outlive
    ``destroy_process_group`` and are freed during finalization, where a gloo worker thread that
    drops a tensor needs the GIL and aborts the process ("terminate called without an active
    exception", SIGABRT): a finished run would report failure to torchrun or SLURM. So the groups
    are destroyed and the exit handlers (wandb, multiprocessing, logging) run while Python is fully
    alive, and the process then leaves with ``os._exit``.
    """
    torch_dist = sys.modules.get("torch.distributed")
    if torch_dist is None or not torch_dist.is_available() or not torch_dist.is_initialized():
        sys.exit(code)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        stderr_line(code)
    torch_dist.destroy_process_group()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
