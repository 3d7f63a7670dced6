"""The candidate patterns of every PII type, in one table.

``core`` is lookaround-free (hyperscan scans for it); ``regex`` adds the boundaries and a group 1
that is the proposed span. ``claim_whole`` makes the whole match block lower-priority types (a
URL's host must not become an email). ``tail``: characters after the core match the regex may
still need (PEM bodies, phone extensions, lookaheads); ``head``: characters before it (a core may
be a short anchor where hyperscan's start-of-match tracking makes the full pattern too large).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from data_pipelines.scrub.filters.pii import validators as v
from data_pipelines.scrub.filters.pii.context import Candidate
from data_pipelines.scrub.filters.pii.phone import broken_phone_spans, phone_spans


@dataclass(frozen=True)
class Pattern:
    type: str
    name: str
    core: str
    regex: str
    validate: Callable[[Candidate], float | None]
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
    digit_run: bool = False  # re engine: every match lies in a run found by scan.DIGIT_RUN (plus head/tail)
    # Types that report several spans per candidate (phones split at "/") instead of validate().
    spans: Callable[[Candidate], list[tuple[int, int, float]]] | None = None
    # The reported span ends before the match (an IBAN is cut at its country's length).
    span_end: Callable[[str], int | None] | None = None


def has_digit(text: str) -> bool:
    return any(c in text for c in "0123456789")


def _has(*needles: str) -> Callable[[str], bool]:
    return lambda text: any(n in text for n in needles)


# Local part of an address: O'Brien@, AT&T-style names and the usual RFC 5322 atoms. It starts
# with an atom character, so a quote or an HTML entity's "&" before it stays outside.
_LOCAL_FIRST = r"[A-Za-z0-9_%+\-]"
_LOCAL = r"[A-Za-z0-9._%+\-'&]"
_AWS_PREFIX = re.compile(r"A(?:KIA|SIA|GPA|IDA|ROA|IPA|NPA|NVA)")
_SECRET_VALUE = r"[A-Za-z0-9+/=_\-.!@#$%^&*~()]"
_SECRET_NAMES = (
    r"(?:password|passwd|pwd|passphrase|secret|api[_\-]?key|apikey|access[_\-]?key|private[_\-]?key"
    r"|auth[_\-]?token|access[_\-]?token|token|client[_\-]?secret)"
)

# A phone number cut by layout between the area code and the rest: the area code (with its
# country code: "+353 1", "+44 (0)20"; or its trunk prefix 0 or 8: "(617)", "(0-612)", "0161",
# "0 800", "06 20", "8 (495)", "8 66"), then a line break, a tab, two spaces or HTML no-break
# spaces, then the rest. Hyperscan looks for the break between two digits (the full pattern is
# too large for its start-of-match tracking); the area code lies at most _AREA_CODE_LEN
# characters before it.
_AREA_CODE = (r"(?:(?:\+|00)\d{1,3}[ .\-]?(?:\(0\) ?)?\(?\d{1,5}\)?|\((?:\d{1,3}|0-?\d{1,4})\)"
              r"|0\d{0,4}(?:[ .\-]\d{1,4})?|8 ?\(\d{2,5}\)|8 \d{2,5})\.?")
_AREA_CODE_LEN = 20
_LAYOUT_BREAK = r"[ \t]{0,8}(?:\r?\n|\t|(?:&nbsp;|&#160;){1,3}| {2})[ \t]{0,40}"
_SUBSCRIBER = r"\d[\d\-. ]{1,20}\d"

PATTERNS: tuple[Pattern, ...] = (
    Pattern("secret", "pem_private_key", r"-----BEGIN[A-Z ]{0,20}PRIVATE KEY-----",
            # A block cut before its END line still loses its base64 body.
            r"(-----BEGIN([A-Z ]{0,20})PRIVATE KEY-----(?:.{0,20000}?-----END\2PRIVATE KEY-----|[A-Za-z0-9+/=\s]{0,20000}[A-Za-z0-9+/=]))",
            v.always, _has("-----BEGIN"), flags=re.S, tail=20100),
    Pattern("secret", "aws_access_key_id", r"(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}",
            r"(?<![A-Za-z0-9])((?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16})(?![A-Za-z0-9])",
            v.always, lambda t: _AWS_PREFIX.search(t) is not None),
    Pattern("secret", "github_token", r"(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22})",
            r"(g(?<![A-Za-z0-9_]g)h(?:[pousr]_[A-Za-z0-9]{36}|ithub_pat_[A-Za-z0-9_]{22,255}))(?![A-Za-z0-9_])",
            v.always, _has("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"), tail=240),
    Pattern("secret", "gitlab_token", r"glpat-[A-Za-z0-9_\-]{20,}",
            r"(?<![A-Za-z0-9_])(glpat-[A-Za-z0-9_\-]{20,})(?![A-Za-z0-9_\-])", v.always, _has("glpat-")),
    Pattern("secret", "slack_token", r"xox[abposr]-[A-Za-z0-9\-]{10,}",
            r"(?<![A-Za-z0-9])(xox[abposr]-[A-Za-z0-9\-]{10,250})", v.always, _has("xox")),
    Pattern("secret", "stripe_key", r"[rs]k_live_[A-Za-z0-9]{16,}",
            r"(?<![A-Za-z0-9])([rs]k_live_[A-Za-z0-9]{16,247})", v.always, _has("k_live_")),
    Pattern("secret", "google_api_key", r"AIza[0-9A-Za-z_\-]{35}",
            r"(?<![A-Za-z0-9])(AIza[0-9A-Za-z_\-]{35})(?![A-Za-z0-9_\-])", v.always, _has("AIza")),
    Pattern("secret", "jwt", r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
            r"(?<![A-Za-z0-9_\-])(eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})",
            v.valid_jwt, _has("eyJ")),
    Pattern("secret", "assigned_secret",
            rf"(?i){_SECRET_NAMES}[A-Za-z0-9_\-]{{0,20}}[\"']?\s{{0,3}}(?:=|:|:=|=>)",
            rf"(?i){_SECRET_NAMES}[A-Za-z0-9_\-]{{0,20}}[\"']?\s{{0,3}}(?:=|:|:=|=>)\s{{0,3}}[\"']?"
            rf"({_SECRET_VALUE}{{8,200}})",
            v.valid_assigned_secret, lambda t: "=" in t or ":" in t, tail=220,
            anchors=("pass", "pwd", "secret", "token", "key"), anchor_window=(10, 260), anchor_lower=True),
    Pattern("url_credentials", "url_userinfo", r"://[^\s:/@]+:[^\s/@]+@",
            r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{0,15}://([^\s:/@]{1,64}:[^\s/@]{1,128})@[A-Za-z0-9.\-]{1,253}",
            v.valid_url_credentials, _has("://"), tail=260, head=17, claim_whole=True,
            anchors=("://",), anchor_window=(17, 460)),
    Pattern("email", "email", rf"{_LOCAL_FIRST}@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{{2,24}}",
            rf"(?<![A-Za-z0-9._%+\-])({_LOCAL_FIRST}{_LOCAL}{{0,63}}(?<=[A-Za-z0-9_%+\-])@[A-Za-z0-9\-]{{1,63}}"
            rf"(?:\.[A-Za-z0-9\-]{{1,63}}){{0,8}}\.[A-Za-z]{{2,24}})(?![A-Za-z0-9\-]|\.[A-Za-z0-9])",
            v.valid_email, _has("@"), head=64, anchors=("@",), anchor_window=(65, 600)),
    Pattern("iban", "iban", r"[A-Za-z]{2}\d\d(?: ?[A-Za-z0-9]){11,31}",
            # Compact, or in groups of four (the last may be shorter): "gb82 west 1234 ..." is not
            # read on into the words after it.
            r"([A-Za-z](?<![A-Za-z0-9][A-Za-z])[A-Za-z]\d\d(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,4})?))"
            r"(?![A-Za-z0-9])", v.valid_iban, has_digit,
            span_end=v.iban_length),
    Pattern("credit_card", "card", r"\d(?:[ \-]?\d){11,18}",
            r"(\d(?<![\d\-.+]\d)(?:[ \-]?\d){11,18})(?![\d]|[\-.]\d)", v.valid_card, has_digit, digit_run=True),
    Pattern("ssn", "ssn", r"\d{3}-\d{2}-\d{4}",
            r"(\d(?<![\d\-+]\d)\d\d-\d{2}-\d{4})(?![\d]|[\-.]\d)", v.valid_ssn, has_digit, digit_run=True),
    Pattern("ip", "ipv4", r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}",
            r"(\d(?<![\d.]\d)\d{0,2}(?:\.\d{1,3}){3})(?![\d]|\.\d)", v.valid_ipv4, has_digit, digit_run=True),
    Pattern("ip", "ipv6", r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]{0,34}",
            r"(?<![0-9A-Za-z:_.])([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})(?![0-9A-Za-z:_]|\.\d)",
            v.valid_ipv6, lambda t: "::" in t or t.count(":") >= 3, anchors=(":",), anchor_window=(5, 45)),
    Pattern("phone", "phone", r"(?:\+|00)?\(?\d[\d().\-/ ]{5,24}\d",
            # The first character is consumed before the lookbehinds so `re` can skip ahead by it.
            r"([+(\d](?<![\d+][+(\d])(?<!\d\.[+(\d])(?:(?<=\+)\s?\(?\d|(?<=\()\d|(?<=\d))"
            r"[\d().\-/ \u00a0]{5,40}\d(?:\s?(?:x|ext\.?)\s?\d{1,6})?)(?!\d|\.\d)",
            v.always, has_digit, tail=30, spans=phone_spans, digit_run=True),
    Pattern("phone", "phone_broken", r"[\d)]\.?" + _LAYOUT_BREAK + _SUBSCRIBER,
            rf"((?<![\w+.\-/()]){_AREA_CODE}{_LAYOUT_BREAK}{_SUBSCRIBER})(?!\d|\.\d)",
            v.always, has_digit, head=_AREA_CODE_LEN, spans=broken_phone_spans, digit_run=True),
)
