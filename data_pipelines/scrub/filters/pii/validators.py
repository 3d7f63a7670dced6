"""Validators: each takes a :class:`Candidate` and returns a score, or None to reject it.

Regexes only propose; these decide. IPs by address class, cards by Luhn and the issuer table,
IBANs by mod-97 and the country length, SSNs by the area/group/serial rules, secrets by prefix or
entropy. Phones live in :mod:`.phone` (they need ``phonenumbers`` and cue words).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import re
from collections import Counter

from data_pipelines.scrub.filters.pii.context import Candidate

_FILE_EXTENSIONS = frozenset(
    "png jpg jpeg gif svg webp bmp ico tif tiff css js ts py java rb go rs php html htm xml json yml yaml txt md pdf zip gz".split()
)


def valid_email(c: Candidate) -> float | None:
    text, start = c.text, c.start
    if start and text[start - 1] == ":" and "://" in text[max(0, start - 80):start].rsplit(None, 1)[-1]:
        return None  # the password@host of scheme://user:pass@host (url_credentials decides)
    local, _, domain = c.value.rpartition("@")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return None
    labels = domain.split(".")
    if any(not lab or lab[0] == "-" or lab[-1] == "-" for lab in labels):
        return None
    if labels[-1].lower() in _FILE_EXTENSIONS and any(ch.isdigit() for ch in labels[0]):
        return None  # icon@2x.png, logo@3x.webp; but jan@example.py is Paraguay, not Python
    return 1.0


_PLACEHOLDER_CREDENTIAL = re.compile(r"^[a-z_\-]*(?:pass|pwd|secret|key|token)[a-z_\-]*$|^[*x.]+$|^[<{$\[]", re.I)


def valid_url_credentials(c: Candidate) -> float | None:
    user, _, password = c.value.partition(":")
    if not user or not password or _PLACEHOLDER_CREDENTIAL.match(password):
        return None  # s3://access_key_id:secret_access_key@bucket, user:<password>@host
    return 1.0


# ---- IP addresses --------------------------------------------------------------------------
# Kept: addresses that name no one (loopback, unspecified, link-local, multicast, documentation,
# netmasks) and, unless redact_private_ips, private space. Everything else is redacted, also
# unassigned or "reserved" global space: a held-out set is full of such addresses.

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
_KEEP_V4 = tuple(_V4(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "192.0.2.0/24",
                                 "198.51.100.0/24", "203.0.113.0/24", "255.255.255.255/32"))
_PRIVATE_V4 = tuple(_V4(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"))
_KEEP_V6 = tuple(_V6(n) for n in ("::/128", "::1/128", "fe80::/10", "ff00::/8", "2001:db8::/32", "3fff::/20"))
_PRIVATE_V6 = tuple(_V6(n) for n in ("fc00::/7", "fec0::/10"))

# Dotted numbers after these words are versions, sections, figures: "Chapter 4.2.1.3",
# "lz4>=1.7.4.2", "v10.0.0.1", "Abschnitt 3.1.2.4". A ">" closing an HTML tag ("<td>1.2.3.4") is
# markup, not a version comparison. The words must be words: "sec." and "ch." inside a host name
# ("from sec.example.com ([1.2.3.4])", "(host.adsl.ch.example.net [1.2.3.4])") are no sections.
_NOT_AN_IP_CONTEXT = re.compile(
    r"(?:[<>~!=]=|<|(?<![\w\"'/\]-])>|§|(?<![\w.@/])v|(?<![\w.@/\-])(?:ver\.?|rev\.?"
    r"|(?:version|release|build|firmware|kernel|section|sect?\.?|chapter"
    r"|chap\.?|ch\.|figure|fig\.?|table|tab\.|appendix|clause|paragraph|para\.?|article|art\.|step|equation|eq\.?"
    r"|theorem|lemma|part|item|rule|kapitel|abschnitt|abbildung|tabelle|cap[ií]tulo|secci[oó]n|tabla|figura"
    r"|chapitre|tableau|capitolo|sezione|tabella|hoofdstuk|rozdzia[lł]|глава|раздел|рисунок|таблица)s?)"
    r"(?![\w@]|[.:/\-]\w)[^\n\d]{0,16})\s*$",
    re.I,
)


def _is_netmask(ip: ipaddress.IPv4Address) -> bool:
    v = int(ip)
    inv = (~v) & 0xFFFFFFFF
    return v >> 24 == 255 and (inv & (inv + 1)) == 0  # 255.255.255.0, 255.255.240.0


def valid_ipv4(c: Candidate) -> float | None:
    try:
        ip = ipaddress.IPv4Address(c.value)
    except ValueError:
        return None
    if _NOT_AN_IP_CONTEXT.search(c.before(40)):
        return None
    if any(ip in n for n in _KEEP_V4) or _is_netmask(ip):
        return None
    if not c.settings.redact_private_ips and any(ip in n for n in _PRIVATE_V4):
        return None
    return 1.0


def valid_ipv6(c: Candidate) -> float | None:
    s = c.value
    if s.count(":") < 2 or not any(ch.isdigit() for ch in s):
        return None
    try:
        ip = ipaddress.IPv6Address(s)
    except ValueError:
        return None
    if len([g for g in s.split(":") if g]) < 3:  # "a::1", "Foo::Bar" in code
        return None
    if any(ip in n for n in _KEEP_V6):
        return None
    if not c.settings.redact_private_ips and any(ip in n for n in _PRIVATE_V6):
        return None
    return 1.0


# ---- cards, SSNs, IBANs ---------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_network_ok(d: str) -> bool:
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


_GUID_OR_HEX = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-|(?=[0-9]*[A-Fa-f])[0-9A-Fa-f]{16}")
_URLISH = re.compile(r"://|doi|/10\.|^10\.\d{4}", re.I)


def _hebrew_prefix(text: str, i: int) -> bool:
    """A one-letter Hebrew preposition glued to the number with a hyphen ("ב-03", "ל-052")."""
    return text[i] in "בלמשהוכ" and (i == 0 or not text[i - 1].isalnum())


def inside_identifier(text: str, start: int, end: int) -> bool:
    """Digit runs inside identifiers: IBAN-like codes, GUIDs, hashes, URLs/DOIs, timestamps."""
    left = text[start - 1] if start else " "
    right = text[end] if end < len(text) else " "
    if (left == ":" and start >= 2 and text[start - 2].isdigit()) or (right == ":" and text[end + 1: end + 2].isdigit()):
        return True  # 10:43:02.028663
    if left in "-_" and start >= 2 and text[start - 2].isalnum() and not _hebrew_prefix(text, start - 2):
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


def valid_card(c: Candidate) -> float | None:
    s = c.value
    seps = set(s) - set("0123456789")
    if len(seps) > 1:
        return None
    groups = re.split(r"[ \-]", s) if seps else [s]
    if seps and (len(groups) < 3 or len(groups[0]) != 4 or any(len(g) not in (4, 6) for g in groups[1:-1])
                 or not 3 <= len(groups[-1]) <= 6):
        return None  # cards are written in blocks of 4 (Amex/Diners 4-6-5, 4-6-4), not "12 345 6789 ..."
    if inside_identifier(c.text, c.start, c.end):
        return None  # https://doi.org/10.3757/s42177-594-4426-4
    d = "".join(groups)
    if 12 <= len(d) <= 19 and luhn_ok(d) and card_network_ok(d):
        return 1.0
    return None


_INTERNATIONAL_BEFORE = re.compile(r"\+\d{1,3}[ .\-]?(?:\(?\d{1,4}\)?)?\s*$")


def valid_ssn(c: Candidate) -> float | None:
    area, group, serial = c.value.split("-")
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    if _INTERNATIONAL_BEFORE.search(c.before(16)):
        return None  # "+60 1  300-12-3456": the rest of an international phone number
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
    """Country length and ISO 7064 mod-97 check of an IBAN without spaces (any case)."""
    compact = compact.upper()
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def iban_length(s: str) -> int | None:
    """Characters of ``s`` (spaces included) that make up the IBAN, which must end on a group
    boundary: the pattern is greedy ("DE89 3704 ... 00 IN 2020"). None when it is no IBAN."""
    n = IBAN_LENGTHS.get(s[:2].upper())
    if n is None:
        return None
    seen = 0
    for i, ch in enumerate(s):
        if ch != " ":
            seen += 1
            if seen == n:
                if i + 1 < len(s) and s[i + 1] != " ":
                    return None
                return i + 1 if iban_ok(s[: i + 1].replace(" ", "")) else None
    return None


def valid_iban(c: Candidate) -> float | None:
    return 1.0 if iban_length(c.value) is not None else None


# ---- secrets -------------------------------------------------------------------------------


def shannon_entropy(s: str) -> float:
    counts = Counter(s)
    n = len(s)
    return -sum(k / n * math.log2(k / n) for k in counts.values())


# settings.SECRET_KEY, MY_TOKEN, ********, getpass.getpass(), os.environ.get(
_NOT_A_SECRET = re.compile(r"^[A-Za-z_]+(?:\.[A-Za-z_]+)+$|^[A-Z_]+$|^[a-z_]+$|^(.)\1+$|^[A-Za-z_][A-Za-z_.]*\((?:.*\)|[A-Za-z_\"'\[]|$)")


def valid_assigned_secret(c: Candidate) -> float | None:
    """A value assigned to password/secret/api_key/token: keep only high-entropy values."""
    v = c.value
    if _NOT_A_SECRET.search(v):
        return None
    classes = sum(
        (any(ch.islower() for ch in v), any(ch.isupper() for ch in v), any(ch.isdigit() for ch in v),
         any(not ch.isalnum() for ch in v))
    )
    h = shannon_entropy(v)
    # A digit separates "password: Summer2024" from prose such as "Tokenization: Byte-pair";
    # long digit-free values must look random.
    has_digit, has_letter = any(ch.isdigit() for ch in v), any(ch.isalpha() for ch in v)
    if (has_digit and has_letter and h >= 2.5) or (classes >= 2 and len(v) >= 20 and h >= 4.0):
        return min(1.0, h / 4.0)
    return None


def valid_jwt(c: Candidate) -> float | None:
    head = c.value.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return 1.0 if isinstance(header, dict) and ("alg" in header or "typ" in header) else None


def always(_c: Candidate) -> float | None:
    return 1.0
