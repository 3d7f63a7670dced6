"""Phone numbers: shape rules first (cheap), then the context (:mod:`.cues`), then ``phonenumbers``.

Without context, validation is strict: ``+``/``00`` numbers against every region's numbering
plan, national numbers against ``scrub.pii.phone_regions`` and against the regions the document
itself names (the country code of another number in it, the country domain of an address in
it: "6123 4567" in a card that also says "+65" or "@example.sg"). With context (a cue word
before the number, a label after it or on the line above, a spoken "call me back on"), a digit
run that no date, decimal or identifier rule rejects is a phone: local 6-9 digit numbers,
regions outside ``phone_regions``, a country code without ``+`` and old national formats are
what people write after "Phone:".

A number broken by layout (a line break, a tab, HTML whitespace between the area code and the
rest; :data:`.patterns.PATTERNS` proposes it) is joined and decided as one.
"""

from __future__ import annotations

import bisect
import re

from data_pipelines.scrub.filters.pii.context import Candidate
from data_pipelines.scrub.filters.pii.cues import has_context, label_after, reference_before
from data_pipelines.scrub.filters.pii.validators import inside_identifier
from pretrain.errors import UserError

_SSN_SHAPE = re.compile(r"^\d{3}-\d{2}-\d{4}$")
_STRONG_BREAK = re.compile(r"\s*/\s*|\s{2,}")
_SENTENCE_STOP = re.compile(r"(?<=\d)\.\s+")
EXTENSION = re.compile(r"\s?(?:x|ext\.?|#)\s?\d{1,6}$", re.I)
_EXTENSION_SAYS_PHONE = re.compile(r"ext\.?\s?\d{1,6}$|\dx\d{1,6}$", re.I)  # "030 1234567 ext. 12", "0743x9150"
_DATE_INSIDE = re.compile(
    r"(?<!\d)(?:(?:1[5-9]|20)\d\d[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])"
    r"|(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|1[0-2])[-/.](?:1[5-9]|20)\d\d"
    r"|(?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])[-/.](?:1[5-9]|20)\d\d)(?!\d)"
)
_YEAR_RANGE = re.compile(r"^(?:1[5-9]|20)\d\d\s*[-/]\s*(?:(?:1[5-9]|20)?\d\d)$")
_VERSION_WORD = re.compile(r"(?:\bv|\bver\.?|\brev\.?|\b(?:version|release|build|firmware|kernel|section)s?)\s*$", re.I)
_ISBN_CONTEXT = re.compile(r"(?:ISBN|ISSN|DOI|arXiv|PMID|OCLC|LCCN)[\s:\-]*(?:1[03])?[\s:\-]*$", re.I)
_NANP_STRONG = re.compile(r"^(?:\+?1[ .\-]?)?(?:\(\d{3}\)\s?|\d{3}[.\-])\d{3}[.\-]\d{4}$")
_TRUNK_IN_PARENS = re.compile(r"\(0\)\s?")
NANP_REGIONS = frozenset({"US", "CA"})
# 2125550147, 212-555-0147, 212-5550147, 1-212-555-0147 (and the same with parentheses or dots).
_NANP_GROUPINGS = frozenset({(10,), (3, 3, 4), (3, 7), (1, 3, 3, 4), (1, 10), (11,)})
_ZIP4 = re.compile(r"^\d{5}-\d{4}$")
# A decimal fraction: 3.14159, 40.7128, 0.498699 (a trunk-prefixed "01632.960123" is no fraction).
_DECIMAL = re.compile(r"(?<![\d.])(?:0|[1-9]\d{0,2})\.\d{4,}(?![\d.])")
_ONE_DOT = re.compile(r"^\d+\.\d+$")
_LAYOUT_CHARS = re.compile(r"[\d() .\-]+")
_DOUBLE_SEPARATOR = re.compile(r"[ .\-]{2,}")
_THOUSANDS = re.compile(r"^\d{1,2}(?:[ .,]\d{3})+$")  # 12 345 678 people
# Where the document names its country: "+65 ..." in another number, "@example.sg", "www.example.sg".
# Each starts with a literal, so ``re`` skips to its occurrences instead of trying every position.
_COUNTRY_CODE = re.compile(r"\+(?<![\w+]\+)\s?(\d{1,3})(?=[\s.\-(]{0,2}\d)")
_COUNTRY_DOMAINS = tuple(re.compile(lead + r"[\w\-]+(?:\.[\w\-]+)*\.([A-Za-z]{2})(?![\w\-])")
                         for lead in ("@", "://", r"www\."))
