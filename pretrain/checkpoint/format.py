"""The on-disk checkpoint format: layout, completion marker, the one verification chain, listing,
pruning and the ``latest`` pointer.

Layout of ``checkpoint.dir`` (default ``<run.dir>/checkpoints``)::

    latest                      text: name of the newest complete checkpoint (moved last, atomically)
    step_00000100/
      engine/                   DeepSpeed's own files (engine.save_checkpoint, tag "engine"):
                                model states, ZeRO optimizer shards of every rank, LR schedule
      rank_00000.json           OUR per-rank state: TrainState, this rank's loader state, RNG
      rank_00001.json           (python, numpy, torch CPU, CUDA). DeepSpeed writes client_state
                                only from data-parallel rank 0, hence one file per rank.
      meta.json                 world size, ZeRO stage, model shape, scrub manifest references
      config.yaml               the resolved config of the run
      tokenizer.json            copy of the tokenizer the run trained with (meta.json records the
                                sha256 of its normalized content, see TokenizerRef)
      COMPLETE.json             completion marker: size + sha256 of every file above; written LAST
      universal/                (only after an elastic resume) DeepSpeed universal checkpoint

A directory without a valid marker is not a checkpoint: resume skips it and pruning deletes it.
Loading verifies every sha256 in the marker before DeepSpeed (which unpickles) sees a byte, so a
truncated, foreign or tampered checkpoint is refused with the name of the file.

Our own metadata is JSON; where our code calls ``torch.load`` it passes ``weights_only=True``.
DeepSpeed's loaders unpickle without that restriction, so every torch file first passes a
``weights_only=True`` load (see :func:`_check_pickles`): a forged checkpoint whose marker matches
its files still cannot run code.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from pretrain.dist import select_accelerator
from pretrain.errors import UserError
from pretrain.fileio import json_sha256, sha256_file, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "pretrain-checkpoint"
FORMAT_VERSION = 1
MARKER = "COMPLETE.json"
META = "meta.json"
LATEST = "latest"
ENGINE_TAG = "engine"
UNIVERSAL_TAG = "universal"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.yaml"

_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, incomplete, foreign, tampered, incompatible)."""


class CheckpointSaveError(RuntimeError):
    """A save failed on another rank for a reason other than a full disk (that rank has the traceback)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.json"


# --------------------------------------------------------------------------------------------
# The marker
# --------------------------------------------------------------------------------------------


def payload_files(step_dir: Path) -> list[str]:
    """Every file the marker must cover (relative, sorted); excludes the marker and universal/."""
    out = []
    for p in step_dir.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(step_dir).as_posix()
        if rel == MARKER or rel.startswith(UNIVERSAL_TAG + "/") or rel == "latest_universal":
            continue
        if p.name.startswith(".") and ".tmp" in p.name:
            continue
        out.append(rel)
    return sorted(out)


def hash_files(root: Path, names: list[str]) -> dict[str, dict]:
    """Marker entries (size, sha256) of ``names`` under ``root``; fsyncs each file as it reads it."""
    return {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel, fsync=True)} for rel in names}


def write_marker(root: Path, files: dict[str, dict], **fields) -> None:
    """The completion marker, atomically; written last, after every file it lists is durable."""
    write_json_atomic(root / MARKER, {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "files": files})


def read_marker(step_dir: str | os.PathLike) -> dict:
    """The completion marker of a checkpoint; CheckpointError naming the file when unusable."""
    step_dir = Path(step_dir)
    marker = step_dir / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{step_dir} is not a complete checkpoint: {marker} is missing "
            "(the save was interrupted, or this is not a checkpoint of this framework)"
        )
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint marker {marker} is unreadable or not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{marker} is not a {FORMAT} marker (foreign checkpoint?)")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{marker} has format_version {data.get('format_version')}; this version reads {FORMAT_VERSION}"
        )
    if not isinstance(data.get("files"), dict) or not data["files"]:
        raise CheckpointError(f"{marker} lists no files")
    return data


# --------------------------------------------------------------------------------------------
# Our JSON files: meta.json (run level) and rank_NNNNN.json (per rank)
# --------------------------------------------------------------------------------------------


def write_meta(step_dir: Path, **fields) -> None:
    write_json_atomic(step_dir / META, {"format": FORMAT, "format_version": FORMAT_VERSION, **fields})


def read_meta(step_dir: Path) -> dict:
    meta = json.loads((step_dir / META).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir / META} is not a {FORMAT} file")
    return meta


def read_config(step_dir: Path) -> dict:
    """The resolved config a checkpoint was written with, as a plain dict (no schema check: a
    checkpoint of an older version may lack keys, and a resume compares what both have)."""
    data = yaml.safe_load((step_dir / CONFIG_FILE).read_text())
    if not isinstance(data, dict):
        raise CheckpointError(f"{step_dir / CONFIG_FILE} does not hold a config")
    return data


@dataclass(frozen=True)
class TokenizerRef:
    """A tokenizer by content: the sha256 of its normalized file (:func:`pretrain.fileio.json_sha256`),
    so a moved or re-saved tokenizer.json is the same tokenizer and a retrained one is not."""

    sha256: str
    path: str  # where it was read from (for messages)
    copy: str | None = None  # the checkpoint's own copy, when this describes a checkpoint's tokenizer

    def describe(self) -> str:
        where = f"{self.path}, saved with it as {self.copy}" if self.copy and self.copy != self.path else self.path
        return f"{where} (sha256 {self.sha256[:12]})"


def read_tokenizer(path: str | os.PathLike) -> tuple[bytes, TokenizerRef]:
    """A tokenizer.json's bytes (what a checkpoint keeps a copy of) and its identity."""
    path = Path(path)
    data = path.read_bytes()
    try:
        sha = json_sha256(data)
    except ValueError as e:
        raise CheckpointError(f"tokenizer file {path} is not JSON: {e}") from None
    return data, TokenizerRef(sha, str(path.resolve()))


