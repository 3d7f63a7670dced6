"""Training sources: the privacy gate, shard discovery, and random access to fixed row ranges.

A source is a scrubbed output directory (``manifest.json`` + shards). Its documents are cut into
*chunks* of ``data.chunk_docs`` consecutive rows of one shard. Chunks are the unit of work the
loader deals to ranks and workers (see :mod:`data_pipelines.loading.stream`); they depend only on the
shards and ``chunk_docs``, never on the world size, which is what makes loader state portable
across world sizes.

Reading goes straight through pyarrow: a chunk is a row range of a parquet row group, so reading
it costs one row-group read, wherever the run is (a resume never scans what came before).
``jsonl.zst`` shards are not seekable; a shard is decompressed whole on first touch and cached
(two per reader), so keep such shards moderate in size; parquet is the scrub's default format.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.scrub.manifest import MANIFEST_NAME, read_manifest
from data_pipelines.scrub.readers import decompressed_blocks
from pretrain.errors import UserError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".parquet", ".jsonl.zst", ".jsonl.gz", ".jsonl")


@dataclass(frozen=True)
class Shard:
    path: Path
    rows: int
    fmt: str  # parquet | jsonl.zst | jsonl.gz | jsonl


@dataclass(frozen=True)
class Chunk:
    shard: int
    start: int
    end: int  # exclusive


def _fmt(path: Path) -> str | None:
    name = path.name
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            return suffix.lstrip(".")
    return None


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Stable validation hold-out: the same document id is held out on every machine and run."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


class Source:
    """One configured source: its shards, chunks, scrub manifest (or None) and a row reader."""

    def __init__(self, name: str, path: str, weight: float, text_field: str, key: str,
                 require_scrubbed: bool, chunk_docs: int):
        self.name, self.path, self.weight, self.text_field, self.key = name, path, weight, text_field, key
        root = Path(path)
        self.manifest: dict | None = None
        if root.is_dir() and (root / MANIFEST_NAME).is_file():
            self.manifest = read_manifest(root)
            files = [(root / s["path"]).resolve() for s in self.manifest["shards"]]
            docs = [int(s["docs"]) for s in self.manifest["shards"]]
        elif require_scrubbed:
            raise UserError(
                f"{key}: {path} has no scrub manifest ({root / MANIFEST_NAME}); the loader reads only "
                "scrubbed data. Run `python -m data_pipelines scrub` on it, or set data.require_scrubbed=false "
                "to train on unscrubbed files (the run records it)."
            )
        else:
            files = _glob_files(path, key)
            docs = [None] * len(files)
            log.warning("%s (%s) is NOT scrubbed (no manifest.json); training on it because "
                        "data.require_scrubbed=false", key, path)
        self.shards: list[Shard] = []
        for f, n in zip(files, docs, strict=True):
            fmt = _fmt(f)
            if fmt is None:
                raise UserError(f"{key}: cannot read {f} (supported: {', '.join(FILE_SUFFIXES)})")
            rows = _count_rows(f, fmt) if n is None else n  # scrubbed: the manifest's count, no file opened
            if rows:
                self.shards.append(Shard(f, rows, fmt))
        self.chunks: list[Chunk] = [
            Chunk(i, a, min(a + chunk_docs, s.rows))
            for i, s in enumerate(self.shards)
            for a in range(0, s.rows, chunk_docs)
        ]
        if not self.chunks:
            raise UserError(f"{key}: {path} holds no documents")
        self.reader = ShardReader(self.shards, text_field)

    @property
    def scrubbed(self) -> bool:
        return self.manifest is not None

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def read_chunk(self, chunk_id: int) -> tuple[list[str], list]:
        """(ids, texts) of one chunk in file order; texts may hold None for malformed rows."""
        c = self.chunks[chunk_id]
        return self.reader.read(c.shard, c.start, c.end)


def _glob_files(path: str, key: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file() and _fmt(f)]
    elif p.is_file():
        files = [p]
    else:
        files = [Path(f) for f in sorted(glob.glob(path, recursive=True)) if Path(f).is_file()]
    if not files:
        raise UserError(f"{key}: no data files found at {path} (supported: {', '.join(FILE_SUFFIXES)})")
    return [f.resolve() for f in files]


def _count_rows(path: Path, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return len(_jsonl_lines(path, fmt))


def _jsonl_lines(path: Path, fmt: str) -> list[bytes]:
    if fmt in ("jsonl.zst", "jsonl.gz"):
        import zstandard  # lazy: only for compressed jsonl sources

        try:  # one decompressor for the whole package; it reports truncated files
            data = b"".join(decompressed_blocks(str(path)))
        except (OSError, EOFError, zstandard.ZstdError) as e:
            raise UserError(f"{path} is corrupt or truncated: {e}") from None
    else:
        data = Path(path).read_bytes()
    return [line for line in data.split(b"\n") if line.strip()]


class ShardReader:
    """Row-range reads with a small cache (parquet row groups, or whole decoded jsonl shards)."""

    def __init__(self, shards: list[Shard], text_field: str, cache: int = 4):
        self.shards, self.text_field, self.cache_size = shards, text_field, cache
        self._cache: OrderedDict[tuple, tuple[list, list]] = OrderedDict()
        self._files: dict[int, object] = {}

    def __getstate__(self) -> dict:  # sent to DataLoader workers without open files or caches
        return {**self.__dict__, "_cache": OrderedDict(), "_files": {}}

    def _cached(self, key: tuple, load) -> tuple[list, list]:
        hit = self._cache.get(key)
        if hit is None:
            hit = load()
            self._cache[key] = hit
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return hit

    def read(self, shard: int, start: int, end: int) -> tuple[list[str], list]:
        s = self.shards[shard]
        if s.fmt == "parquet":
            return self._read_parquet(shard, start, end)
        ids, texts = self._cached(("jsonl", shard), lambda: self._load_jsonl(shard))
        return ids[start:end], texts[start:end]

    def _read_parquet(self, shard: int, start: int, end: int) -> tuple[list[str], list]:
        import pyarrow.parquet as pq

        pf = self._files.get(shard)
        if pf is None:
            pf = self._files[shard] = pq.ParquetFile(self.shards[shard].path)
        md = pf.metadata
        ids: list[str] = []
        texts: list = []
        offset = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            lo, hi = max(start, offset), min(end, offset + n)
            if lo < hi:
                gids, gtexts = self._cached(("pq", shard, g), lambda g=g, base=offset: self._load_group(pf, shard, g, base))
                ids += gids[lo - offset:hi - offset]
                texts += gtexts[lo - offset:hi - offset]
            offset += n
            if offset >= end:
                break
        return ids, texts

    def _load_group(self, pf, shard: int, group: int, base: int) -> tuple[list, list]:
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise UserError(f"{self.shards[shard].path} has no column {self.text_field!r} (columns: {', '.join(names)})")
        cols = [self.text_field] + (["id"] if "id" in names else [])
        table = pf.read_row_group(group, columns=cols)
        texts = table.column(self.text_field).to_pylist()
        if "id" in names:
            ids = [str(x) for x in table.column("id").to_pylist()]
        else:
            ids = [f"{self.shards[shard].path.name}:{base + i}" for i in range(len(texts))]
        return ids, texts

    def _load_jsonl(self, shard: int) -> tuple[list, list]:
        s = self.shards[shard]
        ids, texts = [], []
        for i, line in enumerate(_jsonl_lines(s.path, s.fmt)):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                rec = {}
            text = rec.get(self.text_field)
            texts.append(text if isinstance(text, str) else None)
            ids.append(str(rec["id"]) if rec.get("id") is not None else f"{s.path.name}:{i}")
        return ids, texts


def open_sources(source_cfgs: list, key: str, require_scrubbed: bool, chunk_docs: int) -> list[Source]:
    """Open every configured source (the privacy gate runs here, before any worker starts)."""
    return [
        Source(s.name, s.path, s.weight, s.text_field, f"{key}[{i}].path", require_scrubbed, chunk_docs)
        for i, s in enumerate(source_cfgs)
    ]
