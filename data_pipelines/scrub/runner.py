"""The scrub: raw corpus in, scrubbed shards + manifest.json + report out.

Filter order (the first filter that drops a document is its one reason):

    read -> malformed.* (bad_json, missing_text, non_string_text, too_large, then after
            normalization undecodable, empty_text)
         -> normalize -> language -> quality.<rule> -> dedup.{exact,near}
         -> toxicity.{wordlist,classifier} (+ bias audit of every filter's removals)
         -> counterfactual substitution (optional) -> PII redaction -> shard

Execution, in three phases over *units* (one input file or hub dataset each):

1. **signatures** (parallel, per unit): read, normalize, malformed checks, language, quality;
   the survivors go to ``_work/p1/<unit>.arrow`` with their dedup signature in ``<unit>.sig.npz``.
2. **dedup** (once, over all units of all ranks, in global unit order): exact and near duplicates
   are decided from the signatures alone (:func:`data_pipelines.scrub.filters.dedup.find_duplicates`).
   It is deterministic, so every rank recomputes it instead of exchanging results; all it needs
   is every unit's phase-1 output in the shared output directory. With
   ``scrub.dedup.method=bucketed`` the same decision is made out of core instead
   (:mod:`data_pipelines.scrub.filters.dedup_buckets`): stage ``buckets`` (exact duplicates per hash partition)
   and stage ``pairs`` (near-duplicate pairs per band partition), bucket j on rank
   ``j % world_size`` with a marker per bucket, then a union-find over the pairs in ``write``.
3. **write** (parallel, per unit): drop duplicates, toxicity, optional counterfactual swap, PII
   redaction, then ``shards/part-<rank>-<unit>.parquet``.

Finally **merge** (rank 0): sums every unit's statistics into manifest.json, report.json and
report.md. Every unit output is written to a temporary name, renamed when complete, and followed
by a ``.done.json`` marker holding its statistics; a rerun skips units with markers (resume at
unit granularity; a half-written temp file from a killed run is simply redone).

Several machines: give each the same config and output directory (a shared filesystem) with
``scrub.rank``/``scrub.world_size``; unit i belongs to rank ``i % world_size``. Either run
``stage=all`` everywhere with ``wait_timeout_s`` (ranks wait for each other's phase-1 outputs),
or run the stages as dependent jobs: ``stage=signatures`` on every rank, (bucketed dedup:
``stage=buckets``, then ``stage=pairs`` on every rank,) then ``stage=write`` on every rank, then
one ``stage=merge`` (the SLURM recipe in docs/scrub.md).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_pipelines.scrub import manifest as mf
from data_pipelines.scrub import planting
from data_pipelines.scrub import report as rp
from data_pipelines.scrub.filters import bias, dedup, language, normalize, pii, quality, toxicity
from data_pipelines.scrub.filters import dedup_buckets as db
from data_pipelines.scrub.filters.bias import (
    BiasAudit,
    GroupMatcher,
    add_counts,
    chosen_for_swap,
    counterfactual_swap,
    load_groups,
)
from data_pipelines.scrub.filters.dedup import MinHasher, exact_key, find_duplicates
from data_pipelines.scrub.filters.language import LanguageFilter
from data_pipelines.scrub.filters.normalize import normalize_text, repair_utf8
from data_pipelines.scrub.filters.pii import PIIRedactor
from data_pipelines.scrub.filters.pii_types import DOCUMENT_SEPARATOR, PLACEHOLDERS
from data_pipelines.scrub.filters.quality import QualityFilter, Words
from data_pipelines.scrub.filters.toxicity import ToxicityFilter
from data_pipelines.scrub.planting import CopyTracker, UnitCanaries
from data_pipelines.scrub.readers import InputUnit, input_info, read_unit, resolve_inputs
from pretrain.errors import DiskFullError, UserError, is_disk_full
from pretrain.fileio import write_json_atomic
from pretrain.run_lease import LEASE_NAME, RunLease, stop_process

log = logging.getLogger(__name__)

WORK = "_work"
EXECUTION_KEYS = ("workers", "rank", "world_size", "stage", "wait_timeout_s", "output")
AUDIT_CHARS = 1500
_BATCH_DOCS = 512  # rows buffered before a write: bounded by count and by characters
_BATCH_CHARS = 32_000_000


def filter_versions(cfg) -> dict[str, str]:
    s = cfg.scrub
    out = {}
    for name, mod, on in (("normalize", normalize, s.normalize.enabled), ("language", language, s.language.enabled),
                          ("quality", quality, s.quality.enabled), ("dedup", dedup, s.dedup.enabled),
                          ("toxicity", toxicity, s.toxicity.enabled), ("bias", bias, s.bias.enabled)):
        out[name] = mod.VERSION if on else "off"
    out["pii"] = pii.VERSION if s.pii.enabled else "off"
    return out


def scrub_config_hash(cfg) -> str:
    """Hash of everything that changes the output (not workers, ranks or the output path)."""
    section = {k: v for k, v in dataclasses.asdict(cfg.scrub).items() if k not in EXECUTION_KEYS}
    return mf.config_hash({"scrub": section, "filters": filter_versions(cfg)})


# ---------------------------------------------------------------------------------------------
# Per-process filter objects (built once per worker process).


class _Filters:
    def __init__(self, cfg) -> None:
        s = cfg.scrub
        self.cfg = cfg
        groups = load_groups(s.bias.terms_file) if s.bias.enabled else {}
        self.groups = list(groups)
        self.matcher = GroupMatcher(groups) if s.bias.enabled else None
        self.language = LanguageFilter(s.language) if s.language.enabled else None
        self.quality = QualityFilter(s.quality) if s.quality.enabled else None
        d = s.dedup
        self.minhash = MinHasher(d.num_perm, d.ngram, d.seed, d.threshold) if d.enabled and d.near else None
        self.toxicity = ToxicityFilter(s.toxicity) if s.toxicity.enabled else None
        self._pii = None

    @property
    def pii(self):
        if self._pii is None and self.cfg.scrub.pii.enabled:
            self._pii = PIIRedactor(self.cfg.scrub.pii)
        return self._pii

    def redact(self, text: str) -> tuple[str, Counter]:
        return self.pii.redact(text) if self.pii is not None else (text, Counter())


_FILTERS: dict[str, _Filters] = {}


def filters_for(cfg) -> _Filters:
    """One _Filters per process and config (workers get a fresh unpickled cfg per task)."""
    key = json.dumps(dataclasses.asdict(cfg.scrub), sort_keys=True, default=str)
    if key not in _FILTERS:
        _FILTERS.clear()
        _FILTERS[key] = _Filters(cfg)
    return _FILTERS[key]


class _UnitStats:
    """Counts of one unit in one phase; JSON-serialisable through ``to_dict``."""

    def __init__(self, f: _Filters, audit_cap: int, canaries: CopyTracker) -> None:
        self.f = f
        self.canaries = canaries  # planted canary copies: the outcome of each
        self.d: dict = {"read": 0, "bytes": 0, "kept": 0, "candidates": 0, "dropped": Counter(),
                        "pii": Counter(), "languages": Counter(), "counterfactual_swapped": 0,
                        "toxicity_masked": 0, "seconds": 0.0, "stage_seconds": Counter()}
        self.audit = BiasAudit(f.groups)
        self.samples: list[dict] = []
        self.per_reason: Counter = Counter()
        self.cap = audit_cap

    def drop(self, reason: str, mask: int | None, rec_id: str, source: str, text: str | None, detail: str = "") -> None:
        self.d["dropped"][reason] += 1
        self.canaries.dropped(reason)
        if mask is not None:
            self.audit.final(mask, kept=False)
        if self.per_reason[reason] < self.cap:
            self.per_reason[reason] += 1
            excerpt = self.f.redact(text[:AUDIT_CHARS])[0] if text else None
            self.samples.append({"id": rec_id, "source": source, "reason": reason, "detail": detail, "text": excerpt})

    def to_dict(self) -> dict:
        out = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in self.d.items()}
        out["bias"] = self.audit.data
        out["audit"] = self.samples
        out["canaries"] = self.canaries.to_dict()
        if self.canaries.survivors:
            out["canary_hosts"] = self.canaries.survivors
        return out


# ---------------------------------------------------------------------------------------------
# Phase 1: read -> normalize -> malformed -> language -> quality -> signatures


def _p1_paths(out: Path, unit: InputUnit) -> tuple[Path, Path, Path]:
    d = out / WORK / "p1"  # (keys may contain dots: append suffixes, never with_suffix)
    return d / f"{unit.key}.arrow", d / f"{unit.key}.sig.npz", d / f"{unit.key}.done.json"


_CANDIDATE_SCHEMA = None


def _candidate_schema():
    import pyarrow as pa

    global _CANDIDATE_SCHEMA
    if _CANDIDATE_SCHEMA is None:
        _CANDIDATE_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string()),
                                       ("meta", pa.string()), ("groups", pa.int64())])
    return _CANDIDATE_SCHEMA


def phase1_unit(unit: InputUnit, cfg, out_dir: str, canaries: UnitCanaries | None = None) -> dict:
    import pyarrow as pa  # heavy optional library: only the processes that run phase 1 load it

    t0 = time.perf_counter()
    s = cfg.scrub
    out = Path(out_dir)
    arrow_path, sig_path, done_path = _p1_paths(out, unit)
    arrow_path.parent.mkdir(parents=True, exist_ok=True)
    f = filters_for(cfg)
    st = _UnitStats(f, s.audit_sample, CopyTracker(canaries))
    info = input_info(unit)
    rows: dict[str, list] = {k: [] for k in ("id", "text", "source", "meta", "groups")}
    exact: list[int] = []
    sigs: list[np.ndarray] = []
    tmp_arrow = arrow_path.with_name(arrow_path.name + ".tmp")
    opts = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.OSFile(str(tmp_arrow), "wb") as sink, pa.ipc.new_file(sink, _candidate_schema(), options=opts) as writer:

        def flush() -> None:
            if rows["id"]:
                writer.write_batch(pa.record_batch([pa.array(rows[k]) for k in rows], schema=_candidate_schema()))
                for v in rows.values():
                    v.clear()

        records = iter(read_unit(unit, s))
        buffered = 0
        tm, clock = st.d["stage_seconds"], time.perf_counter
        while True:
            t = clock()
            rec = next(records, None)
            tm["read"] += clock() - t
            if rec is None:
                break
            ordinal = st.d["read"]
            st.d["read"] += 1
            st.d["bytes"] += rec.nbytes
            if rec.error:
                st.drop(f"malformed.{rec.error}", None, rec.id, rec.source, None)
                continue
            rec.text = st.canaries.plant(ordinal, rec.text)  # canary copies go in before any filter
            t = clock()
            n = normalize_text(rec.text) if s.normalize.enabled else repair_utf8(rec.text)
            tm["normalize"] += clock() - t
            if n.invalid_ratio(len(rec.text)) > s.normalize.max_invalid_utf8_ratio:
                st.drop("malformed.undecodable", None, rec.id, rec.source, None, f"{n.invalid_bytes} bad bytes")
                continue
            text = n.text
            st.canaries.check(text, "altered.normalize")
            if not text.strip():
                st.drop("malformed.empty_text", None, rec.id, rec.source, None)
                continue
            t = clock()
            mask = f.matcher.mask(text) if f.matcher else 0
            tm["bias_terms"] += clock() - t
            scrub_meta = {}
            if f.language:
                t = clock()
                ok, lang = f.language.keep(text)
                tm["language"] += clock() - t
                st.d["languages"][lang.lang] += 1
                st.audit.record("language", mask, not ok)
                scrub_meta = {"lang": lang.lang, "lang_score": round(lang.score, 4)}
                if not ok:
                    st.drop("language", mask, rec.id, rec.source, text, f"{lang.lang} {lang.score:.2f}")
                    continue
            words = None
            if f.quality:
                t = clock()
                text, reason, words = f.quality.apply(text)
                tm["quality"] += clock() - t
                st.audit.record("quality", mask, reason is not None)
                if reason:
                    st.drop(f"quality.{reason}", mask, rec.id, rec.source, text)
                    continue
                st.canaries.check(text, "altered.quality")
            t = clock()  # one exact key per candidate always: it also counts them for phase 2
            exact.append(exact_key(text) if s.dedup.enabled and s.dedup.exact else len(exact))
            if f.minhash:
                sigs.append(f.minhash.signature(words if words is not None else Words.of(text)))
            tm["dedup_signature"] += clock() - t
            meta = dict(rec.meta)
            if scrub_meta:
                meta["scrub"] = scrub_meta
            rows["id"].append(rec.id)
            rows["text"].append(text)
            rows["source"].append(rec.source)
            rows["meta"].append(repair_utf8(json.dumps(meta, ensure_ascii=False, default=str)).text)
            rows["groups"].append(mask)
            st.canaries.survive(st.d["candidates"])
            st.d["candidates"] += 1
            buffered += len(text)
            if len(rows["id"]) >= _BATCH_DOCS or buffered >= _BATCH_CHARS:
                flush()
                buffered = 0
        flush()
    ex = np.array(exact, dtype=np.uint64)
    sg = np.stack(sigs) if sigs else np.zeros((0, s.dedup.num_perm), dtype=np.uint32)
    if _bucketed(s):
        d = s.dedup
        db.write_unit(_layout(out), unit.index, unit.key, ex if d.exact else None, sg if d.near else None,
                      f.minhash, d.buckets)
    else:
        tmp_sig = sig_path.with_name(sig_path.name + ".tmp.npz")
        np.savez(tmp_sig, exact=ex, sigs=sg)
        os.replace(tmp_sig, sig_path)
    os.replace(tmp_arrow, arrow_path)
    st.d["seconds"] = time.perf_counter() - t0
    result = {"unit": unit.key, "input": info, **st.to_dict()}
    _write_json_atomic(done_path, result)
    return result


# ---------------------------------------------------------------------------------------------
# Phase 2: global dedup decision (in memory, or in bucketed steps: data_pipelines.scrub.filters.dedup_buckets)


def _bucketed(s) -> bool:
    return s.dedup.enabled and s.dedup.method == "bucketed"


def _layout(out: Path) -> db.Layout:
    return db.Layout(out / WORK / "dedup")


def _unit_keys(units: list[InputUnit]) -> list[str]:
    """Unit keys indexed by unit index (the upper half of a bucketed global id)."""
    keys = [u.key for u in sorted(units, key=lambda u: u.index)]
    if [u.index for u in sorted(units, key=lambda u: u.index)] != list(range(len(units))):
        raise RuntimeError("unit indices are not 0..n-1")
    return keys


def exact_step(cfg, out_dir: str, unit_keys: list[str], bucket: int) -> dict:
    """Bucketed step 'buckets': the exact duplicates of one hash partition, then its marker."""
    t0 = time.perf_counter()
    lay = _layout(Path(out_dir))
    dups = db.exact_bucket(lay, unit_keys, bucket) if cfg.scrub.dedup.exact else np.zeros(0, np.uint64)
    path, done = lay.exact_out(bucket)
    db.save(path, dups)
    result = {"bucket": bucket, "exact_duplicates": len(dups), "seconds": time.perf_counter() - t0}
    _write_json_atomic(done, result)
    return result


def pairs_step(cfg, out_dir: str, unit_keys: list[str], bucket: int) -> dict:
    """Bucketed step 'pairs': verified near-duplicate pairs of one band partition, then its marker."""
    t0 = time.perf_counter()
    d = cfg.scrub.dedup
    lay = _layout(Path(out_dir))
    pairs = (db.pairs_bucket(lay, unit_keys, bucket, d.buckets, d.num_perm, d.threshold) if d.near
             else np.zeros((0, 2), np.uint64))
    path, done = lay.pairs_out(bucket)
    db.save(path, pairs)
    result = {"bucket": bucket, "pairs": len(pairs), "seconds": time.perf_counter() - t0}
    _write_json_atomic(done, result)
    return result


def join_step(cfg, out: Path) -> None:
    """Union-find over every bucket's pairs -> the sorted near-duplicate list. Deterministic,
    so every rank may compute it; the atomic rename makes concurrent writers harmless."""
    lay = _layout(out)
    pairs = [np.load(lay.pairs_out(b)[0]) for b in range(cfg.scrub.dedup.buckets)]
    db.save(lay.near(), db.join_pairs(np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64)))


def decide_duplicates(cfg, out: Path, units: list[InputUnit]) -> dict[str, np.ndarray]:
    """Per unit key: int8 flags (0 keep, 1 exact, 2 near) for its phase-1 candidates, in order."""
    d = cfg.scrub.dedup
    loaded = []
    for u in units:
        with np.load(_p1_paths(out, u)[1]) as z:
            loaded.append((u.key, z["exact"], z["sigs"]))
    sizes = [len(e) for _, e, _ in loaded]
    if not d.enabled:
        return {k: np.zeros(n, dtype=np.int8) for (k, _, _), n in zip(loaded, sizes, strict=True)}
    exact = np.concatenate([e for _, e, _ in loaded]) if loaded else np.zeros(0, np.uint64)
    if not d.exact:  # unique placeholder keys: nothing is an exact duplicate
        exact = np.arange(len(exact), dtype=np.uint64)
    sigs = bands = None
    if d.near:
        sigs = np.concatenate([s for _, _, s in loaded]) if loaded else np.zeros((0, d.num_perm), np.uint32)
        bands = MinHasher(d.num_perm, d.ngram, d.seed, d.threshold).band_keys(sigs)
    flags = find_duplicates(exact, sigs, bands, d.threshold)
    out_map, pos = {}, 0
    for (k, _, _), n in zip(loaded, sizes, strict=True):
        out_map[k] = flags[pos : pos + n]
        pos += n
    return out_map


# ---------------------------------------------------------------------------------------------
# Phase 3: dedup drops -> toxicity -> counterfactual -> PII -> shard


def _p3_done(out: Path, unit: InputUnit) -> Path:
    return out / WORK / "p3" / f"{unit.key}.done.json"


SCRUB_FAULT_ENV = "DATA_PIPELINES_SCRUB_FAULT"  # test hook: "enospc@UNIT_INDEX" fails that unit's shard write


def _shard_write_fault(unit_index: int) -> None:
    """Raise ENOSPC, as a full output filesystem would, when the test hook names this unit."""
    spec = os.environ.get(SCRUB_FAULT_ENV, "")
    if spec == f"enospc@{unit_index}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {SCRUB_FAULT_ENV})")


class _ShardWriter:
    """Streams rows into a temp file; ``close`` renames it into place, ``discard`` removes it."""

    def __init__(self, path: Path, fmt: str, unit_index: int = -1) -> None:
        self.path, self.fmt, self.unit_index = path, fmt, unit_index
        self.tmp = path.with_name("." + path.name + ".tmp")
        self.rows = 0
        self._chars = 0
        self._buf: dict[str, list] = {k: [] for k in ("id", "text", "source", "meta")}
        self._writer = None
        self._fh = None

    def add(self, rid: str, text: str, source: str, meta: str) -> None:
        for k, v in zip(self._buf, (rid, text, source, meta), strict=True):
            self._buf[k].append(v)
        self.rows += 1
        self._chars += len(text)
        if len(self._buf["id"]) >= _BATCH_DOCS or self._chars >= _BATCH_CHARS:
            self._flush()

    def _flush(self) -> None:
        if not self._buf["id"]:
            return
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({k: pa.array(v, pa.string()) for k, v in self._buf.items()})
            if self._writer is None:
                self.tmp.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(str(self.tmp), table.schema, compression="zstd")
            self._writer.write_table(table)
        else:
            import zstandard

            if self._writer is None:
                self.tmp.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
                self._writer = zstandard.ZstdCompressor(level=3).stream_writer(self._fh)
            lines = (json.dumps(dict(zip(self._buf, vals, strict=True)), ensure_ascii=False) + "\n"
                     for vals in zip(*self._buf.values(), strict=True))
            self._writer.write("".join(lines).encode("utf-8"))
        for v in self._buf.values():
            v.clear()
        self._chars = 0

    def close(self) -> bool:
        """Finish and rename; False (and no file) when no row was written."""
        self._flush()
        if self._writer is None:
            return False
        _shard_write_fault(self.unit_index)
        self._writer.close()
        if self._fh is not None:
            self._fh.close()
        os.replace(self.tmp, self.path)
        return True

    def discard(self) -> None:
        """After a failed write (a full disk): free the temp file's space; the unit is redone."""
        for f in (self._writer, self._fh):
            try:
                if f is not None:
                    f.close()
            except Exception:  # noqa: BLE001 - closing a broken writer may fail again; the file goes anyway
                pass
        self.tmp.unlink(missing_ok=True)


