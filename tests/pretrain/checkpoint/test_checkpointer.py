"""The Checkpointer in one process: when to save, crashes inside a save, resume of engine,
loader and RNG, and the loader reshard when data.num_workers changes."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _ckpt_fakes import INFO, Crash, FakeEngine, arm_crash, make

import pretrain.checkpoint.checkpointer as checkpointer_module
from pretrain.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointError,
    TrainState,
    find_latest_complete,
    is_complete,
)
from pretrain.config import load_config
from pretrain.errors import LeaseLostError
from pretrain.faults import FAULT_ENV
from pretrain.run_lease import LEASE_NAME, RunLease, generation_file, generations


def test_resume_restores_engine_state_loader_and_rng(tmp_path):
    c = make(tmp_path)
    c.save(TrainState(step=2, tokens_seen=10, extra={"k": 1}), {"pos": 3})
    expect_w = c.engine.w.clone()
    expect_draws = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # disturb every RNG
    fresh = make(tmp_path, engine=FakeEngine(seed=5))
    state, loader = fresh.resume()
    assert state == TrainState(step=2, tokens_seen=10, extra={"k": 1}) and loader == {"pos": 3}
    assert torch.equal(fresh.engine.w, expect_w)
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == expect_draws[0] and draws[1] == expect_draws[1] and torch.equal(draws[2], expect_draws[2])


def test_crash_before_marker_keeps_previous_checkpoint(tmp_path, monkeypatch, caplog):
    c = make(tmp_path)
    c.save(TrainState(step=2), {"pos": 2})
    w2 = c.engine.w.clone()
    c.engine.w = c.engine.w + 1
    arm_crash(monkeypatch, "after_shards@4")
    with pytest.raises(Crash):
        c.save(TrainState(step=4), {"pos": 4})
    step4 = tmp_path / "checkpoints" / "step_00000004"
    assert (step4 / "engine").is_dir() and not (step4 / MARKER).exists()  # shards written, no marker
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert find_latest_complete(tmp_path / "checkpoints").name == "step_00000002"

    fresh = make(tmp_path, engine=FakeEngine(seed=3))
    with caplog.at_level(logging.INFO, logger="pretrain.checkpoint"):
        state, loader = fresh.resume()
    assert state.step == 2 and loader == {"pos": 2} and torch.equal(fresh.engine.w, w2)
    assert "ignoring incomplete checkpoint(s) step_00000004" in caplog.text
    assert "resumed from" in caplog.text and "step_00000002" in caplog.text
    # The next save of step 4 replaces the leftover and completes.
    os.environ.pop(FAULT_ENV)
    fresh.save(TrainState(step=4), {"pos": 4})
    assert is_complete(step4)


def test_crash_after_marker_resumes_from_newest_complete(tmp_path, monkeypatch, caplog):
    c = make(tmp_path)
    c.save(TrainState(step=2), {"pos": 2})
    arm_crash(monkeypatch, "after_marker@4")
    with pytest.raises(Crash):
        c.save(TrainState(step=4), {"pos": 4})
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # pointer lags
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        state, _ = make(tmp_path).resume()
    assert state.step == 4
    assert "newest complete checkpoint is step_00000004" in caplog.text


def test_save_of_an_already_saved_step_is_a_noop(tmp_path):
    c = make(tmp_path)
    p1 = c.save(TrainState(step=2), {"pos": 1})
    before = (Path(p1) / MARKER).read_text()
    assert c.save(TrainState(step=2), {"pos": 999}) == p1  # e.g. save-on-exit after a periodic save
    assert (Path(p1) / MARKER).read_text() == before
    assert json.loads((Path(p1) / "rank_00000.json").read_text())["loader"] == {"pos": 1}


def test_auto_ignores_damaged_newest_only_when_incomplete(tmp_path):
    """auto picks the newest COMPLETE checkpoint; a tampered newest one is refused, not skipped."""
    c = make(tmp_path)
    c.save(TrainState(step=2), {})
    step4 = Path(c.save(TrainState(step=4), {}))
    (step4 / "rank_00000.json").write_text((step4 / "rank_00000.json").read_text().replace('"step": 4', '"step": 5'))
    with pytest.raises(CheckpointError, match="rank_00000.json"):
        make(tmp_path).resume()


def test_due_by_steps_and_wall_clock(tmp_path, monkeypatch):
    c = make(tmp_path, "checkpoint.every_steps=3")
    assert [s for s in range(1, 10) if c.due(s)] == [3, 6, 9]
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    c = make(tmp_path, "checkpoint.every_steps=0", "checkpoint.every_minutes=1")
    assert not c.due(1)
    now[0] += 61
    assert c.due(2)
    c.save(TrainState(step=2), {})
    assert not c.due(3)  # the clock restarts at each save


def test_a_complete_checkpoint_this_run_did_not_write_is_replaced(tmp_path):
    make(tmp_path).save(TrainState(step=4), {"pos": "old"})
    step4 = Path(make(tmp_path, "checkpoint.resume=never", "checkpoint.overwrite=true").save(TrainState(step=4), {"pos": "new"}))
    assert json.loads((step4 / "rank_00000.json").read_text())["loader"] == {"pos": "new"}
    assert is_complete(step4)


def test_unwritable_checkpoint_dir_is_a_user_error_naming_it(tmp_path):
    blocker = tmp_path / "ckpts"
    blocker.write_text("a file where the directory should be")
    c = Checkpointer(load_config(None, [f"checkpoint.dir={blocker}"]), FakeEngine(), INFO, None)
    with pytest.raises(CheckpointError, match=r"cannot create checkpoint directory .*ckpts/step_00000001 \(checkpoint.dir\)"):
        c.save(TrainState(step=1), {})


def test_changing_data_num_workers_on_resume_reshards_the_loader_state(tmp_path, monkeypatch):
    """Same world size, other data.num_workers: the saved per-rank state has another number of
    streams, which the loader refuses as is; the checkpointer reshards it (as for a new world)."""
    make(tmp_path).save(TrainState(step=2), {"workers": 1, "pos": 7})
    calls = []

    def reshard(states, world, num_workers):
        calls.append((states, world, num_workers))
        return [{"workers": max(1, num_workers), "pos": states[0]["pos"]}] * world

    monkeypatch.setattr(checkpointer_module, "reshard_states", reshard)
    assert make(tmp_path, "data.num_workers=1").resume()[1] == {"workers": 1, "pos": 7} and calls == []  # as saved
    assert make(tmp_path, "data.num_workers=2").resume()[1] == {"workers": 2, "pos": 7}
    assert calls == [([{"workers": 1, "pos": 7}], 1, 2)]


# --------------------------------------------------------------------------------------------
# A save in a run directory whose lease another job took over
# --------------------------------------------------------------------------------------------


def _take_over(run_dir: Path) -> None:
    """Another job (on another host) takes the run directory's lease over, as after a stall."""
    lease_dir = run_dir / LEASE_NAME
    now = time.time()
    generation_file(lease_dir, generations(lease_dir)[-1] + 1).write_text(json.dumps(dict(
        host="othernode", pid=4242, job_id="777", started=now, heartbeat=now, token="successor")))


