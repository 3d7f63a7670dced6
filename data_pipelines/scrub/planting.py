"""How the scrub plants canaries (``scrub.canaries``) and follows every copy through the filters.

1. **plan** (before phase 1, the same on every scrub rank): read the first ``host_pool``
   documents and keep as possible hosts those the per-document filters (normalize, language,
   quality) keep *as they are*, that have at least ``min_host_words`` words and no exact
   duplicate among them: a copy planted in a document dropped for its own reasons would measure
   nothing, in a long document a few planted sentences cannot tip a word-ratio rule, and a copy in
   one of two identical pages would make them differ and keep both. Each canary's copies go to that many
   *different* hosts (least loaded first, ties in seeded random order), each appended to a line the
   C4 line rules keep. Dedup then keeps them, as it keeps a secret repeated across real pages.
2. **plant** (phase 1, right after a record is read, before any filter): the copy's sentence is
   appended to its line of the raw text.
3. **follow** (phases 1 and 3): :class:`CopyTracker` gives each copy one outcome: ``dropped.<reason>``
   when its host is dropped, ``altered.<filter>`` when a filter rewrote its text (quality line
   rules, toxicity masking, counterfactual swap), ``redacted.pii`` when PII redaction did, else
   ``kept`` (verbatim in the shards). Per canary, the outcomes add up to the copies planted.

The plan and, at the end, the outcomes are written to the registry beside the output
(:mod:`data_pipelines.scrub.canaries`). The output directory holds the planted text (that is the
point) but never the answer key: its markers name canaries by id only.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field

from data_pipelines.scrub import canaries as cn
from data_pipelines.scrub.filters.dedup import exact_key
from data_pipelines.scrub.filters.language import LanguageFilter
from data_pipelines.scrub.filters.normalize import normalize_text
from data_pipelines.scrub.filters.quality import QualityFilter, Words
from data_pipelines.scrub.readers import InputUnit, read_unit
from pretrain.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class UnitCanaries:
    """The canaries one unit hosts: record ordinal -> [(line index, canary)] (phase 1), and the
    texts to look for by canary id (phase 3). Small and picklable: it travels to the workers."""

    placements: dict[int, list[tuple[int, cn.Canary]]] = field(default_factory=dict)
    by_id: dict[str, cn.Canary] = field(default_factory=dict)


@dataclass
class Plan:
    registry: cn.Registry
    saved: bool = False  # already in the registry file

    def for_unit(self, key: str) -> UnitCanaries:
        out = UnitCanaries(by_id={c.id: c for c in self.registry.canaries})
        for c in self.registry.canaries:  # in canary order: two copies on one line land in the same order everywhere
            for h in self.registry.hosts.get(c.id, []):
                if h["unit"] == key:
                    out.placements.setdefault(h["record"], []).append((h["line"], c))
        return out


def _canaries(cfg) -> list[cn.Canary]:
    c = cfg.scrub.canaries
    return cn.make_canaries(c.seed, list(c.levels), c.secrets_per_level, c.pii_per_level, list(c.pii_kinds))


class _HostCheck:
    """Can a document host a copy? The per-document filters keep it as it is, it has at least
    min_host_words words, and it has lines the C4 line rules keep (a copy is appended to one)."""

    def __init__(self, s) -> None:
        self.s = s
        self.language = LanguageFilter(s.language) if s.language.enabled else None
        self.quality = QualityFilter(s.quality) if s.quality.enabled else None

    def _norm(self, text: str) -> str:
        return normalize_text(text).text if self.s.normalize.enabled else text

    def lines(self, raw: str) -> tuple[list[int], int]:
        """(indices of the raw lines a copy may be appended to, empty when it cannot host; the
        document's exact-dedup key as phase 1 computes it)."""
        s = self.s
        normalized = normalize_text(raw) if s.normalize.enabled else None
        if normalized is not None and normalized.invalid_ratio(len(raw)) > s.normalize.max_invalid_utf8_ratio:
            return [], 0
        text = raw if normalized is None else normalized.text
        if not text.strip() or (self.language and not self.language.keep(text)[0]):
            return [], 0
        cleaned, words = text, None
        if self.quality:
            cleaned, reason, words = self.quality.apply(text)  # the words of the kept text
            if reason:
                return [], 0
        if len((words or Words.of(cleaned)).ids) < s.canaries.min_host_words:
            return [], 0
        kept = {line.strip() for line in cleaned.split("\n")}
        lines = [i for i, line in enumerate(raw.split("\n")) if line.strip() and self._norm(line).strip() in kept]
        return lines, exact_key(cleaned)


def make_plan(cfg, units: list[InputUnit], config_hash: str) -> cn.Registry:
    """Choose the hosts of every copy (see the module docstring). Deterministic in the config and
    the corpus, so every scrub rank computes the same plan."""
    s = cfg.scrub
    canaries = _canaries(cfg)
    check = _HostCheck(s)
    pool: list[tuple[str, int, str, list[int]]] = []  # (unit key, record ordinal, record id, lines)
    keys: list[int] = []
    seen = 0
    for unit in units:
        for ordinal, rec in enumerate(read_unit(unit, s)):
            if seen >= s.canaries.host_pool:
                break
            seen += 1
            if rec.error is None and rec.text:
                lines, key = check.lines(rec.text)
                if lines:
                    pool.append((unit.key, ordinal, rec.id, lines))
                    keys.append(key)
        if seen >= s.canaries.host_pool:
            break
    counts = Counter(keys)
    pool = [p for p, k in zip(pool, keys, strict=True) if counts[k] == 1]
    need = max(c.repetitions for c in canaries)
    if len(pool) < need:
        raise UserError(
            f"scrub.canaries.levels: the largest level plants {need} copies, each in a different document, but only "
            f"{len(pool)} of the first {seen} documents can host one (kept by the per-document filters, at least "
            f"scrub.canaries.min_host_words={s.canaries.min_host_words} words, no exact duplicate); lower the "
            "levels or min_host_words")
    rng = random.Random(f"hosts:{s.canaries.seed}")
    load = [0] * len(pool)
    hosts: dict[str, list[dict]] = {}
    for c in sorted(canaries, key=lambda c: -c.repetitions):  # the big levels first: they need the most room
        order = rng.sample(range(len(pool)), len(pool))
        chosen = sorted(order, key=lambda i: load[i])[: c.repetitions]  # stable: random among equals
        for i in sorted(chosen):
            key, ordinal, rid, lines = pool[i]
            load[i] += 1
            hosts.setdefault(c.id, []).append({"unit": key, "record": ordinal, "id": rid, "line": rng.choice(lines)})
    hosts = {c.id: hosts[c.id] for c in canaries}
    log.info("canaries: %d canaries, %d copies in %d of %d possible hosts (first %d documents)",
             len(canaries), sum(c.repetitions for c in canaries), sum(1 for n in load if n), len(pool), seen)
    return cn.Registry(config_hash, canaries, hosts)


def prepare(cfg, units: list[InputUnit], config_hash: str) -> Plan | None:
    """The plan of this scrub: the registry's when it holds this config's plan (a resumed or
    multi-rank scrub), else a new one (written by :func:`save`). None when canaries are off."""
    if not cfg.scrub.canaries.enabled:
        return None
    path = cn.registry_path(cfg.scrub)
    if path.is_file():
        reg = cn.read_registry(path)
        if reg.config_hash == config_hash and [c.id for c in reg.canaries] == [c.id for c in _canaries(cfg)]:
            return Plan(reg, saved=True)
    return Plan(make_plan(cfg, units, config_hash))


def save(cfg, plan: Plan) -> None:
    """Write a new plan to the registry beside the output (before any copy is planted)."""
    if not plan.saved:
        path = cn.write_registry(cn.registry_path(cfg.scrub), plan.registry)
        plan.saved = True
        log.info("canary registry (the answer key; outside the scrub output): %s", path)


def plant(text: str, placements: list[tuple[int, cn.Canary]]) -> str:
    """Append each copy's sentence to its line (after the line's own last sentence)."""
    lines = text.split("\n")
    for i, c in placements:
        line = lines[i]
        body = line.rstrip()
        lines[i] = body + " " + c.sentence + line[len(body):]
    return "\n".join(lines)


class CopyTracker:
    """The outcome of every planted copy of one unit in one phase (see the module docstring).

    ``enter`` starts a document, ``dropped`` / ``check`` / ``keep`` settle its copies; the loops of
    the runner call them at the points where a document is dropped or rewritten. Without canaries
    every call is a dictionary miss.
    """

    def __init__(self, unit: UnitCanaries | None = None, hosts: dict[int, list[str]] | None = None):
        self.unit = unit or UnitCanaries()
        self.hosts = hosts  # phase 3: candidate index -> ids of the copies intact after phase 1
        self.current: list[cn.Canary] = []
        self.outcomes: dict[str, Counter] = {}
        self.survivors: dict[str, list[str]] = {}  # phase 1 -> phase 3, by candidate index

    def plant(self, ordinal: int, text: str) -> str:
        """Phase 1: plant this record's copies (if it is a host) and follow them."""
        placed = self.unit.placements.get(ordinal)
        self.current = [c for _, c in placed] if placed else []
        return plant(text, placed) if placed else text

    def enter(self, candidate: int) -> None:
        """Phase 3: follow the copies that reached this candidate intact."""
        ids = self.hosts.get(str(candidate)) if self.hosts else None
        self.current = [self.unit.by_id[i] for i in ids] if ids else []

    def _count(self, c: cn.Canary, outcome: str) -> None:
        self.outcomes.setdefault(c.id, Counter())[outcome] += 1

    def dropped(self, reason: str) -> None:
        for c in self.current:
            self._count(c, f"dropped.{reason}")
        self.current = []

    def check(self, text: str, outcome: str) -> None:
        """Copies no longer verbatim in ``text`` get ``outcome``; the others stay followed."""
        if not self.current:
            return
        intact = []
        for c in self.current:
            if c.text in text:
                intact.append(c)
            else:
                self._count(c, outcome)
        self.current = intact

    def survive(self, candidate: int) -> None:
        """Phase 1: the document became candidate ``candidate``; phase 3 follows its copies on."""
        if self.current:
            self.survivors[str(candidate)] = [c.id for c in self.current]
        self.current = []

    def keep(self) -> None:
        """Phase 3: the document is written; its intact copies are in the shards."""
        for c in self.current:
            self._count(c, "kept")
        self.current = []

    def to_dict(self) -> dict:
        return {cid: dict(n) for cid, n in sorted(self.outcomes.items())}


def finish(cfg, plan: Plan, outcomes: dict[str, dict[str, int]]) -> dict:
    """Check that every copy has exactly one outcome, write the outcomes into the registry, and
    return the report's canary section (copies per family and outcome)."""
    reg = plan.registry
    for c in reg.canaries:
        got = sum(outcomes.get(c.id, {}).values())
        if got != c.repetitions:  # a bug, never the user's fault
            raise RuntimeError(f"canary {c.id}: {c.repetitions} copies planted but {got} accounted for")
    reg.outcomes = {c.id: dict(outcomes.get(c.id, {})) for c in reg.canaries}
    path = cn.write_registry(cn.registry_path(cfg.scrub), reg)
    families: dict[str, dict] = {}
    for c in reg.canaries:
        fam = families.setdefault(c.family, {"canaries": 0, "present_after_scrub": 0, "copies": Counter()})
        fam["canaries"] += 1
        fam["present_after_scrub"] += reg.present_after_scrub(c.id)
        fam["copies"]["planted"] += c.repetitions
        fam["copies"].update(reg.outcomes[c.id])
    for fam in families.values():
        fam["copies"] = dict(sorted(fam["copies"].items()))
    return {"registry": str(path), "families": families}
