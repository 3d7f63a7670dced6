"""Checkpoint protocol in one process: layout, marker-last atomicity, crashes inside a save,
pruning, resume modes, refusal of truncated / foreign / tampered checkpoints, RNG round trip.

A stand-in engine writes and reads one torch file the way DeepSpeed's save_checkpoint /
load_checkpoint do, so these tests run in milliseconds; the real DeepSpeed engine under 2 ranks
is covered by test_checkpoint_resume.py.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pretrain.checkpoint as ck
from pretrain.checkpoint import MARKER, Checkpointer, CheckpointError, TrainState
from pretrain.config import load_config
from pretrain.dist import DistInfo
from pretrain.fileio import sha256_file

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


def make(tmp_path: Path, *overrides: str, engine: FakeEngine | None = None, tok: Path | None = None):
    cfg = load_config(None, [f"checkpoint.dir={tmp_path / 'checkpoints'}", "checkpoint.every_steps=2", *overrides])
    return Checkpointer(cfg, engine or FakeEngine(), INFO, str(tok) if tok else None)


@pytest.fixture
def crash_at(monkeypatch):
    """Turn the fault-injection SIGKILL into an exception: the save stops exactly there."""

    def arm(spec: str):
        monkeypatch.setenv(ck.FAULT_ENV, spec)

        def kill(pid, sig):
            raise Crash(spec)

        monkeypatch.setattr(ck.os, "kill", kill)

    return arm


def test_save_layout_marker_and_latest(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"fake": "tokenizer"}')
    c = make(tmp_path, tok=tok)
    path = Path(c.save(TrainState(step=2, tokens_seen=64, wandb_run_id="abc"), {"pos": 7}))
    assert path.name == "step_00000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    marker = json.loads((path / MARKER).read_text())
    assert set(marker["files"]) >= {"engine/mp_rank_00_model_states.pt", "rank_00000.json", "meta.json",
                                    "config.yaml", "tokenizer.json"}
    for rel, info in marker["files"].items():  # every recorded hash is the file's real hash
        assert sha256_file(path / rel) == info["sha256"] and (path / rel).stat().st_size == info["size"]
    assert (path / "tokenizer.json").read_text() == tok.read_text()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 2 and meta["model"]["n_layers"] == c.cfg.model.n_layers
    assert meta["scrub_manifests"][0]["source"] == "main"
    rank = json.loads((path / "rank_00000.json").read_text())
    assert rank["loader"] == {"pos": 7} and rank["train_state"]["wandb_run_id"] == "abc"
    assert load_config(path / "config.yaml").checkpoint.dir == c.cfg.checkpoint.dir


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


def test_crash_before_marker_keeps_previous_checkpoint(tmp_path, crash_at, caplog):
    c = make(tmp_path)
    c.save(TrainState(step=2), {"pos": 2})
    w2 = c.engine.w.clone()
    c.engine.w = c.engine.w + 1
    crash_at("after_shards@4")
    with pytest.raises(Crash):
        c.save(TrainState(step=4), {"pos": 4})
    step4 = tmp_path / "checkpoints" / "step_00000004"
    assert (step4 / "engine").is_dir() and not (step4 / MARKER).exists()  # shards written, no marker
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert ck.find_latest_complete(tmp_path / "checkpoints").name == "step_00000002"

    fresh = make(tmp_path, engine=FakeEngine(seed=3))
    with caplog.at_level(logging.INFO, logger="pretrain.checkpoint"):
        state, loader = fresh.resume()
    assert state.step == 2 and loader == {"pos": 2} and torch.equal(fresh.engine.w, w2)
    assert "ignoring incomplete checkpoint(s) step_00000004" in caplog.text
    assert "resumed from" in caplog.text and "step_00000002" in caplog.text
    # The next save of step 4 replaces the leftover and completes.
    ck.os.environ.pop(ck.FAULT_ENV)
    fresh.save(TrainState(step=4), {"pos": 4})
    assert ck.is_complete(step4)


def test_crash_after_marker_resumes_from_newest_complete(tmp_path, crash_at, caplog):
    c = make(tmp_path)
    c.save(TrainState(step=2), {"pos": 2})
    crash_at("after_marker@4")
    with pytest.raises(Crash):
        c.save(TrainState(step=4), {"pos": 4})
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # pointer lags
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        state, _ = make(tmp_path).resume()
    assert state.step == 4
    assert "newest complete checkpoint is step_00000004" in caplog.text


def test_prune_keep_last_and_keep_every(tmp_path, crash_at):
    c = make(tmp_path, "checkpoint.keep_last=2", "checkpoint.keep_every=4")
    for step in range(1, 9):
        c.save(TrainState(step=step), {})
    names = sorted(p.name for _, p in ck.list_checkpoints(tmp_path / "checkpoints"))
    assert names == ["step_00000004", "step_00000007", "step_00000008"]
    crash_at("after_shards@9")
    with pytest.raises(Crash):
        c.save(TrainState(step=9), {})
    ck.os.environ.pop(ck.FAULT_ENV)
    c.save(TrainState(step=10), {})  # pruning after it removes the incomplete step 9
    names = sorted(p.name for _, p in ck.list_checkpoints(tmp_path / "checkpoints"))
    assert names == ["step_00000004", "step_00000008", "step_00000010"]
    # keep_last=1 keeps the newest complete one even when an incomplete newer directory exists.
    (tmp_path / "checkpoints" / "step_00000011").mkdir()
    assert ck.prune(tmp_path / "checkpoints", keep_last=1) and ck.find_latest_complete(tmp_path / "checkpoints").name == "step_00000010"


def test_save_of_an_already_saved_step_is_a_noop(tmp_path):
    c = make(tmp_path)
    p1 = c.save(TrainState(step=2), {"pos": 1})
    before = (Path(p1) / MARKER).read_text()
    assert c.save(TrainState(step=2), {"pos": 999}) == p1  # e.g. save-on-exit after a periodic save
    assert (Path(p1) / MARKER).read_text() == before
    assert json.loads((Path(p1) / "rank_00000.json").read_text())["loader"] == {"pos": 1}


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_marker", "foreign_marker", "rank_file_missing",
                                    "unlisted_shard"])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    c = make(tmp_path)
    step_dir = Path(c.save(TrainState(step=2), {"pos": 2}))
    shard = step_dir / "engine" / "mp_rank_00_model_states.pt"
    if damage == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        expect = [str(shard), "sha256"]
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
        expect = [str(shard), "truncated"]
    elif damage == "no_marker":
        (step_dir / MARKER).unlink()
        expect = [str(step_dir / MARKER), "missing"]
    elif damage == "foreign_marker":
        (step_dir / MARKER).write_text(json.dumps({"format": "something-else", "files": {}}))
        expect = [str(step_dir / MARKER), "foreign"]
    elif damage == "rank_file_missing":
        (step_dir / "rank_00000.json").unlink()
        expect = [str(step_dir / "rank_00000.json"), "missing"]
    else:  # DeepSpeed globs shard names: a planted file must not be loaded unhashed
        planted = step_dir / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        planted.write_bytes(b"not hashed")
        expect = [str(planted), "not listed"]
    engine = FakeEngine(seed=1)
    fresh = make(tmp_path, f"checkpoint.resume={step_dir}", engine=engine)
    with pytest.raises(CheckpointError) as e:
        fresh.resume()
    for part in expect:
        assert part in str(e.value)
    assert engine.loads == 0  # never half-loaded


def test_auto_ignores_damaged_newest_only_when_incomplete(tmp_path):
    """auto picks the newest COMPLETE checkpoint; a tampered newest one is refused, not skipped."""
    c = make(tmp_path)
    c.save(TrainState(step=2), {})
    step4 = Path(c.save(TrainState(step=4), {}))
    (step4 / "rank_00000.json").write_text((step4 / "rank_00000.json").read_text().replace('"step": 4', '"step": 5'))
    with pytest.raises(CheckpointError, match="rank_00000.json"):
        make(tmp_path).resume()


def test_resume_modes(tmp_path):
    assert make(tmp_path).resume() is None  # auto, nothing there: fresh start
    make(tmp_path).save(TrainState(step=2), {})
    with pytest.raises(CheckpointError, match="checkpoint.resume=never.*checkpoint.overwrite=true"):
        make(tmp_path, "checkpoint.resume=never").resume()
    assert make(tmp_path, "checkpoint.resume=never", "checkpoint.overwrite=true").resume() is None
    assert ck.list_checkpoints(tmp_path / "checkpoints") == []
    with pytest.raises(CheckpointError, match="does not exist"):
        make(tmp_path, f"checkpoint.resume={tmp_path / 'nope'}").resume()
    not_ckpt = tmp_path / "random_dir"
    not_ckpt.mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        make(tmp_path, f"checkpoint.resume={not_ckpt}").resume()


def test_resume_path_forms_and_model_mismatch(tmp_path):
    make(tmp_path).save(TrainState(step=2), {})
    make(tmp_path).save(TrainState(step=4), {})
    for form in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "step_00000002"):
        want = 2 if form.name.startswith("step_") else 4
        (tmp_path / "ckpt2").mkdir(exist_ok=True)
        c = make(tmp_path / "ckpt2", f"checkpoint.resume={form}")
        assert c.resume()[0].step == want
    with pytest.raises(CheckpointError, match=r"model.n_layers: checkpoint 6, config 2"):
        make(tmp_path, "model.n_layers=2").resume()


def test_rng_state_is_json_and_round_trips():
    state = json.loads(json.dumps(ck.rng_state()))
    a = (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist())
    ck.set_rng_state(state)
    assert (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist()) == a


def test_due_by_steps_and_wall_clock(tmp_path, monkeypatch):
    c = make(tmp_path, "checkpoint.every_steps=3")
    assert [s for s in range(1, 10) if c.due(s)] == [3, 6, 9]
    now = [1000.0]
    monkeypatch.setattr(ck.time, "monotonic", lambda: now[0])
    c = make(tmp_path, "checkpoint.every_steps=0", "checkpoint.every_minutes=1")
    assert not c.due(1)
    now[0] += 61
    assert c.due(2)
    c.save(TrainState(step=2), {})
    assert not c.due(3)  # the clock restarts at each save


def _forge_marker(step_dir: Path) -> None:
    """Rewrite the marker so its sizes and hashes match whatever lies in step_dir now."""
    marker = json.loads((step_dir / MARKER).read_text())
    marker["files"] = {rel: {"size": (step_dir / rel).stat().st_size, "sha256": sha256_file(step_dir / rel)}
                       for rel in ck._payload_files(step_dir)}
    (step_dir / MARKER).write_text(json.dumps(marker))


class _Payload:
    """Unpickling this calls Path.touch: stands in for code a forged checkpoint would run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_forged_checkpoint_with_matching_marker_never_runs_code(tmp_path):
    """DeepSpeed unpickles with weights_only=False; a shard holding more than tensors is refused
    (resume and export/generate) even when its marker was forged to match, before any load."""
    c = make(tmp_path)
    step_dir = Path(c.save(TrainState(step=2), {"pos": 2}))
    shard = step_dir / "engine" / "mp_rank_00_model_states.pt"
    ran = tmp_path / "code_ran"
    torch.save({"module": {"w": torch.zeros(8)}, "extra": _Payload(ran)}, shard)
    _forge_marker(step_dir)
    assert ck.is_complete(step_dir)
    engine = FakeEngine(seed=1)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: refused, it holds more than tensors"):
        make(tmp_path, engine=engine).resume()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        ck.verify_checkpoint(step_dir)  # export and generate go through this
    assert engine.loads == 0 and not ran.exists()


