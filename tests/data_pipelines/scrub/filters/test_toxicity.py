import dataclasses

import pytest

from data_pipelines.scrub.filters.toxicity import ToxicityFilter, chunk_spans
from pretrain.config import ToxicityConfig
from pretrain.errors import UserError

CLEAN = ("The museum opened in 1901 and holds a large collection of paintings. Visitors can walk "
         "through rooms arranged by period. The library next door lends books to students. ")
TOXIC = "You are a fucking idiot and a piece of shit, shut the fuck up."


def test_chunks_cover_text_in_order():
    text = CLEAN * 10
    spans = chunk_spans(text, 100)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(e - s >= 100 for s, e in spans[:-1])
    assert chunk_spans("", 100) == [(0, 0)]


def test_short_toxic_dropped_clean_kept():
    f = ToxicityFilter(ToxicityConfig())
    assert f.apply(TOXIC)[1] == "classifier"
    text, reason, r = f.apply(CLEAN * 3)
    assert reason is None and text == CLEAN * 3 and r.score < 0.5


def test_quantile_keeps_long_document_with_one_toxic_sentence():
    long_doc = CLEAN * 30 + TOXIC + " " + CLEAN * 30
    f = ToxicityFilter(ToxicityConfig(quantile=0.9))
    _, reason, r = f.apply(long_doc)
    assert reason is None and r.max_score >= 0.9 > r.score
    strict = ToxicityFilter(ToxicityConfig(quantile=1.0))
    assert strict.apply(long_doc)[1] == "classifier"


def test_mask_removes_only_toxic_chunks():
    doc = CLEAN * 3 + "\n" + TOXIC + "\n" + CLEAN * 3
    f = ToxicityFilter(ToxicityConfig(action="mask", quantile=1.0, chunk_chars=50))
    text, reason, _ = f.apply(doc)
    assert reason is None
    assert "fuck" not in text and "museum opened" in text
    assert f.apply(TOXIC)[1] == "classifier"  # nothing left: dropped


def test_wordlist(tmp_path):
    wl = tmp_path / "bad.txt"
    wl.write_text("# comment\nzorblax\nfoo bar\n")
    f = ToxicityFilter(ToxicityConfig(wordlists=[str(wl)]))
    assert f.apply(CLEAN + " The Zorblax said hi.")[1] == "wordlist"
    assert f.apply(CLEAN + " zorblaxes are fine.")[1] is None  # whole words only
    assert f.apply(CLEAN + " A foo  bar? no, a foo bar.")[1] == "wordlist"
    with pytest.raises(UserError, match="missing.txt"):
        ToxicityFilter(dataclasses.replace(ToxicityConfig(), wordlists=[str(tmp_path / "missing.txt")]))


def test_score_many_equals_single():
    f = ToxicityFilter(ToxicityConfig())
    docs = [CLEAN, TOXIC, CLEAN * 5 + TOXIC]
    many = f.score_many(docs)
    for d, r in zip(docs, many, strict=True):
        assert r.score == pytest.approx(f.score(d).score)