_DOCUMENT_NEAR = 1500
# Country domains used as generic names (.io, .co, .tv, .me, .ai, ...) say nothing of the country.
GENERIC_USE_DOMAINS = frozenset("io co tv me ai ly fm am to cc ws gg sh nu tk la vc gl ac im".split())
_LAYOUT_GAP = re.compile(r"(?:\s|&nbsp;|&#160;)+")  # collapsed to one space in a broken number


def isbn_ok(d: str) -> bool:
    if len(d) == 13 and d[:3] in ("978", "979"):
        return sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(d)) % 10 == 0
    if len(d) == 10:
        return sum((10 - i) * int(c) for i, c in enumerate(d)) % 11 == 0
    return False


def _dots_read_as_decimals(body: str) -> bool:
    """"40.7128 -74.0060", "2000 3456 45.0 29177": dots that are decimal points, not separators.
    Separator dots are a trunk's ("01632.960123"), the area code's ("0212. 444 55 66") or the
    subscriber number's ("(0212) 444.55.66"): one block at either end of the separators."""
    if _DECIMAL.search(body):
        return True
    if _ONE_DOT.match(body):
        return not (body.startswith("0") and body.index(".") >= 3)  # 4464.1698, but 01632.960123
    seps = re.findall(r"[^\d]+", body.strip("()+ "))
    if body.startswith("+") and seps:
        seps = seps[1:]  # the separator after the country code
    dotted = [i for i, sep in enumerate(seps) if "." in sep]
    if not dotted or len(set(seps)) == 1:
        return False
    contiguous = dotted[-1] - dotted[0] == len(dotted) - 1
    return not (contiguous and (dotted[0] == 0 or dotted[-1] == len(seps) - 1))


def _local_layout(body: str) -> bool:
    """Grouped the way local numbers are: one separator between groups of digits, one group maybe
    in parentheses, at most one group after the first shorter than two digits ("6123 4567",
    "61-23-45-67", "(11) 3456-7890", "8 (912) 345-67-89"); not "3813 - 5712" or a bare run."""
    if _LAYOUT_CHARS.fullmatch(body) is None or _DOUBLE_SEPARATOR.search(body.replace(") ", ")")):
        return False
    groups = re.findall(r"\d+", body)
    return (len(groups) >= 2 and sum(len(g) == 1 for g in groups[1:]) <= 1
            and body.count("(") == body.count(")") <= 1)


def phone_shape_rejected(s: str) -> bool:
    """Digit runs that are dates, year ranges, ZIP+4 codes, SSNs, decimals/coordinates or tables, not phones."""
    if _DATE_INSIDE.search(s) or _YEAR_RANGE.match(s) or _ZIP4.match(s) or _SSN_SHAPE.match(s):
        return True  # 3-2-4 is how SSNs are written (an invalid one is still no phone)
    body = s.lstrip("+")
    if "." in body and _dots_read_as_decimals(s):
        return True
    groups = [g for g in re.split(r"[^\d]+", body) if g]
    if sum(len(g) == 1 for g in groups[1:]) >= 3:  # "1 2 3 4 5 6 7", math, tables
        return True
    seps = {c for c in body if c in ".- /"}
    if seps == {"."} and 3 <= len(groups) <= 4 and all(len(g) <= 3 for g in groups):
        return True  # 016.016.016.016: an (invalid) IPv4 or a version, not a phone
    return False