def test_branching_from_an_older_checkpoint_needs_overwrite_and_drops_the_later_ones(tmp_path):
    """resume=<step 2> while step 4 and 6 exist: left in place, a requeued resume=auto would
    continue from the abandoned step 6, and the branch's save of step 4 used to keep the old one."""
    c = make(tmp_path)
    for step in (2, 4, 6):
        c.save(TrainState(step=step), {"pos": step})
    step2 = tmp_path / "checkpoints" / "step_00000002"
    with pytest.raises(CheckpointError, match=r"step_00000004, step_00000006.*checkpoint.overwrite=true"):
        make(tmp_path, f"checkpoint.resume={step2}").resume()
    shutil.copytree(step2, tmp_path / "best")  # a step directory under another name: its marker says step 2
    with pytest.raises(CheckpointError, match=r"starts from step 2, .*step_00000004, step_00000006"):
        make(tmp_path, f"checkpoint.resume={tmp_path / 'best'}").resume()
    branch = make(tmp_path, f"checkpoint.resume={step2}", "checkpoint.overwrite=true")
    assert branch.resume()[0].step == 2
    assert [p.name for _, p in ck.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]
    step4 = Path(branch.save(TrainState(step=4), {"pos": "branch"}))
    assert json.loads((step4 / "rank_00000.json").read_text())["loader"] == {"pos": "branch"}
    # Resuming from the newest checkpoint of the directory itself is not a branch.
    assert make(tmp_path, f"checkpoint.resume={tmp_path / 'checkpoints'}").resume()[0].step == 4


