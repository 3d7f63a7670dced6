"""Crash-safe small-file writes and file fingerprints shared by both packages.

Markers, manifests, reports, configs and checkpoint metadata are written to a temporary file in
the same directory, flushed to disk and renamed over the target: a reader (or a run resumed after
a kill) sees the old file or the whole new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (and durably); parent directories are created.

    ``durable=False`` skips the fsyncs, for files whose loss in a machine crash is harmless and
    that are rewritten often (a lease's heartbeat: a crash ends its holder too).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, durable: bool = True, **dumps_kwargs: Any) -> Path:
    """JSON through :func:`write_text_atomic` (sorted keys, one-space indent unless overridden)."""
    dumps_kwargs.setdefault("indent", 1)
    dumps_kwargs.setdefault("sort_keys", True)
    return write_text_atomic(path, json.dumps(obj, **dumps_kwargs) + "\n", durable=durable)


def sha256_file(path: str | os.PathLike, fsync: bool = False) -> str:
    """sha256 of a file, read in 4 MiB blocks (never whole into memory).

    With ``fsync=True`` the file is also flushed to disk: a checkpoint save hashes every file it
    wrote anyway, so the flush costs no second pass.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        if fsync:
            try:
                os.fsync(f.fileno())
            except OSError:
                pass
    return h.hexdigest()


def json_sha256(data: bytes) -> str:
    """sha256 of a JSON document's canonical form (keys sorted, no whitespace, UTF-8).

    The identity of a file by what it says, not how it is written: moving it, re-saving it with
    another indentation or key order, or escaping its characters differently keeps the hash.
    Raises ValueError when ``data`` is not JSON.
    """
    canonical = json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
