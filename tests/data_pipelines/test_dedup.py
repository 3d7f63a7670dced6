import random

import numpy as np
import pytest

from data_pipelines.filters.dedup import (
    EXACT,
    KEEP,
    NEAR,
    MinHasher,
    exact_key,
    find_duplicates,
    lsh_params,
)
from data_pipelines.filters.quality import Words


def doc(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [f"w{rng.randint(0, 5000)}" for _ in range(n)]


def run(texts: list[str], threshold: float = 0.8, mh: MinHasher | None = None) -> np.ndarray:
    mh = mh or MinHasher(128, 5, 1, threshold)
    sigs = np.stack([mh.signature(Words.of(t)) for t in texts])
    ex = np.array([exact_key(t) for t in texts], dtype=np.uint64)
    return find_duplicates(ex, sigs, mh.band_keys(sigs), threshold)


def test_exact_key_ignores_case_and_whitespace():
    assert exact_key("Hello  World\n\tagain") == exact_key("hello world again")
    assert exact_key("hello world") != exact_key("hello worlds")


def test_signature_estimates_jaccard():
    mh = MinHasher(256, 1, 3, 0.8)
    a = [f"t{i}" for i in range(1000)]
    for overlap in (900, 600, 300):  # |A∩B| / |A∪B| with |A| = |B| = 1000
        b = a[:overlap] + [f"u{i}" for i in range(1000 - overlap)]
        true_j = overlap / (2000 - overlap)
        est = (mh.signature(Words.of(" ".join(a))) == mh.signature(Words.of(" ".join(b)))).mean()
        assert est == pytest.approx(true_j, abs=0.08)
    # short documents (fewer shingles than bins) still compare sensibly
    short = "alpha beta gamma delta epsilon zeta eta theta"
    assert (mh.signature(Words.of(short)) == mh.signature(Words.of(short))).all()
    other = "one two three four five six seven eight"
    assert (mh.signature(Words.of(short)) == mh.signature(Words.of(other))).mean() < 0.2


def test_first_copy_kept_later_copies_dropped_in_global_order():
    base = doc(1)
    near = list(base)
    near[150] = "CHANGED"  # one word of 300: Jaccard of 5-shingles ~0.97
    texts = [" ".join(doc(2)), " ".join(base), " ".join(doc(3)), " ".join(near), " ".join(base).upper(),
             " ".join(doc(4))]
    flags = run(texts)
    assert flags.tolist() == [KEEP, KEEP, KEEP, NEAR, EXACT, KEEP]


def test_threshold_respected_and_unrelated_docs_kept():
    base = doc(5)
    half = base[:150] + doc(6)[:150]  # Jaccard ~0.33
    assert run([" ".join(base), " ".join(half)]).tolist() == [KEEP, KEEP]
    assert run([" ".join(doc(i)) for i in range(20)]).tolist() == [KEEP] * 20


def test_deterministic_and_independent_of_batching():
    texts = [" ".join(doc(i % 7)) + f" tail{i // 7}" for i in range(21)]
    a = run(texts)
    b = run(texts)
    assert (a == b).all()
    # the decision over concatenated per-shard signatures equals the one over a single list
    mh = MinHasher(128, 5, 1, 0.8)
    shards = [texts[:10], texts[10:]]
    sigs = np.concatenate([np.stack([mh.signature(Words.of(t)) for t in s]) for s in shards])
    ex = np.concatenate([np.array([exact_key(t) for t in s], dtype=np.uint64) for s in shards])
    assert (find_duplicates(ex, sigs, mh.band_keys(sigs), 0.8) == a).all()
    assert (a[:7] == KEEP).all() and (a[7:] == NEAR).all()


def test_exact_only_and_params():
    ex = np.array([5, 7, 5, 5, 9], dtype=np.uint64)
    assert find_duplicates(ex).tolist() == [KEEP, KEEP, EXACT, EXACT, KEEP]
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and b > 1 and r > 1
