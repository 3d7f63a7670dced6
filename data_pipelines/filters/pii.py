"""PII detection and redaction: one combined scan for candidates, then validators.

Why this shape:

* **One scan.** Every candidate pattern of every type goes into one hyperscan database (SOM
  leftmost), so a document is read once at GB/s whatever the number of types. Without hyperscan
  (non-x86, or ``scrub.pii.engine=re``) cheap locators stand in for it: one shared regex pass
  for digit runs, ``str.find`` of anchors ('@', '://', secret names, ':'), substring prefilters
  for token prefixes. Either way the same Python regexes then extract the exact candidates from
  small windows, so both engines return the same spans (a test checks it).
* **Validators decide, regexes only propose.** Phones are checked with ``phonenumbers``, IPs
  with ``ipaddress``, cards with Luhn and the issuer table, IBANs with mod-97 and the country
  length, SSNs with the area/group/serial rules, secrets by prefix or by entropy. Shapes that
  look like PII but are not (dates, year ranges, ISBNs, decimals, coordinates, versions, hashes,
  GUIDs) are rejected by the patterns' boundaries or by explicit checks.
* **Detection apart from replacement** (as in dolma): :meth:`PIIRedactor.detect` returns typed,
  scored spans; :meth:`PIIRedactor.redact` replaces given spans, so reports can show what was
  found and a policy change does not need a rescan.

Replacement is a typed placeholder (``<|email|>``) by default. ``replacement=pseudonym`` gives
``<|email:3fa9c2d1|>``: a keyed HMAC-SHA256 tag of the normalized value (the same address in
any spelling maps to the same tag across the whole corpus, so co-reference survives), obviously
synthetic (it can never be a real person's number or address, unlike format-preserving fakes)
and still typed. The key comes from the environment variable ``scrub.pii.secret_env`` and is
never stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from data_pipelines.filters.pii_types import PII_TYPES, PLACEHOLDERS
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.config import PIIConfig

log = logging.getLogger(__name__)

VERSION = "1"


@dataclass(frozen=True)
class PIISpan:
    start: int
    end: int
    type: str
    score: float = 1.0


# ------------------------------------------------------------------------------------------
# Validators: each takes the regex match and the redactor, returns a score or None (reject).
# ------------------------------------------------------------------------------------------

_FILE_EXTENSIONS = frozenset(
    "png jpg jpeg gif svg webp bmp ico tif tiff css js ts py java rb go rs php html htm xml json yml yaml txt md pdf zip gz".split()
)


def _valid_email(m: re.Match, _r: PIIRedactor) -> float | None:
    text, start = m.string, m.start(1)
    if start and text[start - 1] in ":/" and "://" in text[max(0, start - 80):start].rsplit(None, 1)[-1]:
        return None  # the host part of scheme://user:pass@host (url_credentials decides)
    local, _, domain = m.group(1).rpartition("@")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    labels = domain.split(".")
    if any(not lab or lab[0] == "-" or lab[-1] == "-" for lab in labels):
        return None
    if labels[-1].lower() in _FILE_EXTENSIONS:  # icon@2x.png, logo@3x.webp
        return None
    return 1.0


_PLACEHOLDER_CREDENTIAL = re.compile(r"^[a-z_\-]*(?:pass|pwd|secret|key|token)[a-z_\-]*$|^[*x.]+$|^[<{$\[]", re.I)


def _valid_url_credentials(m: re.Match, _r: PIIRedactor) -> float | None:
    user, _, password = m.group(1).partition(":")
    if not user or not password or _PLACEHOLDER_CREDENTIAL.match(password):
        return None  # s3://access_key_id:secret_access_key@bucket, user:<password>@host
    return 1.0


# Four-part versions and section numbers look like IPv4: "lz4>=1.7.4.2", "Versions after
# 1.11.1.1", "section 8.2.4.44".
_VERSION_CONTEXT = re.compile(
    r"(?:[<>~!=]=|[<>]|\bv|\bver\.?|\brev\.?|\b(?:version|release|build|firmware|kernel|section|§)s?\b[^\n\d]{0,16})\s*$",
    re.I,
)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")


def _valid_ipv4(m: re.Match, r: PIIRedactor) -> float | None:
    try:
        ip = ipaddress.IPv4Address(m.group(1))
    except ValueError:
        return None
    if _VERSION_CONTEXT.search(m.string, max(0, m.start(1) - 30), m.start(1)):
        return None  # "version 1.2.3.4", "v10.0.0.1", ">=1.7.4.2"
    if not r.cfg.redact_private_ips and not ip.is_global:
        return None
    return 1.0


def _valid_ipv6(m: re.Match, r: PIIRedactor) -> float | None:
    s = m.group(1)
    if s.count(":") < 2 or not any(c.isdigit() for c in s):
        return None
    try:
        ip = ipaddress.IPv6Address(s)
    except ValueError:
        return None
    groups = [g for g in s.split(":") if g]
    if len(groups) < 3:  # "a::1", "Foo::Bar" in code
        return None
    if not r.cfg.redact_private_ips and (ip not in _GLOBAL_UNICAST_V6 or not ip.is_global):
        return None
    return 1.0


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_network_ok(d: str) -> bool:
    """Issuer prefix (IIN) and length plausible for a real network."""
    n = len(d)
    p2, p4, p6 = int(d[:2]), int(d[:4]), int(d[:6])
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # Amex
    if d.startswith("6011") or p2 == 65 or 644 <= int(d[:3]) <= 649 or 622126 <= p6 <= 622925:
        return 16 <= n <= 19  # Discover
    if p2 == 35 or (n == 15 and d[:4] in ("2131", "1800")):
        return 15 <= n <= 19  # JCB (3528-3589 today; older 15-digit 2131/1800)
    if 300 <= int(d[:3]) <= 305 or p2 in (36, 38, 39) or d.startswith("3095"):
        return 14 <= n <= 19  # Diners Club
    if p2 == 62 or p2 == 81:
        return 16 <= n <= 19  # UnionPay
    if p2 == 50 or 56 <= p2 <= 69 or d.startswith("0604"):
        return 12 <= n <= 19  # Maestro
    return False


def _valid_card(m: re.Match, _r: PIIRedactor) -> float | None:
    s = m.group(1)
    seps = set(s) - set("0123456789")
    if len(seps) > 1:
        return None
    groups = re.split(r"[ \-]", s) if seps else [s]
    if seps and (len(groups) < 3 or len(groups[0]) != 4 or any(len(g) not in (4, 6) for g in groups[1:-1])
                 or not 3 <= len(groups[-1]) <= 6):
        return None  # cards are written in blocks of 4 (Amex/Diners 4-6-5, 4-6-4), not "12 345 6789 ..."
    if _inside_identifier(m.string, m.start(1), m.end(1)):
        return None  # https://doi.org/10.3757/s42177-594-4426-4
    d = "".join(groups)
    if 12 <= len(d) <= 19 and _luhn_ok(d) and _card_network_ok(d):
        return 1.0
    return None


def _valid_ssn(m: re.Match, _r: PIIRedactor) -> float | None:
    area, group, serial = m.group(1).split("-")
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return 1.0


# IBAN lengths per country (SWIFT IBAN registry).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def iban_ok(compact: str) -> bool:
    """Country length and ISO 7064 mod-97 check of an IBAN without spaces."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _valid_iban(m: re.Match, _r: PIIRedactor) -> float | None:
    # The pattern is greedy ("DE89 3704 ... 00 IN 2020"): cut at the country's length, which must
    # fall on a group boundary.
    s = m.group(1)
    n = IBAN_LENGTHS.get(s[:2])
    if n is None:
        return None
    seen = 0
    for i, c in enumerate(s):
        if c != " ":
            seen += 1
            if seen == n:
                if i + 1 < len(s) and s[i + 1] != " ":
                    return None
                return 1.0 if iban_ok(s[: i + 1].replace(" ", "")) else None
    return None