def phase3_unit(unit: InputUnit, cfg, out_dir: str, flags: np.ndarray | None,
                canaries: UnitCanaries | None = None) -> dict:
    """flags None: read this unit's dedup flags from the bucketed step outputs."""
    import pyarrow as pa  # heavy optional library, as in phase 1

    t0 = time.perf_counter()
    s = cfg.scrub
    out = Path(out_dir)
    done = _read_json(_p1_paths(out, unit)[2]) if flags is None or canaries else None  # phase 1's record
    if flags is None:
        flags = db.unit_flags(_layout(out), unit.index, done["candidates"], s.dedup.buckets)
    f = filters_for(cfg)
    hosts = done.get("canary_hosts") if canaries else None
    st = _UnitStats(f, s.audit_sample, CopyTracker(canaries, hosts))
    rel = mf.shard_name(s.rank, unit.index, s.output_format)
    tm, clock = st.d["stage_seconds"], time.perf_counter
    writer = _ShardWriter(out / rel, s.output_format, unit.index)
    reasons = {1: "dedup.exact", 2: "dedup.near"}
    i = 0
    try:
        with pa.memory_map(str(_p1_paths(out, unit)[0]), "r") as src:
            reader = pa.ipc.open_file(src)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b).to_pydict()
                n = len(batch["id"])
                batch_flags = [int(x) for x in flags[i : i + n]]
                tox = iter([])
                if f.toxicity:  # one classifier call for the batch's non-duplicates
                    t = clock()
                    live = [txt for txt, fl in zip(batch["text"], batch_flags, strict=True) if not (s.dedup.enabled and fl)]
                    tox = iter(f.toxicity.score_many(live))
                    tm["toxicity"] += clock() - t
                for rid, text, source, meta, mask, flag in zip(batch["id"], batch["text"], batch["source"],
                                                               batch["meta"], batch["groups"], batch_flags, strict=True):
                    st.canaries.enter(i)
                    i += 1
                    if s.dedup.enabled:
                        st.audit.record("dedup", mask, flag != 0)
                        if flag:
                            st.drop(reasons[flag], mask, rid, source, text)
                            continue
                    if f.toxicity:
                        new_text, reason, r = f.toxicity.apply(text, next(tox))
                        st.audit.record("toxicity", mask, reason is not None)
                        if reason:
                            st.drop(f"toxicity.{reason}", mask, rid, source, text, f"score {r.score:.3f} max {r.max_score:.3f}")
                            continue
                        if new_text != text:
                            st.d["toxicity_masked"] += 1
                            text = new_text
                            st.canaries.check(text, "altered.toxicity")
                        m = json.loads(meta)
                        m.setdefault("scrub", {})["toxicity"] = round(r.score, 4)
                        meta = json.dumps(m, ensure_ascii=False)
                    if s.bias.enabled and chosen_for_swap(rid, s.bias.counterfactual_rate, cfg.run.seed):
                        text = counterfactual_swap(text)
                        st.d["counterfactual_swapped"] += 1
                        st.canaries.check(text, "altered.counterfactual")
                    t = clock()
                    text, counts = f.redact(text)
                    tm["pii"] += clock() - t
                    st.d["pii"].update(counts)
                    st.canaries.check(text, "redacted.pii")
                    st.audit.final(mask, kept=True)
                    st.d["kept"] += 1
                    st.canaries.keep()
                    t = clock()
                    writer.add(rid, text, source, meta)
                    tm["write"] += clock() - t
        if i != len(flags):
            raise RuntimeError(f"unit {unit.key}: {i} phase-1 candidates but {len(flags)} dedup flags")
        st.d["candidates"] = i
        t = clock()
        shard = mf.shard_entry(out, rel, writer.rows) if writer.close() else None
    except BaseException:
        writer.discard()  # no marker: a rerun redoes this unit from its phase-1 output
        raise
    tm["write"] += clock() - t
    st.d["seconds"] = time.perf_counter() - t0
    result = {"unit": unit.key, "shard": shard, **st.to_dict()}
    _write_json_atomic(_p3_done(out, unit), result)
    return result


