"""Rank-aware logging shared by both packages.

Global rank 0 logs at the configured level; other ranks log warnings and errors only, unless
asked (``run.log_all_ranks=true`` or ``LOG_ALL_RANKS=1``), so an 8-GPU job prints one story.
"""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname).1s [%(rank_tag)s%(name)s] %(message)s"


def global_rank() -> int:
    """The launcher's global rank (torchrun/deepspeed set RANK; SLURM sets SLURM_PROCID)."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world: bool):
        super().__init__()
        self.tag = f"rank {rank} " if world else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_tag = self.tag
        return True


def setup_logging(level: str = "info", all_ranks: bool = False) -> None:
    """Configure the root logger once per process (idempotent)."""
    rank = global_rank()
    all_ranks = all_ranks or os.environ.get("LOG_ALL_RANKS") == "1"
    wanted = getattr(logging, level.upper(), logging.INFO)
    effective = wanted if (rank == 0 or all_ranks) else max(wanted, logging.WARNING)
    multi = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_pretrain", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._pretrain = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_RankFilter(rank, multi))
    root.addHandler(handler)
    root.setLevel(effective)
    # Third-party chatter stays at warnings unless debugging.
    for noisy in ("datasets", "urllib3", "filelock", "fsspec", "DeepSpeed", "deepspeed", "wandb"):
        logging.getLogger(noisy).setLevel(max(effective, logging.WARNING) if wanted > logging.DEBUG else logging.DEBUG)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