def _iban_end(m: re.Match) -> int:
    s, n, seen = m.group(1), IBAN_LENGTHS.get(m.group(1)[:2], 0), 0
    for i, c in enumerate(s):
        if c != " ":
            seen += 1
            if seen == n:
                return m.start(1) + i + 1
    return m.end(1)


def shannon_entropy(s: str) -> float:
    counts = Counter(s)
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


# settings.SECRET_KEY, MY_TOKEN, ********, getpass.getpass(), os.environ.get(
_NOT_A_SECRET = re.compile(r"^[A-Za-z_]+(?:\.[A-Za-z_]+)+$|^[A-Z_]+$|^[a-z_]+$|^(.)\1+$|^[A-Za-z_][A-Za-z_.]*\((?:.*\)|[A-Za-z_\"'\[]|$)")


def _valid_assigned_secret(m: re.Match, _r: PIIRedactor) -> float | None:
    """A value assigned to password/secret/api_key/token: keep only high-entropy values."""
    v = m.group(1)
    if _NOT_A_SECRET.search(v):
        return None
    classes = sum(
        (any(c.islower() for c in v), any(c.isupper() for c in v), any(c.isdigit() for c in v),
         any(not c.isalnum() for c in v))
    )
    h = shannon_entropy(v)
    # A digit separates "password: Summer2024" from prose such as "Tokenization: Byte-pair";
    # long digit-free values must look random.
    has_digit, has_letter = any(c.isdigit() for c in v), any(c.isalpha() for c in v)
    if (has_digit and has_letter and h >= 2.5) or (classes >= 2 and len(v) >= 20 and h >= 4.0):
        return min(1.0, h / 4.0)
    return None


