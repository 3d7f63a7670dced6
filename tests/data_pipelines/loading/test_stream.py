"""The streaming loader: batch format, epoch coverage across ranks x workers, hold-out, mixing, gate."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from _loader_fixtures import (
    MB,
    SEQ,
    assert_epoch_covered,
    doc_len,
    find_epoch_cover,
    make_cfg,
    make_corpus,
    split_streams,
    stream_ids,
    words,
)

from data_pipelines.loaders import build_train_loader, build_val_loader
from data_pipelines.loading.sources import is_heldout
from pretrain.config import load_config
from pretrain.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_batch_format_and_document_boundaries(corpus):
    loader = build_train_loader(make_cfg(corpus), 0, 1)
    b1, b2 = next(loader), next(loader)
    for k in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert b1[k].shape == (MB, SEQ) and b1[k].dtype == torch.long
    # labels are the next tokens; windows overlap by one token, so nothing is lost between rows
    assert torch.equal(b1["labels"][:, :-1], b1["input_ids"][:, 1:])
    assert b1["labels"][0, -1] == b1["input_ids"][1, 0]
    assert b1["labels"][1, -1] == b2["input_ids"][0, 0]
    eos = 0
    table = corpus["table"]
    for row in range(MB):
        ids, pos, doc = b1["input_ids"][row], b1["position_ids"][row], b1["doc_ids"][row]
        assert pos[0] == 0 and doc[0] == 0
        for t in range(1, SEQ):
            if ids[t - 1] == eos:  # a new document starts after every separator
                assert pos[t] == 0 and doc[t] == doc[t - 1] + 1
            else:  # same document: consecutive words, consecutive positions
                assert pos[t] == pos[t - 1] + 1 and doc[t] == doc[t - 1]
                if ids[t] != eos:
                    assert table[int(ids[t])][0] == table[int(ids[t - 1])][0]
                    assert table[int(ids[t])][1] == table[int(ids[t - 1])][1] + 1


@pytest.mark.slow
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2)])
def test_epoch_covers_every_token_once_across_ranks_and_workers(corpus, world, workers):
    cfg = make_cfg(corpus, f"data.num_workers={workers}", mix=True)
    loaders = [build_train_loader(cfg, r, world) for r in range(world)]
    total = sum(doc_len(corpus, d) for d in [*corpus["a"], *corpus["b"]])
    per_rank: list[list[dict]] = [[] for _ in loaders]
    n = 4 * total // (MB * SEQ * world) + 40  # source a (weight 3) runs ~3 epochs, b at least one
    for _ in range(n):
        for got, lo in zip(per_rank, loaders, strict=True):
            got.append(next(lo))
    for lo in loaders:
        lo.close()
    streams = [stream_ids(s) for got in per_rank for s in split_streams(got, max(1, workers))]
    assert_epoch_covered(corpus, [], streams, {name: list(corpus[name]) for name in ("a", "b")})


def test_mixing_follows_weights_and_seed(corpus):
    cfg = make_cfg(corpus, mix=True)
    lo = build_train_loader(cfg, 0, 1)
    batches = [next(lo) for _ in range(300)]
    ids = stream_ids(batches)
    starts = Counter()  # documents drawn per source (a document's first word marks its draw)
    for prefix in ("d", "m"):
        starts[prefix] = sum(j == 0 for _, j in words(corpus, ids, prefix))
    share = starts["d"] / (starts["d"] + starts["m"])
    assert 0.68 < share < 0.82, share  # weights 3:1
    same = build_train_loader(cfg, 0, 1)
    assert torch.equal(next(same)["input_ids"], batches[0]["input_ids"])
    other = build_train_loader(make_cfg(corpus, "run.seed=7", mix=True), 0, 1)
    assert not torch.equal(next(other)["input_ids"], batches[0]["input_ids"])


def test_shuffle_changes_order_and_can_be_off(corpus):
    def first_docs(loader):  # the documents of the first 12 rows, in order
        docs = [d for d, _ in words(corpus, stream_ids([next(loader) for _ in range(6)]), "d")]
        return [d for i, d in enumerate(docs) if i == 0 or docs[i - 1] != d]

    ordered = first_docs(build_train_loader(make_cfg(corpus, "data.shuffle=false"), 0, 1))
    assert ordered == [f"d-{k}" for k in range(len(ordered))]  # file order
    assert first_docs(build_train_loader(make_cfg(corpus), 0, 1)) != ordered


def test_heldout_documents_never_reach_training_and_form_validation(corpus):
    cfg = make_cfg(corpus, "train.eval_batches=3", val_fraction=0.25)
    held = {d for d in corpus["a"] if is_heldout(d, 0.25)}
    assert 5 < len(held) < 30
    lo = build_train_loader(cfg, 0, 1)
    batches = [next(lo) for _ in range(80)]  # > 1 epoch of the training documents
    seen = {d for d, _ in words(corpus, stream_ids(batches), "d")}
    assert seen == set(corpus["a"]) - held
    table = corpus["table"]
    val = list(build_val_loader(cfg, 0, 1))
    assert len(val) == 3 and val[0]["input_ids"].shape == (MB, SEQ)
    val_docs = {f"d-{table[int(t)][0][1:]}" for b in val for t in b["input_ids"].flatten() if int(t) in table}
    assert val_docs and val_docs <= held
    again = list(build_val_loader(cfg, 0, 1))  # deterministic: same batches every time
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(val, again, strict=True))
    r0, r1 = (list(build_val_loader(cfg, r, 2)) for r in (0, 1))  # ranks hold different shares
    assert not torch.equal(r0[0]["input_ids"], r1[0]["input_ids"])


def test_validation_sources_are_used_and_gated(corpus, tmp_path):
    cfg = make_cfg(corpus, f"data.validation=[{{name: v, path: {corpus['root'] / 'b'}}}]", "train.eval_batches=2")
    val = list(build_val_loader(cfg, 0, 1))
    words = {corpus["table"][int(t)][0][0] for b in val for t in b["input_ids"].flatten() if int(t) in corpus["table"]}
    assert words == {"m"}
    (tmp_path / "raw").mkdir()
    bad = make_cfg(corpus, f"data.validation=[{{name: v, path: {tmp_path / 'raw'}}}]")
    with pytest.raises(UserError, match=r"data.validation\[0\].path.*raw.*no scrub manifest"):
        build_train_loader(bad, 0, 1)


def test_privacy_gate_refuses_unscrubbed_unless_allowed(corpus, tmp_path, caplog):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "docs.jsonl").write_text("".join(f'{{"id": "r{i}", "text": "d{i}w0 d{i}w1"}}\n' for i in range(20)))
    cfg = load_config(None, [f"data.sources=[{{name: raw, path: {raw}}}]", f"data.tokenizer={corpus['tok']}",
                             f"data.seq_len={SEQ}", f"train.micro_batch_size={MB}", "data.chunk_docs=4", "train.eval_every=0"])
    with pytest.raises(UserError, match=rf"data.sources\[0\].path: {raw} has no scrub manifest.*require_scrubbed=false"):
        build_train_loader(cfg, 0, 1)
    cfg.data.require_scrubbed = False
    with caplog.at_level(logging.WARNING):
        lo = build_train_loader(cfg, 0, 1)
    assert lo.unscrubbed_sources == [str(raw)]
    assert "NOT scrubbed" in caplog.text
    assert next(lo)["input_ids"].shape == (MB, SEQ)


def test_privacy_gate_exit_status_2_at_the_cli(corpus, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (tmp_path / "c.yaml").write_text("data:\n  seq_len: 16\n")
    r = subprocess.run([sys.executable, "-m", "data_pipelines", "pretokenize", str(tmp_path / "c.yaml"),
                        f"data.sources=[{{name: raw, path: {raw}}}]", f"data.tokenizer={corpus['tok']}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert str(raw) in r.stderr and "Traceback" not in r.stderr


def test_too_few_chunks_for_the_streams_is_a_user_error(corpus):
    cfg = make_cfg(corpus, "data.chunk_docs=40", "data.num_workers=2")  # 2 chunks, 2 ranks x 2 workers
    with pytest.raises(UserError, match="has 2 chunks.*fewer than the 4 loader streams") as e:
        build_train_loader(cfg, 0, 2)
    suggested = re.search(r"data.chunk_docs <= (\d+)", str(e.value)).group(1)  # the advice works
    build_train_loader(make_cfg(corpus, f"data.chunk_docs={suggested}", "data.num_workers=2"), 0, 2)
    with pytest.raises(UserError, match=r"\(60 documents\), fewer than the 400 loader streams.*; use fewer ranks"):
        build_train_loader(make_cfg(corpus, "data.chunk_docs=1", "data.num_workers=2"), 0, 200)
    assert next(build_train_loader(make_cfg(corpus, "data.chunk_docs=40"), 1, 2))["input_ids"].shape == (MB, SEQ)


def test_tokenizer_larger_than_model_vocab_is_a_user_error(corpus):
    with pytest.raises(UserError, match="model.vocab_size"):
        build_train_loader(make_cfg(corpus, "model.vocab_size=10"), 0, 1)


def test_boundaries_helper_matches_a_loop():
    from data_pipelines.loading.packing import boundaries

    ids = np.array([[5, 0, 7, 8, 0, 0, 9], [0, 1, 2, 3, 0, 4, 0]])
    pos, doc = boundaries(ids, 0)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 0, 1]]
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 2, 2]]


@pytest.mark.slow
def test_real_corpus_epoch_decodes_back_to_every_training_document(scrubbed_corpus, tokenizer_path):
    """The embedded Wikipedia sample through the real scrub + BPE: 2 ranks x 1 epoch, byte-exact."""
    import pyarrow.parquet as pq

    from data_pipelines.scrub.manifest import shard_files
    from data_pipelines.tokenizer import load_tokenizer

    cfg = load_config(None, [f"data.sources=[{{name: wiki, path: {scrubbed_corpus}}}]", f"data.tokenizer={tokenizer_path}",
                             "data.seq_len=256", "train.micro_batch_size=8", "data.val_fraction=0.05"])
    texts = {}
    for f in shard_files(scrubbed_corpus):
        t = pq.read_table(f, columns=["id", "text"])
        texts.update(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))
    by_text = {text: doc_id for doc_id, text in texts.items()}
    assert len(by_text) == len(texts)
    expected = {d for d in texts if not is_heldout(d, 0.05)}
    tok = load_tokenizer(tokenizer_path)
    loaders = [build_train_loader(cfg, r, 2) for r in range(2)]
    emitted: list[list[int]] = [[], []]
    docs: list[list[str]] = [[], []]
    for _ in range(200):  # until each rank's documents, up to a cut, are one epoch exactly
        for r, lo in enumerate(loaders):
            emitted[r] += stream_ids([next(lo) for _ in range(5)])
            cut = len(emitted[r]) - emitted[r][::-1].index(0)  # up to the last complete document
            pieces = np.split(np.array(emitted[r][:cut]), np.flatnonzero(np.array(emitted[r][:cut]) == 0) + 1)[:-1]
            texts_r = [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]
            unknown = [x[:60] for x in texts_r if x not in by_text]
            assert not unknown, f"rank {r} emitted text that is no training document (byte-exact): {unknown[:3]}"
            docs[r] = [by_text[x] for x in texts_r]
        if find_epoch_cover([], docs, expected, lambda _: True):
            break
    else:
        raise AssertionError("the two ranks never covered the epoch exactly once")


def test_truncated_unscrubbed_jsonl_source_is_a_user_error(corpus, tmp_path):
    import zstandard

    rows = b"".join(b'{"id": "%d", "text": "%s"}\n' % (i, b"word " * 40) for i in range(500))
    data = zstandard.ZstdCompressor().compress(rows)
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])  # zstandard's reader would stop silently
    cfg = make_cfg(corpus, f"data.sources=[{{name: raw, path: {tmp_path / 'cut.jsonl.zst'}}}]",
                   "data.require_scrubbed=false")
    with pytest.raises(UserError, match="cut.jsonl.zst is corrupt or truncated"):
        build_train_loader(cfg, 0, 1)


def test_workers_survive_preemption_signals(corpus):
    """SIGTERM/SIGUSR1 reach every process of the job step on preemption (SLURM signals the step's
    processes, launch/slurm.sbatch forwards SIGUSR1 the same way): the workers
    must leave them to the trainer, or the loader dies before the trainer can save."""
    import os
    import signal

    loader = build_train_loader(make_cfg(corpus, "data.num_workers=2"), 0, 1)
    try:
        next(loader), next(loader)  # both workers delivered, so both have run their init (signal set-up)
        workers = loader._dl_iter._workers
        assert len(workers) == 2
        for w in workers:
            os.kill(w.pid, signal.SIGTERM)
            os.kill(w.pid, signal.SIGUSR1)
        for _ in range(6):  # every worker delivers again
            next(loader)
        assert all(w.is_alive() for w in workers)
    finally:
        loader.close()
