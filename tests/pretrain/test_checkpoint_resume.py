"""Exact and elastic resume with real DeepSpeed engines: 2 CPU ranks (gloo), ZeRO-2 and ZeRO-3.

Two drivers. The harness (_checkpoint_harness.py) trains a small fp32 model with dropout and
numpy/python noise in every step on the token ids of the real streaming loader, whose state the
real ``reshard_states`` remaps on a world-size change; "every document exactly once" is checked
from the token ids each rank consumed, against the tokenized corpus. The real trainer
(`python -m pretrain train`, real loader, scrubbed corpus) is killed inside saves through the
PRETRAIN_CKPT_FAULT hook. Resumed per-step losses must equal an uninterrupted run's BITWISE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from _trainer_helpers import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HARNESS = HERE / "_checkpoint_harness.py"


def run(config: Path, nproc: int, ckpt: Path, stage: int, steps: int, kill_at: int = -1, fault: str | None = None,
        expect_ok: bool = True) -> dict[tuple[int, int], dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PRETRAIN_CKPT_FAULT", None)
    if fault:
        env["PRETRAIN_CKPT_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(HARNESS), str(config), str(ckpt), str(stage), str(steps), "2",
           str(kill_at)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert (p.returncode == 0) == expect_ok, p.stdout[-2000:] + p.stderr[-4000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    out = {(r["rank"], r["step"]): r for r in rows if "step" in r}
    out["log"] = p.stderr  # type: ignore[index]
    return out


def steps_of(rows: dict) -> list[int]:
    return sorted(k[1] for k in rows if k != "log" and k[0] == 0)


def assert_same(rows: dict, base: dict) -> None:
    for k, r in rows.items():
        if k == "log":
            continue
        b = base[k]
        assert r["samples"] == b["samples"], (k, r["samples"], b["samples"])
        assert r["loss"] == b["loss"], f"rank {k[0]} step {k[1]}: loss {r['loss']!r} != uninterrupted {b['loss']!r}"
        assert r["lr"] == b["lr"] and r["global_steps"] == b["global_steps"], (k, r, b)


EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def toy_corpus(tokenizer_path, tmp_path_factory) -> tuple[Path, dict[tuple[int, ...], str]]:
    """The harness's config over 240 short distinct documents (jsonl, 4 per chunk, ~17 tokens each:
    far more than the run consumes, so no epoch wraps) and each document's token ids + separator."""
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("toy_corpus")
    words = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "juniper"]
    texts = {f"d{i}": f"Record {i}: the {words[i % 10]} {words[i // 10 % 10]} crossed river {i * 7} at dawn."
             for i in range(240)}
    (root / "docs.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    cfg = root / "harness.yaml"
    cfg.write_text(f"""
data:
  sources: [{{name: toy, path: {root / 'docs.jsonl'}}}]
  tokenizer: {tokenizer_path}
  require_scrubbed: false
  seq_len: 16
  chunk_docs: 4
  val_fraction: 0.0
train: {{micro_batch_size: 4, eval_every: 0}}
""")
    tok = Tokenizer.from_file(str(tokenizer_path))
    eos = tok.token_to_id(EOS)
    docs = {tuple(tok.encode(v, add_special_tokens=False).ids) + (eos,): k for k, v in texts.items()}
    assert len(docs) == len(texts)
    return cfg, docs


def consumed_documents(phases: list[list[list[int]]], docs: dict[tuple[int, ...], str], eos: int) -> Counter:
    """How often each document was consumed, from the token streams each rank consumed per phase.

    phases[k][r] is rank r's token stream in phase k: whole documents (each ending with the
    separator), except that it may end inside a document (the phase stopped) and, after a resume,
    hold the rest of documents cut by the previous phase (a resharded stream takes over the cut
    documents of several old streams). Every cut document must be finished exactly once in the next
    phase: its tokens before and after the cut together form the document.
    """
    count: Counter = Counter()
    cut: list[tuple[int, ...]] = []  # documents the previous phase stopped inside of
    for k, streams in enumerate(phases):
        heads, tails = [], []
        for seq in streams:
            pieces, cur = [], []
            for t in seq:
                cur.append(t)
                if t == eos:
                    pieces.append(tuple(cur))
                    cur = []
            assert pieces, f"phase {k}: a stream without a document boundary"
            if cur:
                tails.append(tuple(cur))
            for p in pieces:
                if p in docs:
                    count[docs[p]] += 1
                else:  # the rest of a document cut by the previous phase (may lie anywhere in a resharded stream)
                    assert k, f"phase {k}: consumed {p} which is no document"
                    heads.append(p)
        for tail in cut:
            ends = [h for h in heads if tail + h in docs]
            assert len(ends) == 1, f"phase {k}: the document cut at the end of phase {k - 1} ({tail}) is " \
                                   f"finished {len(ends)} times"
            heads.remove(ends[0])
            count[docs[tail + ends[0]]] += 1
        assert not heads, f"phase {k}: consumed the rest of documents no earlier phase started: {heads}"
        cut = tails
    return count


def token_streams(rows: dict, drop_after: int | None = None) -> list[list[int]]:
    """Each rank's consumed input ids, in step order (rows' inputs are disjoint consecutive windows)."""
    ranks = sorted({k[0] for k in rows if k != "log"})
    return [[t for k in sorted(k for k in rows if k != "log" and k[0] == r and (drop_after is None or k[1] <= drop_after))
             for row in rows[k]["samples"] for t in row] for r in ranks]


@pytest.mark.slow
def test_harness_elastic_2_to_1_to_2_ranks(toy_corpus, tmp_path):
    """ZeRO-2: 2 ranks -> universal checkpoint -> 1 rank -> 2 ranks with the real loader and the real
    reshard_states; every document consumed exactly once, none cut and lost."""
    config, docs = toy_corpus
    ck = tmp_path / "elastic"
    a = run(config, 2, ck, 2, 5)  # saves at 2 and 4; its step 5 is the uninterrupted reference
    (ck / "step_00000004" / "COMPLETE.json").stat()
    b = run(config, 1, ck, 2, 6)
    c = run(config, 2, ck, 2, 8)
    assert "step_00000004 to a universal checkpoint" in b["log"]  # converted by the framework
    assert (ck / "step_00000006" / "universal" / "COMPLETE.json").is_file()
    assert "2 -> 1 data-parallel ranks" in b["log"] and "1 -> 2 data-parallel ranks" in c["log"]
    assert steps_of(b) == [5, 6] and steps_of(c) == [7, 8]
    eos = next(iter(docs))[-1]
    count = consumed_documents([token_streams(a, drop_after=4), token_streams(b), token_streams(c)], docs, eos)
    assert count and max(count.values()) == 1, count.most_common(3)  # every document exactly once
    assert sum(count.values()) >= 30  # (4 * 2 + 2 + 2 * 2) x 64 tokens consumed, ~19 tokens a document
    # A chunk (4 consecutive documents, read together in a shuffled row order) that a stream began
    # is read to its end, whichever stream ends it; only the two final streams may stop inside one.
    per_chunk = Counter(int(d[1:]) // 4 for d in count)
    assert len([n for n in per_chunk.values() if n != 4]) <= 2, sorted(per_chunk.items())
    # Weights, optimizer step count and LR schedule crossed over intact: before step 5 the 1-rank
    # run holds the same weights as the 2-rank run, so its loss on a fixed input is bitwise the same.
    assert b[(0, 5)]["probe"] == a[(0, 5)]["probe"] == a[(1, 5)]["probe"]
    assert b[(0, 5)]["lr"] == a[(0, 5)]["lr"] and b[(0, 5)]["global_steps"] == 5


# --------------------------------------------------------------------------------------------
# The real trainer: `python -m pretrain train` with the real loader on the scrubbed corpus
# --------------------------------------------------------------------------------------------


def train(config: Path, run_dir: Path, nproc: int, *overrides: str, fault: str | None = None,
          expect_ok: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PRETRAIN_CKPT_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["PRETRAIN_CKPT_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "pretrain", "train", str(config), f"run.dir={run_dir}",
           *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert (p.returncode == 0) == expect_ok, p.stderr[-4000:]
    return p.stderr


def train_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def trainer_config(scrubbed_corpus, tokenizer_path, tmp_path_factory) -> Path:
    cfg = tmp_path_factory.mktemp("resume_cfg") / "c.yaml"
    cfg.write_text(f"""
extends: {REPO}/configs/model/tiny.yaml
data:
  sources: [{{name: wiki, path: {scrubbed_corpus}}}]
  tokenizer: {tokenizer_path}
  seq_len: 32
model: {{vocab_size: 4096, max_seq_len: 64}}
train: {{micro_batch_size: 4, max_steps: 8, eval_every: 0, log_every: 1, progress_bar: false, precision: fp32}}
optim: {{lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2}}
deepspeed: {{zero_stage: 2}}
checkpoint: {{every_steps: 2, keep_last: 2, save_on_exit: false}}
wandb: {{mode: disabled}}
""")
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_exact_resume(trainer_config, tmp_path, stage):
    """SIGKILLed inside the save of step 4 (no marker), after step 5 (outside a save) and, for
    ZeRO-2, after the marker of step 6 (pointer not moved); resumed two or three times in a row:
    every logged loss equals the uninterrupted run's, bitwise."""
    zero = f"deepspeed.zero_stage={stage}"
    train(trainer_config, tmp_path / "base", 2, zero)
    base = {r["step"]: r for r in train_rows(tmp_path / "base")}
    assert sorted(base) == list(range(1, 9))
    run_dir = tmp_path / "run"
    train(trainer_config, run_dir, 2, zero, fault="after_shards@4", expect_ok=False)
    log = train(trainer_config, run_dir, 2, zero, fault="step@5", expect_ok=False)
    assert "ignoring incomplete checkpoint(s) step_00000004" in log and "step_00000002 (step 2" in log
    expect = [1, 2, 3, 4, 3, 4, 5]
    if stage == 2:
        log = train(trainer_config, run_dir, 2, zero, fault="after_marker@6", expect_ok=False)
        assert "step_00000004 (step 4" in log
        log = train(trainer_config, run_dir, 2, zero)
        assert "newest complete checkpoint is step_00000006" in log and "step_00000006 (step 6" in log
        expect += [5, 6]
    else:
        log = train(trainer_config, run_dir, 2, zero)
        assert "step_00000004 (step 4" in log
    expect += [5, 6, 7, 8] if stage == 3 else [7, 8]
    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == expect
    for r in rows:  # the crashed attempts' steps too: every attempt computed the same numbers
        assert r["train/loss"] == base[r["step"]]["train/loss"], (r["step"], r["train/loss"], base[r["step"]])
        assert r["train/tokens_seen"] == base[r["step"]]["train/tokens_seen"]