def _valid_jwt(m: re.Match, _r: PIIRedactor) -> float | None:
    head = m.group(1).split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return 1.0 if isinstance(header, dict) and ("alg" in header or "typ" in header) else None


def _always(_m: re.Match, _r: PIIRedactor) -> float | None:
    return 1.0


# ---- phone ------------------------------------------------------------------------------

_STRONG_BREAK = re.compile(r"\s*/\s*|\s{2,}")
_EXTENSION = re.compile(r"\s?(?:x|ext\.?|#)\s?\d{1,6}$", re.I)
_DATE_INSIDE = re.compile(
    r"(?<!\d)(?:(?:1[5-9]|20)\d\d[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])"
    r"|(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|1[0-2])[-/.](?:1[5-9]|20)\d\d"
    r"|(?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])[-/.](?:1[5-9]|20)\d\d)(?!\d)"
)
_YEAR_RANGE = re.compile(r"^(?:1[5-9]|20)\d\d\s*[-/]\s*(?:(?:1[5-9]|20)?\d\d)$")
_VERSION_WORD = re.compile(r"(?:\bv|\bver\.?|\brev\.?|\b(?:version|release|build|firmware|kernel|section)s?)\s*$", re.I)
_ISBN_CONTEXT = re.compile(r"(?:ISBN|ISSN|DOI|arXiv|PMID|OCLC|LCCN)[\s:\-]*(?:1[03])?[\s:\-]*$", re.I)
_NANP_STRONG = re.compile(r"^(?:\+?1[ .\-]?)?(?:\(\d{3}\)\s?|\d{3}[.\-])\d{3}[.\-]\d{4}$")
_PHONE_CONTEXT = re.compile(
    r"(?:\b(?:tel|telephone|phone|call|fax|mobile|cell|ph|whatsapp|sms|dial|reach|ring|contact)\b|☎)[^\d\n]{0,12}$",
    re.I,
)
NANP_REGIONS = frozenset({"US", "CA"})
# 2125550147, 212-555-0147, 212-5550147, 1-212-555-0147 (and the same with parentheses or dots).
_NANP_GROUPINGS = frozenset({(10,), (3, 3, 4), (3, 7), (1, 3, 3, 4), (1, 10), (11,)})