# ---------------------------------------------------------------------------------------------
# Orchestration


def _write_json_atomic(path: Path, obj) -> None:
    write_json_atomic(path, obj, ensure_ascii=False, default=str)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _check_run_identity(cfg, out: Path, units: list[InputUnit]) -> str:
    """Refuse to mix outputs of different settings or inputs in one directory."""
    h = scrub_config_hash(cfg)
    ident = {"config_hash": h, "units": [u.key for u in units], "world_size": cfg.scrub.world_size}
    path = out / WORK / "run.json"
    if path.exists():
        old = _read_json(path)
        if old.get("config_hash") != h:
            raise UserError(
                f"scrub.output {out} holds a scrub made with different settings (config hash "
                f"{old.get('config_hash', '?')[:12]} vs {h[:12]} now); use another scrub.output or delete it"
            )
        if old.get("units") != ident["units"] or old.get("world_size") != ident["world_size"]:
            raise UserError(f"scrub.output {out} holds a scrub of different inputs or scrub.world_size; "
                            "use another scrub.output or delete it")
    elif (out / mf.MANIFEST_NAME).exists():
        raise UserError(f"scrub.output {out} already holds a finished scrub without its work directory; "
                        "use another scrub.output or delete it")
    else:
        _write_json_atomic(path, ident)
    return h


