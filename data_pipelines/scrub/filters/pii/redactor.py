"""The redactor: scan once, validate candidates, resolve overlaps, replace.

Detection stays apart from replacement (as in dolma): :meth:`PIIRedactor.detect` returns typed,
scored spans; :meth:`PIIRedactor.redact` replaces given spans, so reports can show what was found
and a policy change does not need a rescan.
"""

from __future__ import annotations

import bisect
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from data_pipelines.scrub.filters.pii import scan
from data_pipelines.scrub.filters.pii.context import Candidate, Settings
from data_pipelines.scrub.filters.pii.patterns import PATTERNS
from data_pipelines.scrub.filters.pii.phone import PhoneValidator
from data_pipelines.scrub.filters.pii.replace import Replacer
from data_pipelines.scrub.filters.pii_types import PII_TYPES, PLACEHOLDERS
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.config import PIIConfig


@dataclass(frozen=True)
class PIISpan:
    start: int
    end: int
    type: str
    score: float = 1.0


_PRIORITY = {t: i for i, t in enumerate(PII_TYPES)}


class PIIRedactor:
    """Detects PII spans and replaces them. Build once per worker process (patterns compile once).

    Picklable: it pickles as its config and rebuilds its scanner on the other side.
    """

    def __init__(self, cfg: PIIConfig):
        unknown = [t for t in cfg.types if t not in PLACEHOLDERS]
        if unknown:
            raise UserError(f"scrub.pii.types: unknown PII type(s) {unknown}; known: {', '.join(PII_TYPES)}")
        self.cfg = cfg
        self.types = frozenset(cfg.types)
        self.patterns = [p for p in PATTERNS if p.type in self.types]
        # ASCII classes in both engines: hyperscan scans bytes, so \d must not match other scripts' digits.
        self.compiled = [re.compile(p.regex, p.flags | re.ASCII) for p in self.patterns]
        phone = PhoneValidator(list(cfg.phone_regions), cfg.phone_cues) if "phone" in self.types else None
        self.settings = Settings(redact_private_ips=cfg.redact_private_ips, phone_cues=cfg.phone_cues, phone=phone)
        key = None
        if cfg.replacement == "pseudonym":
            secret = os.environ.get(cfg.secret_env, "")
            if not secret:
                raise UserError(
                    f"scrub.pii.replacement=pseudonym needs a secret key in the environment variable "
                    f"{cfg.secret_env} (scrub.pii.secret_env), which is not set or empty"
                )
            key = secret.encode()
        self.replacement = Replacer(key)
        engine = cfg.engine
        self.scanner: scan.ReScanner | scan.HyperscanScanner
        if engine == "re" or not self.patterns or (engine == "auto" and not scan.hyperscan_available()):
            self.scanner = scan.ReScanner(self.patterns, self.compiled)
        elif engine in ("auto", "hyperscan"):
            if not scan.hyperscan_available():
                raise UserError("scrub.pii.engine=hyperscan but the hyperscan package is not installed (x86 only); use auto or re")
            self.scanner = scan.HyperscanScanner(self.patterns, self.compiled)
        else:
            raise UserError(f"scrub.pii.engine: expected auto, hyperscan or re; got {engine!r}")

    def __reduce__(self):
        return (PIIRedactor, (self.cfg,))

    @property
    def engine(self) -> str:
        return self.scanner.name

    def detect(self, text: str) -> list[PIISpan]:
        """Validated PII spans, sorted and non-overlapping (higher-priority type, then longer, wins)."""
        if not self.patterns or not text:
            return []
        found: list[tuple[int, int, int, int, PIISpan]] = []  # (prio, -len, claim_start, claim_end, span)
        if "\xa0" in text:  # no-break spaces separate phone digit groups; same length, same offsets
            text = text.replace("\xa0", " ")
        for pid, m in self.scanner.scan(text):
            p = self.patterns[pid]
            cand = Candidate(m, self.settings)
            if p.spans is not None:
                for start, end, score in p.spans(cand):
                    found.append((_PRIORITY[p.type], start - end, start, end, PIISpan(start, end, p.type, score)))
                continue
            score = p.validate(cand)
            if score is None:
                continue
            start, end = m.start(1), m.end(1)
            if p.span_end is not None:
                end = start + (p.span_end(m.group(1)) or end - start)
            c0, c1 = (m.start(), m.end()) if p.claim_whole else (start, end)
            found.append((_PRIORITY[p.type], start - end, c0, c1, PIISpan(start, end, p.type, score)))
        if not found:
            return []
        found.sort(key=lambda f: (f[0], f[1], f[2]))
        # Claimed intervals, disjoint and sorted by start: an overlap can only be with the
        # neighbours of the insertion point (linear in the spans of a PII-dense document).
        starts: list[int] = []
        ends: list[int] = []
        kept: list[PIISpan] = []
        for _, _, c0, c1, span in found:
            i = bisect.bisect_left(starts, c0)
            if (i < len(starts) and starts[i] < c1) or (i > 0 and ends[i - 1] > c0):
                continue
            starts.insert(i, c0)
            ends.insert(i, c1)
            kept.append(span)
        kept.sort(key=lambda s: s.start)
        return kept

    def redact(self, text: str, spans: list[PIISpan] | None = None) -> tuple[str, Counter[str]]:
        """Replace ``spans`` (default: ``detect(text)``); returns the text and counts per type."""
        if spans is None:
            spans = self.detect(text)
        counts: Counter[str] = Counter()
        if not spans:
            return text, counts
        out: list[str] = []
        pos = 0
        for s in sorted(spans, key=lambda s: s.start):
            if s.start < pos:
                raise ValueError(f"overlapping PII spans at {s.start}")
            out.append(text[pos:s.start])
            out.append(self.replacement(s.type, text[s.start:s.end]))
            counts[s.type] += 1
            pos = s.end
        out.append(text[pos:])
        return "".join(out), counts


def measure_throughput(redactor: PIIRedactor, texts: list[str], repeat: int = 1) -> float:
    """MB/s (UTF-8 bytes, 1e6) of ``redactor.redact`` over ``texts`` in this process."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts) * repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        for t in texts:
            redactor.redact(t)
    dt = time.perf_counter() - t0
    return nbytes / 1e6 / dt if dt > 0 else float("inf")