def _isbn_ok(d: str) -> bool:
    if len(d) == 13 and d[:3] in ("978", "979"):
        return sum((1 if i % 2 == 0 else 3) * int(c) for i, c in enumerate(d)) % 10 == 0
    if len(d) == 10:
        return sum((10 - i) * int(c) for i, c in enumerate(d)) % 11 == 0
    return False


_GUID_OR_HEX = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-|(?=[0-9]*[A-Fa-f])[0-9A-Fa-f]{16}")
_URLISH = re.compile(r"://|doi|/10\.|^10\.\d{4}", re.I)


def _inside_identifier(text: str, start: int, end: int) -> bool:
    """Digit runs inside identifiers: IBAN-like codes, GUIDs, hashes, URLs/DOIs, timestamps."""
    left = text[start - 1] if start else " "
    right = text[end] if end < len(text) else " "
    if (left == ":" and start >= 2 and text[start - 2].isdigit()) or (right == ":" and text[end + 1: end + 2].isdigit()):
        return True  # 10:43:02.028663
    if left in "-_" and start >= 2 and text[start - 2].isalnum():
        return True  # aix-6107-1415-32, id_5551234567
    if left.isalnum():
        i = start
        while i > 0 and text[i - 1].isalnum() and start - i < 40:
            i -= 1
        if any(c.isdigit() for c in text[i:start]):
            return True  # NL49KEMU0181590830
    if right.isalnum():
        j = end
        while j < len(text) and text[j].isalnum() and j - end < 40:
            j += 1
        if any(c.isdigit() for c in text[end:j]):
            return True
    if left.isspace() and right.isspace():
        return False
    a, b = start, end
    while a > 0 and not text[a - 1].isspace() and start - a < 80:
        a -= 1
    while b < len(text) and not text[b].isspace() and b - end < 80:
        b += 1
    token = text[a:b]
    return bool(_GUID_OR_HEX.search(token) or _URLISH.search(token))


def _phone_shape_rejected(s: str) -> bool:
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
    if [len(g) for g in groups] == [3, 7] and " " in body and "(" not in body and body[0] != "0":
        return True  # "223 3000234": a status code and a number; NANP 3-7 is written 212-5550147
    return False


