"""What a resume does: which checkpoint (checkpoint.resume / overwrite) and how it is loaded
(same or changed world, universal conversion, loader states as saved / resharded / missing)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from _ckpt_fakes import make

from pretrain.checkpoint import (
    CheckpointError,
    ResumePlan,
    TrainState,
    list_checkpoints,
    plan_resume,
)
from pretrain.checkpoint.format import TokenizerRef
from pretrain.checkpoint.plan import (
    ALLOWABLE,
    ALLOWED,
    LOADER_AS_SAVED,
    LOADER_MISSING,
    LOADER_RESHARD,
    NAMED,
    REFUSED,
    RULES,
    check_settings,
    run_settings,
    setting_changes,
)
from pretrain.config import RESUME_ALLOWABLE, load_config, to_dict

STEP = Path("step_00000004")


def _plan(saved_world: int, saved_stage: int, world: int, stage: int, states: list | None = None,
          num_workers: int = 1) -> ResumePlan:
    states = states if states is not None else [{"workers": 1}] * saved_world
    return plan_resume(STEP, {"world_size": saved_world, "zero_stage": saved_stage}, states, world, stage, num_workers)


@pytest.mark.parametrize(
    "saved_world,saved_stage,world,stage,states,num_workers,universal,loader",
    [
        # same world, same stage: the engine's own shards, every rank its own loader state
        (2, 2, 2, 2, None, 1, False, LOADER_AS_SAVED),
        (2, 0, 2, 0, None, 1, False, LOADER_AS_SAVED),
        (2, 1, 2, 2, None, 1, False, LOADER_AS_SAVED),  # ZeRO-1 <-> 2: same partitioning of parameters
        # changed world with ZeRO: universal conversion, loader states resharded
        (2, 2, 1, 2, None, 1, True, LOADER_RESHARD),
        (1, 3, 2, 3, None, 1, True, LOADER_RESHARD),
        # same world, ZeRO-2 -> 3 (parameters become partitioned): universal, loader as saved
        (2, 2, 2, 3, None, 1, True, LOADER_AS_SAVED),
        # changed world without ZeRO: every rank holds the whole model, no conversion
        (2, 0, 1, 0, None, 1, False, LOADER_RESHARD),
        # same world, other data.num_workers: engine as saved, loader resharded
        (2, 2, 2, 2, [{"workers": 1}, {"workers": 1}], 2, False, LOADER_RESHARD),
        # states of a loader that does not record its streams: taken as saved
        (2, 2, 2, 2, [{"next": 8}, {"next": 8}], 3, False, LOADER_AS_SAVED),
        # changed world, and a rank saved no loader state: the loader starts without one
        (2, 2, 1, 2, [{"workers": 1}, None], 1, True, LOADER_MISSING),
        (2, 0, 4, 0, [None, None], 1, False, LOADER_MISSING),
    ],
)
def test_resume_plan_decision_table(saved_world, saved_stage, world, stage, states, num_workers, universal, loader):
    plan = _plan(saved_world, saved_stage, world, stage, states, num_workers)
    assert (plan.universal, plan.loader) == (universal, loader)
    assert plan.world_changed == (saved_world != world) and plan.step_dir == STEP


@pytest.mark.parametrize("saved_stage,stage", [(0, 2), (2, 0), (0, 3)])
def test_resume_plan_refuses_zero_0_against_sharded_across_a_change(saved_stage, stage):
    with pytest.raises(CheckpointError, match=f"zero_stage={saved_stage}; resuming it with deepspeed.zero_stage={stage}"):
        _plan(2, saved_stage, 1, stage)


def test_resume_plan_refuses_a_zero_0_optimizer_for_other_parameter_dtypes():
    """ZeRO-0 bf16 keeps fp32 parameters under autocast now; a checkpoint of the former bf16-parameter
    layout (its meta records only the precision) cannot feed that optimizer, and says so."""
    old = {"world_size": 1, "zero_stage": 0, "precision": "bf16"}
    with pytest.raises(CheckpointError, match="ZeRO-0 optimizer for bf16 parameters.*pretrain export"):
        plan_resume(STEP, old, [None], 1, 0, 1, param_dtype="fp32")
    assert plan_resume(STEP, {**old, "param_dtype": "fp32"}, [None], 1, 0, 1, param_dtype="fp32").world == 1
    assert plan_resume(STEP, {**old, "precision": "fp32"}, [None], 1, 0, 1, param_dtype="fp32").world == 1
    assert plan_resume(STEP, {**old, "zero_stage": 1}, [None], 1, 1, 1, param_dtype="bf16").world == 1


def test_resume_modes(tmp_path):
    assert make(tmp_path).resume() is None  # auto, nothing there: fresh start
    make(tmp_path).save(TrainState(step=2), {})
    with pytest.raises(CheckpointError, match="checkpoint.resume=never.*checkpoint.overwrite=true"):
        make(tmp_path, "checkpoint.resume=never").resume()
    assert make(tmp_path, "checkpoint.resume=never", "checkpoint.overwrite=true").resume() is None
    assert list_checkpoints(tmp_path / "checkpoints") == []
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
    assert [p.name for _, p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]
    step4 = Path(branch.save(TrainState(step=4), {"pos": "branch"}))
    assert json.loads((step4 / "rank_00000.json").read_text())["loader"] == {"pos": "branch"}
    # Resuming from the newest checkpoint of the directory itself is not a branch.
    assert make(tmp_path, f"checkpoint.resume={tmp_path / 'checkpoints'}").resume()[0].step == 4


def test_resume_never_refuses_a_run_dir_with_metrics_and_no_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    args = (f"run.dir={run}", "checkpoint.resume=never")
    with pytest.raises(CheckpointError, match=r"run.dir already holds a run .*metrics.jsonl.*checkpoint.overwrite=true"):
        make(tmp_path, *args).resume()
    assert make(tmp_path, *args, "checkpoint.overwrite=true").resume() is None


# ---- is this the same run? (check_settings and its table) ---------------------------------------

TOK = TokenizerRef("a" * 64, "/data/tok/tokenizer.json")


def _settings(*overrides: str, tokenizer: TokenizerRef | None = TOK) -> dict:
    return run_settings(to_dict(load_config(None, list(overrides))), tokenizer)


def _changes(saved: tuple, now: tuple, allow: tuple = (), saved_tok: TokenizerRef | None = TOK,
             now_tok: TokenizerRef | None = TOK) -> dict[str, str]:
    return {c.key: c.verdict for c in setting_changes(_settings(*saved, tokenizer=saved_tok),
                                                      _settings(*now, tokenizer=now_tok), allow)}


@pytest.mark.parametrize(
    "saved,now,expected",
    [
        # the weights' shapes
        ((), ("model.n_layers=4",), {"model.n_layers": REFUSED}),
        (("model.vocab_size=1024",), ("model.vocab_size=2048",), {"model.vocab_size": REFUSED}),
        ((), ("model.tie_embeddings=true",), {"model.tie_embeddings": REFUSED}),
        # the optimizer's files and groups
        (("train.precision=bf16",), ("train.precision=fp32",), {"train.precision": REFUSED}),
        ((), ("optim.decay_norms=true",), {"optim.decay_norms": REFUSED}),
        # the loader's position
        ((), ("run.seed=7",), {"run.seed": REFUSED}),
        ((), ("data.mode=pretokenized",), {"data.mode": REFUSED}),
        ((), ("data.chunk_docs=32",), {"data.chunk_docs": REFUSED}),
        (("data.mode=pretokenized",), ("data.mode=pretokenized", "data.chunk_docs=32"), {"data.chunk_docs": NAMED}),
        ((), ("data.sources[0].name=web",), {"data.sources": REFUSED}),
        # sequence length: a schedule in streaming mode, another sample grid in pretokenized mode
        ((), ("data.seq_len=128",), {"data.seq_len": NAMED}),
        (("data.mode=pretokenized",), ("data.mode=pretokenized", "data.seq_len=128"), {"data.seq_len": REFUSED}),
        (("data.mode=pretokenized",), ("data.mode=pretokenized", "train.micro_batch_size=4"),
         {"train.micro_batch_size": REFUSED}),
        ((), ("train.micro_batch_size=4",), {"train.micro_batch_size": NAMED}),
        # refused unless allowed
        ((), ("data.val_fraction=0.1",), {"data.val_fraction": REFUSED}),
        ((), ("model.rope_theta=500000",), {"model.rope_theta": REFUSED}),
        # may change, named: the corpus by content, weights, the schedule, elastic settings
        ((), ("data.sources[0].path=/elsewhere",), {"data.sources[main].path": NAMED}),
        ((), ("data.sources[0].weight=2",), {"data.sources[main].weight": NAMED}),
        ((), ("optim.lr=1e-4", "train.max_steps=5000"), {"optim.lr": NAMED, "train.max_steps": NAMED}),
        ((), ("deepspeed.zero_stage=3", "data.num_workers=2"), {"deepspeed.zero_stage": NAMED, "data.num_workers": NAMED}),
        ((), ("model.max_seq_len=2048",), {"model.max_seq_len": NAMED}),
        # not compared: other commands' settings and how this invocation resumes
        ((), ("tokenizer.vocab_size=512", "scrub.workers=4", "checkpoint.resume=never", "checkpoint.overwrite=true",
              "checkpoint.allow_changes=[data.tokenizer]"), {}),
        # the tokenizer's path is not compared: data.tokenizer moved is no change
        ((), ("data.tokenizer=/moved/tokenizer.json",), {}),
    ],
)
def test_setting_changes_decision_table(saved, now, expected):
    assert _changes(saved, now) == expected


def test_tokenizer_is_compared_by_content_and_can_be_allowed():
    other = TokenizerRef("b" * 64, "/data/tok/tokenizer.json")  # same path, retrained in place
    moved = TokenizerRef("a" * 64, "/elsewhere/tokenizer.json")
    assert _changes((), (), now_tok=moved) == {}
    assert _changes((), (), now_tok=other) == {"data.tokenizer": REFUSED}
    assert _changes((), (), ("data.tokenizer",), now_tok=other) == {"data.tokenizer": ALLOWED}
    # Without a tokenizer file on one side (pretokenized mode without one) there is nothing to compare.
    assert _changes((), (), saved_tok=None, now_tok=other) == {}
    assert _changes((), ("data.val_fraction=0.1",), ("data.tokenizer",), now_tok=other) == {
        "data.tokenizer": ALLOWED, "data.val_fraction": REFUSED}  # each allowance names its own key


def test_refusal_names_key_both_values_and_the_way_out_on_one_line():
    saved = TokenizerRef("a" * 64, "/data/tok/tokenizer.json", copy="/run/step_00000003/tokenizer.json")
    other = TokenizerRef("b" * 64, "/data/tok2/tokenizer.json")
    with pytest.raises(CheckpointError) as e:
        check_settings(STEP, _settings(tokenizer=saved), _settings(tokenizer=other))
    msg = str(e.value)
    assert "\n" not in msg
    assert ("data.tokenizer: checkpoint /data/tok/tokenizer.json, saved with it as /run/step_00000003/tokenizer.json "
            "(sha256 aaaaaaaaaaaa), config /data/tok2/tokenizer.json (sha256 bbbbbbbbbbbb)") in msg
    assert "set checkpoint.allow_changes=[data.tokenizer]" in msg
    with pytest.raises(CheckpointError, match=r"this config:\n  model.n_layers: checkpoint 6, config 4 .*\n  "
                                              r"train.precision: checkpoint bf16, config fp32"):
        check_settings(STEP, _settings("train.precision=bf16"), _settings("model.n_layers=4", "train.precision=fp32"))
    allowed = check_settings(STEP, _settings(tokenizer=saved), _settings("data.seq_len=128", tokenizer=other),
                             ["data.tokenizer"])
    assert [(c.key, c.verdict) for c in allowed] == [("data.tokenizer", ALLOWED), ("data.seq_len", NAMED)]
    assert "nothing is skipped or repeated" in allowed[1].describe()


def test_a_setting_the_checkpoint_did_not_record_is_not_compared():
    saved = _settings("model.n_layers=4")
    del saved["model.n_layers"], saved["model.rope_theta"]  # a checkpoint of a version without these keys
    assert _changes((), ()) == {} and setting_changes(saved, _settings()) == []


def test_every_rule_names_a_real_setting_and_the_allowable_ones_are_the_schemas():
    keys = set(_settings("data.validation=[{name: v, path: /v}]"))
    generic = {re.sub(r"\[[^\]]*\]", "[]", k) for k in keys} | {"data.tokenizer"}
    assert [r.key for r in RULES if r.key not in generic] == []  # a typo here would never fire
    assert {r.key for r in RULES if r.kind == ALLOWABLE} == set(RESUME_ALLOWABLE)
