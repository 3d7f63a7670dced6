"""Exact resume (token for token, twice in a row), bounded restore cost, and elastic resharding."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipelines.loaders import build_train_loader, reshard_states
from pretrain.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
from _loader_fixtures import assert_exact_cover, epoch_spans, make_cfg, make_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def roundtrip(state: dict) -> dict:
    """What a checkpoint does to the state: JSON out and back."""
    return json.loads(json.dumps(state))


def same(xs, ys):
    return all(torch.equal(x[k], y[k]) for x, y in zip(xs, ys, strict=True) for k in ("input_ids", "labels", "position_ids", "doc_ids"))


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), pytest.param(1, 2, marks=pytest.mark.slow),
                                           pytest.param(2, 2, marks=pytest.mark.slow)])
def test_resume_is_exact_and_survives_two_resumes_in_a_row(corpus, world, workers):
    cfg = make_cfg(corpus, f"data.num_workers={workers}", "data.val_fraction=0.1", mix=True)
    for rank in range(world):
        ref = build_train_loader(cfg, rank, world)
        ref_batches = [next(ref) for _ in range(37)]
        ref.close()

        first = build_train_loader(cfg, rank, world)
        head = [next(first) for _ in range(7)]  # an odd count: the next batch is worker 1's
        s1 = roundtrip(first.state_dict())
        first.close()
        assert len(json.dumps(s1)) < 2000  # small: no tokens, no documents

        second = build_train_loader(cfg, rank, world)
        second.load_state_dict(s1)
        middle = [next(second) for _ in range(11)]
        s2 = roundtrip(second.state_dict())
        second.close()

        third = build_train_loader(cfg, rank, world)  # second resume in a row (datasets bug 8308)
        third.load_state_dict(s2)
        tail = [next(third) for _ in range(19)]
        third.close()
        assert same(head + middle + tail, ref_batches), f"rank {rank}"


def test_load_state_dict_mid_iteration_restarts_from_the_state(corpus):
    cfg = make_cfg(corpus, mix=True)
    lo = build_train_loader(cfg, 0, 1)
    [next(lo) for _ in range(5)]
    s = roundtrip(lo.state_dict())
    want = [next(lo) for _ in range(6)]
    lo.load_state_dict(s)
    assert same([next(lo) for _ in range(6)], want)


def test_state_from_another_world_or_config_is_refused(corpus):
    lo = build_train_loader(make_cfg(corpus), 0, 2)
    next(lo)
    s = lo.state_dict()
    with pytest.raises(UserError, match="rank 0 of 2, this is rank 0 of 1.*reshard_states"):
        build_train_loader(make_cfg(corpus), 0, 1).load_state_dict(s)
    with pytest.raises(UserError, match="chunk_docs"):
        build_train_loader(make_cfg(corpus, "data.chunk_docs=5"), 0, 2).load_state_dict(s)


def _restore_cost(cfg, n_batches):
    lo = build_train_loader(cfg, 0, 1)
    for _ in range(n_batches):
        next(lo)
    state = roundtrip(lo.state_dict())
    fresh = build_train_loader(cfg, 0, 1)
    fresh.load_state_dict(state)
    t0 = time.perf_counter()
    batch = next(fresh)
    elapsed = time.perf_counter() - t0
    rows = sum(s.reader.rows_read for s in fresh.spec.sources)
    assert torch.equal(batch["input_ids"], next(lo)["input_ids"])
    return rows, fresh.spec.last_packer.docs_tokenized, elapsed


@pytest.mark.slow
def test_restore_cost_does_not_grow_with_progress(corpus):
    cfg = make_cfg(corpus, mix=True)
    rows_10, docs_10, t_10 = _restore_cost(cfg, 10)
    rows_10k, docs_10k, t_10k = _restore_cost(cfg, 10_000)  # ~150 epochs in
    print(f"restore after 10 batches: {rows_10} rows read, {docs_10} docs tokenized, {t_10 * 1e3:.1f} ms; "
          f"after 10,000: {rows_10k} rows, {docs_10k} docs, {t_10k * 1e3:.1f} ms")
    # A constant, whatever the progress: the packer reads ahead one tokenizer batch (32 documents,
    # so at most 9 four-document chunks of two 7-row parquet groups each, plus the 30-row jsonl.zst
    # shard). The uninterrupted run read about 16,000 documents to get there.
    assert rows_10 <= 9 * 14 + 30 and rows_10k <= 9 * 14 + 30
    assert docs_10 <= 32 and docs_10k <= 32
    assert t_10k < 0.5  # milliseconds in practice; a loader that spins would take seconds


def _run(loaders, n):
    out = []
    for _ in range(n):
        out += [next(lo) for lo in loaders]
    return out


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2)])
def test_elastic_reshard_neither_repeats_nor_skips(corpus, old_world, new_world):
    cfg = make_cfg(corpus, "data.val_fraction=0.1", mix=True)
    before = [build_train_loader(cfg, r, old_world, trace=True) for r in range(old_world)]
    seen = _run(before, 23)  # mid-epoch, mid-document, partly filled buffers
    states = [roundtrip(lo.state_dict()) for lo in before]
    new_states = reshard_states(states, new_world)
    assert [s["rank"] for s in new_states] == list(range(new_world))
    after = [build_train_loader(cfg, r, new_world, trace=True) for r in range(new_world)]
    for lo, s in zip(after, new_states, strict=True):
        lo.load_state_dict(roundtrip(s))
    seen += _run(after, 400 // new_world)  # to well past the end of epoch 0 of both sources
    from data_pipelines.sources import is_heldout

    spans = epoch_spans(seen)
    for src, name in ((0, "a"), (1, "b")):
        train_ids = [d for d in corpus[name] if not is_heldout(d, 0.1)]
        assert_exact_cover(corpus, {k: v for k, v in spans.items() if k[0] == src}, train_ids)
    # and twice: resize back, the next epoch is still covered exactly once
    states = reshard_states([roundtrip(lo.state_dict()) for lo in after], old_world)
    back = [build_train_loader(cfg, r, old_world, trace=True) for r in range(old_world)]
    for lo, s in zip(back, states, strict=True):
        lo.load_state_dict(s)
    epochs = {k[1] for b in seen for row in b["trace"] for k, _, _ in row if k[0] == 1}
    last = max(epochs)  # source b's current epoch: finish it after the second resize
    seen += _run(back, 500 // old_world)
    spans = epoch_spans(seen, epoch=last)
    train_b = [d for d in corpus["b"] if not is_heldout(d, 0.1)]
    assert_exact_cover(corpus, {k: v for k, v in spans.items() if k[0] == 1}, train_b)


@pytest.mark.slow
def test_elastic_reshard_with_workers(corpus):
    """2 ranks x 2 workers -> 1 rank x 2 workers."""
    cfg = make_cfg(corpus, "data.num_workers=2", mix=True)
    before = [build_train_loader(cfg, r, 2, trace=True) for r in range(2)]
    seen = _run(before, 15)
    states = [roundtrip(lo.state_dict()) for lo in before]
    for lo in before:
        lo.close()
    after = build_train_loader(cfg, 0, 1, trace=True)
    after.load_state_dict(reshard_states(states, 1)[0])
    seen += _run([after], 400)
    after.close()
    spans = epoch_spans(seen)
    assert_exact_cover(corpus, {k: v for k, v in spans.items() if k[0] == 0}, corpus["a"])
    assert_exact_cover(corpus, {k: v for k, v in spans.items() if k[0] == 1}, corpus["b"])


def test_reshard_needs_every_rank(corpus):
    los = [build_train_loader(make_cfg(corpus), r, 2) for r in range(2)]
    with pytest.raises(UserError, match="ranks 0..1"):
        reshard_states([los[1].state_dict()], 1)