def saved_tokenizer(step_dir: str | os.PathLike, meta: dict | None = None) -> TokenizerRef | None:
    """The tokenizer a checkpoint was trained with (its copy), or None when it holds none."""
    step_dir = Path(step_dir)
    copy = step_dir / TOKENIZER_FILE
    if not copy.is_file():
        return None
    meta = read_meta(step_dir) if meta is None else meta
    sha = meta.get("tokenizer_sha256") or read_tokenizer(copy)[1].sha256  # older checkpoints: from the copy
    return TokenizerRef(sha, meta.get("tokenizer_source") or str(copy), copy=str(copy))


def write_rank_file(step_dir: Path, rank: int, **fields) -> None:
    write_json_atomic(step_dir / rank_file_name(rank), {"format": FORMAT, "rank": rank, **fields})


def read_rank_files(step_dir: Path, saved_world: int) -> list[dict]:
    """Every saved rank's file, by rank; CheckpointError unless there is one per saved rank."""
    rank_files = sorted(step_dir.glob("rank_*.json"))
    if len(rank_files) != saved_world:
        raise CheckpointError(f"checkpoint {step_dir} has {len(rank_files)} rank_*.json files for world size {saved_world}")
    return [json.loads(p.read_text()) for p in rank_files]


def remove_latest_pointer(ckpt_dir: Path) -> None:
    (ckpt_dir / LATEST).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Verification: one chain (sizes -> sha256 -> weights-only pickle scan) used everywhere
# --------------------------------------------------------------------------------------------


def _check_sizes(step_dir: Path, files: dict) -> list[str]:
    """Every listed file present with its size, and no unlisted file (DeepSpeed globs shard names,
    so an extra file would be loaded without ever being hashed)."""
    problems = [f"{step_dir / rel}: not listed in {MARKER} (added after the save?)"
                for rel in payload_files(step_dir) if rel not in files]
    for rel, info in files.items():
        p = step_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != info["size"]:
            problems.append(f"{p}: size {p.stat().st_size} bytes, the marker says {info['size']} (truncated or modified)")
    return problems


def _check_hashes(step_dir: Path, files: dict, names: list[str]) -> list[str]:
    problems = []
    for rel in names:
        p = step_dir / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        if sha256_file(p) != files[rel]["sha256"]:
            problems.append(f"{p}: sha256 differs from the marker (corrupted or tampered with)")
    return problems


# The few DeepSpeed types its optimizer shards pickle besides tensors and containers.
_DEEPSPEED_PICKLED = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


def _deepspeed_pickled_types() -> list:
    select_accelerator()  # before the first deepspeed import
    return [getattr(importlib.import_module(mod), name) for mod, name in (q.rsplit(".", 1) for q in _DEEPSPEED_PICKLED)]


def _check_pickles(step_dir: Path, names: list[str]) -> list[str]:
    """Every torch file in ``names`` must load with ``weights_only=True`` (tensors, containers and
    the DeepSpeed types above, nothing callable).

    DeepSpeed's loaders unpickle with ``weights_only=False``, and a forged checkpoint can carry a
    marker whose hashes match it; this restricted pass over the same bytes is what stops it before
    they run. ``mmap=True``: only the pickle is parsed, tensor data stays on disk.
    """
    problems = []
    for rel in (r for r in names if r.endswith(".pt")):
        path = step_dir / rel
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # scans, runs nothing
            if found - set(_DEEPSPEED_PICKLED):
                raise ValueError(f"it references {', '.join(sorted(found - set(_DEEPSPEED_PICKLED)))}")
            with torch.serialization.safe_globals(_deepspeed_pickled_types() if found else []):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure means: do not hand it to DeepSpeed
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"{path}: refused, it holds more than tensors ({why[:300]})")
    return problems