def test_a_save_after_the_lease_was_lost_writes_nothing(tmp_path):
    lease = RunLease.acquire(tmp_path, 10, 60, start_heartbeat=False)
    c = make(tmp_path, "checkpoint.keep_last=1")
    c.lease = lease
    c.save(TrainState(step=2), {"pos": 2})
    _take_over(tmp_path)
    with pytest.raises(LeaseLostError, match=r"lost the directory's lease to another job \(generation 2: host othernode"):
        c.save(TrainState(step=4), {"pos": 4})
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["latest", "step_00000002"]


class TakenOverWhileSaving(FakeEngine):
    """The lease is lost while the engine writes its shards (the holder stalled meanwhile)."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir
        self.take_over = False

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        super().save_checkpoint(save_dir, tag, client_state, save_latest)
        if self.take_over:
            _take_over(self.run_dir)


def test_a_save_whose_lease_is_lost_midway_is_never_marked_pointed_at_or_pruned(tmp_path):
    lease = RunLease.acquire(tmp_path, 10, 60, start_heartbeat=False)
    engine = TakenOverWhileSaving(tmp_path)
    c = make(tmp_path, "checkpoint.keep_last=1", engine=engine)
    c.lease = lease
    c.save(TrainState(step=2), {"pos": 2})
    engine.take_over = True
    with pytest.raises(LeaseLostError, match=r"generation 2: host othernode, pid 4242, SLURM job 777"):
        c.save(TrainState(step=4), {"pos": 4})
    ckpts = tmp_path / "checkpoints"
    assert not (ckpts / "step_00000004" / MARKER).exists()  # the shards in flight were written, never marked
    assert (ckpts / "latest").read_text().strip() == "step_00000002" and is_complete(ckpts / "step_00000002")
