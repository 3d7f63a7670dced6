"""Bias audit of the scrub's filters, and optional gendered counterfactual substitution.

Why: blocklist and classifier filters remove text *about* some groups far more often than
average; C4's blocklist removed documents about LGBTQ identities and in dialect English at several
times the base rate (Dodge et al. 2021, "Documenting Large Webtext Corpora"). The audit measures
that for every filter of this run.

For each document that reaches a filter we know which identity groups it mentions (term lists
in ``resources/identity_terms.json`` or ``scrub.bias.terms_file``). Per filter f and group g:

    rate(f)    = removed(f) / entered(f)
    rate(f, g) = removed(f, g) / entered(f, g)      (documents mentioning g)
    disparity  = rate(f, g) / rate(f)

A group is flagged when disparity >= ``disparity_threshold`` (default 2) and at least ``min_docs``
documents mentioning it reached the filter (fewer is noise, reported but not flagged).

Counterfactual substitution (off by default): a deterministic ``counterfactual_rate`` fraction
of kept documents (chosen by a hash of the id) has gendered words swapped (he<->she, man<->woman,
...). This is substitution, not augmentation (Maudslay et al. 2019, "It's All in the Name"):
the swapped text replaces the original, which keeps kept + dropped = read and avoids adding
near-duplicates right after dedup.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import xxhash

from pretrain.errors import UserError

VERSION = "1"
FILTERS = ("language", "quality", "dedup", "toxicity")
DEFAULT_TERMS = Path(__file__).resolve().parents[2] / "resources" / "identity_terms.json"
_PUNCT = string.punctuation + "“”‘’«»…"


def load_groups(path: str | Path = "") -> dict[str, list[str]]:
    """{group: [lower-case terms]} from a JSON file (keys starting with '_' are comments)."""
    path = Path(path) if path else DEFAULT_TERMS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"scrub.bias.terms_file: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"scrub.bias.terms_file: {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise UserError(f"scrub.bias.terms_file: {path} must hold a JSON object {{group: [terms]}}")
    groups = {}
    for g, terms in data.items():
        if g.startswith("_"):
            continue
        if not isinstance(terms, list) or not all(isinstance(t, str) and t.strip() for t in terms):
            raise UserError(f"scrub.bias.terms_file: {path}: group {g!r} must be a list of non-empty strings")
        groups[g] = [t.strip().lower() for t in terms]
    if not groups:
        raise UserError(f"scrub.bias.terms_file: {path} defines no groups")
    return groups


class GroupMatcher:
    """Which groups a text mentions, as a bitmask (bit i = groups[i]). Single words are looked up
    in the document's set of words; phrases (with spaces) are searched as whole phrases."""

    def __init__(self, groups: dict[str, list[str]]) -> None:
        self.names = list(groups)
        self.words: dict[str, int] = {}
        phrases: dict[str, int] = {}
        for i, terms in enumerate(groups.values()):
            for t in terms:
                target = phrases if " " in t else self.words
                target[t] = target.get(t, 0) | (1 << i)
        self.phrases = [(p, re.compile(rf"(?<!\w){re.escape(p)}(?!\w)"), bit) for p, bit in phrases.items()]

    def mask(self, text: str) -> int:
        lower = text.lower()
        tokens = {t.strip(_PUNCT) for t in set(lower.split())}
        tokens |= {part for t in tokens if "-" in t for part in t.split("-")}
        m = 0
        for t in tokens.intersection(self.words):
            m |= self.words[t]
        for phrase, pattern, bit in self.phrases:
            if not m & bit and phrase in lower and pattern.search(lower):
                m |= bit
        return m

    def names_of(self, mask: int) -> list[str]:
        return [g for i, g in enumerate(self.names) if mask >> i & 1]