class PhoneValidator:
    """Scores a phone candidate: 1.0 valid for its region, 0.9 valid for a region the document
    names, 0.8 only *possible* but written unmistakably as a phone, 0.7 accepted because of its
    context (a cue word, a label, a spoken phrase)."""

    def __init__(self, regions: list[str], cues: bool = True):
        import phonenumbers  # heavy metadata: loaded only when phones are redacted

        self.pn = phonenumbers
        bad = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if bad:
            raise UserError(f"scrub.pii.phone_regions: unknown region code(s) {bad}; use ISO 3166 codes such as US, GB, DE")
        self.cues = cues
        # (document, positions, regions) of the last document _country_mentions read: one tuple,
        # replaced whole, so a reader never sees one document's text with another's mentions.
        self._mentions: tuple[str | None, list[int], list[tuple[str, ...]]] = (None, [], [])
        self.nanp = [r for r in regions if r in NANP_REGIONS]
        self.trunk0 = [r for r in regions if r not in NANP_REGIONS]

    def score(self, body: str, text: str, start: int, end: int) -> float | None:
        """``body`` is the number as written (layout breaks collapsed), ``text[start:end]`` its span."""
        extension = _EXTENSION_SAYS_PHONE.search(body) is not None
        body = EXTENSION.sub("", body)
        digits = "".join(c for c in body if c.isdigit())
        if not 6 <= len(digits) <= 15 or phone_shape_rejected(body) or set(digits) <= {"0", "1"}:
            return None
        if inside_identifier(text, start, end):
            return None
        if _ISBN_CONTEXT.search(text, max(0, start - 16), start):
            return None  # ISBN 0-306-40615-2, DOI/arXiv/PMID numbers
        if len(digits) in (10, 13) and body.count("-") >= 3 and len(body.rsplit("-", 1)[1]) == 1 and isbn_ok(digits):
            return None  # 0-306-40615-2: ISBN groups end in one check digit
        if text[end: end + 1] in ("-", ".") and text[end + 1: end + 2].isalnum() and not label_after(text, end):
            return None  # 0-306-40615-X, identifiers that continue past the digits ("555-0147-Office" is a label)
        if _VERSION_WORD.search(text, max(0, start - 12), start):
            return None  # version 9.3.16951.890
        if body.startswith("+") or digits.startswith("00"):
            number = "+" + digits[2:] if digits.startswith("00") and not body.startswith("+") else body
            sc = self._check(_TRUNK_IN_PARENS.sub("", number), None, strong=True)
            if sc is not None or len(digits) < 8:
                return sc
            return 0.7 if self.cues and has_context(text, start, end) else None
        if reference_before(text, start):
            return None  # Invoice 4521 8890, my registered account 4521 8890: a reference, whatever the cues
        if self.cues and (extension or has_context(text, start, end)):
            return self._with_cue(body, digits)
        return self._without_cue(body, digits, text, start)

    def _with_cue(self, body: str, digits: str) -> float | None:
        """After "Tel:": any possible number, local ones included; no region is required."""
        if len(digits) <= 13 or digits[0] == "0":
            return 0.7
        return self._check("+" + digits, None, strong=True)  # a country code written without "+"

    def _without_cue(self, body: str, digits: str, text: str, start: int) -> float | None:
        if re.match(r"\(?0[^\d(]", body) or (body == digits and (digits in "01234567890" or digits in "98765432109")):
            return None  # (0-999999), 0.255.255.255, '0123456789'
        if [len(g) for g in re.findall(r"\d+", body)] == [3, 7] and " " in body and "(" not in body and body[0] != "0":
            return None  # "223 3000234": a status code and a number; NANP 3-7 is written 212-5550147
        if not any(c in body.strip("()") for c in " -./()") and digits[0] != "0":
            return None  # a bare 10-digit run is an id, a count or a timestamp unless the text says phone
        if len(digits) < 10 and not any(c in body for c in " -./()"):
            return None  # "Grant No. 0757627": short bare runs are ids
        sc = self._in_phone_regions(body, digits) if len(digits) >= 7 else None
        if sc is None and _local_layout(body) and not _THOUSANDS.match(body):
            sc = self._in_document_regions(body, text, start)  # 6-digit numbers too: "21 12 34" in a "+298" card
        return sc

    def _in_phone_regions(self, body: str, digits: str) -> float | None:
        if digits[0] == "0":
            best = None
            strong = "(" in body or len({c for c in body if c in ".- /"}) == 1
            for region in self.trunk0:
                sc = self._check(body, region, strong=strong)
                if sc is not None and (best is None or sc > best):
                    best = sc
                    if sc == 1.0:
                        break
            return best
        national = digits[-10:]
        groups = tuple(len(g) for g in re.findall(r"\d+", body))
        # NANP area codes start with 2-9 (123-456-7890 is not a number).
        if (self.nanp and (len(digits) == 10 or (len(digits) == 11 and digits[0] == "1")) and national[0] not in "01"
                and groups in _NANP_GROUPINGS):
            sc = self._check(body, self.nanp[0], strong=bool(_NANP_STRONG.match(body)))
            if sc is not None:
                return sc
        if "IN" in self.trunk0 and len(digits) == 10 and digits[0] in "6789":
            return self._check(body, "IN", strong=False)
        return None

    def _in_document_regions(self, body: str, text: str, start: int) -> float | None:
        """Valid (not merely possible) for a region the document names near the number."""
        positions, named = self._country_mentions(text)
        i, j = bisect.bisect_left(positions, start - _DOCUMENT_NEAR), bisect.bisect_right(positions, start + _DOCUMENT_NEAR)
        for region in sorted({r for regions in named[i:j] for r in regions}):
            if self._check(body, region, strong=False) == 1.0:
                return 0.9
        return None

    def _country_mentions(self, text: str) -> tuple[list[int], list[tuple[str, ...]]]:
        """Where ``text`` names a country ("+65 ...", "@example.sg", "www.example.sg") and which
        regions each names; found once per document (the last document is remembered)."""
        cached = self._mentions
        if cached[0] is text:
            return cached[1], cached[2]
        positions: list[int] = []
        named: list[tuple[str, ...]] = []
        for m in _COUNTRY_CODE.finditer(text):
            cc = m.group(1)
            for k in range(1, len(cc) + 1):  # country codes are prefix-free: one length names a country
                found = self.pn.COUNTRY_CODE_TO_REGION_CODE.get(int(cc[:k]))
                if found:
                    positions.append(m.start())
                    named.append(found)
                    break
        for rx in _COUNTRY_DOMAINS:
            for m in rx.finditer(text):
                tld = m.group(1).lower()
                region = "GB" if tld == "uk" else tld.upper()
                if tld not in GENERIC_USE_DOMAINS and region in self.pn.SUPPORTED_REGIONS:
                    positions.append(m.start())
                    named.append((region,))
        order = sorted(range(len(positions)), key=positions.__getitem__)
        self._mentions = (text, [positions[k] for k in order], [named[k] for k in order])
        return self._mentions[1], self._mentions[2]

    def _check(self, number: str, region: str | None, strong: bool) -> float | None:
        pn = self.pn
        try:
            n = pn.parse(number, region)
        except pn.NumberParseException:
            return None
        if pn.is_valid_number(n):
            return 1.0
        # Allocated-looking but unassigned ranges (US 555, UK drama numbers) in an unmistakable
        # phone format are still someone's-phone-shaped text: redact, with a lower score.
        if strong and pn.is_possible_number_with_reason(n) == pn.ValidationResult.IS_POSSIBLE:
            return 0.8
        return None


