"""Pretokenized mode: memmap shards + index, seeded sampling, O(1) resume, elastic by global index."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _loader_fixtures import MB, SEQ, make_cfg, make_corpus, words, write_word_tokenizer

from data_pipelines.loaders import build_train_loader, reshard_states
from data_pipelines.loading.pretokenize import pretokenize, token_dtype
from data_pipelines.loading.sources import is_heldout
from data_pipelines.tokenizer import load_tokenizer
from pretrain.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pretok(corpus):
    out = corpus["root"] / "pretok"
    cfg = make_cfg(corpus, f"data.pretokenized_dir={out}", "data.mode=pretokenized", mix=True, val_fraction=0.2)
    assert pretokenize(cfg) == 0
    return cfg


def test_shards_hold_the_training_documents_joined_by_the_separator(corpus, pretok):
    out = Path(pretok.data.pretokenized_dir)
    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["eos_id"] == 0
    assert (out / "manifests" / "a.json").is_file() and index["sources"][0]["manifest_sha256"]
    tok = load_tokenizer(corpus["tok"])
    for src, name in ((0, "a"), (1, "b")):
        tokens = np.concatenate([np.fromfile(out / sh["path"], dtype=np.uint16) for sh in index["sources"][src]["shards"]])
        kept = [t for d, t in corpus[name].items() if not is_heldout(d, 0.2)]
        want = np.concatenate([np.array(tok.encode(t).ids + [0]) for t in kept])
        assert np.array_equal(tokens, want)  # file order, held-out documents left out
    mtime = (out / "index.json").stat().st_mtime_ns
    assert pretokenize(pretok) == 0 and (out / "index.json").stat().st_mtime_ns == mtime  # up to date: no work


def windows(batches: list[dict]) -> list[tuple[int, ...]]:
    """Every sample (row) of the batches as its seq_len + 1 token ids."""
    return [tuple(i) + (lab[-1],) for b in batches
            for i, lab in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True)]


def source_samples(pretok, src: int) -> set[tuple[int, ...]]:
    """Every sample of a source, cut from its shard files: seq_len + 1 tokens, overlapping by one."""
    out = Path(pretok.data.pretokenized_dir)
    index = json.loads((out / "index.json").read_text())
    samples = set()
    for sh in index["sources"][src]["shards"]:
        tokens = np.fromfile(out / sh["path"], dtype=np.uint16).tolist()
        samples |= {tuple(tokens[i * SEQ:i * SEQ + SEQ + 1]) for i in range((len(tokens) - 1) // SEQ)}
    return samples


def test_token_dtype():
    assert token_dtype(65_535) == np.uint16 and token_dtype(65_536) == np.uint32


def test_batches_resume_and_mix(corpus, pretok):
    lo = build_train_loader(pretok, 0, 1)
    batches = [next(lo) for _ in range(400)]
    b = batches[0]
    assert b["input_ids"].shape == (MB, SEQ) and torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    eos_rows = (b["input_ids"] == 0).nonzero()
    for r, t in eos_rows.tolist():  # positions restart after each separator
        if t + 1 < SEQ:
            assert b["position_ids"][r, t + 1] == 0 and b["doc_ids"][r, t + 1] == b["doc_ids"][r, t] + 1
    rows = windows(batches)
    srcs = Counter("a" if words(corpus, list(w), "d") else "b" for w in rows)  # a sample lies in one source
    assert 0.68 < srcs["a"] / len(rows) < 0.82  # weights 3:1
    # every epoch is a permutation of the source's samples: all of them before any twice
    for name, src in (("a", 0), ("b", 1)):
        mine = [w for w in rows if bool(words(corpus, list(w), "d")) == (name == "a")]
        every = source_samples(pretok, src)
        assert len(mine) > len(every)  # the run went past the first epoch
        assert len(set(mine[:len(every)])) == len(every) and set(mine[:len(every)]) == every, name

    fresh = build_train_loader(pretok, 0, 1)
    head = [next(fresh) for _ in range(5)]
    state = json.loads(json.dumps(fresh.state_dict()))
    again = build_train_loader(pretok, 0, 1)
    again.load_state_dict(state)
    tail = [next(again) for _ in range(5)]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(head + tail, batches[:10], strict=True))


@pytest.mark.slow
def test_workers_and_elastic_continue_the_global_sample_sequence(pretok):
    # reference: 1 rank; global batch g = samples [g*mb, (g+1)*mb)
    one = build_train_loader(pretok, 0, 1)
    ref = windows([next(one) for _ in range(24)])
    pretok.data.num_workers = 2
    try:
        two = [build_train_loader(pretok, r, 2) for r in range(2)]
        got = []
        for _ in range(6):  # 6 global batches of 2 ranks = 12 local batches of 1 rank
            for lo in two:
                got += windows([next(lo)])
        states = [json.loads(json.dumps(lo.state_dict())) for lo in two]
        for lo in two:
            lo.close()
    finally:
        pretok.data.num_workers = 0
    new = reshard_states(states, 1)
    back = build_train_loader(pretok, 0, 1)
    back.load_state_dict(new[0])
    got += windows([next(back) for _ in range(12)])
    assert got == ref


def test_wrong_tokenizer_or_missing_index_is_a_user_error(corpus, pretok, tmp_path):
    other = write_word_tokenizer(tmp_path / "other.json", [corpus["b"]])
    cfg = make_cfg(corpus, f"data.pretokenized_dir={pretok.data.pretokenized_dir}", "data.mode=pretokenized",
                   f"data.tokenizer={other}", mix=True)
    with pytest.raises(UserError, match="another tokenizer"):
        build_train_loader(cfg, 0, 1)
    cfg = make_cfg(corpus, f"data.pretokenized_dir={tmp_path / 'none'}", "data.mode=pretokenized")
    with pytest.raises(UserError, match="pretokenize` first"):
        build_train_loader(cfg, 0, 1)


def test_privacy_gate_holds_in_pretokenized_mode(corpus, tmp_path, caplog):
    """Unscrubbed data pretokenized with require_scrubbed=false must not slip into a default run,
    and a source re-scrubbed after pretokenizing must not be trained on stale tokens."""
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(corpus["root"] / "a", raw)
    (raw / "manifest.json").unlink()
    out = tmp_path / "pretok"

    def cfg(*extra):
        return make_cfg(corpus, f"data.sources=[{{name: a, path: {raw}}}]", f"data.pretokenized_dir={out}",
                        "data.mode=pretokenized", *extra)

    assert pretokenize(cfg("data.require_scrubbed=false")) == 0
    with pytest.raises(UserError, match=f"source 'a' \\({raw}\\) pretokenized without a scrub manifest"):
        build_train_loader(cfg(), 0, 1)
    with caplog.at_level("WARNING"):
        loader = build_train_loader(cfg("data.require_scrubbed=false"), 0, 1)
    assert loader.unscrubbed_sources == [str(raw)] and "unscrubbed pretokenized" in caplog.text

    scrubbed = tmp_path / "scrubbed"
    shutil.copytree(corpus["root"] / "a", scrubbed)
    good = make_cfg(corpus, f"data.sources=[{{name: a, path: {scrubbed}}}]", f"data.pretokenized_dir={tmp_path / 'p2'}",
                    "data.mode=pretokenized")
    assert pretokenize(good) == 0 and build_train_loader(good, 0, 1).unscrubbed_sources == []
    m = json.loads((scrubbed / "manifest.json").read_text())
    (scrubbed / "manifest.json").write_text(json.dumps({**m, "config_hash": "redone"}))
    with pytest.raises(UserError, match="changed or is missing since"):
        build_train_loader(good, 0, 1)
    with pytest.raises(UserError, match=f"is {raw} but .* was pretokenized from {scrubbed}"):
        build_train_loader(make_cfg(corpus, f"data.sources=[{{name: a, path: {raw}}}]", "data.mode=pretokenized",
                                    f"data.pretokenized_dir={tmp_path / 'p2'}", "data.require_scrubbed=false"), 0, 1)
