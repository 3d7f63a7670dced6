"""Bucketed, out-of-core deduplication: the same decisions as ``find_duplicates``, bounded memory.

The in-memory path (:func:`data_pipelines.scrub.filters.dedup.find_duplicates`) holds every signature
of the run in one process. This module splits the same computation into steps whose memory is
bounded by one *bucket* (``scrub.dedup.buckets`` hash partitions), like datatrove's MinHash stages:

1. **per unit** (scrub phase 1, :func:`write_unit`): a document's global id is
   ``unit_index << 32 | position`` (so sorting ids is the global order). It writes the unit's
   signatures as a raw file (read back by offset), its exact keys as ``(key, gid)`` records and
   its LSH band keys as ``(band, key, gid, exact_key)`` records, each grouped by bucket
   (``mix(key) % buckets``) with an offsets file, so a bucket step reads only its slice.
2. **exact, per bucket** (:func:`exact_bucket`): all ``(key, gid)`` records of one bucket, sorted;
   every gid but the first of an equal key is an exact duplicate -> sorted gid list.
3. **pairs, per bucket** (:func:`pairs_bucket`): all band records of one bucket, sorted by
   (band, key, gid). A run of equal (band, key) is exactly one LSH bucket of the in-memory path;
   its members that are not exact duplicates are compared in global order with the run's
   representatives as there, and every verified match becomes a pair ``(representative, member)``.
   Only colliding members' signatures are read (by offset, never the whole file).
4. **join** (:func:`join_pairs`): connected components over the pairs only (not over all
   documents); every member but the smallest gid of its component is a near duplicate.
5. **flags per unit** (:func:`unit_flags`): EXACT / NEAR / KEEP for a unit's candidates, read
   from the sorted lists by range.

Why the decisions equal the in-memory ones: the in-memory path unions ``(first matching rep,
member)`` inside each (band, key) run of non-exact-duplicates, members in global order, and drops
every document whose union-find root (the component's earliest) is not itself. Step 3 sees the
same runs with the same members in the same order, so it emits the same unions; components do
not depend on the order unions are applied, so step 4 gives the same roots.

Memory: one exact step holds 16 bytes per record of its bucket, one pairs step 32 bytes per
band record of its bucket plus the signatures (4 x num_perm bytes) of colliding documents, both
about 3x for sorting; with N candidates, B buckets and b bands that is ~48 N / B resp.
~96 b N / B bytes (measured: docs/benchmarks.md). The join holds the pairs (16 bytes each): it grows with the number
of near duplicates, not with the corpus.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_pipelines.scrub.filters.dedup import EXACT, KEEP, NEAR, MinHasher

_MIX = np.uint64(0x9E3779B97F4A7C15)
_GID_SHIFT = np.uint64(32)


def _bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of 64-bit keys: a cheap mixer so band sums spread evenly too."""
    z = keys * _MIX
    z ^= z >> np.uint64(29)
    return (z % np.uint64(buckets)).astype(np.int64)


def gids(unit_index: int, n: int) -> np.ndarray:
    """Global ids of a unit's n candidates: sorting them is the global order (unit, position)."""
    return (np.uint64(unit_index) << _GID_SHIFT) | np.arange(n, dtype=np.uint64)


class Layout:
    """Paths of the dedup work directory (``<output>/_work/dedup``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def sig(self, unit_key: str) -> Path:
        return self.root / "units" / f"{unit_key}.sig.u32"

    def exact_records(self, unit_key: str) -> tuple[Path, Path]:
        d = self.root / "units"
        return d / f"{unit_key}.exact.npy", d / f"{unit_key}.exact.off.npy"

    def band_records(self, unit_key: str) -> tuple[Path, Path]:
        d = self.root / "units"
        return d / f"{unit_key}.bands.npy", d / f"{unit_key}.bands.off.npy"

    def exact_out(self, bucket: int) -> tuple[Path, Path]:
        d = self.root / "exact"
        return d / f"{bucket:05d}.npy", d / f"{bucket:05d}.done.json"

    def pairs_out(self, bucket: int) -> tuple[Path, Path]:
        d = self.root / "pairs"
        return d / f"{bucket:05d}.npy", d / f"{bucket:05d}.done.json"

    def near(self) -> Path:
        return self.root / "near.npy"

    def bulky(self) -> list[Path]:
        """Everything but the markers (deleted after the merge)."""
        return [p for sub in ("units", "exact", "pairs") for p in (self.root / sub).glob("*")
                if not p.name.endswith(".done.json")] + [self.near()]


def _save(path: Path, arr: np.ndarray) -> None:
    """np.save to a temp name, then rename: a killed step never leaves a complete-looking file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _save_grouped(paths: tuple[Path, Path], records: np.ndarray, bucket: np.ndarray, buckets: int) -> None:
    order = np.argsort(bucket, kind="stable")
    offsets = np.concatenate(([0], np.cumsum(np.bincount(bucket, minlength=buckets)))).astype(np.int64)
    _save(paths[0], records[order])
    _save(paths[1], offsets)