def _trim_open_paren(cand: str) -> str:
    """"+1 800 555 0199 (24-hour": a "(" never closed starts the next phrase, not the number."""
    while cand.count("(") > cand.count(")"):
        cand = cand[:cand.rfind("(")].rstrip(" -./\u00a0")
    return cand


def phone_spans(c: Candidate) -> list[tuple[int, int, float]]:
    """Phones, after splitting the candidate at strong breaks ("030 1234567 / 030 7654321")."""
    validator = c.settings.phone
    assert validator is not None
    cand, text = c.value, c.text
    if sum(map(str.isdigit, cand)) < 6:
        return []  # cheap exit for short runs in prose ("2002 55(4")
    start, cand = c.start, _trim_open_paren(cand)
    out = []
    for s0, s1 in _sentences(cand):
        pieces = [(s0, s1)]
        part = cand[s0:s1]
        if _STRONG_BREAK.search(part):
            pieces, pos = [], s0
            for brk in _STRONG_BREAK.finditer(part):
                pieces.append((pos, s0 + brk.start()))
                pos = s0 + brk.end()
            pieces.append((pos, s1))
            if len(pieces) > 2 and any("/" not in brk.group() for brk in _STRONG_BREAK.finditer(part)):
                continue  # columns of numbers ("010 0000    040    32    20"), not phones
        for a, b in pieces:
            if a == b:
                continue
            score = validator.score(cand[a:b], text, start + a, start + b)
            if score is not None:
                out.append((start + a, start + b, score))
    return out


def _sentences(cand: str) -> list[tuple[int, int]]:
    """"call 622 1234. 10/05 works": a period and a space after a whole number end the sentence
    (a period after the area code, "0212. 444 55 66", does not)."""
    if ". " not in cand:
        return [(0, len(cand))]
    parts, pos = [], 0
    for m in _SENTENCE_STOP.finditer(cand):
        if sum(map(str.isdigit, cand[pos:m.start()])) >= 6:
            parts.append((pos, m.start()))
            pos = m.end()
    parts.append((pos, len(cand)))
    return parts


def broken_phone_spans(c: Candidate) -> list[tuple[int, int, float]]:
    """A number cut by layout between the area code and the rest ("+353 1\\n234 5678",
    "(617)\\n      253-1000", "0800&nbsp;123456"), decided as the number it is when joined."""
    validator = c.settings.phone
    assert validator is not None
    body = _LAYOUT_GAP.sub(" ", c.value)
    if not body.startswith(("+", "00")) and not (c.settings.phone_cues and has_context(c.text, c.start, c.end)):
        return []  # two digit groups a line apart without a label are a table, not a phone
    score = validator.score(body, c.text, c.start, c.end)
    return [] if score is None else [(c.start, c.end, score)]
