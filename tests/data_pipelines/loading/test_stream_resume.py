"""Exact resume (token for token, twice in a row), bounded restore cost, and elastic resharding."""

from __future__ import annotations

import json

import pytest
import torch
from _loader_fixtures import (
    assert_epoch_covered,
    make_cfg,
    make_corpus,
    split_streams,
    stream_ids,
)

from data_pipelines.loaders import build_train_loader, reshard_states
from data_pipelines.loading.sources import ShardReader, is_heldout
from data_pipelines.tokenizer import load_tokenizer
from pretrain.errors import UserError


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


class CountingTokenizer:
    """The real tokenizer, counting the documents it encodes (what a restore re-tokenizes)."""

    def __init__(self, path):
        self.tok, self.docs = load_tokenizer(path), 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode_batch(self, texts, **kw):
        self.docs += len(texts)
        return self.tok.encode_batch(texts, **kw)


def _restore_cost(cfg, n_batches, monkeypatch):
    """(rows read from storage, documents tokenized) to restore after `n_batches` and produce the next batch."""
    lo = build_train_loader(cfg, 0, 1)
    for _ in range(n_batches):
        next(lo)
    state = roundtrip(lo.state_dict())
    rows = []
    read = ShardReader.read

    def counting_read(self, shard, start, end):
        ids, texts = read(self, shard, start, end)
        rows.append(len(ids))
        return ids, texts

    tok = CountingTokenizer(cfg.data.tokenizer)
    with monkeypatch.context() as m:
        m.setattr(ShardReader, "read", counting_read)
        fresh = build_train_loader(cfg, 0, 1, tokenizer=tok)
        fresh.load_state_dict(state)
        batch = next(fresh)
    assert torch.equal(batch["input_ids"], next(lo)["input_ids"])
    return sum(rows), tok.docs


@pytest.mark.slow
def test_restore_cost_does_not_grow_with_progress(corpus, monkeypatch):
    cfg = make_cfg(corpus, mix=True)
    rows_10, docs_10 = _restore_cost(cfg, 10, monkeypatch)
    rows_10k, docs_10k = _restore_cost(cfg, 10_000, monkeypatch)  # ~150 epochs in
    print(f"restore after 10 batches: {rows_10} rows read, {docs_10} docs tokenized; after 10,000: {rows_10k} rows, {docs_10k} docs")
    # A constant, whatever the progress: the packer reads ahead one tokenizer batch (32 documents,
    # i.e. at most 32 + 2 four-document chunk reads: a chunk per document and the two pieces the
    # state points into). The uninterrupted run read about 16,000 documents to get there.
    assert 0 < rows_10 <= (32 + 2) * 4 and 0 < rows_10k <= (32 + 2) * 4
    assert 0 < docs_10 <= 32 and 0 < docs_10k <= 32


def _run(loaders, n):
    """n batches of each loader, per loader."""
    out = [[] for _ in loaders]
    for _ in range(n):
        for got, lo in zip(out, loaders, strict=True):
            got.append(next(lo))
    return out


def _resumed(cfg, states, world):
    loaders = [build_train_loader(cfg, r, world) for r in range(world)]
    for lo, s in zip(loaders, states, strict=True):
        lo.load_state_dict(roundtrip(s))
    return loaders


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2)])
def test_elastic_reshard_neither_repeats_nor_skips(corpus, old_world, new_world):
    """Resize, then resize back: judged from the emitted token ids (decoded to documents and words)."""
    cfg = make_cfg(corpus, "data.val_fraction=0.1", mix=True)
    before = [build_train_loader(cfg, r, old_world) for r in range(old_world)]
    first = _run(before, 8)  # mid-epoch, mid-document, partly filled buffers; inside epoch 0 of both sources
    new_states = reshard_states([roundtrip(lo.state_dict()) for lo in before], new_world)
    assert [s["rank"] for s in new_states] == list(range(new_world))
    after = _resumed(cfg, new_states, new_world)
    middle = _run(after, 4)  # still inside epoch 0
    back = _resumed(cfg, reshard_states([roundtrip(lo.state_dict()) for lo in after], old_world), old_world)
    last = _run(back, 400 // old_world)  # to well past the end of epoch 0 of both sources
    expected = {name: [d for d in corpus[name] if not is_heldout(d, 0.1)] for name in ("a", "b")}
    assert_epoch_covered(corpus, [stream_ids(b) for b in first + middle], [stream_ids(b) for b in last], expected)


@pytest.mark.slow
def test_elastic_reshard_with_workers(corpus):
    """2 ranks x 2 workers -> 1 rank x 2 workers."""
    cfg = make_cfg(corpus, "data.num_workers=2", mix=True)
    before = [build_train_loader(cfg, r, 2) for r in range(2)]
    first = _run(before, 6)  # inside epoch 0 of every stream
    states = [roundtrip(lo.state_dict()) for lo in before]
    for lo in before:
        lo.close()
    new = reshard_states(states, 1)[0]
    after = build_train_loader(cfg, 0, 1)
    after.load_state_dict(new)
    last = _run([after], 400)[0]
    after.close()
    fixed = [stream_ids(s) for b in first for s in split_streams(b, 2)]
    open_ = [stream_ids(s) for s in split_streams(last, 2, new["next_worker"])]
    assert_epoch_covered(corpus, fixed, open_, {name: list(corpus[name]) for name in ("a", "b")})


def test_reshard_needs_every_rank(corpus):
    los = [build_train_loader(make_cfg(corpus), r, 2) for r in range(2)]
    with pytest.raises(UserError, match="ranks 0..1"):
        reshard_states([los[1].state_dict()], 1)
