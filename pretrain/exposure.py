"""Exposure of a planted canary (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary's secret s was drawn uniformly from a space R. Order every candidate r in R by the
model's log-perplexity of ``prefix + r``; the canary's *exposure* is

    exposure = log2 |R| - log2 rank(s)

bits: 0 when the model likes the canary no better than a random candidate (rank |R| ... chance is
about log2 e = 1.44 bits on average), log2 |R| when it is the model's first choice. |R| is too
large to score, so two estimates from N references drawn uniformly from R (as TensorFlow Privacy's
``secret_sharer/exposures.py`` does):

- **rank**: the canary's rank among the references, scaled to the space: with k references
  scoring strictly lower (better), rank ~ (k + 1) |R| / N, so exposure = log2 N - log2 (k + 1).
  It cannot exceed log2 N: a canary better than every reference is only known to be in the top
  1/N of the space.
- **extrapolated**: fit a skew-normal distribution to the references' log-perplexities; the
  fraction of the space scoring better than the canary is its CDF at the canary's value, so
  exposure = -log2 CDF. It resolves beyond log2 N, but only as well as the fit's tail; it is capped
  at log2 |R| (a rank is at least 1).

Scores here are log-perplexities in bits (lower = more likely); any score that ranks candidates
the same way gives the same rank exposure.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import skewnorm


def rank_exposure(canary: float, references: np.ndarray) -> tuple[float, int]:
    """(exposure in bits, rank among the references: 1 + how many score strictly lower)."""
    refs = np.asarray(references, dtype=np.float64)
    if refs.size == 0:
        raise ValueError("rank exposure needs at least one reference")
    rank = 1 + int(np.count_nonzero(refs < canary))
    return math.log2(refs.size) - math.log2(rank), rank


def extrapolated_exposure(canary: float, references: np.ndarray, space_bits: float) -> float:
    """-log2 of the skew-normal CDF (fitted to the references) at the canary's score, in
    [0, space_bits]: 0 when the canary is no better than the bulk of the references."""
    refs = np.asarray(references, dtype=np.float64)
    params = skewnorm.fit(refs)
    log_cdf = float(skewnorm.logcdf(canary, *params))  # log space: no underflow far in the tail
    return float(min(space_bits, max(0.0, -log_cdf / math.log(2))))
