"""PII type names and their placeholder tokens.

Deliberately light (no imports beyond the standard library): the tokenizer reads
``PLACEHOLDERS`` to make every placeholder a single special token, the scrub manifest records
it, and the config validates ``scrub.pii.types`` against ``PII_TYPES``.
"""

from __future__ import annotations

# Order is the priority used when detections of different types overlap: the earlier type wins
# (a secret inside a URL beats the URL's credentials; credentials in a URL beat an email-looking
# ``pass@host``; a checksum-validated IBAN or card beats a phone-shaped digit run).
PII_TYPES: tuple[str, ...] = (
    "secret",
    "url_credentials",
    "email",
    "iban",
    "credit_card",
    "ssn",
    "ip",
    "phone",
)

PLACEHOLDERS: dict[str, str] = {t: f"<|{t}|>" for t in PII_TYPES}

DOCUMENT_SEPARATOR = "<|endoftext|>"
