"""Replacement: a typed placeholder (``<|email|>``) or a keyed pseudonym (``<|email:3fa9c2d1|>``).

The pseudonym is an HMAC-SHA256 tag of the normalized value: the same address in any spelling
maps to the same tag across the corpus (co-reference survives), it is obviously synthetic (never a
real person's number, unlike format-preserving fakes) and still typed. The key comes from the
environment variable ``scrub.pii.secret_env`` and is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from data_pipelines.scrub.filters.pii.phone import EXTENSION
from data_pipelines.scrub.filters.pii_types import PLACEHOLDERS


def normalize_value(pii_type: str, value: str) -> str:
    """Canonical form, so one value written several ways gets one pseudonym."""
    if pii_type == "email":
        return value.lower()
    if pii_type == "phone":
        body = EXTENSION.sub("", value)
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


class Replacer:
    """Placeholder per type, or with ``key`` a keyed pseudonym per value."""

    def __init__(self, key: bytes | None = None):
        self.key = key

    def __call__(self, pii_type: str, value: str) -> str:
        if self.key is None:
            return PLACEHOLDERS[pii_type]
        digest = hmac.new(self.key, f"{pii_type}\x00{normalize_value(pii_type, value)}".encode(), hashlib.sha256)
        return f"<|{pii_type}:{digest.hexdigest()[:8]}|>"
