"""Fault injection at named points of the save protocol: the crash and the disk-full case."""

from __future__ import annotations

import errno

import pytest
from _ckpt_fakes import make

from pretrain.checkpoint import TrainState, find_latest_complete, list_checkpoints
from pretrain.errors import UserError
from pretrain.faults import FAULT_ENV, POINTS, Fault, fault_point, parse


def test_parse_spec_forms():
    assert parse("after_shards") == Fault("after_shards", None, "kill")
    assert parse("after_marker@6") == Fault("after_marker", 6, "kill")
    assert parse("after_engine@4:enospc") == Fault("after_engine", 4, "enospc")
    for bad in ("after_shard", "after_shards@x", "after_shards:explode", "@4"):
        with pytest.raises(UserError, match=FAULT_ENV):
            parse(bad)


def test_only_the_named_point_and_step_fail(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "after_rank_file@4:enospc")
    fault_point("after_rank_file", 3)
    fault_point("after_engine", 4)
    with pytest.raises(OSError) as e:
        fault_point("after_rank_file", 4)
    assert e.value.errno == errno.ENOSPC


@pytest.mark.parametrize("point", [p for p in POINTS if p not in ("step", "after_marker", "after_latest")])
def test_disk_full_at_each_point_before_the_marker_keeps_the_previous_checkpoint(tmp_path, monkeypatch, point):
    c = make(tmp_path)
    c.save(TrainState(step=2), {"pos": 2})
    monkeypatch.setenv(FAULT_ENV, f"{point}@4:enospc")
    with pytest.raises(OSError, match="No space left"):
        c.save(TrainState(step=4), {"pos": 4})
    assert find_latest_complete(tmp_path / "checkpoints").name == "step_00000002"
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4]  # step 4 left incomplete
    monkeypatch.delenv(FAULT_ENV)
    assert make(tmp_path).resume()[1] == {"pos": 2}