def file_problems(step_dir: Path, marker: dict, rank: int = 0, world: int = 1) -> list[str]:
    """The one check chain over the files ``marker`` lists: sizes and unlisted files (all files),
    then sha256 and the weights-only pickle scan of this rank's share (every ``world``-th file from
    ``rank``), so the ranks of a resume hash a checkpoint between them. Empty when all is well."""
    files = marker["files"]
    problems = _check_sizes(step_dir, files)
    if problems:
        return problems
    mine = sorted(files)[rank::world]
    return _check_hashes(step_dir, files, mine) or _check_pickles(step_dir, mine)


def verify_checkpoint(step_dir: str | os.PathLike) -> dict:
    """Full check: marker, sizes and every sha256. Returns the marker; raises CheckpointError."""
    step_dir = Path(step_dir)
    marker = read_marker(step_dir)
    problems = file_problems(step_dir, marker)
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} failed verification:\n  " + "\n  ".join(problems))
    return marker


def is_complete(step_dir: str | os.PathLike) -> bool:
    """Cheap check (marker valid, every file present with the right size); no hashing."""
    try:
        marker = read_marker(step_dir)
    except CheckpointError:
        return False
    return not _check_sizes(Path(step_dir), marker["files"])


# --------------------------------------------------------------------------------------------
# Finding, pruning, pointing
# --------------------------------------------------------------------------------------------


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """All step directories (complete or not), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest_complete(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint by step (the `latest` pointer is only a hint for people)."""
    for _, p in reversed(list_checkpoints(ckpt_dir)):
        if is_complete(p):
            return p
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run dir, a checkpoint dir or a step dir -> the complete step dir to use."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if (p / MARKER).exists() or _STEP_RE.match(p.name):
        read_marker(p)  # raises with the file name when incomplete or foreign
        return p
    cands = [p, p / "checkpoints"]
    if (p / CONFIG_FILE).is_file():  # a run directory whose checkpoint.dir lies elsewhere
        try:
            cands.append(Path(yaml.safe_load((p / CONFIG_FILE).read_text())["checkpoint"]["dir"]))
        except Exception:  # not our config: fall through to the error below
            pass
    for cand in cands:
        if cand.is_dir() and list_checkpoints(cand):
            latest = find_latest_complete(cand)
            if latest is None:
                raise CheckpointError(f"{cand} holds checkpoint directories but none is complete")
            return latest
    raise CheckpointError(
        f"{p} is not a checkpoint: expected a step_NNNNNNNN directory with {MARKER}, "
        "a checkpoint directory holding them, or a run directory with checkpoints/"
    )


def delete_checkpoint(step_dir: Path) -> None:
    """Marker first: a crash mid-delete leaves a directory that is visibly not a checkpoint."""
    try:
        (step_dir / MARKER).unlink(missing_ok=True)
    except OSError:
        pass
    shutil.rmtree(step_dir, ignore_errors=True)


def prune(ckpt_dir: str | os.PathLike, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete incomplete leftovers and old complete checkpoints; never the newest complete one.

    Kept: the newest ``keep_last`` complete checkpoints, and every complete one whose step is a
    multiple of ``keep_every`` (when > 0). Called by rank 0 right after its own save completed, so
    no other save is in flight in this directory.
    """
    entries = list_checkpoints(ckpt_dir)
    complete = [(s, p) for s, p in entries if is_complete(p)]
    keep = {p for _, p in complete[-max(1, keep_last):]}
    if keep_every > 0:
        keep |= {p for s, p in complete if s % keep_every == 0}
    removed = [p for _, p in entries if p not in keep]
    for p in removed:
        delete_checkpoint(p)
    if removed:
        log.info("pruned %d checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def point_latest(ckpt_dir: Path, name: str) -> None:
    """Move the ``latest`` pointer; a hint for people and scripts, resume goes by the markers.

    Some network and FUSE filesystems refuse to rename over an existing file: then the pointer is
    removed and written again, and if even that fails the save still counts (its marker is there).
    """
    path = ckpt_dir / LATEST
    try:
        write_text_atomic(path, name + "\n")
        return
    except OSError as e:
        log.warning("could not replace %s atomically (%s); rewriting it", path, e)
    try:
        path.unlink(missing_ok=True)
        write_text_atomic(path, name + "\n")
    except OSError as e:
        log.warning("could not update %s (%s); resume finds %s by its marker anyway", path, e, name)


def read_latest_pointer(ckpt_dir: Path) -> str | None:
    """The name ``latest`` holds, or None when there is no pointer."""
    path = ckpt_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
