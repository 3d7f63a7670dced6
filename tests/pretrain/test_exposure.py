"""The exposure estimators against hand-worked ranks and a known skew-normal distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import skewnorm

from pretrain.exposure import extrapolated_exposure, rank_exposure

REFS = np.arange(1.0, 17.0)  # 16 references scoring 1, 2, ..., 16 bits


@pytest.mark.parametrize("canary,rank,bits", [
    (0.5, 1, 4.0),  # better than every reference: rank 1 of 16, log2 16 - log2 1
    (3.5, 4, 2.0),  # three references score lower: rank 4, 4 - 2
    (4.0, 4, 2.0),  # a tie is not better: only 1, 2, 3 are strictly lower
    (8.5, 9, 4 - math.log2(9)),
    (20.0, 17, 4 - math.log2(17)),  # worse than all: slightly negative, the chance end of the scale
])
def test_rank_exposure_hand_worked(canary, rank, bits):
    got, r = rank_exposure(canary, REFS)
    assert r == rank and got == pytest.approx(bits)


def test_rank_exposure_is_chance_for_a_canary_drawn_like_the_references():
    """Averaged over canaries from the references' own distribution, about log2 e = 1.44 bits."""
    rng = np.random.default_rng(0)
    refs = rng.normal(size=4096)
    mean = np.mean([rank_exposure(x, refs)[0] for x in rng.normal(size=2000)])
    assert 1.2 < mean < 1.7


@pytest.mark.parametrize("tail_bits", [3.0, 10.0, 16.0])
def test_extrapolated_exposure_recovers_a_known_skew_normal_tail(tail_bits):
    """References from skew-normal(a=4, loc=20, scale=6): a canary at the quantile 2^-t of that
    distribution is exposed by t bits (the fit's error on 20000 references grows into the tail, to
    about half a bit at 16), even beyond what ranking among 20000 references could resolve
    (log2 20000 = 14.3)."""
    dist = skewnorm(4, loc=20, scale=6)
    refs = dist.rvs(size=20000, random_state=np.random.default_rng(1))
    canary = dist.ppf(2.0 ** -tail_bits)
    assert extrapolated_exposure(canary, refs, space_bits=40) == pytest.approx(tail_bits, abs=0.1 + 0.05 * tail_bits)
    assert rank_exposure(canary, refs)[0] <= math.log2(refs.size)


def test_extrapolated_exposure_is_capped_by_the_space_and_zero_at_the_bulk():
    refs = skewnorm(4, loc=20, scale=6).rvs(size=5000, random_state=np.random.default_rng(2))
    assert extrapolated_exposure(-1000.0, refs, space_bits=26.6) == 26.6  # rank cannot be below 1
    assert extrapolated_exposure(1000.0, refs, space_bits=26.6) == pytest.approx(0.0, abs=1e-9)
