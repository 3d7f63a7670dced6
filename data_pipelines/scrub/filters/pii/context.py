"""What a validator sees: one candidate match and the settings, not the whole redactor."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol


class PhoneScorer(Protocol):
    """What phone validation offers (:class:`~.phone.PhoneValidator`)."""

    def score(self, body: str, text: str, start: int, end: int) -> float | None: ...


@dataclass(frozen=True)
class Settings:
    """The part of ``scrub.pii`` the validators read."""

    redact_private_ips: bool = False
    phone_cues: bool = True
    phone: PhoneScorer | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A regex match (group 1 is the proposed span) in its text, with the settings."""

    match: re.Match
    settings: Settings

    @property
    def text(self) -> str:
        return self.match.string

    @property
    def start(self) -> int:
        return self.match.start(1)

    @property
    def end(self) -> int:
        return self.match.end(1)

    @property
    def value(self) -> str:
        return self.match.group(1)

    def before(self, n: int) -> str:
        """Up to ``n`` characters before the span (where cue words are looked for)."""
        return self.text[max(0, self.start - n):self.start]