def test_a_complete_checkpoint_this_run_did_not_write_is_replaced(tmp_path):
    make(tmp_path).save(TrainState(step=4), {"pos": "old"})
    step4 = Path(make(tmp_path, "checkpoint.resume=never", "checkpoint.overwrite=true").save(TrainState(step=4), {"pos": "new"}))
    assert json.loads((step4 / "rank_00000.json").read_text())["loader"] == {"pos": "new"}
    assert ck.is_complete(step4)


def test_latest_pointer_on_a_filesystem_that_cannot_rename_over_a_file(tmp_path, monkeypatch, caplog):
    real_replace = ck.os.replace

    def replace(src, dst):
        if Path(dst).exists():
            raise OSError(95, "Operation not supported")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    c = make(tmp_path)
    c.save(TrainState(step=2), {})
    c.save(TrainState(step=4), {})
    latest = tmp_path / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step_00000004"
    assert not list(latest.parent.glob(".latest.tmp*"))  # no leftovers of the failed rename

    def no_pointer(src, dst):
        if Path(dst).name == "latest":
            raise OSError(5, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", no_pointer)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        c.save(TrainState(step=6), {})  # the marker counts; the pointer is only a hint
    assert "resume finds step_00000006 by its marker" in caplog.text
    assert make(tmp_path).resume()[0].step == 6


def test_resume_never_refuses_a_run_dir_with_metrics_and_no_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    args = (f"run.dir={run}", "checkpoint.resume=never")
    with pytest.raises(CheckpointError, match=r"run.dir already holds a run .*metrics.jsonl.*checkpoint.overwrite=true"):
        make(tmp_path, *args).resume()
    assert make(tmp_path, *args, "checkpoint.overwrite=true").resume() is None


def test_unwritable_checkpoint_dir_is_a_user_error_naming_it(tmp_path):
    blocker = tmp_path / "ckpts"
    blocker.write_text("a file where the directory should be")
    c = Checkpointer(load_config(None, [f"checkpoint.dir={blocker}"]), FakeEngine(), INFO, None)
    with pytest.raises(CheckpointError, match=r"cannot create checkpoint directory .*ckpts/step_00000001 \(checkpoint.dir\)"):
        c.save(TrainState(step=1), {})


def test_changing_data_num_workers_on_resume_reshards_the_loader_state(tmp_path):
    """Same world size, other data.num_workers: the saved per-rank state has another number of
    streams, which the loader refuses as is; the checkpointer reshards it (as for a new world)."""
    make(tmp_path).save(TrainState(step=2), {"workers": 1, "pos": 7})
    calls = []

    def reshard(states, world, num_workers):
        calls.append((states, world, num_workers))
        return [{"workers": max(1, num_workers), "pos": states[0]["pos"]}] * world

    same = make(tmp_path, "data.num_workers=1")
    same.reshard = reshard
    assert same.resume()[1] == {"workers": 1, "pos": 7} and calls == []  # nothing changed: state as saved
    more = make(tmp_path, "data.num_workers=2")
    more.reshard = reshard
    assert more.resume()[1] == {"workers": 2, "pos": 7}
    assert calls == [([{"workers": 1, "pos": 7}], 1, 2)]