class _PhoneValidator:
    """Phone validation: shape rules first (cheap), then ``phonenumbers`` for the regions that fit.

    Valid numbers score 1.0; numbers that are only *possible* (unassigned ranges such as US 555 or
    the UK drama numbers) count when written unmistakably as phones (+ prefix, (area) code, one
    consistent separator, or a "Tel:"-like word before them) and score 0.8.
    """

    def __init__(self, regions: list[str]):
        import phonenumbers

        self.pn = phonenumbers
        supported = phonenumbers.SUPPORTED_REGIONS
        bad = [r for r in regions if r not in supported]
        if bad:
            raise UserError(f"scrub.pii.phone_regions: unknown region code(s) {bad}; use ISO 3166 codes such as US, GB, DE")
        self.nanp = [r for r in regions if r in NANP_REGIONS]
        self.trunk0 = [r for r in regions if r not in NANP_REGIONS]

    def score(self, cand: str, text: str, start: int) -> float | None:
        body = _EXTENSION.sub("", cand)
        digits = "".join(c for c in body if c.isdigit())
        if not 7 <= len(digits) <= 15 or _phone_shape_rejected(body) or set(digits) <= {"0", "1"}:
            return None
        if digits in "01234567890" or digits in "98765432109" or re.match(r"\(?0[^\d(]", body):
            return None  # '0123456789', (0-999999), 0.255.255.255
        if _inside_identifier(text, start, start + len(cand)):
            return None
        if _ISBN_CONTEXT.search(text, max(0, start - 16), start):
            return None  # ISBN 0-306-40615-2, DOI/arXiv/PMID numbers
        if len(digits) in (10, 13) and body.count("-") >= 3 and _isbn_ok(digits):
            return None
        end = start + len(cand)
        if text[end: end + 1] in ("-", ".") and text[end + 1: end + 2].isalnum():
            return None  # 0-306-40615-X, identifiers that continue past the digits
        intl = body.startswith("+") or digits.startswith("00")
        if intl:
            number = "+" + digits[2:] if digits.startswith("00") and not body.startswith("+") else body
            return self._check(number, None, strong=True)
        if _VERSION_WORD.search(text, max(0, start - 12), start):
            return None  # version 9.3.16951.890
        context = bool(_PHONE_CONTEXT.search(text, max(0, start - 24), start))
        if not context and not any(c in body.strip("()") for c in " -./()\u00a0") and digits[0] != "0":
            return None  # a bare 10-digit run is an id, a count or a timestamp unless the text says phone
        if not context and len(digits) < 10 and not any(c in body for c in " -./()\u00a0"):
            return None  # "Grant No. 0757627": short bare runs are ids
        if digits[0] == "0":
            best = None
            strong = context or "(" in body or len({c for c in body if c in ".- /"}) == 1
            for region in self.trunk0:
                sc = self._check(body, region, strong=strong)
                if sc is not None and (best is None or sc > best):
                    best = sc
                    if sc == 1.0:
                        break
            return best
        national = digits[-10:]
        # NANP area codes start with 2-9 (123-456-7890 is not a number).
        groups = tuple(len(g) for g in re.findall(r"\d+", body))
        if (self.nanp and (len(digits) == 10 or (len(digits) == 11 and digits[0] == "1")) and national[0] not in "01"
                and groups in _NANP_GROUPINGS):
            strong = context or bool(_NANP_STRONG.match(body))
            sc = self._check(body, self.nanp[0], strong=strong)
            if sc is not None:
                return sc
        if "IN" in self.trunk0 and len(digits) == 10 and digits[0] in "6789":
            return self._check(body, "IN", strong=False)
        if context and len(digits) >= 9:  # "Tel. 1730338487": national numbers without the trunk prefix
            for region in self.trunk0:
                n = self._check(body, region, strong=False)
                if n is not None:
                    return n
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


def _phone_spans(m: re.Match, r: PIIRedactor) -> list[tuple[int, int, float]]:
    """Phones, after splitting the candidate at strong breaks ("030 1234567 / 030 7654321")."""
    start, cand = m.start(1), m.group(1)
    pieces = [(0, len(cand))]
    if _STRONG_BREAK.search(cand):
        pieces, pos = [], 0
        for brk in _STRONG_BREAK.finditer(cand):
            pieces.append((pos, brk.start()))
            pos = brk.end()
        pieces.append((pos, len(cand)))
        if len(pieces) > 2:  # columns of numbers ("010 0000    040    32"), not phones
            return []
    out = []
    for a, b in pieces:
        score = r.phone.score(cand[a:b], m.string, start + a)
        if score is not None:
            out.append((start + a, start + b, score))
    return out


# ------------------------------------------------------------------------------------------
# Patterns. ``core`` is lookaround-free (hyperscan); ``regex`` adds the boundaries and a group 1
# that is the reported span. ``claim_whole`` makes the whole match block lower-priority types
# (a URL's host must not become an email). ``tail``: characters after the core match the regex
# may still need (PEM bodies, phone extensions, lookaheads); ``head``: characters before it (a
# core may be a short anchor where hyperscan's start-of-match tracking makes the full pattern too
# large).
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    type: str
    name: str
    core: str
    regex: str
    validate: Callable[[re.Match, PIIRedactor], float | None]
    prefilter: Callable[[str], bool]
    flags: int = 0
    tail: int = 2
    head: int = 0
    claim_whole: bool = False
    # re engine: every match contains one of these literals, at most anchor_window[0] characters
    # after its start and anchor_window[1] before its end; str.find locates them (lowercased text
    # when anchor_lower), and the regex runs only in those windows.
    anchors: tuple[str, ...] = ()
    anchor_window: tuple[int, int] = (0, 0)
    anchor_lower: bool = False
    digit_run: bool = False  # re engine: every match lies in a run found by _DIGIT_RUN (plus head/tail)
    spans: Callable[[re.Match, PIIRedactor], list[tuple[int, int, float]]] | None = None


