import random
import tempfile
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.scrub.filters import dedup_buckets as db
from data_pipelines.scrub.filters.dedup import (
    EXACT,
    KEEP,
    NEAR,
    MinHasher,
    exact_key,
    find_duplicates,
    lsh_params,
)
from data_pipelines.scrub.filters.quality import Words


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
    assert (run(texts) == a).all()
    assert (a[:7] == KEEP).all() and (a[7:] == NEAR).all()
    # Genuinely different batchings: signatures computed per shard (3 uneven shards, each with its
    # own MinHasher instance) and concatenated, versus the one list above.
    shards = [texts[:4], texts[4:13], texts[13:]]
    sigs, ex = [], []
    for s in shards:
        mh = MinHasher(128, 5, 1, 0.8)
        sigs.append(np.stack([mh.signature(Words.of(t)) for t in s]))
        ex.append(np.array([exact_key(t) for t in s], dtype=np.uint64))
    sigs_cat = np.concatenate(sigs)
    assert (find_duplicates(np.concatenate(ex), sigs_cat, mh.band_keys(sigs_cat), 0.8) == a).all()
    # and the bucketed path, with the same documents spread over units in another way
    assert (bucketed([texts[:10], texts[10:11], texts[11:]], 5) == a).all()


def planted(seed: int, clusters: list[int], singles: int, words: int = 200) -> list[str]:
    """Clusters of known sizes (each member a few words off the cluster's base, some exact copies
    in other case) shuffled among unrelated documents."""
    rng = random.Random(seed)
    texts = []
    for c, size in enumerate(clusters):
        base = doc(10_000 + seed * 100 + c, words)
        for k in range(size):
            t = list(base)
            if k % 3 == 1:
                t[rng.randrange(words)] = f"edit{k}"
            texts.append(" ".join(t).upper() if k % 3 == 2 else " ".join(t))
    texts += [" ".join(doc(50_000 + seed * 1000 + i, words)) for i in range(singles)]
    rng.shuffle(texts)
    return texts


def bucketed(units: list[list[str]], buckets: int, threshold: float = 0.8, tmp: Path | None = None) -> np.ndarray:
    """Flags of the bucketed path over documents given as units, concatenated in unit order."""
    with tempfile.TemporaryDirectory() as d:
        lay = db.Layout(Path(tmp or d))
        mh = MinHasher(128, 5, 1, threshold)
        keys = [f"u{i}" for i in range(len(units))]
        for i, texts in enumerate(units):
            sigs = np.stack([mh.signature(Words.of(t)) for t in texts]).astype(np.uint32)
            db.write_unit(lay, i, keys[i], np.array([exact_key(t) for t in texts], dtype=np.uint64), sigs, mh, buckets)
        for b in range(buckets):
            db.save(lay.exact_out(b)[0], db.exact_bucket(lay, keys, b))
        pairs = [db.pairs_bucket(lay, keys, b, buckets, 128, threshold) for b in range(buckets)]
        db.save(lay.near(), db.join_pairs(np.concatenate(pairs)))
        return np.concatenate([db.unit_flags(lay, i, len(t), buckets) for i, t in enumerate(units)])


@pytest.mark.parametrize("buckets", [1, 3, 16])
def test_bucketed_equals_in_memory_on_planted_clusters(buckets):
    clusters = [2, 3, 5, 8, 1, 13, 4]
    texts = planted(7, clusters, 60)
    expected = run(texts)
    # kept: one per cluster plus the unrelated documents; every other cluster member dropped
    assert (expected == KEEP).sum() == len(clusters) + 60
    assert (expected == EXACT).sum() > 0 and (expected == NEAR).sum() > 0
    for cut in ([len(texts)], [10, 50, len(texts)], [1, 2, 3, 40, len(texts)]):  # units of all sizes
        units = [texts[a:b] for a, b in zip([0, *cut[:-1]], cut, strict=True)]
        assert (bucketed(units, buckets) == expected).all(), (buckets, cut)


def test_join_pairs_keeps_the_earliest_of_each_component():
    pairs = np.array([[5, 9], [9, 12], [1, 3], [12, 20], [3, 4]], dtype=np.uint64)
    assert db.join_pairs(pairs).tolist() == [3, 4, 9, 12, 20]
    assert db.join_pairs(np.zeros((0, 2), np.uint64)).tolist() == []


def test_exact_only_and_params():
    ex = np.array([5, 7, 5, 5, 9], dtype=np.uint64)
    assert find_duplicates(ex).tolist() == [KEEP, KEEP, EXACT, EXACT, KEEP]
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and b > 1 and r > 1
