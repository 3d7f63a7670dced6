"""`python -m data_pipelines bench dedup [--docs N,N,...]`: the bucketed dedup at growing N.

For each N it builds N short synthetic documents (50 words from a 5,000-word vocabulary) with
planted duplicates: every 10th document is an exact copy (other case) of an earlier random
document, every 10th+1 a near copy (last word changed, estimated Jaccard ~0.96). Units hold a
fixed number of documents and ``buckets`` grows with N (a fixed number of candidates per bucket),
so each step's memory should stay flat. Each step runs in its own fresh process; its peak RSS
is that process's ``ru_maxrss``. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_pipelines.scrub.filters import dedup_buckets as db
from data_pipelines.scrub.filters.dedup import EXACT, NEAR, MinHasher, exact_key
from data_pipelines.scrub.filters.quality import Words

UNIT_DOCS = 50_000
BUCKET_DOCS = 25_000
WORDS = 50
VOCAB = np.array([f"w{i}" for i in range(5000)])
NUM_PERM, NGRAM, SEED, THRESHOLD = 128, 5, 1, 0.8


def _mix(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(31)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    return z ^ (z >> np.uint64(29))


def synthetic_texts(start: int, stop: int) -> list[str]:
    """Documents start..stop-1 of the synthetic corpus (deterministic, independent of batching)."""
    i = np.arange(start, stop, dtype=np.uint64)
    src = i.copy()  # the document whose words this one uses: itself, or a random earlier original
    planted = (i % np.uint64(10) <= np.uint64(1)) & (i >= np.uint64(10))
    h = _mix(i[planted])
    src[planted] = (h % (i[planted] // np.uint64(10))) * np.uint64(10) + np.uint64(2) + (h >> np.uint64(32)) % np.uint64(8)
    ids = _mix(src[:, None] * np.uint64(WORDS) + np.arange(WORDS, dtype=np.uint64)) % np.uint64(len(VOCAB))
    texts = []
    for k, row in enumerate(ids):
        words = VOCAB[row].tolist()
        n = int(i[k])
        if n >= 10 and n % 10 == 1:
            words[-1] = f"edit{n}"
        text = " ".join(words)
        texts.append(text.upper() if n >= 10 and n % 10 == 0 else text)
    return texts


def _rss_mb() -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of this process: on a shared machine CPU time, not wall
    time, is the per-core cost."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_maxrss / 1024, r.ru_utime + r.ru_stime


def step_signatures(root: str, n: int, buckets: int) -> tuple[dict, tuple[float, float]]:
    lay, mh = db.Layout(Path(root)), MinHasher(NUM_PERM, NGRAM, SEED, THRESHOLD)
    for u in range(math.ceil(n / UNIT_DOCS)):
        texts = synthetic_texts(u * UNIT_DOCS, min(n, (u + 1) * UNIT_DOCS))
        exact = np.array([exact_key(t) for t in texts], dtype=np.uint64)
        sigs = np.stack([mh.signature(Words.of(t)) for t in texts])
        db.write_unit(lay, u, f"u{u:05d}", exact, sigs, mh, buckets)
        del texts, exact, sigs
    return {}, _rss_mb()


def _keys(n: int) -> list[str]:
    return [f"u{u:05d}" for u in range(math.ceil(n / UNIT_DOCS))]


def step_buckets(root: str, n: int, buckets: int) -> tuple[dict, tuple[float, float]]:
    lay, dups = db.Layout(Path(root)), 0
    for b in range(buckets):
        d = db.exact_bucket(lay, _keys(n), b)
        db.save(lay.exact_out(b)[0], d)
        dups += len(d)
    return {"exact_duplicates": dups}, _rss_mb()


def step_pairs(root: str, n: int, buckets: int) -> tuple[dict, tuple[float, float]]:
    lay, total = db.Layout(Path(root)), 0
    for b in range(buckets):
        p = db.pairs_bucket(lay, _keys(n), b, buckets, NUM_PERM, THRESHOLD)
        db.save(lay.pairs_out(b)[0], p)
        total += len(p)
    return {"pairs": total}, _rss_mb()


def step_join(root: str, n: int, buckets: int) -> tuple[dict, tuple[float, float]]:
    lay = db.Layout(Path(root))
    pairs = np.concatenate([np.load(lay.pairs_out(b)[0]) for b in range(buckets)])
    near = db.join_pairs(pairs)
    db.save(lay.near(), near)
    return {"near_duplicates": len(near)}, _rss_mb()


def step_flags(root: str, n: int, buckets: int) -> tuple[dict, tuple[float, float]]:
    lay, counts = db.Layout(Path(root)), np.zeros(3, dtype=np.int64)
    for u in range(math.ceil(n / UNIT_DOCS)):
        f = db.unit_flags(lay, u, min(n, (u + 1) * UNIT_DOCS) - u * UNIT_DOCS, buckets)
        counts += np.bincount(f, minlength=3)
    return {"kept": int(counts[0]), "exact": int(counts[EXACT]), "near": int(counts[NEAR])}, _rss_mb()


STEPS = (("signatures", step_signatures), ("buckets", step_buckets), ("pairs", step_pairs),
         ("join", step_join), ("flags", step_flags))


def bench_one(n: int, work: Path) -> dict:
    buckets = max(1, math.ceil(n / BUCKET_DOCS))
    root = work / f"n{n}"
    row: dict = {"docs": n, "buckets": buckets, "units": math.ceil(n / UNIT_DOCS), "steps": {}}
    for name, fn in STEPS:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:  # fresh process per step
            t = time.perf_counter()
            info, (rss, cpu) = ex.submit(fn, str(root), n, buckets).result()
            wall = time.perf_counter() - t
        row["steps"][name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss, 1), **info}
    row["wall_s"] = round(sum(s["wall_s"] for s in row["steps"].values()), 2)
    row["cpu_s"] = round(sum(s["cpu_s"] for s in row["steps"].values()), 2)
    row["docs_per_s_per_core"] = round(n / row["cpu_s"])  # every step is one single-threaded process
    row["dedup_only_docs_per_s_per_core"] = round(n / sum(s["cpu_s"] for k, s in row["steps"].items() if k != "signatures"))
    row["planted"] = {"exact": len(range(10, n, 10)), "near": len(range(11, n, 10))}
    shutil.rmtree(root, ignore_errors=True)
    return row


def bench_dedup(sizes: list[int]) -> int:
    """Run the bench for each N in ``sizes``; print a table, then one JSON line."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        for n in sizes:
            rows.append(bench_one(n, Path(tmp)))
            r = rows[-1]
            print(f"N={n:>10,}  buckets={r['buckets']:>5}  units={r['units']:>4}  wall {r['wall_s']:8.1f} s  "
                  f"cpu {r['cpu_s']:8.1f} s  {r['docs_per_s_per_core']:>8,} docs/s/core  "
                  f"(steps after signatures: {r['dedup_only_docs_per_s_per_core']:,} docs/s/core)", flush=True)
            for name, s in r["steps"].items():
                extra = " ".join(f"{k}={v}" for k, v in s.items() if k not in ("wall_s", "cpu_s", "peak_rss_mb"))
                print(f"    {name:<11} wall {s['wall_s']:8.1f} s  cpu {s['cpu_s']:8.1f} s  "
                      f"peak RSS {s['peak_rss_mb']:7.1f} MB  {extra}", flush=True)
    print(json.dumps({"bench": "dedup", "unit_docs": UNIT_DOCS, "bucket_docs": BUCKET_DOCS, "results": rows}))
    return 0
