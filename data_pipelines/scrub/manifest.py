"""manifest.json: the contract between the scrub stage and everything downstream.

The scrub writes it last (atomically), so a directory with a readable manifest is a finished scrub;
the training loader and the tokenizer refuse a directory without one (the privacy gate). Reading
checks what is cheap to check every time (format version, required keys, every shard present with
the recorded size); ``verify="sha256"`` also re-hashes every shard, for audits.

Layout written by :func:`data_pipelines.scrub.runner.run_scrub`::

    {
      "format_version": 1,
      "config_hash": "<sha256 of the resolved scrub config>",
      "created": "2026-01-01T00:00:00+00:00",
      "inputs": [{"input": ..., "path": ..., "bytes": ..., "sha256": ...}],
      "shards": [{"path": "shards/part-00000-00000.parquet", "docs": n, "bytes": b, "sha256": ...}],
      "documents": {"read": n, "kept": n, "dropped": n},
      "pii": {"placeholders": {"email": "<|email|>", ...}, "counts": {"email": n, ...}},
      "filters": {"normalize": "1", ...},          # filter versions ("off" when disabled)
      "dropped_by_reason": {...}, "format": "parquet", "columns": [...],
      "document_separator": "<|endoftext|>", "scrub_config": {...}
    }
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pretrain.errors import UserError
from pretrain.fileio import sha256_file, write_text_atomic

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SHARD_DIR = "shards"
SHARD_SUFFIXES = (".parquet", ".jsonl.zst")
REQUIRED_KEYS = ("format_version", "config_hash", "shards", "documents", "pii", "filters", "inputs", "created")


class ManifestError(UserError):
    """A scrub output directory whose manifest is missing, corrupt or does not match its shards."""


def config_hash(section: Any) -> str:
    """Stable hash of a (JSON-serialisable) config section: same settings, same hash."""
    blob = json.dumps(section, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_name(rank: int, index: int, fmt: str) -> str:
    """`shards/part-<rank>-<index>.<fmt>`, zero-padded so lexical order is numeric order."""
    suffix = ".parquet" if fmt == "parquet" else ".jsonl.zst"
    return f"{SHARD_DIR}/part-{rank:05d}-{index:05d}{suffix}"


def shard_entry(directory: str | os.PathLike, rel_path: str, docs: int) -> dict:
    """The manifest record of one finished shard file (size and sha256 taken from disk)."""
    p = Path(directory) / rel_path
    return {"path": rel_path, "docs": int(docs), "bytes": p.stat().st_size, "sha256": sha256_file(p)}




def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Validate and write manifest.json atomically (temp file + rename), shards sorted by path."""
    directory = Path(directory)
    out = dict(manifest)
    out.setdefault("format_version", FORMAT_VERSION)
    out.setdefault("created", now_iso())
    out["shards"] = sorted(out.get("shards", []), key=lambda s: s["path"])
    missing = [k for k in REQUIRED_KEYS if k not in out]
    if missing:
        raise ValueError(f"manifest for {directory} lacks {', '.join(missing)}")  # a bug, not user input
    return write_text_atomic(directory / MANIFEST_NAME, json.dumps(out, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: str | os.PathLike, verify: str = "size") -> dict:
    """Load and check ``<directory>/manifest.json``.

    verify: "none" (structure only), "size" (every shard exists with the recorded byte size;
    cheap, the default) or "sha256" (also re-hash every shard). Raises :class:`ManifestError`
    naming the path and the problem.
    """
    if verify not in ("none", "size", "sha256"):
        raise ValueError(f"verify must be none, size or sha256, not {verify!r}")
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ManifestError(f"scrubbed data directory {directory} does not exist (run `python -m data_pipelines scrub` first)")
    if not path.is_file():
        raise ManifestError(
            f"{path} is missing: {directory} is not a finished scrub output "
            "(run `python -m data_pipelines scrub`, or finish an interrupted one by rerunning it)"
        )
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is corrupt (not valid JSON: {e.msg} at line {e.lineno})") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{path} is corrupt: expected a JSON object, got {type(m).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise ManifestError(f"{path} is incomplete: missing key(s) {', '.join(missing)}")
    if m["format_version"] != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {m['format_version']!r}; this code reads version {FORMAT_VERSION}"
        )
    if not isinstance(m["shards"], list):
        raise ManifestError(f"{path} is corrupt: 'shards' must be a list")
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not {"path", "docs", "bytes", "sha256"} <= s.keys():
            raise ManifestError(f"{path} is corrupt: shards[{i}] must have path, docs, bytes and sha256")
        rel = str(s["path"])
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ManifestError(f"{path}: shards[{i}].path {rel!r} must be relative and inside {directory}")
        if verify == "none":
            continue
        shard = directory / rel
        if not shard.is_file():
            raise ManifestError(f"{path} lists {rel}, but {shard} is missing")
        size = shard.stat().st_size
        if size != s["bytes"]:
            raise ManifestError(f"{shard} has {size} bytes but {path} records {s['bytes']}: the shard changed or is truncated")
        if verify == "sha256" and sha256_file(shard) != s["sha256"]:
            raise ManifestError(f"{shard} does not match the sha256 recorded in {path}: the shard was modified")
    return m


def shard_files(directory: str | os.PathLike, verify: str = "size") -> list[Path]:
    """Absolute paths of the shards a finished scrub lists, in manifest (sorted) order."""
    directory = Path(directory)
    m = read_manifest(directory, verify=verify)
    return [(directory / s["path"]).resolve() for s in m["shards"]]


def source_summary(name: str, path: str | os.PathLike) -> dict[str, Any]:
    """What the scrub did to one training source, for run records (checkpoints, wandb).

    Never raises: a source without a manifest (``data.require_scrubbed=false``) or with an
    unreadable one is recorded as such, since the privacy gate has already decided by then.
    """
    m = Path(path) / MANIFEST_NAME
    entry: dict[str, Any] = {"source": name, "path": str(Path(path).resolve()), "manifest": None}
    if not m.is_file():
        entry["manifest_status"] = "none (data.require_scrubbed=false)"
        return entry
    entry["manifest"] = str(m.resolve())
    try:
        entry["sha256"] = sha256_file(m)
        data = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        entry["manifest_status"] = f"unreadable: {e}"
        return entry
    entry["manifest_status"] = "ok"
    entry["config_hash"] = data.get("config_hash")
    entry["documents"] = data.get("documents", {})
    entry["pii_counts"] = data.get("pii", {}).get("counts", {})
    entry["filters"] = data.get("filters", {})
    return entry