def _has_digit(text: str) -> bool:
    return any(c in text for c in "0123456789")


def _has(*needles: str) -> Callable[[str], bool]:
    return lambda text: any(n in text for n in needles)


_LOCAL = r"[A-Za-z0-9._%+\-]"
_AWS_PREFIX = re.compile(r"A(?:KIA|SIA|GPA|IDA|ROA|IPA|NPA|NVA)")
_SECRET_VALUE = r"[A-Za-z0-9+/=_\-.!@#$%^&*~()]"
_SECRET_NAMES = (
    r"(?:password|passwd|pwd|passphrase|secret|api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key"
    r"|auth[_\-]?token|access[_\-]?token|token|client[_\-]?secret)"
)

PATTERNS: tuple[_Pattern, ...] = (
    _Pattern("secret", "pem_private_key", r"-----BEGIN[A-Z ]{0,20}PRIVATE KEY-----",
             # A block cut before its END line still loses its base64 body.
             r"(-----BEGIN([A-Z ]{0,20})PRIVATE KEY-----(?:.{0,20000}?-----END\2PRIVATE KEY-----|[A-Za-z0-9+/=\s]{0,20000}[A-Za-z0-9+/=]))",
             _always, _has("-----BEGIN"), flags=re.S, tail=20100),
    _Pattern("secret", "aws_access_key_id", r"(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}",
             r"(?<![A-Za-z0-9])((?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16})(?![A-Za-z0-9])",
             _always, lambda t: _AWS_PREFIX.search(t) is not None),
    _Pattern("secret", "github_token", r"(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22})",
             r"(g(?<![A-Za-z0-9_]g)h(?:[pousr]_[A-Za-z0-9]{36}|ithub_pat_[A-Za-z0-9_]{22,255}))(?![A-Za-z0-9_])",
             _always, _has("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), tail=240),
    _Pattern("secret", "gitlab_token", r"glpat-[A-Za-z0-9_\-]{20,}",
             r"(?<![A-Za-z0-9_])(glpat-[A-Za-z0-9_\-]{20,})(?![A-Za-z0-9_\-])", _always, _has("glpat-")),
    _Pattern("secret", "slack_token", r"xox[abposr]-[A-Za-z0-9\-]{10,}",
             r"(?<![A-Za-z0-9])(xox[abposr]-[A-Za-z0-9\-]{10,250})", _always, _has("xox")),
    _Pattern("secret", "stripe_key", r"[rs]k_live_[A-Za-z0-9]{16,}",
             r"(?<![A-Za-z0-9])([rs]k_live_[A-Za-z0-9]{16,247})", _always, _has("k_live_")),
    _Pattern("secret", "google_api_key", r"AIza[0-9A-Za-z_\-]{35}",
             r"(?<![A-Za-z0-9])(AIza[0-9A-Za-z_\-]{35})(?![A-Za-z0-9_\-])", _always, _has("AIza")),
    _Pattern("secret", "jwt", r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
             r"(?<![A-Za-z0-9_\-])(eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})",
             _valid_jwt, _has("eyJ")),
    _Pattern("secret", "assigned_secret",
             rf"(?i){_SECRET_NAMES}[A-Za-z0-9_\-]{{0,20}}[\"']?\s{{0,3}}(?:=|:|:=|=>)",
             rf"(?i){_SECRET_NAMES}[A-Za-z0-9_\-]{{0,20}}[\"']?\s{{0,3}}(?:=|:|:=|=>)\s{{0,3}}[\"']?"
             rf"({_SECRET_VALUE}{{8,200}})",
             _valid_assigned_secret, lambda t: "=" in t or ":" in t, tail=220,
             anchors=("pass", "pwd", "secret", "token", "key"), anchor_window=(10, 260), anchor_lower=True),
    _Pattern("url_credentials", "url_userinfo", r"://[^\s:/@]+:[^\s/@]+@",
             r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{0,15}://([^\s:/@]{1,64}:[^\s/@]{1,128})@[A-Za-z0-9.\-]{1,253}",
             _valid_url_credentials, _has("://"), tail=260, head=17, claim_whole=True,
             anchors=("://",), anchor_window=(17, 460)),
    _Pattern("email", "email", rf"{_LOCAL}@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{{2,24}}",
             rf"(?<!{_LOCAL})({_LOCAL}{{1,64}}@[A-Za-z0-9\-]{{1,63}}(?:\.[A-Za-z0-9\-]{{1,63}}){{0,8}}\.[A-Za-z]{{2,24}})(?![A-Za-z0-9\-]|\.[A-Za-z0-9])",
             _valid_email, _has("@"), head=64, anchors=("@",), anchor_window=(65, 600)),
    _Pattern("iban", "iban", r"[A-Z]{2}\d\d(?: ?[A-Z0-9]){11,31}",
             r"([A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d\d(?: ?[A-Z0-9]){11,31})", _valid_iban, _has_digit),
    _Pattern("credit_card", "card", r"\d(?:[ \-]?\d){11,18}",
             r"(\d(?<![\d\-.]\d)(?:[ \-]?\d){11,18})(?![\d]|[\-.]\d)", _valid_card, _has_digit, digit_run=True),
    _Pattern("ssn", "ssn", r"\d{3}-\d{2}-\d{4}",
             r"(\d(?<![\d\-]\d)\d\d-\d{2}-\d{4})(?![\d]|[\-.]\d)", _valid_ssn, _has_digit, digit_run=True),
    _Pattern("ip", "ipv4", r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}",
             r"(\d(?<![\d.]\d)\d{0,2}(?:\.\d{1,3}){3})(?![\d]|\.\d)", _valid_ipv4, _has_digit, digit_run=True),
    _Pattern("ip", "ipv6", r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]{0,34}",
             r"(?<![0-9A-Za-z:_.])([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})(?![0-9A-Za-z:_]|\.\d)",
             _valid_ipv6, lambda t: "::" in t or t.count(":") >= 3, anchors=(":",), anchor_window=(5, 45)),
    _Pattern("phone", "phone", r"(?:\+|00)?\(?\d[\d().\-/ ]{5,24}\d",
             # The first character is consumed before the lookbehinds so `re` can skip ahead by it.
             r"([+(\d](?<![\d+][+(\d])(?<!\d\.[+(\d])(?:(?<=\+)\s?\(?\d|(?<=\()\d|(?<=\d))"
             r"[\d().\-/ \u00a0]{5,24}\d(?:\s?(?:x|ext\.?)\s?\d{1,6})?)(?!\d|\.\d)",
             _always, _has_digit, tail=14, spans=_phone_spans, digit_run=True),
)


