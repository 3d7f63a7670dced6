"""The on-disk format: layout, marker-last atomicity, the one verification chain (refusal of
truncated / foreign / tampered / forged checkpoints), pruning and the `latest` pointer."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from _ckpt_fakes import Crash, FakeEngine, arm_crash, make

from pretrain.checkpoint import (
    MARKER,
    CheckpointError,
    TrainState,
    find_latest_complete,
    is_complete,
    list_checkpoints,
)
from pretrain.checkpoint.format import (
    file_problems,
    payload_files,
    prune,
    read_marker,
    verify_checkpoint,
)
from pretrain.config import load_config
from pretrain.fileio import sha256_file


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


def test_prune_keep_last_and_keep_every(tmp_path, monkeypatch):
    c = make(tmp_path, "checkpoint.keep_last=2", "checkpoint.keep_every=4")
    for step in range(1, 9):
        c.save(TrainState(step=step), {})
    names = sorted(p.name for _, p in list_checkpoints(tmp_path / "checkpoints"))
    assert names == ["step_00000004", "step_00000007", "step_00000008"]
    arm_crash(monkeypatch, "after_shards@9")
    with pytest.raises(Crash):
        c.save(TrainState(step=9), {})
    monkeypatch.undo()
    c.save(TrainState(step=10), {})  # pruning after it removes the incomplete step 9
    names = sorted(p.name for _, p in list_checkpoints(tmp_path / "checkpoints"))
    assert names == ["step_00000004", "step_00000008", "step_00000010"]
    # keep_last=1 keeps the newest complete one even when an incomplete newer directory exists.
    (tmp_path / "checkpoints" / "step_00000011").mkdir()
    assert prune(tmp_path / "checkpoints", keep_last=1) and find_latest_complete(tmp_path / "checkpoints").name == "step_00000010"


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
    with pytest.raises(CheckpointError) as e:  # export and generate go through the same chain
        verify_checkpoint(step_dir)
    assert expect[0] in str(e.value)


def test_ranks_share_the_hashing_and_together_cover_every_file(tmp_path):
    """Each rank of a resume hashes every world-th file: a corrupted file is found by exactly
    the rank whose share it is in, so no file escapes hashing whatever the world size."""
    step_dir = Path(make(tmp_path, tok=None).save(TrainState(step=2), {"pos": 2}))
    marker = read_marker(step_dir)
    names = sorted(marker["files"])
    victim = names[len(names) // 2]
    (step_dir / victim).write_bytes(b"x" * marker["files"][victim]["size"])  # same size, other bytes
    for world in (1, 2, 3):
        found = [r for r in range(world) if any(victim in p for p in file_problems(step_dir, marker, r, world))]
        assert found == [names.index(victim) % world]


def _forge_marker(step_dir: Path) -> None:
    """Rewrite the marker so its sizes and hashes match whatever lies in step_dir now."""
    marker = json.loads((step_dir / MARKER).read_text())
    marker["files"] = {rel: {"size": (step_dir / rel).stat().st_size, "sha256": sha256_file(step_dir / rel)}
                       for rel in payload_files(step_dir)}
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
    assert is_complete(step_dir)
    engine = FakeEngine(seed=1)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: refused, it holds more than tensors"):
        make(tmp_path, engine=engine).resume()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        verify_checkpoint(step_dir)  # export and generate go through this
    assert engine.loads == 0 and not ran.exists()


def test_latest_pointer_on_a_filesystem_that_cannot_rename_over_a_file(tmp_path, monkeypatch, caplog):
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).exists():
            raise OSError(95, "Operation not supported")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
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

    monkeypatch.setattr(os, "replace", no_pointer)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        c.save(TrainState(step=6), {})  # the marker counts; the pointer is only a hint
    assert "resume finds step_00000006 by its marker" in caplog.text
    assert make(tmp_path).resume()[0].step == 6
