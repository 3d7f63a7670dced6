"""Heuristic quality filters: C4 line rules, Gopher repetition rules, Gopher quality rules.

Thresholds default to the papers: Gopher = Rae et al. 2021, "Scaling Language Models", appendix
A, table A1; C4 = Raffel et al. 2020, section 2.2 (and the tfds ``c4_utils`` reference code).

Order inside this filter (the first failing rule is the drop reason, ``quality.<rule>``):

1. C4 line cleaning (``c4_lines``): it *rewrites* the document (drops lines without terminal
   punctuation, with fewer than 5 words, or mentioning javascript / cookie or privacy policies,
   and citation markers like ``[12]``), and rejects whole pages with "lorem ipsum", "{" (code) or
   fewer than 3 sentences left. It runs first so every later rule and the dedup signature see
   the text that will be kept.
2. Gopher repetition: duplicated lines / paragraphs (by count and by characters), the character
   share of the most frequent 2/3/4-gram, the character share of repeated 5..10-grams.
3. Gopher quality: word count, mean word length, '#' and ellipsis ratios, bullet and ellipsis
   lines, alphabetic words, stop words.

Character fractions use the characters of the words (whitespace excluded) in numerator and
denominator alike. Repeated n-grams count every occurrence after the first (as datatrove does),
with overlapping occurrences covering each character once. The n-gram statistics are vectorised
with numpy over per-document word ids: the Python-level work is one pass over the words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

VERSION = "1"

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "◦", "▪", "·", "–")
C4_END_MARKS = (".", "?", "!", '"', "”", "'")
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_C4_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_PARA_SPLIT = re.compile(r"\n{2,}")
_NO_ALNUM_LINE = re.compile(r"^(?:[^\w\n]|_)*$", re.MULTILINE)  # a vocabulary word without letters or digits
_NO_ALPHA_LINE = re.compile(r"^(?:[^\w\n]|[\d_])*$", re.MULTILINE)  # ... without letters
_STOP_VARIANTS = frozenset(v for s in STOP_WORDS for v in (s, s.capitalize(), s.upper()))
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant: polynomial n-gram keys wrap mod 2**64


@dataclass
class Words:
    """Whitespace words of a document as ids into its own vocabulary (computed once, shared
    by the quality rules and the dedup signature)."""

    words: list[str]
    vocab: list[str]
    ids: np.ndarray  # uint64 per word, index into vocab
    lens: np.ndarray = field(init=False)  # int64 chars per word
    cum: np.ndarray = field(init=False)  # prefix sums of lens, len(words) + 1

    def __post_init__(self) -> None:
        vocab_len = np.fromiter(map(len, self.vocab), dtype=np.int64, count=len(self.vocab))
        self.lens = vocab_len[self.ids] if len(self.ids) else np.zeros(0, np.int64)
        self.cum = np.concatenate(([0], np.cumsum(self.lens)))

    @classmethod
    def of(cls, text: str) -> Words:
        words = text.split()
        vocab = list(dict.fromkeys(words))  # first-seen order; C-speed dedup
        index = {w: i for i, w in enumerate(vocab)}
        ids = np.fromiter(map(index.__getitem__, words), dtype=np.uint64, count=len(words))
        return cls(words, vocab, ids)

    @property
    def chars(self) -> int:
        return int(self.cum[-1])


def ngram_keys(ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit keys of every word n-gram (position i covers words i..i+n-1)."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    keys = ids[:m] + np.uint64(1)
    for k in range(1, n):
        keys = keys * _MULT + (ids[k : k + m] + np.uint64(1))
    return keys


def top_ngram_char_frac(w: Words, n: int) -> float:
    """Characters in the most frequent n-gram (all its occurrences) / all characters."""
    keys = ngram_keys(w.ids, n)
    if len(keys) < 2 or w.chars == 0:
        return 0.0
    srt = np.sort(keys)
    bounds = np.flatnonzero(np.concatenate(([True], srt[1:] != srt[:-1], [True])))
    counts = np.diff(bounds)
    best = int(np.argmax(counts))
    if counts[best] < 2:
        return 0.0
    pos = int(np.flatnonzero(keys == srt[bounds[best]])[0])
    return min(1.0, float(counts[best]) * float(w.cum[pos + n] - w.cum[pos]) / w.chars)


def dup_ngram_char_frac(w: Words, n: int) -> float:
    """Characters covered by repeated occurrences of n-grams / all characters."""
    keys = ngram_keys(w.ids, n)
    if len(keys) < 2 or w.chars == 0:
        return 0.0
    order = np.argsort(keys, kind="stable")  # stable: the first of a run is the earliest occurrence
    srt = keys[order]
    starts = order[1:][srt[1:] == srt[:-1]]
    if len(starts) == 0:
        return 0.0
    nw = len(w.ids)
    delta = np.bincount(starts, minlength=nw + 1) - np.bincount(starts + n, minlength=nw + 1)
    covered = np.cumsum(delta)[:nw] > 0
    return float(w.lens[covered].sum()) / w.chars


def _dup_fracs(parts: list[str]) -> tuple[float, float]:
    """(fraction of parts that repeat an earlier part, fraction of characters in them)."""
    parts = [p for p in parts if p.strip()]
    if not parts:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total = 0
    for p in parts:
        total += len(p)
        if p in seen:
            dup += 1
            dup_chars += len(p)
        else:
            seen.add(p)
    return dup / len(parts), dup_chars / max(1, total)


def c4_clean(text: str, min_words_per_line: int = 5, min_sentences: int = 3,
             drop_curly: bool = True) -> tuple[str, str | None]:
    """C4 line rules: (cleaned text, None) or (text, reason) when the whole page is rejected."""
    kept: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        low = line.lower()
        if "lorem ipsum" in low:
            return text, "c4_lorem_ipsum"
        if drop_curly and "{" in line:
            return text, "c4_curly_bracket"
        if "[" in line:
            line = _C4_CITATION.sub("", line)
        if not line.endswith(C4_END_MARKS) or line.endswith(("...", "…")):
            continue
        if len(line.split()) < min_words_per_line:
            continue
        if "javascript" in low or any(p in low for p in C4_POLICY):
            continue
        kept.append(line)
    sentences = 0
    for line in kept:  # every kept line ends with a terminal mark, so most hold >= 1 sentence
        sentences += len(_SENTENCE_END.findall(line))
        if sentences >= min_sentences:
            return "\n".join(kept), None
    return text, "c4_too_few_sentences"


class QualityFilter:
    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def apply(self, text: str) -> tuple[str, str | None, Words | None]:
        """(possibly rewritten text, drop reason or None, the words of the kept text)."""
        c = self.cfg
        if c.c4_lines:
            text, reason = c4_clean(text, c.c4_min_words_per_line, c.c4_min_sentences, c.c4_drop_curly_bracket)
            if reason:
                return text, reason, None
        w = Words.of(text)
        reason = (self._repetition(text, w) if c.repetition else None) or self._gopher_quality(text, w)
        return text, reason, w

    def _repetition(self, text: str, w: Words) -> str | None:
        c = self.cfg
        frac, char_frac = _dup_fracs(_PARA_SPLIT.split(text.strip()))
        if frac > c.max_dup_para_frac:
            return "dup_para_frac"
        if char_frac > c.max_dup_para_char_frac:
            return "dup_para_char_frac"
        frac, char_frac = _dup_fracs(text.split("\n"))
        if frac > c.max_dup_line_frac:
            return "dup_line_frac"
        if char_frac > c.max_dup_line_char_frac:
            return "dup_line_char_frac"
        for n, limit in zip((2, 3, 4), c.max_top_ngram_char_frac, strict=True):
            if top_ngram_char_frac(w, n) > limit:
                return f"top_{n}gram_char_frac"
        # Characters covered by repeated (n+1)-grams are a subset of those covered by repeated
        # n-grams, so once a fraction is below every remaining threshold the rest cannot fail.
        limits = list(zip(range(5, 11), c.max_dup_ngram_char_frac, strict=True))
        for i, (n, limit) in enumerate(limits):
            frac = dup_ngram_char_frac(w, n)
            if frac > limit:
                return f"dup_{n}gram_char_frac"
            if frac <= min(lim for _, lim in limits[i:]):
                break
        return None

    def _gopher_quality(self, text: str, w: Words) -> str | None:
        c = self.cfg
        # Per-vocabulary-word flags from two regex scans over the joined vocabulary (C speed; a
        # Python test per word dominated the cost of short documents).
        if not w.vocab:
            return "min_words"
        joined = "\n".join(w.vocab)
        index = {v: i for i, v in enumerate(w.vocab)}
        vocab_alnum = np.ones(len(w.vocab), dtype=bool)
        vocab_alnum[[index[v] for v in _NO_ALNUM_LINE.findall(joined)]] = False
        vocab_alpha = vocab_alnum.copy()
        vocab_alpha[[index[v] for v in _NO_ALPHA_LINE.findall(joined)]] = False
        ids = w.ids.astype(np.intp)
        real = vocab_alnum[ids]  # words that are not just symbols/punctuation
        n_words = int(real.sum())
        if n_words < c.min_words:
            return "min_words"
        if n_words > c.max_words:
            return "max_words"
        mean_len = float(w.lens[real].mean())
        if mean_len < c.min_mean_word_len or mean_len > c.max_mean_word_len:
            return "mean_word_len"
        if text.count("#") / n_words > c.max_symbol_word_ratio:
            return "hash_word_ratio"
        if (text.count("...") + text.count("…")) / n_words > c.max_symbol_word_ratio:
            return "ellipsis_word_ratio"
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if lines:
            if sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines) > c.max_bullet_lines_ratio:
                return "bullet_lines"
            if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > c.max_ellipsis_lines_ratio:
                return "ellipsis_lines"
        if float(vocab_alpha[ids].mean()) < c.min_alpha_words_ratio:
            return "alpha_words"
        if len({v.lower() for v in _STOP_VARIANTS.intersection(w.vocab)}) < c.min_stop_words:
            return "stop_words"
        return None