# ------------------------------------------------------------------------------------------
# Candidate scanners
# ------------------------------------------------------------------------------------------


# Superset of every card/SSN/IPv4/phone match: 7+ characters from the union of their alphabets,
# digits at both ends (a phone's leading "+ (" is covered by _DIGIT_HEAD).
_DIGIT_RUN = re.compile(r"\d[\d().\-/ \u00a0]{5,}\d")
_DIGIT_HEAD, _DIGIT_TAIL = 3, 16


def _digit_windows(text: str) -> list[tuple[int, int]]:
    windows: list[tuple[int, int]] = []
    n = len(text)
    for m in _DIGIT_RUN.finditer(text):
        lo, hi = max(0, m.start() - _DIGIT_HEAD), min(n, m.end() + _DIGIT_TAIL)
        if windows and lo <= windows[-1][1]:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
    return windows


class _ReScanner:
    """Fallback: the compiled regexes behind cheap locators, which give the same matches as a
    whole-text scan: one shared digit-run scan for the four digit types, str.find of start words
    for assigned secrets, and a substring prefilter for the rest."""

    name = "re"

    def __init__(self, patterns: list[_Pattern], compiled: list[re.Pattern]):
        self.patterns, self.compiled = patterns, compiled

    def scan(self, text: str) -> Iterable[tuple[int, re.Match]]:
        lowered: str | None = None
        windows: list[tuple[int, int]] | None = None
        for i, (p, rx) in enumerate(zip(self.patterns, self.compiled, strict=True)):
            if not p.prefilter(text):
                continue
            if p.digit_run:
                if windows is None:
                    windows = _digit_windows(text)
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


