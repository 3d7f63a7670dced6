"""Phone numbers: shape rules first (cheap), then cue words, then ``phonenumbers``.

Without a cue word, validation is strict: ``+``/``00`` numbers against every region's numbering
plan, national numbers against ``scrub.pii.phone_regions``. Near a cue word ("Tel:", "call me on",
"Mobil", "電話", in 20+ languages) a digit run that no date, decimal or identifier rule rejects is
a phone: local 6-9 digit numbers, regions outside ``phone_regions``, a country code without ``+``
and old national formats are what people write after "Phone:".
"""

from __future__ import annotations

import re

from data_pipelines.scrub.filters.pii.context import Candidate
from data_pipelines.scrub.filters.pii.validators import inside_identifier
from pretrain.errors import UserError

# Cue words, lower case. Latin-script words match at a word start and may be inflected
# ("Telefonnummer", "phoned"); the short ones (tel, ph, fax, ...) only as whole words.
_CUE_STEMS = (
    # English
    "phone", "telephon", "mobile", "cellphone", "cellular", "whatsapp", "contact", "call",
    # Spanish, Portuguese, Italian, French, German, Dutch
    "teléfono", "telefono", "móvil", "movil", "celular", "llam", "llám", "márcame", "marcar", "contacto", "oficina",
    "telefone", "telemóvel", "telemovel", "ligue", "ligar", "liga-me", "me liga", "contato", "escritório",
    "cellulare", "chiam", "ufficio", "contatto", "téléphon", "portable", "appelez", "appeler", "appelle",
    "joindre", "telefon", "handy", "mobil", "anruf", "rufen", "ruf mich", "rufnummer", "büro", "durchwahl",
    "telefoon", "mobiel", "bellen", "bel me", "kantoor",
    # Polish, Czech, Swedish, Turkish, Indonesian/Malay, Vietnamese
    "komórk", "zadzwo", "biuro", "kontakt", "volejte", "ring mig", "arayın", "beni ara", "iletişim", "telepon",
    "hubungi", "ponsel", "kantor", "điện thoại", "gọi", "di động",
)
# Short or ambiguous words only as whole words ("Appellate", "dialect", "Rufus", "officers" are not cues).
_CUE_WORDS = ("tel", "tél", "tlf", "tfn", "ph", "fax", "faks", "sms", "desk", "mob", "cel", "cell", "fon", "tfno",
              "telf", "ddi", "office", "offices", "reach", "ring", "dial", "cep", "ofis")
_CUE_SCRIPTS = (
    # Russian/Ukrainian, Greek, Arabic, Persian, Hebrew, Hindi, Thai, Chinese, Japanese, Korean
    "телефон", "тел", "моб", "факс", "звоните", "звонит", "τηλ", "κινητό", "هاتف", "جوال", "فاكس", "اتصل", "موبايل",
    "تلفن", "همراه", "فاکس", "טלפון", "נייד", "फ़ोन", "फोन", "मोबाइल", "फैक्स", "दूरभाष", "โทร", "电话", "電話", "手机",
    "手機", "传真", "傳真", "携帯", "ファックス", "ファクス", "전화", "휴대폰", "팩스", "☎", "📞",
)
PHONE_CUE = re.compile(
    r"(?<![^\W\d_])(?:" + "|".join(re.escape(w.strip()) for w in _CUE_STEMS) + r")"
    r"|(?<![^\W\d_])(?:" + "|".join(re.escape(w) for w in _CUE_WORDS) + r")(?![^\W\d_])"
    r"|" + "|".join(re.escape(w) for w in _CUE_SCRIPTS),
    re.I,
)
_CUE_NEAR, _CUE_LINE = 32, 72  # a cue right before the number, or earlier on its line with numbers between

_SENTENCE_END = re.compile(r"[;!?]|[.]\s+[A-Z]")
_BETWEEN_NUMBERS_BREAK = re.compile(r"[.;!?=]")
_WORD = re.compile(r"[^\W\d_]+")
_SSN_SHAPE = re.compile(r"^\d{3}-\d{2}-\d{4}$")
_STRONG_BREAK = re.compile(r"\s*/\s*|\s{2,}")
EXTENSION = re.compile(r"\s?(?:x|ext\.?|#)\s?\d{1,6}$", re.I)
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


def isbn_ok(d: str) -> bool:
    if len(d) == 13 and d[:3] in ("978", "979"):
        return sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(d)) % 10 == 0
    if len(d) == 10:
        return sum((10 - i) * int(c) for i, c in enumerate(d)) % 11 == 0
    return False


def phone_shape_rejected(s: str) -> bool:
    """Digit runs that are dates, year ranges, decimals/coordinates or tables, not phones."""
    if _DATE_INSIDE.search(s) or _YEAR_RANGE.match(s):
        return True
    body = s.lstrip("+")
    seps = {c for c in body if c in ".- /"}
    if "." in seps and (len(seps) > 1 or body.count(".") == 1):  # 40.7128 -74.0060, 0.498699
        return True
    groups = [g for g in re.split(r"[^\d]+", body) if g]
    if sum(len(g) == 1 for g in groups[1:]) >= 3:  # "1 2 3 4 5 6 7", math, tables
        return True
    if seps == {"."} and 3 <= len(groups) <= 4 and all(len(g) <= 3 for g in groups):
        return True  # 016.016.016.016: an (invalid) IPv4 or a version, not a phone
    return False


