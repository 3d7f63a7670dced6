"""PII detection and redaction, in layers a reader can follow:

* :mod:`.patterns` - one table of candidate patterns per type (regexes only propose);
* :mod:`.scan` - the one-pass scan: one hyperscan database over every pattern, or ``re`` behind
  cheap locators where hyperscan is missing (both give the same candidates; a test checks it);
* :mod:`.validators` and :mod:`.phone` - decide on each candidate from a small
  :class:`~.context.Candidate` (the text, the span, the settings), never the whole redactor;
* :mod:`.cues` - where the text says "phone" around a number (a cue word before it, a label
  after it or on the line above, a spoken phrase) or says "reference number" instead;
* :mod:`.replace` - placeholders or keyed HMAC pseudonyms;
* :mod:`.redactor` - :class:`PIIRedactor` ties them together: detect spans, then replace them.
"""

from __future__ import annotations

from data_pipelines.scrub.filters.pii.redactor import PIIRedactor, PIISpan, measure_throughput
from data_pipelines.scrub.filters.pii.replace import normalize_value
from data_pipelines.scrub.filters.pii.scan import hyperscan_available
from data_pipelines.scrub.filters.pii.validators import IBAN_LENGTHS, iban_ok, shannon_entropy

VERSION = "3"

__all__ = [
    "IBAN_LENGTHS", "PIIRedactor", "PIISpan", "VERSION", "hyperscan_available", "iban_ok", "measure_throughput",
    "normalize_value", "shannon_entropy",
]
