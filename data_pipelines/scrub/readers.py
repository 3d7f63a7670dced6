"""Streaming readers: every input becomes an iterator of :class:`Record` without loading a corpus.

Inputs (``scrub.inputs``), resolved into *units* (one unit = one file or one hub dataset; units
are what workers and machines share out and what resume skips):

- local files, globs and directories: ``.jsonl``/``.json``(lines) optionally ``.gz``/``.zst``,
  ``.parquet``, plain text (``.txt``, ``.md``; one document per file);
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset streamed with ``load_dataset(..., streaming=True)``
  (``scrub.hf_split``), one unit per shard (data file) via ``IterableDataset.shard``; a local
  dataset directory works the same way, which is how it is tested offline;
- ``builtin:enwiki-sample``: the 106 Wikipedia articles gensim ships in its wheel (MediaWiki XML,
  CC BY-SA), markup stripped, one document per article, title and licence kept in ``meta``.

Malformed records are yielded with ``error`` set (``bad_json``, ``missing_text``,
``non_string_text``, ``too_large``; ``undecodable`` and ``empty_text`` are decided after
normalization) so the scrub counts them; nothing raises on bad data and nothing is skipped silently.

Why jsonl does not go through HF's ``json`` builder: it parses whole blocks with pyarrow and raises
on the first bad line, killing the whole file. We stream lines through HF's ``text`` builder and
parse each line ourselves. The text builder is opened with ``encoding="latin-1"`` (a lossless
byte <-> char mapping) and we re-decode each line as UTF-8 with ``surrogateescape``: a strict
UTF-8 open would also raise on the first undecodable byte, and pyarrow refuses surrogates.
Compressed local files take our own streaming decompressor instead, because HF's streaming open
drops the ``encoding`` argument for compressed files (one bad byte would again kill the file).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipelines.scrub.filters.normalize import repair_utf8
from pretrain.errors import UserError
from pretrain.fileio import sha256_file

log = logging.getLogger(__name__)

ENWIKI = "builtin:enwiki-sample"
ENWIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ENWIKI_LICENSE = "CC BY-SA 3.0"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md", ".text")
COMPRESSIONS = (".gz", ".zst")


@dataclass(frozen=True)
class InputUnit:
    """One independently processable input (a file or a hub dataset)."""

    index: int
    kind: str  # jsonl | parquet | text | hf | enwiki
    path: str  # file path, hub name (without hf:), or the builtin name
    config: str | None = None  # hub dataset config
    part: int = 0  # hub datasets: this unit reads shard `part` of `parts` (its data files)
    parts: int = 1

    @property
    def key(self) -> str:
        """File-name-safe, unique and stable name used for markers and temp files."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.path).name or self.path)[-60:]
        suffix = f"-part{self.part}of{self.parts}" if self.parts > 1 else ""
        return f"{self.index:05d}-{stem}{suffix}"


@dataclass(slots=True)
class Record:
    id: str
    text: str | None
    source: str
    meta: dict = field(default_factory=dict)
    error: str | None = None  # malformed reason, or None
    nbytes: int = 0  # raw size of the record


def _kind_of(path: str, forced: str) -> str:
    if forced != "auto":
        return forced
    name = path.lower()
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise UserError(f"scrub.inputs: cannot tell the format of {path} from its extension; set scrub.input_format")


def resolve_inputs(cfg) -> list[InputUnit]:
    """Expand scrub.inputs into units in a deterministic order (inputs in the given order, files
    within a glob or directory sorted). Raises UserError naming an input that matches nothing."""
    units: list[tuple] = []
    for spec in cfg.inputs:
        if spec == ENWIKI:
            units.append(("enwiki", spec, None))
        elif spec.startswith("builtin:"):
            raise UserError(f"scrub.inputs: unknown builtin corpus {spec!r}; available: {ENWIKI}")
        elif spec.startswith("hf:"):
            name, _, conf = spec[3:].partition(":")
            if not name:
                raise UserError(f"scrub.inputs: {spec!r} must look like hf:NAME or hf:NAME:CONFIG")
            # One unit per shard (data file) of the dataset, so workers and machines share it out.
            n = _open_hf(name, conf or None, cfg.hf_split).num_shards
            units += [("hf", name, conf or None, i, n) for i in range(n)]
        else:
            p = Path(spec)
            if p.is_dir():
                files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            elif glob.has_magic(spec):
                files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
            elif p.is_file():
                files = [spec]
            else:
                raise UserError(f"scrub.inputs: {spec} does not exist")
            if not files:
                raise UserError(f"scrub.inputs: {spec} matches no files")
            for f in files:
                units.append((_kind_of(f, cfg.input_format), str(Path(f).resolve()), None))
    return [InputUnit(i, *u) for i, u in enumerate(units)]