def has_cue(text: str, start: int) -> bool:
    """A phone cue word right before ``start`` ("Tel.: ", "Telefon (Zentrale): "), or before an
    earlier number on the same line with at most one word between the two ("Tel: 030 1234567 or
    030 7654321", "555-1234 (home), 555-5678")."""
    window = text[max(0, start - _CUE_LINE):start]
    window = window[window.rfind("\n") + 1:]
    cues = list(PHONE_CUE.finditer(window))
    if not cues:
        return False
    gap = window[cues[-1].end():]
    last_digit = max((i for i, ch in enumerate(gap) if ch.isdigit()), default=-1)
    if last_digit < 0:
        return len(gap) <= _CUE_NEAR and not _SENTENCE_END.search(gap)
    between = gap[last_digit + 1:]
    return len(_WORD.findall(between)) <= 1 and not _BETWEEN_NUMBERS_BREAK.search(between)


class PhoneValidator:
    """Scores a phone candidate: 1.0 valid for its region, 0.8 only *possible* but written
    unmistakably as a phone, 0.7 accepted because of a cue word."""

    def __init__(self, regions: list[str], cues: bool = True):
        import phonenumbers  # heavy metadata: loaded only when phones are redacted

        self.pn = phonenumbers
        bad = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if bad:
            raise UserError(f"scrub.pii.phone_regions: unknown region code(s) {bad}; use ISO 3166 codes such as US, GB, DE")
        self.cues = cues
        self.nanp = [r for r in regions if r in NANP_REGIONS]
        self.trunk0 = [r for r in regions if r not in NANP_REGIONS]

    def score(self, cand: str, text: str, start: int) -> float | None:
        body = EXTENSION.sub("", cand)
        digits = "".join(c for c in body if c.isdigit())
        if not 6 <= len(digits) <= 15 or phone_shape_rejected(body) or set(digits) <= {"0", "1"}:
            return None
        end = start + len(cand)
        if inside_identifier(text, start, end):
            return None
        if _ISBN_CONTEXT.search(text, max(0, start - 16), start):
            return None  # ISBN 0-306-40615-2, DOI/arXiv/PMID numbers
        if len(digits) in (10, 13) and body.count("-") >= 3 and isbn_ok(digits):
            return None
        if text[end: end + 1] in ("-", ".") and text[end + 1: end + 2].isalnum():
            return None  # 0-306-40615-X, identifiers that continue past the digits
        if _VERSION_WORD.search(text, max(0, start - 12), start):
            return None  # version 9.3.16951.890
        cue = self.cues and has_cue(text, start)
        intl = body.startswith("+") or digits.startswith("00")
        if intl:
            number = "+" + digits[2:] if digits.startswith("00") and not body.startswith("+") else body
            sc = self._check(_TRUNK_IN_PARENS.sub("", number), None, strong=True)
            return sc if sc is not None or not cue else (0.7 if len(digits) >= 8 else None)
        if cue:
            return self._with_cue(body, digits)
        return self._without_cue(body, digits)

    def _with_cue(self, body: str, digits: str) -> float | None:
        """After "Tel:": any possible number, local ones included; no region is required."""
        if _SSN_SHAPE.match(body):
            return None  # 3-2-4 is how SSNs are written (an invalid one is still no phone)
        if len(digits) <= 13:
            return 0.7
        return self._check("+" + digits, None, strong=True)  # a country code written without "+"

    def _without_cue(self, body: str, digits: str) -> float | None:
        if len(digits) < 7 or re.match(r"\(?0[^\d(]", body) or digits in "01234567890" or digits in "98765432109":
            return None  # (0-999999), 0.255.255.255, '0123456789'
        if [len(g) for g in re.findall(r"\d+", body)] == [3, 7] and " " in body and "(" not in body and body[0] != "0":
            return None  # "223 3000234": a status code and a number; NANP 3-7 is written 212-5550147
        if not any(c in body.strip("()") for c in " -./()") and digits[0] != "0":
            return None  # a bare 10-digit run is an id, a count or a timestamp unless the text says phone
        if len(digits) < 10 and not any(c in body for c in " -./()"):
            return None  # "Grant No. 0757627": short bare runs are ids
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
    cand = c.value
    n_digits = sum(map(str.isdigit, cand))
    if n_digits < 6 or (n_digits == 6 and not (c.settings.phone_cues and has_cue(c.text, c.start))):
        return []  # cheap exit for short runs in prose ("2002 55(4"): only "Tel 12 34 56" has 6 digits
    start, cand = c.start, _trim_open_paren(cand)
    pieces = [(0, len(cand))]
    if _STRONG_BREAK.search(cand):
        pieces, pos = [], 0
        for brk in _STRONG_BREAK.finditer(cand):
            pieces.append((pos, brk.start()))
            pos = brk.end()
        pieces.append((pos, len(cand)))
        if len(pieces) > 2 and any("/" not in brk.group() for brk in _STRONG_BREAK.finditer(cand)):
            return []  # columns of numbers ("010 0000    040    32"), not phones
    out = []
    for a, b in pieces:
        if a == b:
            continue
        score = validator.score(cand[a:b], c.text, start + a)
        if score is not None:
            out.append((start + a, start + b, score))
    return out
