"""Exact and near-duplicate detection across every shard of a run.

Two halves, so duplicates are found across shards, workers and machines:

- per document (in parallel, phase 1 of the scrub): an exact key (xxh64 of the lower-cased,
  whitespace-collapsed text) and a MinHash signature over word n-gram shingles, plus its LSH band
  keys;
- once over the whole run (phase 2): :func:`find_duplicates` walks all documents in the global
  order (input unit, then position) and keeps the first of each exact group and the first of
  each near-duplicate cluster. The result depends only on that order and the signatures, so it is
  the same however many workers or machines produced them, and every machine can recompute it.

MinHash is our own vectorised numpy implementation: datasketch hashes every shingle with SHA-1
in Python and applies num_perm permutations to each (O(num_perm x shingles)), about 10x too slow
for the 2 MB/s/core bar. We use one-permutation hashing with rotation densification (Li et al.
2012; Shrivastava & Li 2014): each shingle is hashed once (splitmix64 of per-word xxh64 values
combined polynomially), the hash picks one of num_perm bins and the bin keeps its minimum; empty
bins borrow from the next filled bin. The fraction of equal slots estimates the Jaccard
similarity like classic MinHash, at O(shingles) cost. LSH banding parameters (bands x rows) are datasketch's
optimum for the threshold. Candidate pairs from a shared band are verified by the estimated Jaccard
similarity (fraction of equal signature slots) before they are merged (union-find), so a band
collision alone never drops a document.
"""

from __future__ import annotations

import functools

import numpy as np
import xxhash

from data_pipelines.scrub.filters.quality import Words

VERSION = "1"
_MULT = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised: a strong 64-bit mixer (wraps mod 2**64)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def exact_key(text: str) -> int:
    """Hash of the text, lower-cased with whitespace collapsed (so reflowed copies match)."""
    return xxhash.xxh64_intdigest(" ".join(text.lower().split()).encode("utf-8", "surrogatepass"))


@functools.cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives at the threshold (datasketch)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


class MinHasher:
    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1, threshold: float = 0.8) -> None:
        rng = np.random.default_rng(seed)
        self.seed_key = rng.integers(0, 2**63, dtype=np.uint64)
        self.num_perm, self.ngram = num_perm, ngram
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng_band = np.random.default_rng(seed + 1)
        self.band_mult = rng_band.integers(1, 2**63, self.rows, dtype=np.uint64) | np.uint64(1)

    def shingles(self, w: Words) -> np.ndarray:
        """Unique 64-bit hashes of the lower-cased word n-grams (the whole text if shorter)."""
        if len(w.ids) == 0:
            return np.zeros(1, dtype=np.uint64)
        word_hash = np.fromiter(
            map(xxhash.xxh64_intdigest, map(_utf8, map(str.lower, w.vocab))), dtype=np.uint64, count=len(w.vocab)
        )[w.ids.astype(np.intp)]
        n = min(self.ngram, len(word_hash))
        m = len(word_hash) - n + 1
        keys = word_hash[:m].copy()
        for k in range(1, n):
            keys = keys * _MULT + word_hash[k : k + m]
        return np.unique(keys)

    def signature(self, w: Words) -> np.ndarray:
        """uint32[num_perm] one-permutation MinHash with densification (see module docstring)."""
        h = _splitmix64(self.shingles(w) ^ self.seed_key)
        p = self.num_perm
        bins = (h % np.uint64(p)).astype(np.intp)
        sig = np.full(p, np.iinfo(np.uint64).max, dtype=np.uint64)
        np.minimum.at(sig, bins, h >> np.uint64(32))
        filled = np.zeros(p, dtype=bool)
        filled[bins] = True
        if not filled.all():
            # Rotation densification: an empty bin borrows the next filled bin to its right
            # (circularly), mixed with the distance so borrowed values differ per bin.
            full = np.flatnonzero(filled)
            empty = np.flatnonzero(~filled)
            nxt = np.searchsorted(full, empty) % len(full)
            dist = ((full[nxt] - empty) % p).astype(np.uint64)
            sig[empty] = _splitmix64(sig[full[nxt]] + dist) >> np.uint64(32)
        return sig.astype(np.uint32)

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """uint64[n_docs, bands]: one key per band of `rows` signature slots."""
        sigs = np.atleast_2d(sigs).astype(np.uint64)
        out = np.zeros((len(sigs), self.bands), dtype=np.uint64)
        for i in range(self.bands):
            part = sigs[:, i * self.rows : (i + 1) * self.rows]
            out[:, i] = (part * self.band_mult).sum(axis=1) + np.uint64(i)
        return out


KEEP, EXACT, NEAR = 0, 1, 2


def _find(parent: dict[int, int], x: int) -> int:
    root = x
    while parent.get(root, root) != root:
        root = parent[root]
    while parent.get(x, x) != root:  # path compression
        parent[x], x = root, parent[x]
    return root


def find_duplicates(exact: np.ndarray, sigs: np.ndarray | None = None, bands: np.ndarray | None = None,
                    threshold: float = 0.8) -> np.ndarray:
    """Decide duplicates over all documents in their global order.

    exact: uint64[N] exact keys; sigs: uint32[N, P] MinHash signatures and bands: uint64[N, B]
    band keys (both None = exact only). Returns int8[N]: KEEP, EXACT or NEAR. The first document
    of each exact group and of each near-duplicate cluster is kept.
    """
    n = len(exact)
    out = np.zeros(n, dtype=np.int8)
    if n == 0:
        return out
    order = np.argsort(exact, kind="stable")
    srt = exact[order]
    out[order[1:][srt[1:] == srt[:-1]]] = EXACT
    if sigs is None or bands is None:
        return out
    alive = np.flatnonzero(out == KEEP)  # exact copies are already gone; their first stays
    parent: dict[int, int] = {}
    for b in range(bands.shape[1]):
        keys = bands[alive, b]
        o = np.argsort(keys, kind="stable")
        sk = keys[o]
        same = np.flatnonzero(sk[1:] == sk[:-1])
        if len(same) == 0:
            continue
        # group runs of equal keys; members in global order (stable sort over increasing alive)
        run_starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
        run_ends = np.concatenate((run_starts[1:], [len(sk)]))
        for s, e in zip(run_starts, run_ends, strict=True):
            if e - s < 2:
                continue
            members = alive[o[s:e]]
            # Compare each member with the bucket's representatives only (members that matched
            # no earlier representative): a bucket of k copies of one page costs O(k), not O(k^2).
            reps = [int(members[0])]
            for m in members[1:]:
                sim = (sigs[reps] == sigs[m]).mean(axis=1)
                hit = np.flatnonzero(sim >= threshold)
                if len(hit) == 0:
                    reps.append(int(m))
                    continue
                ra, rb = _find(parent, reps[int(hit[0])]), _find(parent, int(m))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)  # the root is the earliest document
    for x in list(parent):
        if _find(parent, x) != x:
            out[x] = NEAR
    return out
