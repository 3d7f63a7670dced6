"""PII type names and their placeholder tokens.

Deliberately light (nothing beyond the config schema): the tokenizer reads
``PLACEHOLDERS`` to make every placeholder a single special token, the scrub manifest records
it, and ``PII_TYPES`` comes from the config schema, which validates ``scrub.pii.types``.
"""

from __future__ import annotations

from pretrain.config import PII_TYPES  # the schema owns the list and its priority order

PLACEHOLDERS: dict[str, str] = {t: f"<|{t}|>" for t in PII_TYPES}

DOCUMENT_SEPARATOR = "<|endoftext|>"
