"""Toxicity: the profanity classifier that ships in alt-profanity-check's wheel, plus optional
C4-style word lists.

How a long document is scored: the classifier (TF-IDF + calibrated linear SVM) was trained on
short comments, so scoring a whole article at once dilutes a toxic passage into thousands of
neutral words, and taking the *max* over sentences drops a history article for one quoted slur
(the blocklist failure Dodge et al. 2021 documented, which hits texts *about* minorities most).
We split the text into chunks of whole sentences (~``chunk_chars`` characters), score every
chunk, and use the ``quantile`` (default 0.9) of the chunk scores: a short toxic comment (one to
a few chunks) scores like its worst chunk, a long document only when at least ~10% of it is toxic.
``quantile=1.0`` gives the strict max. Detection (chunk spans and scores) is kept apart from the
decision, so ``action=mask`` removes just the chunks at or above the threshold.

A word-list hit (whole word, case-insensitive) drops the document as ``toxicity.wordlist``, as C4
did with its "bad words" list, or with ``action=mask`` removes the chunk holding it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.errors import UserError

VERSION = "alt-profanity-check-1.9.1-q"
# A sentence ends at . ! ? followed by whitespace, or at a newline. (No look-behind: it is
# tried at every character and made this scan 5x slower.)
_BOUNDARY = re.compile(r"[.!?]\s+|\n+")


@functools.cache
def _classifier():
    import warnings

    with warnings.catch_warnings():  # sklearn version notes about the pickled model
        warnings.simplefilter("ignore")
        from profanity_check import profanity_check as pc
    return pc.vectorizer, pc.model


def chunk_spans(text: str, chunk_chars: int) -> list[tuple[int, int]]:
    """Spans of consecutive whole sentences, each about chunk_chars long (the last may be short)."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.start() + (text[m.start()] in ".!?")  # keep the sentence's own punctuation
        if end - start >= chunk_chars:
            spans.append((start, end))
            start = m.end()
    if start < len(text) and text[start:].strip():
        spans.append((start, len(text)))
    elif spans and start < len(text):
        spans[-1] = (spans[-1][0], len(text))
    return spans or [(0, len(text))]


def load_wordlists(paths: list[str]) -> re.Pattern | None:
    terms: list[str] = []
    for p in paths:
        try:
            lines = Path(p).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UserError(f"scrub.toxicity.wordlists: cannot read {p}: {e.strerror}") from None
        terms += [t.strip().lower() for t in lines if t.strip() and not t.startswith("#")]
    if not terms:
        return None
    alternation = "|".join(re.escape(t) for t in sorted(set(terms), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)


@dataclass
class ToxicityResult:
    score: float  # the document score (quantile of chunk scores)
    max_score: float
    spans: list[tuple[int, int]]
    chunk_scores: np.ndarray
    wordlist_hits: list[int]  # chunk indices holding a word-list term


class ToxicityFilter:
    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.wordlist = load_wordlists(list(cfg.wordlists))

    def score(self, text: str) -> ToxicityResult:
        return self.score_many([text])[0]

    def score_many(self, texts: list[str]) -> list[ToxicityResult]:
        """Score several documents with one classifier call: sklearn's per-call overhead (input
        validation, ~7 ms) would otherwise cost more than the scoring of a typical document."""
        all_spans = [chunk_spans(t, self.cfg.chunk_chars) for t in texts]
        chunks = [t[s:e] for t, spans in zip(texts, all_spans, strict=True) for s, e in spans]
        vectorizer, model = _classifier()
        scores = model.predict_proba(vectorizer.transform(chunks))[:, 1] if chunks else np.zeros(0)
        out, pos = [], 0
        for t, spans in zip(texts, all_spans, strict=True):
            sc = scores[pos : pos + len(spans)]
            pos += len(spans)
            hits: list[int] = []
            if self.wordlist is not None:
                hits = [i for i, (s, e) in enumerate(spans) if self.wordlist.search(t, s, e)]
            out.append(ToxicityResult(float(np.quantile(sc, self.cfg.quantile)), float(sc.max()), spans, sc, hits))
        return out

    def apply(self, text: str, r: ToxicityResult | None = None) -> tuple[str, str | None, ToxicityResult]:
        """(text, drop reason or None, detection). With action=mask the text loses toxic chunks.
        Pass ``r`` from :meth:`score_many` to decide without rescoring."""
        r = r if r is not None else self.score(text)
        if self.cfg.action == "drop":
            if r.wordlist_hits:
                return text, "wordlist", r
            return text, ("classifier" if r.score >= self.cfg.threshold else None), r
        bad = set(r.wordlist_hits) | {i for i, s in enumerate(r.chunk_scores) if s >= self.cfg.threshold}
        if not bad:
            return text, None, r
        kept = [text[s:e] for i, (s, e) in enumerate(r.spans) if i not in bad]
        masked = "\n".join(k.strip() for k in kept if k.strip())
        return masked, (None if masked else "classifier"), r