class _HyperscanScanner:
    """One hyperscan pass finds where each pattern can match; its regex then runs only there."""

    name = "hyperscan"

    def __init__(self, patterns: list[_Pattern], compiled: list[re.Pattern]):
        import hyperscan

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
        self.fallback = _ReScanner(patterns, compiled)
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


def hyperscan_available() -> bool:
    try:
        import hyperscan  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------
# The redactor
# ------------------------------------------------------------------------------------------

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
        self.phone = _PhoneValidator(list(cfg.phone_regions)) if "phone" in self.types else None
        self._key: bytes | None = None
        if cfg.replacement == "pseudonym":
            secret = os.environ.get(cfg.secret_env, "")
            if not secret:
                raise UserError(
                    f"scrub.pii.replacement=pseudonym needs a secret key in the environment variable "
                    f"{cfg.secret_env} (scrub.pii.secret_env), which is not set or empty"
                )
            self._key = secret.encode()
        engine = getattr(cfg, "engine", "auto")
        self.scanner: _ReScanner | _HyperscanScanner
        if engine == "re" or not self.patterns or (engine == "auto" and not hyperscan_available()):
            self.scanner = _ReScanner(self.patterns, self.compiled)
        elif engine in ("auto", "hyperscan"):
            if not hyperscan_available():
                raise UserError("scrub.pii.engine=hyperscan but the hyperscan package is not installed (x86 only); use auto or re")
            self.scanner = _HyperscanScanner(self.patterns, self.compiled)
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
            if p.spans is not None:
                for start, end, score in p.spans(m, self):
                    found.append((_PRIORITY[p.type], start - end, start, end, PIISpan(start, end, p.type, score)))
                continue
            score = p.validate(m, self)
            if score is None:
                continue
            start, end = m.start(1), (_iban_end(m) if p.type == "iban" else m.end(1))
            c0, c1 = (m.start(), m.end()) if p.claim_whole else (start, end)
            found.append((_PRIORITY[p.type], start - end, c0, c1, PIISpan(start, end, p.type, score)))
        if not found:
            return []
        found.sort(key=lambda f: (f[0], f[1], f[2]))
        taken: list[tuple[int, int]] = []
        kept: list[PIISpan] = []
        for _, _, c0, c1, span in found:
            if any(c0 < t1 and t0 < c1 for t0, t1 in taken):
                continue
            taken.append((c0, c1))
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

    def replacement(self, pii_type: str, value: str) -> str:
        if self._key is None:
            return PLACEHOLDERS[pii_type]
        digest = hmac.new(self._key, f"{pii_type}\x00{normalize_value(pii_type, value)}".encode(), hashlib.sha256)
        return f"<|{pii_type}:{digest.hexdigest()[:8]}|>"


def normalize_value(pii_type: str, value: str) -> str:
    """Canonical form, so one value written several ways gets one pseudonym."""
    if pii_type == "email":
        return value.lower()
    if pii_type == "phone":
        body = _EXTENSION.sub("", value)
        digits = "".join(c for c in body if c.isdigit())
        return ("+" if body.lstrip().startswith("+") else "") + digits
    if pii_type == "ip":
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value.lower()
    if pii_type in ("credit_card", "ssn", "iban"):
        return "".join(c for c in value if c.isalnum()).upper()
    return value


def measure_throughput(redactor: PIIRedactor, texts: list[str], repeat: int = 1) -> float:
    """MB/s (UTF-8 bytes, 1e6) of ``redactor.redact`` over ``texts`` in this process."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts) * repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        for t in texts:
            redactor.redact(t)
    dt = time.perf_counter() - t0
    return nbytes / 1e6 / dt if dt > 0 else float("inf")