def input_info(unit: InputUnit) -> dict:
    """Manifest entry of an input: path, size and a content fingerprint (sha256 of local files)."""

    if unit.kind == "enwiki":
        path = enwiki_path()
        return {"input": unit.path, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if unit.kind == "hf":
        name = f"hf:{unit.path}" + (f":{unit.config}" if unit.config else "")
        return {"input": name, "part": f"{unit.part}/{unit.parts}", "bytes": None, "sha256": None}
    p = Path(unit.path)
    return {"input": unit.path, "path": unit.path, "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def _corrupt_file_errors() -> tuple[type[BaseException], ...]:
    import pyarrow
    import zstandard

    return OSError, EOFError, zstandard.ZstdError, pyarrow.ArrowException


def read_unit(unit: InputUnit, cfg) -> Iterator[Record]:
    """Stream the records of one unit (cfg = the scrub config section).

    A bad *record* is yielded as malformed; a bad *file* (truncated archive, corrupt parquet) cannot
    be accounted record by record, so it stops the scrub with a UserError naming the file (the
    unit has no completion marker yet: fix or remove the file and rerun)."""
    if unit.kind == "enwiki":
        records = read_enwiki()
    elif unit.kind == "jsonl":
        records = _read_jsonl(unit, cfg)
    elif unit.kind == "text":
        records = _read_text_file(unit, cfg)
    elif unit.kind in ("parquet", "hf"):
        records = _read_rows(unit, cfg)
    else:
        raise UserError(f"scrub.input_format {unit.kind!r} is not supported")
    n = 0
    try:
        for rec in records:
            # Ids and source names go into parquet, JSON markers and the audit file, which all need
            # valid UTF-8: an undecodable byte or a lone "\ud800" escape there becomes U+FFFD.
            # (The text keeps its surrogates: normalize counts them to decide malformed.undecodable.)
            if not rec.id.isascii():
                rec.id = repair_utf8(rec.id).text
            if not rec.source.isascii():
                rec.source = repair_utf8(rec.source).text
            yield rec
            n += 1
    except _corrupt_file_errors() as e:
        where = unit.path if unit.kind != "hf" else f"hf:{unit.path} (part {unit.part} of {unit.parts})"
        raise UserError(f"scrub.inputs: {where} is corrupt or truncated after {n} record(s): "
                        f"{type(e).__name__}: {e}; fix or remove it and rerun") from None


# ---------------------------------------------------------------------------------------------


def _hf():
    import datasets

    datasets.disable_progress_bars()
    return datasets


_TRUE = ("1", "on", "yes", "true")  # how huggingface_hub reads its boolean environment variables


def _open_hf(name: str, config: str | None, split: str):
    """Open a hub (or local) dataset for streaming; failing that, one line saying why it may fail.

    ``datasets`` keeps its own retries (they help on a flaky network); what it raises at the end
    (ConnectionError when offline or unreachable, DatasetNotFoundError for a misspelt or gated name,
    both OSErrors; ValueError for an unknown config or split) becomes a UserError naming the input.
    """
    spec = f"hf:{name}" + (f":{config}" if config else "")
    try:
        return _hf().load_dataset(name, config, split=split, streaming=True)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, ValueError):  # datasets names the configs or splits it has
            raise UserError(f"scrub.inputs: cannot open {spec} ({reason}); check CONFIG in"
                            " hf:NAME:CONFIG and scrub.hf_split") from None
        flags = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").lower() in _TRUE]
        causes = [
            f"{' and '.join(flags)} set and the dataset not in the local cache" if flags
            else "no network (or HF_DATASETS_OFFLINE=1 set and the dataset not cached)",
            "the dataset or config name misspelt",
            "a gated or private dataset without a token (HF_TOKEN or `hf auth login`)",
        ]
        raise UserError(f"scrub.inputs: cannot open {spec} ({reason}); likely causes: {'; '.join(causes)}") from None


def decompressed_blocks(path: str, block: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed bytes of a .gz or .zst file, streamed. A truncated file raises EOFError: gzip
    checks this itself; zstandard's stream reader would silently stop early, so zstd frames are
    decoded here and an unfinished last frame is reported."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            while data := f.read(block):
                yield data
        return
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    with open(path, "rb") as raw:
        dobj, pending = None, b""
        while True:
            data = pending or raw.read(block)
            pending = b""
            if not data:
                break
            if dobj is None:
                dobj = dctx.decompressobj()
            out = dobj.decompress(data)
            if out:
                yield out
            if dobj.eof:  # end of a frame: the rest (if any) starts the next one
                pending, dobj = dobj.unused_data, None
        if dobj is not None:
            raise EOFError("zstd stream ended before the end of its frame")


def _decompressed_lines(path: str) -> Iterator[bytes]:
    parts: list[bytes] = []  # pieces of the current line (a long line is joined once, not per block)
    for data in decompressed_blocks(path):
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            parts.append(data[start : end + 1])
            yield b"".join(parts)
            parts.clear()
            start = end + 1
        if start < len(data):
            parts.append(data[start:])
    if parts:
        yield b"".join(parts)


def raw_lines(path: str) -> Iterator[str]:
    """Lines of a (possibly compressed) file as str; undecodable bytes become lone surrogates."""
    if path.endswith(COMPRESSIONS):
        for b in _decompressed_lines(path):
            yield b.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        return
    ds = _hf().load_dataset("text", data_files=[path], split="train", streaming=True, encoding="latin-1")
    for row in ds:
        yield row["text"].encode("latin-1").decode("utf-8", "surrogateescape")


def _file_blocks(path: str, block: int = 1 << 20) -> Iterator[bytes]:
    if path.endswith(COMPRESSIONS):
        yield from decompressed_blocks(path, block)
        return
    with open(path, "rb") as f:
        while data := f.read(block):
            yield data


def bounded_lines(path: str, limit: int) -> Iterator[tuple[str | None, int]]:
    """(line, size in bytes) of a (possibly compressed) file; undecodable bytes become lone
    surrogates. A line over ``limit`` bytes comes back as ``(None, size)`` and is never held
    whole: its pieces are dropped as they are read, so a multi-GB line costs one block of memory."""
    parts: list[bytes] = []
    size = 0

    def line(piece: bytes) -> tuple[str | None, int]:
        if size > limit:
            return None, size
        raw = b"".join(parts) + piece if parts else piece
        return raw.rstrip(b"\r").decode("utf-8", "surrogateescape"), size

    for data in _file_blocks(path):
        pieces = data.split(b"\n")
        for piece in pieces[:-1]:
            size += len(piece)
            yield line(piece)
            parts.clear()
            size = 0
        last = pieces[-1]
        size += len(last)
        if size > limit:
            parts.clear()  # over the limit: keep counting, hold nothing
        elif last:
            parts.append(last)
    if size:
        yield line(b"")


def _record_id(obj: dict, cfg, where: str) -> str:
    rid = obj.get(cfg.id_field)
    return where if rid is None else str(rid)


def _record_from_obj(obj, where: str, cfg, nbytes: int, source: str) -> Record:
    if not isinstance(obj, dict):
        return Record(where, None, source, {}, "bad_json", nbytes)
    rid = _record_id(obj, cfg, where)
    if cfg.text_field not in obj or obj[cfg.text_field] is None:
        return Record(rid, None, source, {}, "missing_text", nbytes)
    text = obj[cfg.text_field]
    if not isinstance(text, str):
        return Record(rid, None, source, {}, "non_string_text", nbytes)
    meta = {k: v for k, v in obj.items() if k not in (cfg.text_field, cfg.id_field)}
    return Record(rid, text, source, meta, None, nbytes)


def _too_large(line: str, limit: int) -> bool:
    # len() counts characters <= bytes; encode only when the answer is not already clear.
    return len(line) > limit or (len(line) * 4 > limit and len(line.encode("utf-8", "surrogatepass")) > limit)


def _read_jsonl(unit: InputUnit, cfg) -> Iterator[Record]:
    source = Path(unit.path).name
    for lineno, (line, size) in enumerate(bounded_lines(unit.path, cfg.max_doc_bytes), start=1):
        where = f"{source}:{lineno}"
        if line is None or _too_large(line, cfg.max_doc_bytes):
            yield Record(where, None, source, {}, "too_large", size)
            continue
        if lineno == 1:
            line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the record
        if not line.strip():
            continue  # blank lines are not records
        try:
            obj = json.loads(line)
        except ValueError:
            yield Record(where, None, source, {}, "bad_json", len(line))
            continue
        yield _record_from_obj(obj, where, cfg, len(line), source)


def _decompressed_prefix(path: str, limit: int) -> tuple[bytes, int]:
    """Up to ``limit + 1`` decompressed bytes and the total decompressed size (streamed, so a
    huge file is measured without ever being held in memory)."""
    head, total = bytearray(), 0
    for block in decompressed_blocks(path):
        total += len(block)
        if len(head) <= limit:
            head += block[: limit + 1 - len(head)]
    return bytes(head), total


def _read_text_file(unit: InputUnit, cfg) -> Iterator[Record]:
    """One document per file. The size cap is checked before the text is loaded: a multi-GB
    file is counted as ``too_large`` instead of exhausting memory."""
    source = Path(unit.path).name
    limit = cfg.max_doc_bytes
    if unit.path.endswith(COMPRESSIONS):
        raw, size = _decompressed_prefix(unit.path, limit)
        text = None if size > limit else raw.decode("utf-8", "surrogateescape")
    else:
        size = os.path.getsize(unit.path)
        text = None
        if size <= limit:
            ds = _hf().load_dataset("text", data_files=[unit.path], split="train", streaming=True,
                                    encoding="latin-1", sample_by="document", keep_linebreaks=True)
            text = "".join(row["text"] for row in ds).encode("latin-1").decode("utf-8", "surrogateescape")
    if text is None:
        yield Record(source, None, source, {}, "too_large", size)
    else:
        yield Record(source, text, source, {"path": unit.path}, None, size)


def _read_rows(unit: InputUnit, cfg) -> Iterator[Record]:
    hf = _hf()
    if unit.kind == "parquet":
        ds = hf.load_dataset("parquet", data_files=[unit.path], split="train", streaming=True)
        source = Path(unit.path).name
    else:
        ds = _open_hf(unit.path, unit.config, cfg.hf_split)
        if unit.parts > 1:
            ds = ds.shard(num_shards=unit.parts, index=unit.part)
        source = unit.path if unit.parts == 1 else f"{unit.path}#{unit.part}"
    for i, row in enumerate(ds):
        text = row.get(cfg.text_field)
        size = len(text) if isinstance(text, str) else 0
        if isinstance(text, str) and _too_large(text, cfg.max_doc_bytes):
            yield Record(_record_id(row, cfg, f"{source}:{i}"), None, source, {}, "too_large", size)
            continue
        yield _record_from_obj(row, f"{source}:{i}", cfg, size, source)


# ---------------------------------------------------------------------------------------------
# builtin:enwiki-sample


def enwiki_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise UserError(f"{ENWIKI} needs the gensim package (pip install -e '.[scrub]')")
    return Path(spec.origin).parent / ENWIKI_FILE


_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={2,})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_MULTI_BLANK = re.compile(r"\n{3,}")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)


def wiki_to_text(markup: str) -> str:
    """MediaWiki markup -> plain text: gensim's filter_wiki plus the leftovers it keeps (bold and
    italic quotes, heading equals signs, parentheses emptied by removed templates)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = _BOLD_ITALIC.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _EMPTY_PARENS.sub("", text)
    text = _TRAILING_WS.sub("", text)
    return _MULTI_BLANK.sub("\n\n", text).strip()


def read_enwiki() -> Iterator[Record]:
    """The articles of gensim's Wikipedia sample: namespace-0 pages that are not redirects."""
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(enwiki_path(), "rb") as f:
        for title, markup, pageid in extract_pages(f, filter_namespaces=("0",)):
            if ":" in title.split(" ")[0] or markup.lstrip()[:9].upper() == "#REDIRECT":
                continue  # project pages (Wikipedia:...) and redirects are not articles
            meta = {"title": title, "license": ENWIKI_LICENSE, "pageid": pageid,
                    "url": "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")}
            yield Record(f"enwiki:{pageid}", wiki_to_text(markup), "enwiki-sample", meta, None, len(markup))