def write_unit(layout: Layout, unit_index: int, unit_key: str, exact: np.ndarray | None,
               sigs: np.ndarray | None, minhash: MinHasher | None, buckets: int) -> None:
    """Step 1 for one unit: exact records (None = exact dedup off), band records and raw
    signatures (None = near dedup off), grouped by bucket."""
    n = len(exact) if exact is not None else (len(sigs) if sigs is not None else 0)
    g = gids(unit_index, n)
    xkeys = exact if exact is not None else g  # unique placeholders: nothing is an exact duplicate
    if exact is not None:
        rec = np.stack([exact.astype(np.uint64), g], axis=1)
        _save_grouped(layout.exact_records(unit_key), rec, _bucket_of(rec[:, 0], buckets), buckets)
    if sigs is not None and minhash is not None:
        path = layout.sig(unit_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        sigs.astype("<u4").tofile(path)
        bk = minhash.band_keys(sigs)  # [n, bands]
        nb = bk.shape[1]
        rec = np.empty((n * nb, 4), dtype=np.uint64)
        rec[:, 0] = np.tile(np.arange(nb, dtype=np.uint64), n)
        rec[:, 1] = bk.reshape(-1)
        rec[:, 2] = np.repeat(g, nb)
        rec[:, 3] = np.repeat(xkeys.astype(np.uint64), nb)
        _save_grouped(layout.band_records(unit_key), rec, _bucket_of(rec[:, 1] ^ (rec[:, 0] * _MIX), buckets), buckets)


def _slice(paths: tuple[Path, Path], bucket: int, width: int) -> np.ndarray:
    """One bucket's records of one unit, read without loading the rest of the file."""
    if not paths[0].exists():
        return np.zeros((0, width), dtype=np.uint64)
    off = np.load(paths[1])
    arr = np.load(paths[0], mmap_mode="r")
    out = np.array(arr[off[bucket] : off[bucket + 1]])
    del arr
    return out


def exact_bucket(layout: Layout, unit_keys: list[str], bucket: int) -> np.ndarray:
    """Step 2: sorted gids of this bucket's exact duplicates (all but the first of each key)."""
    parts = [_slice(layout.exact_records(k), bucket, 2) for k in unit_keys]
    rec = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
    del parts
    o = np.lexsort((rec[:, 1], rec[:, 0]))
    keys, g = rec[o, 0], rec[o, 1]
    del rec, o
    return np.sort(g[1:][keys[1:] == keys[:-1]])


def _exact_dups_among(layout: Layout, xkeys: np.ndarray, g: np.ndarray, buckets: int) -> np.ndarray:
    """Boolean mask: which of the gids (with their exact keys) are exact duplicates. Reads the
    sorted lists of only the exact buckets involved, one at a time."""
    dup = np.zeros(len(g), dtype=bool)
    xb = _bucket_of(xkeys, buckets)
    for b in np.unique(xb):
        path = layout.exact_out(int(b))[0]
        if not path.exists():
            continue
        lst = np.load(path, mmap_mode="r")
        sel = np.flatnonzero(xb == b)
        if len(lst):
            pos = np.minimum(np.searchsorted(lst, g[sel]), len(lst) - 1)
            dup[sel] = lst[pos] == g[sel]
        del lst
    return dup


class _SigReader:
    """Signatures by global id, read by offset (pread) so memory holds only what is asked."""

    def __init__(self, layout: Layout, unit_keys: list[str], num_perm: int) -> None:
        self.layout, self.keys, self.p = layout, unit_keys, num_perm
        self.fds: dict[int, int] = {}

    def read(self, gid: int) -> np.ndarray:
        unit, pos = gid >> 32, gid & 0xFFFFFFFF
        fd = self.fds.get(unit)
        if fd is None:
            fd = self.fds[unit] = os.open(self.layout.sig(self.keys[unit]), os.O_RDONLY)
        size = 4 * self.p
        return np.frombuffer(os.pread(fd, size, pos * size), dtype="<u4")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def pairs_bucket(layout: Layout, unit_keys: list[str], bucket: int, buckets: int, num_perm: int,
                 threshold: float) -> np.ndarray:
    """Step 3: uint64[k, 2] verified pairs (representative, member) of this bucket's LSH runs.

    ``unit_keys`` is indexed by unit index (the gid's upper half)."""
    parts = [_slice(layout.band_records(k), bucket, 4) for k in unit_keys]
    rec = np.concatenate(parts) if parts else np.zeros((0, 4), np.uint64)
    del parts
    rec = rec[np.lexsort((rec[:, 2], rec[:, 1], rec[:, 0]))]
    if len(rec) < 2:
        return np.zeros((0, 2), dtype=np.uint64)
    same = (rec[1:, 0] == rec[:-1, 0]) & (rec[1:, 1] == rec[:-1, 1])
    in_run = np.zeros(len(rec), dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    rec = rec[in_run]  # only members of runs of >= 2 can pair
    if len(rec) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    rec = rec[~_exact_dups_among(layout, rec[:, 3], rec[:, 2], buckets)]  # exact copies are gone first
    starts = np.flatnonzero(np.concatenate(([True], (rec[1:, 0] != rec[:-1, 0]) | (rec[1:, 1] != rec[:-1, 1]))))
    ends = np.concatenate((starts[1:], [len(rec)]))
    reader = _SigReader(layout, unit_keys, num_perm)
    cache: dict[int, np.ndarray] = {}
    pairs: list[tuple[int, int]] = []
    try:
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            if e - s < 2:
                continue
            members = rec[s:e, 2].tolist()
            for m in members:
                if m not in cache:
                    cache[m] = reader.read(m)
            reps = [members[0]]
            rep_sigs = [cache[members[0]]]
            for m in members[1:]:
                sim = (np.stack(rep_sigs) == cache[m]).mean(axis=1)
                hit = np.flatnonzero(sim >= threshold)
                if len(hit) == 0:
                    reps.append(m)
                    rep_sigs.append(cache[m])
                else:
                    pairs.append((reps[int(hit[0])], m))
    finally:
        reader.close()
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2)


def join_pairs(pairs: np.ndarray) -> np.ndarray:
    """Step 4: sorted gids that are near duplicates: in a component of the pair graph, all but
    the smallest gid (the earliest document). Vectorised min-label propagation with pointer
    jumping; memory is linear in the number of pairs."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.uint64)
    nodes, idx = np.unique(pairs, return_inverse=True)
    idx = idx.reshape(-1, 2)
    a, b = idx[:, 0], idx[:, 1]
    label = np.arange(len(nodes))
    while True:
        m = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]  # pointer jumping: labels are node indices, the minimum points at itself
        if (new == label).all():
            break
        label = new
    return nodes[label != np.arange(len(nodes))]


def unit_flags(layout: Layout, unit_index: int, n: int, buckets: int) -> np.ndarray:
    """Step 5: int8[n] KEEP / EXACT / NEAR of one unit's candidates, read by range from the
    sorted exact lists of every bucket and the near list."""
    flags = np.full(n, KEEP, dtype=np.int8)
    lo, hi = np.uint64(unit_index) << _GID_SHIFT, np.uint64(unit_index + 1) << _GID_SHIFT
    mask = np.uint64(0xFFFFFFFF)
    for b in range(buckets):
        path = layout.exact_out(b)[0]
        if path.exists():
            lst = np.load(path, mmap_mode="r")
            i, j = np.searchsorted(lst, [lo, hi])
            flags[(np.array(lst[i:j]) & mask).astype(np.int64)] = EXACT
            del lst
    if layout.near().exists():
        lst = np.load(layout.near(), mmap_mode="r")
        i, j = np.searchsorted(lst, [lo, hi])
        flags[(np.array(lst[i:j]) & mask).astype(np.int64)] = NEAR
        del lst
    return flags


def save(path: Path, arr: np.ndarray) -> None:
    """Atomic np.save (for the step outputs the scrub writes)."""
    _save(path, arr)
