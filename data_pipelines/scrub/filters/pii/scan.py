"""The one-pass candidate scan: a hyperscan database of every pattern's core, or ``re`` behind
cheap locators where hyperscan is missing. Both yield the same (pattern index, match) pairs: the
same Python regexes extract the exact candidates from the windows either engine finds."""

from __future__ import annotations

import re
from collections.abc import Iterable

from data_pipelines.scrub.filters.pii.patterns import Pattern

# Superset of every card/SSN/IPv4/phone match: 7+ characters from the union of their alphabets,
# digits at both ends (a phone's leading "+ (" is covered by _DIGIT_HEAD). Line breaks, tabs and
# HTML no-break spaces are in it for numbers cut by layout ("(617)\n 253-1000").
DIGIT_RUN = re.compile(r"\d(?:[\d().\-/ \u00a0\t\r\n]|&nbsp;|&#160;){5,}\d")
# The same without the entities: a plain character class scans ~2x faster, and a text with neither
# entity has the same matches.
_DIGIT_RUN_PLAIN = re.compile(r"\d[\d().\-/ \u00a0\t\r\n]{5,}\d")
_DIGIT_HEAD = 3


def hyperscan_available() -> bool:
    try:
        import hyperscan  # noqa: F401  (x86-only optional dependency)
    except ImportError:
        return False
    return True


def _digit_windows(text: str, tail: int) -> list[tuple[int, int]]:
    windows: list[tuple[int, int]] = []
    n = len(text)
    runs = DIGIT_RUN if "&nbsp;" in text or "&#160;" in text else _DIGIT_RUN_PLAIN
    for m in runs.finditer(text):
        lo, hi = max(0, m.start() - _DIGIT_HEAD), min(n, m.end() + tail)
        if windows and lo <= windows[-1][1]:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
    return windows


def _anchor_windows(hay: str, anchors: tuple[str, ...], before: int, after: int) -> list[tuple[int, int]]:
    """Merged [pos - before, pos + after] windows around every occurrence of the anchors."""
    starts = []
    for word in anchors:
        pos = hay.find(word)
        while pos >= 0:
            starts.append(pos)
            pos = hay.find(word, pos + 1)
    starts.sort()
    windows: list[tuple[int, int]] = []
    n = len(hay)
    for pos in starts:
        lo, hi = max(0, pos - before), min(n, pos + after)
        if windows and lo <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(hi, windows[-1][1]))
        else:
            windows.append((lo, hi))
    return windows


class ReScanner:
    """Fallback: the compiled regexes behind cheap locators, which give the same matches as a
    whole-text scan: one shared digit-run scan for the four digit types, str.find of start words
    for assigned secrets, and a substring prefilter for the rest."""

    name = "re"

    def __init__(self, patterns: list[Pattern], compiled: list[re.Pattern]):
        self.patterns, self.compiled = patterns, compiled
        self.digit_tail = max([p.tail for p in patterns if p.digit_run] + [2]) + 2

    def scan(self, text: str) -> Iterable[tuple[int, re.Match]]:
        lowered: str | None = None
        windows: list[tuple[int, int]] | None = None
        for i, (p, rx) in enumerate(zip(self.patterns, self.compiled, strict=True)):
            if not p.prefilter(text):
                continue
            if p.digit_run:
                if windows is None:
                    windows = _digit_windows(text, self.digit_tail)
                for lo, hi in windows:
                    yield from ((i, m) for m in rx.finditer(text, lo, hi))
                continue
            if p.anchors:
                hay = text
                if p.anchor_lower:
                    if lowered is None:
                        lowered = text.lower()
                    hay = lowered
                if len(hay) == len(text):  # lower() kept offsets (true unless exotic case mappings)
                    for lo, hi in _anchor_windows(hay, p.anchors, *p.anchor_window):
                        yield from ((i, m) for m in rx.finditer(text, lo, hi))
                    continue
            for m in rx.finditer(text):
                yield i, m


class HyperscanScanner:
    """One hyperscan pass finds where each pattern can match; its regex then runs only there."""

    name = "hyperscan"

    def __init__(self, patterns: list[Pattern], compiled: list[re.Pattern]):
        import hyperscan  # optional, x86 only: imported only when this engine is chosen

        self.patterns, self.compiled = patterns, compiled
        flags = []
        for p in patterns:
            f = hyperscan.HS_FLAG_SOM_LEFTMOST
            if p.flags & re.S:
                f |= hyperscan.HS_FLAG_DOTALL
            flags.append(f)
        self.db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self.db.compile(
            expressions=[p.core.encode() for p in patterns], ids=list(range(len(patterns))),
            elements=len(patterns), flags=flags,
        )
        self.fallback = ReScanner(patterns, compiled)
        self.terminated = hyperscan.ScanTerminated

    def scan(self, text: str) -> Iterable[tuple[int, re.Match]]:
        # Non-ASCII characters become '?', one byte each, so byte offsets are str offsets. Every
        # core pattern is ASCII, so this loses no candidate.
        data = text.encode("ascii", "replace")
        hits: list[tuple[int, int, int]] = []
        add = hits.append
        # Hyperscan reports every end offset of every candidate; a pathological document (a
        # megabyte of digits) would cost a Python callback per byte. Past this many reports, stop
        # and let the regex scanner do that document: the same spans, without the callbacks.
        cap = 4096 + len(data) // 16

        def on_match(pid: int, start: int, end: int, _flags: int, _ctx: object) -> bool:
            add((pid, start, end))
            return len(hits) > cap  # True halts the scan

        try:
            self.db.scan(data, match_event_handler=on_match)
        except self.terminated:
            pass
        if len(hits) > cap:
            yield from self.fallback.scan(text)
            return
        if not hits:
            return
        # Merge the (many, overlapping) reports per pattern into windows, then run the exact regex
        # from each window's start: the union of all core matches contains every regex match.
        hits.sort()
        n = len(text)
        cur_pid, lo, hi = -1, -1, -1
        windows: list[tuple[int, int, int]] = []
        for pid, s, e in hits:
            if pid == cur_pid and s <= hi:
                hi = max(hi, e)
                continue
            if cur_pid >= 0:
                windows.append((cur_pid, lo, hi))
            cur_pid, lo, hi = pid, s, e
        windows.append((cur_pid, lo, hi))
        for pid, lo, hi in windows:
            rx = self.compiled[pid]
            p = self.patterns[pid]
            for m in rx.finditer(text, max(0, lo - p.head), min(n, hi + p.tail)):
                yield pid, m
