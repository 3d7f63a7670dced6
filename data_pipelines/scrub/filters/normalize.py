"""Text normalization: repair invalid UTF-8, Unicode NFC, strip control characters.

Readers decode bytes with ``errors="surrogateescape"``, so an undecodable byte arrives here as a
lone surrogate (U+DC80..U+DCFF) instead of crashing the reader or being silently replaced. That
lets this step *count* them: a record with a few bad bytes is repaired (U+FFFD), a record made of
them (binary, wrong encoding) is rejected as ``malformed.undecodable``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

VERSION = "1"

_SURROGATES = re.compile("[\ud800-\udfff]")
# C0 and C1 controls except tab and newline (carriage returns become newlines first), plus
# DEL, zero-width no-break space / BOM and the Unicode non-characters U+FFFE/U+FFFF.
# (A regex character class: str.translate with a dict is ~10x slower on long texts.)
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\ufffe\uffff]")


@dataclass(slots=True)
class Normalized:
    text: str
    invalid_bytes: int  # undecodable bytes (lone surrogates) found in the input

    def invalid_ratio(self, n_chars: int) -> float:
        return self.invalid_bytes / max(1, n_chars)


def normalize_text(text: str) -> Normalized:
    """Repair, NFC-normalize and clean one document (idempotent)."""
    invalid = 0
    if not text.isascii():
        text, invalid = _SURROGATES.subn("\ufffd", text)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CONTROLS.search(text):
        text = _CONTROLS.sub("", text)
    return Normalized(text, invalid)


def repair_utf8(text: str) -> Normalized:
    """Only the UTF-8 repair (for scrub.normalize.enabled=false): shards must be valid UTF-8."""
    if text.isascii():
        return Normalized(text, 0)
    text, invalid = _SURROGATES.subn("\ufffd", text)
    return Normalized(text, invalid)