def _check_input_unchanged(out: Path, unit: InputUnit) -> None:
    """A resumed unit is skipped only if its input file still has the size phase 1 recorded (a
    cheap check; the sha256 in the manifest is the full fingerprint): otherwise the output would
    silently mix two versions of the corpus."""
    if unit.kind in ("hf", "enwiki"):
        return
    recorded = _read_json(_p1_paths(out, unit)[2])["input"].get("bytes")
    size = Path(unit.path).stat().st_size
    if recorded is not None and size != recorded:
        raise UserError(f"scrub.inputs: {unit.path} changed since this scrub read it ({recorded} bytes then, "
                        f"{size} now); use another scrub.output or delete {out} to scrub it again")


def _confirm_owner(lease: RunLease) -> None:
    """Read from disk now that this scrub rank still owns its lease (a lost one ends the process)."""
    if not lease.still_ours(max_age_s=0):
        raise lease.lost


def _run_pool(fn, jobs: list[tuple], workers: int, lease: RunLease) -> list[dict]:
    """Run the jobs (a unit or a bucket each), each started only once the lease is confirmed ours;
    a lease lost meanwhile ends the process and its pool workers (``stop_process``)."""
    if workers <= 1 or len(jobs) <= 1:
        done = []
        for j in jobs:
            _confirm_owner(lease)
            done.append(fn(*j))
        return done
    _confirm_owner(lease)
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn")) as ex:
        futures = [ex.submit(fn, *j) for j in jobs]
        return [fut.result() for fut in futures]


