"""Fault injection at named points of the save protocol: the crash and the disk-full case."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections import namedtuple

import pytest
import torch
from _ckpt_fakes import FakeEngine, make

from pretrain.checkpoint import TrainState, is_complete, list_checkpoints
from pretrain.checkpoint.format import read_latest_pointer
from pretrain.errors import EXIT_DISK_FULL, DiskFullError, UserError
from pretrain.faults import FAULT_ENV, POINTS, Fault, fault_point, parse


def test_parse_spec_forms():
    assert parse("after_shards") == Fault("after_shards", None, "kill")
    assert parse("after_marker@6") == Fault("after_marker", 6, "kill")
    assert parse("after_engine@4:enospc") == Fault("after_engine", 4, "enospc")
    assert parse("before_marker@4%0:stop") == Fault("before_marker", 4, "stop", 0)
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


@pytest.mark.parametrize("point", [p for p in POINTS if p not in ("step", "after_latest")])
def test_disk_full_at_each_point_before_latest_keeps_the_previous_checkpoint(tmp_path, monkeypatch, point):
    c = make(tmp_path)
    c.save(TrainState(step=2), {"pos": 2})
    monkeypatch.setenv(FAULT_ENV, f"{point}@4:enospc")
    with pytest.raises(DiskFullError) as e:
        c.save(TrainState(step=4), {"pos": 4})
    ckpts = tmp_path / "checkpoints"
    msg = str(e.value)
    assert e.value.exit_status == EXIT_DISK_FULL and "\n" not in msg
    assert "no space left on device" in msg and str(ckpts) in msg and "rank 0: OSError" in msg
    assert f"{ckpts / 'step_00000004'} was removed" in msg and "still step_00000002" in msg
    assert f"rerun the same command: it resumes from {ckpts / 'step_00000002'}" in msg
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]  # the partial step 4 is gone
    assert read_latest_pointer(ckpts) == "step_00000002"
    monkeypatch.delenv(FAULT_ENV)
    assert make(tmp_path).resume()[1] == {"pos": 2}


def test_disk_full_after_latest_moved_keeps_the_new_complete_checkpoint(tmp_path, monkeypatch):
    c = make(tmp_path)
    c.save(TrainState(step=2), {"pos": 2})
    monkeypatch.setenv(FAULT_ENV, "after_latest@4:enospc")
    with pytest.raises(DiskFullError, match="the new checkpoint is complete and stays the newest"):
        c.save(TrainState(step=4), {"pos": 4})
    ckpts = tmp_path / "checkpoints"
    assert read_latest_pointer(ckpts) == "step_00000004" and is_complete(ckpts / "step_00000004")
    monkeypatch.delenv(FAULT_ENV)
    assert make(tmp_path).resume()[1] == {"pos": 4}


def test_disk_full_without_an_earlier_checkpoint_says_the_rerun_starts_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "after_engine@2:enospc")
    with pytest.raises(DiskFullError, match="still none.*it starts fresh"):
        make(tmp_path).save(TrainState(step=2), {"pos": 2})
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_a_full_disk_inside_torch_save_counts_as_disk_full(tmp_path, monkeypatch):
    """torch.save hides ENOSPC behind RuntimeErrors (seen on a full tmpfs); the free space decides."""
    engine = FakeEngine()

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1250688 vs 1250576")

    monkeypatch.setattr(engine, "save_checkpoint", full)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(5 << 20, 5 << 20, 0))
    with pytest.raises(DiskFullError, match=r"no space left on device .* \[rank 0: RuntimeError: \[enforce fail"):
        make(tmp_path, engine=engine).save(TrainState(step=2), {"pos": 2})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(5 << 30, 1 << 30, 4 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: not a full disk
        make(tmp_path, engine=engine).save(TrainState(step=2), {"pos": 2})


def test_another_error_in_a_save_keeps_its_own_traceback(tmp_path, monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(engine, "save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad tensor")))
    with pytest.raises(ValueError, match="bad tensor"):
        make(tmp_path, engine=engine).save(TrainState(step=2), {"pos": 2})
    assert not is_complete(tmp_path / "checkpoints" / "step_00000002")


def test_rank_targeted_fault(monkeypatch):
    assert parse("after_engine@4%1:enospc") == Fault("after_engine", 4, "enospc", rank=1)
    with pytest.raises(UserError, match=FAULT_ENV):
        parse("after_engine@4%x:enospc")
    monkeypatch.setenv(FAULT_ENV, "after_engine%1:enospc")
    monkeypatch.setenv("RANK", "0")
    fault_point("after_engine", 4)  # not this rank
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(OSError, match="No space left"):
        fault_point("after_engine", 4)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB filesystem (tmpfs; needs root and mount rights, else the test is skipped)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_a_really_full_filesystem_fails_the_save_as_disk_full(small_tmpfs):
    """torch.save on a full tmpfs raises RuntimeErrors without an errno: still a DiskFullError."""
    c = make(small_tmpfs)
    c.save(TrainState(step=2), {"pos": 2})
    c.engine.w = torch.zeros(400_000)  # 1.6 MB: does not fit
    with pytest.raises(DiskFullError, match="no space left on device"):
        c.save(TrainState(step=4), {"pos": 4})
    assert [s for s, _ in list_checkpoints(small_tmpfs / "checkpoints")] == [2]
    assert make(small_tmpfs).resume()[1] == {"pos": 2}


def test_a_save_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    c = make(tmp_path)
    c.save(TrainState(step=2), {"pos": 2})
    size = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "step_00000002").rglob("*") if f.is_file())
    Usage = namedtuple("Usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * size, 9 * size, size // 2))
    for ckpt in (c, make(tmp_path)):  # the size is known after a save and after a resume
        if ckpt is not c:
            ckpt.resume()
        with pytest.raises(DiskFullError, match=r"step 4 not started: no space left on device .* still step_00000002"):
            ckpt.save(TrainState(step=4), {"pos": 4})
        assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
    monkeypatch.setattr(shutil, "disk_usage", real)
    c.save(TrainState(step=4), {"pos": 4})
