"""Shared by the in-process checkpoint tests: an engine stand-in and a Checkpointer factory.

The stand-in writes and reads one torch file the way DeepSpeed's save_checkpoint /
load_checkpoint do, so these tests run in milliseconds; the real DeepSpeed engine under 2 ranks
is covered by tests/pretrain/test_checkpoint_resume.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from pretrain.checkpoint import Checkpointer
from pretrain.config import load_config
from pretrain.dist import DistInfo
from pretrain.faults import FAULT_ENV

INFO = DistInfo(rank=0, local_rank=0, world_size=1, backend="gloo", device="cpu")


class FakeEngine:
    """save_checkpoint/load_checkpoint with DeepSpeed's signatures and directory convention."""

    def __init__(self, seed: int = 0):
        self.w = torch.randn(8, generator=torch.Generator().manual_seed(seed))
        self._config = SimpleNamespace(load_universal_checkpoint=False)
        self.loads = 0

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": self.w}}, d / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag=None, **kw):
        self.loads += 1
        self.w = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]["w"]
        return load_dir, {}


class Crash(Exception):
    pass


def make(tmp_path: Path, *overrides: str, engine: FakeEngine | None = None, tok: Path | None = None) -> Checkpointer:
    cfg = load_config(None, [f"checkpoint.dir={tmp_path / 'checkpoints'}", "checkpoint.every_steps=2", *overrides])
    return Checkpointer(cfg, engine or FakeEngine(), INFO, str(tok) if tok else None)


def arm_crash(monkeypatch, spec: str) -> None:
    """Turn the fault-injection SIGKILL into an exception: the save stops exactly there."""
    monkeypatch.setenv(FAULT_ENV, spec)

    def kill(pid, sig):
        raise Crash(spec)

    monkeypatch.setattr(os, "kill", kill)