def _wait_for(paths: list[Path], timeout_s: float, what: str, kind: str = "unit(s)") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [p for p in paths if not p.exists()]
        if not missing:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(p.name.removesuffix(".done.json") for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(
                f"{what} is not finished for {len(missing)} {kind} ({names}{more}); run it on every scrub "
                "rank first (scrub.stage=signatures / buckets / pairs / write) or raise scrub.wait_timeout_s"
            )
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def lease_name(rank: int, world_size: int) -> str:
    """One lease per rank when several ranks share scrub.output (array tasks do so legitimately)."""
    return LEASE_NAME if world_size <= 1 else f".lease-rank-{rank}"


def run_scrub(cfg) -> int:
    """Run (or resume) the scrub described by ``cfg.scrub``; returns the exit status.

    Holds the output directory's lease (per rank, see :func:`lease_name`) from before the first
    write to the end; losing it to another job ends the process at once (exit 6, one line naming
    that job, workers killed, nothing more written). A full output filesystem becomes one
    DiskFullError naming scrub.output."""
    s = cfg.scrub
    with RunLease.acquire(s.output, cfg.run.lease_heartbeat_s, cfg.run.lease_stale_s, what="scrub.output",
                          name=lease_name(s.rank, s.world_size), on_lost=stop_process) as lease:
        try:
            return _run_scrub(cfg, lease)
        except Exception as e:
            if not is_disk_full(e, s.output):
                raise
            raise DiskFullError(
                f"scrub.output {s.output}: no space left on device ({type(e).__name__}: {' '.join(str(e).split())[:300]}). "
                "Free space there, "
                "then rerun the same command: finished units are kept, unfinished ones are redone.") from e


def _run_scrub(cfg, lease: RunLease) -> int:
    s = cfg.scrub
    t_start = time.perf_counter()
    out = Path(s.output)
    units = resolve_inputs(s)
    if not units:
        raise UserError("scrub.inputs is empty")
    out.mkdir(parents=True, exist_ok=True)
    # Canary hosts are chosen before the run identity is written: a plan the corpus cannot hold
    # (levels too high) fails without leaving this output tied to those settings.
    plan = planting.prepare(cfg, units, scrub_config_hash(cfg)) if s.stage not in ("buckets", "pairs") else None
    chash = _check_run_identity(cfg, out, units)
    if plan is not None:
        planting.save(cfg, plan)
    mine = [u for u in units if u.index % s.world_size == s.rank]
    log.info("scrub: %d input unit(s), %d for rank %d/%d, %d worker(s) -> %s",
             len(units), len(mine), s.rank, s.world_size, s.workers, out)

    if s.stage in ("all", "signatures"):
        todo = [u for u in mine if not _p1_paths(out, u)[2].exists()]
        for u in mine:
            if u not in todo:
                _check_input_unchanged(out, u)
        if len(todo) < len(mine):
            log.info("phase 1: %d unit(s) already done, skipped", len(mine) - len(todo))
        _run_pool(phase1_unit, [(u, cfg, str(out), _unit_canaries(plan, u)) for u in todo], s.workers, lease)
        if s.stage == "signatures":
            return 0

    timeout = s.wait_timeout_s if s.stage == "all" else 0.0
    if _bucketed(s):
        lay, keys, nb = _layout(out), _unit_keys(units), s.dedup.buckets
        my_buckets = [b for b in range(nb) if b % s.world_size == s.rank]
        if s.stage in ("all", "buckets"):
            todo_b = [b for b in my_buckets if not lay.exact_out(b)[1].exists()]
            if todo_b:
                _wait_for([_p1_paths(out, u)[2] for u in units], timeout, "phase 1 (signatures)")
                _run_pool(exact_step, [(cfg, str(out), keys, b) for b in todo_b], s.workers, lease)
            if s.stage == "buckets":
                return 0
        if s.stage in ("all", "pairs"):
            todo_b = [b for b in my_buckets if not lay.pairs_out(b)[1].exists()]
            if todo_b:
                _wait_for([lay.exact_out(b)[1] for b in range(nb)], timeout, "dedup step 'buckets'", "bucket(s)")
                _run_pool(pairs_step, [(cfg, str(out), keys, b) for b in todo_b], s.workers, lease)
            if s.stage == "pairs":
                return 0
    elif s.stage in ("buckets", "pairs"):
        log.info("scrub.stage=%s: nothing to do unless scrub.dedup.method=bucketed", s.stage)
        return 0

    if s.stage in ("all", "write"):
        todo = [u for u in mine if not _p3_done(out, u).exists()]
        if todo:
            _wait_for([_p1_paths(out, u)[2] for u in units], timeout, "phase 1 (signatures)")
            if _bucketed(s):
                _wait_for([lay.pairs_out(b)[1] for b in range(nb)], timeout, "dedup step 'pairs'", "bucket(s)")
                _confirm_owner(lease)
                join_step(cfg, out)
                jobs = [(u, cfg, str(out), None, _unit_canaries(plan, u)) for u in todo]
            else:
                flags = decide_duplicates(cfg, out, units)
                jobs = [(u, cfg, str(out), flags[u.key], _unit_canaries(plan, u)) for u in todo]
            _run_pool(phase3_unit, jobs, s.workers, lease)
        if s.stage == "write" or s.rank != 0:
            return 0

    _wait_for([_p3_done(out, u) for u in units], s.wait_timeout_s if s.stage == "all" else 0.0, "phase 3 (write)")
    _confirm_owner(lease)
    merge(cfg, out, units, chash, time.perf_counter() - t_start, plan)
    return 0


def _unit_canaries(plan: planting.Plan | None, unit: InputUnit) -> UnitCanaries | None:
    return plan.for_unit(unit.key) if plan is not None else None


def merge(cfg, out: Path, units: list[InputUnit], chash: str, wall_s: float,
          plan: planting.Plan | None = None) -> dict:
    """Sum every unit's statistics; write manifest.json, report.json, report.md and the audit
    (and with canaries, their outcomes into the registry beside the output)."""
    s = cfg.scrub
    p1 = [_read_json(_p1_paths(out, u)[2]) for u in units]
    p3 = [_read_json(_p3_done(out, u)) for u in units]
    totals: dict = {}
    audit: list[dict] = []
    for st in p1 + p3:
        add_counts(totals, {k: v for k, v in st.items()
                            if k not in ("audit", "input", "shard", "unit", "candidates", "canary_hosts")})
        audit += st["audit"]
    read = sum(st["read"] for st in p1)
    kept = sum(st["kept"] for st in p3)
    dropped = sum(totals.get("dropped", {}).values())
    for a, b in zip(p1, p3, strict=True):
        if a["candidates"] != b["candidates"]:
            raise RuntimeError(f"unit {a['unit']}: phase 1 kept {a['candidates']} but phase 3 saw {b['candidates']}")
    if kept + dropped != read:  # a bug, never the user's fault
        raise RuntimeError(f"accounting broken: kept {kept} + dropped {dropped} != read {read}")
    shards = [st["shard"] for st in p3 if st["shard"]]
    by_reason = {}
    for r, n in sorted(totals.get("dropped", {}).items()):
        by_reason[r] = by_reason.get(r, 0) + n
    filters = filter_versions(cfg)
    manifest = {
        "format_version": mf.FORMAT_VERSION,
        "config_hash": chash,
        "created": mf.now_iso(),
        "inputs": [st["input"] for st in p1],
        "shards": shards,
        "format": s.output_format,
        "columns": ["id", "text", "source", "meta"],
        "documents": {"read": read, "kept": kept, "dropped": dropped},
        "dropped_by_reason": by_reason,
        "pii": {"placeholders": dict(PLACEHOLDERS), "replacement": s.pii.replacement if s.pii.enabled else "off",
                "counts": dict(sorted(totals.get("pii", {}).items()))},
        "document_separator": DOCUMENT_SEPARATOR,
        "filters": filters,
        "scrub_config": {k: v for k, v in dataclasses.asdict(s).items() if k not in EXECUTION_KEYS},
    }
    audit_rel = None
    if audit:
        audit_dir = out / "audit"
        audit_dir.mkdir(exist_ok=True)
        tmp = audit_dir / ".dropped.jsonl.tmp"
        per: Counter = Counter()
        with open(tmp, "w", encoding="utf-8") as fh:
            for a in sorted(audit, key=lambda a: a["reason"]):
                if per[a["reason"]] < s.audit_sample:
                    per[a["reason"]] += 1
                    fh.write(json.dumps(a, ensure_ascii=False) + "\n")
        os.replace(tmp, audit_dir / "dropped.jsonl")
        audit_rel = "audit/dropped.jsonl"
    canaries = planting.finish(cfg, plan, totals.get("canaries", {})) if plan is not None else None
    report = rp.build_report(cfg, manifest, totals, p1, p3, wall_s, audit_rel, canaries)
    rp.write_report(out, report)
    mf.write_manifest(out, manifest)
    # The bulky intermediates are no longer needed; markers stay so a rerun only re-merges.
    for u in units:
        for p in _p1_paths(out, u)[:2]:
            p.unlink(missing_ok=True)
    for p in _layout(out).bulky():
        p.unlink(missing_ok=True)
    for stray in [*out.glob(f"{WORK}/*/*.tmp*"), *out.glob("shards/.*.tmp")]:
        stray.unlink(missing_ok=True)  # temp files of killed runs whose unit was redone since
    log.info("scrub done: read %d, kept %d, dropped %d -> %s", read, kept, dropped, out)
    print(rp.summary_text(report))
    return report