class BiasAudit:
    """Counts per filter and group; ``data`` is plain JSON and merges by addition."""

    def __init__(self, groups: list[str]) -> None:
        self.groups = groups
        zero = dict.fromkeys(groups, 0)
        self.data = {
            "filters": {f: {"entered": 0, "removed": 0, "entered_by_group": dict(zero), "removed_by_group": dict(zero)}
                        for f in FILTERS},
            "kept": 0, "dropped": 0,
            "kept_by_group": dict(zero), "dropped_by_group": dict(zero),
        }

    def record(self, filter_name: str, mask: int, removed: bool) -> None:
        f = self.data["filters"][filter_name]
        f["entered"] += 1
        f["removed"] += removed
        for i, g in enumerate(self.groups):
            if mask >> i & 1:
                f["entered_by_group"][g] += 1
                f["removed_by_group"][g] += removed

    def final(self, mask: int, kept: bool) -> None:
        key = "kept" if kept else "dropped"
        self.data[key] += 1
        for i, g in enumerate(self.groups):
            if mask >> i & 1:
                self.data[f"{key}_by_group"][g] += 1


def add_counts(dst: dict, src: dict) -> dict:
    """dst += src for nested dicts of numbers (keys missing in dst are copied)."""
    for k, v in src.items():
        if isinstance(v, dict):
            add_counts(dst.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            dst[k] = dst.get(k, 0) + v
    return dst


def disparity_rows(data: dict, threshold: float, min_docs: int) -> list[dict]:
    """One row per (filter, group): rates, disparity (None when undefined) and the flag."""
    rows = []
    for f, c in data["filters"].items():
        overall = c["removed"] / c["entered"] if c["entered"] else 0.0
        for g, entered in c["entered_by_group"].items():
            removed = c["removed_by_group"][g]
            rate = removed / entered if entered else None
            disparity = rate / overall if rate is not None and overall > 0 else None
            rows.append({
                "filter": f, "group": g, "entered": entered, "removed": removed,
                "rate": rate, "overall_rate": overall, "disparity": disparity,
                "flagged": bool(disparity is not None and disparity >= threshold and entered >= min_docs),
                "enough_docs": entered >= min_docs,
            })
    return rows


# ---------------------------------------------------------------------------------------------
# counterfactual substitution

GENDER_PAIRS = [
    ("he", "she"), ("him", "her"), ("his", "her"), ("himself", "herself"), ("man", "woman"),
    ("men", "women"), ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"),
    ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"),
    ("husband", "wife"), ("husbands", "wives"), ("king", "queen"), ("kings", "queens"),
    ("male", "female"), ("males", "females"), ("uncle", "aunt"), ("nephew", "niece"),
    ("gentleman", "lady"), ("gentlemen", "ladies"), ("mr", "mrs"), ("grandfather", "grandmother"),
]
_SWAP: dict[str, str] = {}
for _a, _b in GENDER_PAIRS:
    _SWAP.setdefault(_a, _b)
    _SWAP.setdefault(_b, _a)  # "her" -> "him" here; the possessive case is fixed in _swap_word
_SWAP_RE = re.compile(r"\b(" + "|".join(sorted(_SWAP, key=len, reverse=True)) + r")\b(?=(\s*\w)?)", re.IGNORECASE)


def _swap_word(m: re.Match) -> str:
    word, after = m.group(1), m.group(2) or ""
    low = word.lower()
    out = _SWAP[low]
    if low == "her":  # possessive when a word follows ("her book" -> "his book"), else object
        out = "his" if after.strip() else "him"
    if word.isupper() and len(word) > 1:
        out = out.upper()
    elif word[0].isupper():
        out = out.capitalize()
    return out


def counterfactual_swap(text: str) -> str:
    """Swap gendered words, keeping their capitalisation."""
    return _SWAP_RE.sub(_swap_word, text)


def chosen_for_swap(doc_id: str, rate: float, seed: int = 0) -> bool:
    """Deterministic per-document coin: same id, rate and seed -> same choice on any machine."""
    if rate <= 0:
        return False
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8", "surrogatepass"), seed=seed) < rate * 2**64
