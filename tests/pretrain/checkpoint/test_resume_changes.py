"""A resumed run is the same run, through the real command: train 3 steps, then rerun with one
thing changed. Each row of the table users meet (see pretrain/checkpoint/plan.py, RULES):

    model.n_layers=6                               refused, exit 2, names the key and both values
    model.vocab_size=2048 + a 2048-token tokenizer refused, exit 2, names the key
    another corpus under the same source name      refused by the loader state, exit 2
    another tokenizer of the same size             refused, exit 2, names both files; resumes when
                                                   checkpoint.allow_changes=[data.tokenizer]
    data.seq_len=32 (was 64), optimizer settings   resumes, each change logged; the loader continues
                                                   at the exact token; the new settings apply

One process on CPU (fp32, ZeRO-1); every attempt resumes a copy of the same 3-step run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from _trainer_helpers import (
    PY,
    REPO,
    TIMEOUT,
    metrics,
    run_train,
    tiny_data_fixture,  # noqa: F401 - registers the tiny_data fixture
    write_config,
)

COMMON = ["train.precision=fp32", "deepspeed.zero_stage=1", "checkpoint.save_on_exit=true"]
RECORDER = REPO / "tests" / "pretrain" / "_fed_batches.py"
STEP3 = "step_00000003"


def _train_tokenizer(corpus: Path, out: Path, vocab_size: int, max_docs: int = 0) -> Path:
    from data_pipelines.tokenizer import train_tokenizer
    from pretrain.config import load_config

    train_tokenizer(load_config(None, [f"tokenizer.input={corpus}", f"tokenizer.output={out}", "data.require_scrubbed=false",
                                       f"tokenizer.vocab_size={vocab_size}", f"tokenizer.max_docs={max_docs}"]))
    return out / "tokenizer.json"


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory) -> SimpleNamespace:
    """The 3-step run every test resumes, and the inputs they change it with."""
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("resume_changes")
    cfg = write_config(root / "c.yaml", tiny_data, root / "run")
    run_train(cfg, [*COMMON, "train.max_steps=3"], nproc=1)
    other = _train_tokenizer(tiny_data["corpus"], root / "other_tok", 1024, max_docs=40)  # retrained: same size
    big = _train_tokenizer(tiny_data["corpus"], root / "big_tok", 2048)
    sizes = [Tokenizer.from_file(str(p)).get_vocab_size() for p in (tiny_data["tokenizer"], other, big)]
    assert sizes == [1024, 1024, 2048] and other.read_bytes() != tiny_data["tokenizer"].read_bytes()
    return SimpleNamespace(root=root, cfg=cfg, data=tiny_data, other=other, big=big)


def _resume(base, tmp_path: Path, *overrides: str, ok: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    run = tmp_path / "run"
    shutil.copytree(base.root / "run", run)
    return run_train(base.cfg, [*COMMON, f"run.dir={run}", "train.max_steps=4", *overrides], nproc=1, ok=ok), run


def _assert_refused(p: subprocess.CompletedProcess, run: Path, *needles: str) -> None:
    """Exit 2 with the reason, and the run untouched: no step trained, no checkpoint written."""
    assert p.returncode == 2, p.stderr[-3000:]
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    assert [r["step"] for r in metrics(run, "train")] == [1, 2, 3]
    assert sorted(d.name for d in (run / "checkpoints").glob("step_*")) == [STEP3]


@pytest.mark.slow
def test_another_model_shape_is_refused(base, tmp_path):
    p, run = _resume(base, tmp_path, "model.n_layers=6")
    _assert_refused(p, run, f"checkpoint {run / 'checkpoints' / STEP3} cannot be resumed with this config: "
                            "model.n_layers: checkpoint 2, config 6")


@pytest.mark.slow
def test_another_vocabulary_size_is_refused(base, tmp_path):
    p, run = _resume(base, tmp_path, "model.vocab_size=2048", f"data.tokenizer={base.big}")
    _assert_refused(p, run, "\n  model.vocab_size: checkpoint 1024, config 2048",
                    "\n  data.tokenizer: checkpoint ")  # both refusals, one line each


@pytest.mark.slow
def test_another_corpus_under_the_same_name_is_refused(base, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(base.data["corpus"].read_text().splitlines(keepends=True)[50:]))
    p, run = _resume(base, tmp_path, f"data.sources[0].path={other}")
    _assert_refused(p, run, "loader state does not match this data configuration")


@pytest.mark.slow
def test_another_tokenizer_of_the_same_size_is_refused_naming_both_files(base, tmp_path):
    p, run = _resume(base, tmp_path, f"data.tokenizer={base.other}")
    copy = run / "checkpoints" / STEP3 / "tokenizer.json"
    _assert_refused(p, run, "cannot be resumed with this config: data.tokenizer: checkpoint "
                            f"{base.data['tokenizer'].resolve()}, saved with it as {copy} (sha256 ",
                    f"config {base.other.resolve()} (sha256 ", "checkpoint.allow_changes=[data.tokenizer]")


@pytest.mark.slow
def test_another_tokenizer_resumes_when_allowed_and_the_checkpoints_keep_it(base, tmp_path):
    from pretrain.checkpoint import saved_tokenizer
    from pretrain.fileio import json_sha256

    p, run = _resume(base, tmp_path, f"data.tokenizer={base.other}", "checkpoint.allow_changes=[data.tokenizer]",
                     ok=True)
    assert "allowed by checkpoint.allow_changes: data.tokenizer: checkpoint " in p.stderr
    assert [r["step"] for r in metrics(run, "train")] == [1, 2, 3, 4]
    step4 = run / "checkpoints" / "step_00000004"
    assert (step4 / "tokenizer.json").read_bytes() == base.other.read_bytes()
    assert saved_tokenizer(step4).sha256 == json_sha256(base.other.read_bytes())


@pytest.mark.slow
def test_seq_len_and_optimizer_changes_are_named_and_take_effect(base, tmp_path):
    """data.seq_len 64 -> 32, the tokenizer moved and re-saved (no change), and new optimizer settings.

    Run through the recorder (``pretrain.__main__.main`` with the fed batches copied): the tokens
    fed after the resume must be exactly the ones an uninterrupted loader hands out next.
    """
    import numpy as np

    from data_pipelines.loaders import build_train_loader
    from pretrain.config import load_config
    from pretrain.schedules import lr_at

    moved = tmp_path / "moved" / "tokenizer.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(json.loads(base.data["tokenizer"].read_text()), indent=4))  # re-saved elsewhere
    shutil.copy(base.data["tokenizer"].with_name("tokenizer_config.json"), moved.parent)
    run = tmp_path / "run"
    shutil.copytree(base.root / "run", run)
    overrides = [*COMMON, f"run.dir={run}", "train.max_steps=5", "data.seq_len=32", f"data.tokenizer={moved}",
                 "optim.lr=1e-3", "optim.beta2=0.99", "optim.weight_decay=0.05", "train.grad_clip=0.5"]
    p = subprocess.run([PY, str(RECORDER), str(run / "fed"), "0", str(base.cfg), *overrides], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    changed = [line.split("changed since the checkpoint: ", 1)[1] for line in p.stderr.splitlines()
               if "changed since the checkpoint: " in line]
    assert any(c.startswith("data.seq_len: checkpoint 64, config 32 (the loader continues at the exact token")
               for c in changed), changed
    assert any(c.startswith("optim.lr: checkpoint 0.003, config 0.001 (the config's value applies") for c in changed)
    assert not [c for c in changed if c.startswith("data.tokenizer")]  # moved and re-saved: the same tokenizer
    assert "betas (0.9, 0.99), eps 1e-08, weight decay [0.05, 0.0], grad clip 0.5" in p.stderr

    # The learning rate is the new schedule's at the checkpoint's step (not the old rate or a mix).
    rows = {r["step"]: r for r in metrics(run, "train")}
    assert sorted(rows) == [1, 2, 3, 4, 5] and rows[5]["train/tokens_seen"] == 3 * 4 * 64 + 2 * 4 * 32
    for step in (4, 5):
        want = lr_at(step - 1, lr=1e-3, min_lr=3e-4, warmup_steps=2, max_steps=5)
        assert rows[step]["train/lr"] == pytest.approx(want, rel=1e-6), step

    # Nothing skipped or repeated: rows of 32 continue the token stream where rows of 64 stopped.
    fed = [json.loads(line) for line in (run / "fed.rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in fed] == [4, 5]
    after = np.concatenate([np.asarray(r["input_ids"]).reshape(-1) for r in fed])
    loader = build_train_loader(load_config(base.cfg, COMMON), 0, 1)
    stream = np.concatenate([next(loader)["input_ids"].numpy().reshape(-1) for _ in range(4)])
    assert np.array_equal(after, stream[3 * 4 * 64:3 * 4 * 64 + 2 * 4 * 32])
