"""Checkpoints that survive anything: atomic saves, verified loads, exact and elastic resume.

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
      tokenizer.json            copy of the tokenizer the run trained with
      COMPLETE.json             completion marker: size + sha256 of every file above; written LAST
      universal/                (only after an elastic resume) DeepSpeed universal checkpoint

The protocol: every rank writes its shards and its rank file, a barrier, the ranks hash the files
between them, rank 0 writes ``COMPLETE.json`` (tmp + fsync + rename) and only then moves
``latest``. A directory without a valid marker is not a checkpoint: resume skips it and pruning
deletes it. Loading verifies every sha256 in the marker before DeepSpeed (which unpickles) sees a
byte, so a truncated, foreign or tampered checkpoint is refused with the name of the file.

Our own metadata is JSON; where our code calls ``torch.load`` it passes ``weights_only=True``.
DeepSpeed's loaders unpickle without that restriction, so every torch file first passes a
``weights_only=True`` load (see :func:`_check_pickles`): a forged checkpoint whose marker matches
its files still cannot run code.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_pipelines.loaders import reshard_states, source_summaries
from pretrain.errors import UserError
from pretrain.fileio import fsync_dir, sha256_file, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    import torch

    from pretrain.config import Config
    from pretrain.dist import DistInfo

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
# Fault injection for the crash tests: "after_shards" (every shard and rank file written, no
# marker yet), "after_marker" (marker written, `latest` not moved) or "step" (in `due`, right after
# a training step, outside any save); "POINT@STEP" limits it to that step. Every rank SIGKILLs
# itself there, as a node failure would.
FAULT_ENV = "PRETRAIN_CKPT_FAULT"

_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, incomplete, foreign, tampered, incompatible)."""


@dataclass
class TrainState:
    """Our training progress; JSON-serializable and identical on every rank."""

    step: int = 0
    tokens_seen: int = 0
    wandb_run_id: str | None = None
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------------
# Files: atomic JSON, hashing, markers
# --------------------------------------------------------------------------------------------




def _point_latest(ckpt_dir: Path, name: str) -> None:
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


def _payload_files(step_dir: Path) -> list[str]:
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


def _check_sizes(step_dir: Path, files: dict) -> list[str]:
    """Every listed file present with its size, and no unlisted file (DeepSpeed globs shard names,
    so an extra file would be loaded without ever being hashed)."""
    problems = [f"{step_dir / rel}: not listed in {MARKER} (added after the save?)"
                for rel in _payload_files(step_dir) if rel not in files]
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
    import importlib

    from pretrain.dist import select_accelerator

    select_accelerator()  # before the first deepspeed import
    return [getattr(importlib.import_module(mod), name) for mod, name in (q.rsplit(".", 1) for q in _DEEPSPEED_PICKLED)]


def _check_pickles(step_dir: Path, names: list[str]) -> list[str]:
    """Every torch file in ``names`` must load with ``weights_only=True`` (tensors, containers and
    the DeepSpeed types above, nothing callable).

    DeepSpeed's loaders unpickle with ``weights_only=False``, and a forged checkpoint can carry a
    marker whose hashes match it; this restricted pass over the same bytes is what stops it before
    they run. ``mmap=True``: only the pickle is parsed, tensor data stays on disk.
    """
    import torch

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


def is_complete(step_dir: str | os.PathLike) -> bool:
    """Cheap check (marker valid, every file present with the right size); no hashing."""
    try:
        marker = read_marker(step_dir)
    except CheckpointError:
        return False
    return not _check_sizes(Path(step_dir), marker["files"])


def verify_checkpoint(step_dir: str | os.PathLike) -> dict:
    """Full check: marker, sizes and every sha256. Returns the marker; raises CheckpointError."""
    step_dir = Path(step_dir)
    marker = read_marker(step_dir)
    names = sorted(marker["files"])
    problems = (_check_sizes(step_dir, marker["files"]) or _check_hashes(step_dir, marker["files"], names)
                or _check_pickles(step_dir, names))
    if problems:
        raise CheckpointError(f"checkpoint {step_dir} failed verification:\n  " + "\n  ".join(problems))
    return marker


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
            import yaml

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


def _delete_checkpoint(step_dir: Path) -> None:
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
        _delete_checkpoint(p)
    if removed:
        log.info("pruned %d checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


# --------------------------------------------------------------------------------------------
# RNG state as JSON (no pickle anywhere in our files)
# --------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every RNG a training step may touch, JSON-serializable."""
    import numpy as np
    import torch

    py = random.getstate()
    npst = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": None,
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(d: dict) -> None:
    import numpy as np
    import torch

    v, st, gauss = d["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(d["torch"]))
    if d.get("cuda") and torch.cuda.is_available():
        states = [_unb64(s) for s in d["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            torch.cuda.set_rng_state(states[0])


# --------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)
# --------------------------------------------------------------------------------------------


def _dist_on() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _dist_on():
        import torch.distributed as dist

        dist.barrier()


def _broadcast_obj(obj: Any, src: int = 0) -> Any:
    if not _dist_on():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_gather_obj(obj: Any) -> list:
    if not _dist_on():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _maybe_fault(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == point and (not at or int(at) == step):
        log.warning("fault injection %s=%s: killing this process at step %d", FAULT_ENV, spec, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# The Checkpointer the trainer drives
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Save / resume / prune for one run. Every rank constructs one and calls the same methods.

    ``save`` and ``resume`` are collective. ``due`` is collective when checkpoint.every_minutes > 0
    (rank 0's clock decides, so all ranks agree); call it on every rank at every step.
    """

    def __init__(self, cfg: Config, engine: Any, info: DistInfo, tokenizer_path: str | None):
        self.cfg = cfg
        self.engine = engine
        self.info = info
        self.tokenizer_path = tokenizer_path
        self.dir = Path(cfg.checkpoint.dir)
        self._last_save_time = time.monotonic()
        self._last_saved_step: int | None = None
        # (states of every saved rank, new world size, data.num_workers) -> one state per new
        # rank; data_pipelines.stream.reshard_states unless a test replaces it.
        self.reshard: Any = None

    # ---- when ---------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Periodic save by steps (checkpoint.every_steps) or wall clock (checkpoint.every_minutes)."""
        _maybe_fault("step", step)
        c = self.cfg.checkpoint
        if step <= 0 or step == self._last_saved_step:
            return False
        if c.every_steps > 0 and step % c.every_steps == 0:
            return True
        if c.every_minutes > 0:
            late = (time.monotonic() - self._last_save_time) >= c.every_minutes * 60
            if _dist_on():
                import torch
                import torch.distributed as dist

                flag = torch.tensor([1 if late else 0], dtype=torch.int32, device=self.info.device)
                dist.broadcast(flag, src=0)
                late = bool(flag.item())
            return late
        return False

    # ---- save ---------------------------------------------------------------------------

    def save(self, state: TrainState, loader_state: dict) -> str:
        """Write a checkpoint of ``state.step``; returns its directory. Collective and atomic."""
        rank, world = self.info.rank, self.info.world_size
        step_dir = self.dir / step_dir_name(state.step)
        t0 = time.monotonic()

        # This run already saved (or resumed from) this step, e.g. save-on-exit right after a
        # periodic save: keep it. Anything else there (an interrupted save) is replaced.
        if state.step == self._last_saved_step and _broadcast_obj(is_complete(step_dir) if rank == 0 else None):
            self._last_save_time = time.monotonic()
            return str(step_dir)
        err = None
        if rank == 0:
            try:
                if step_dir.exists():
                    _delete_checkpoint(step_dir)
                step_dir.mkdir(parents=True)
            except OSError as e:
                err = f"cannot create checkpoint directory {step_dir} (checkpoint.dir): {e}"
        err = _broadcast_obj(err)  # every rank raises; none is left waiting for rank 0
        if err:
            raise CheckpointError(err)

        # 1. Engine shards (DeepSpeed: model, ZeRO partitions of every rank, LR schedule).
        self.engine.save_checkpoint(str(step_dir), tag=ENGINE_TAG, client_state={"step": state.step}, save_latest=False)

        # 2. Our per-rank state.
        write_json_atomic(
            step_dir / f"rank_{rank:05d}.json",
            {
                "format": FORMAT,
                "rank": rank,
                "world_size": world,
                "train_state": dataclasses.asdict(state),
                "loader": loader_state,
                "rng": rng_state(),
            },
        )
        # 3. Run-level files (rank 0).
        if rank == 0:
            self._write_run_files(step_dir, state, world)
        _maybe_fault("after_shards", state.step)
        _barrier()

        # 4. Hash the payload between the ranks (each also fsyncs what it reads), rank 0 writes
        #    the marker last, then moves `latest`, then prunes.
        names = _broadcast_obj(_payload_files(step_dir) if rank == 0 else None)
        mine = {}
        for rel in names[rank::world]:
            p = step_dir / rel
            mine[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p, fsync=True)}
        gathered = _all_gather_obj(mine)
        if rank == 0:
            files: dict = {}
            for part in gathered:
                files.update(part)
            fsync_dir(step_dir)
            fsync_dir(step_dir / ENGINE_TAG)
            write_json_atomic(
                step_dir / MARKER,
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "step": state.step,
                    "world_size": world,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": files,
                },
            )
            _maybe_fault("after_marker", state.step)
            _point_latest(self.dir, step_dir.name)
            prune(self.dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
            log.info("saved checkpoint %s (%.1fs)", step_dir, time.monotonic() - t0)
        _barrier()
        self._last_saved_step, self._last_save_time = state.step, time.monotonic()
        return str(step_dir)

    def _write_run_files(self, step_dir: Path, state: TrainState, world: int) -> None:
        from pretrain.config import save_resolved, to_dict

        save_resolved(self.cfg, step_dir, CONFIG_FILE)
        tok = None
        if self.tokenizer_path and Path(self.tokenizer_path).is_file():
            shutil.copyfile(self.tokenizer_path, step_dir / TOKENIZER_FILE)
            tok = TOKENIZER_FILE
        versions = {}
        for mod in ("torch", "deepspeed"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # version reporting must never fail a save
                versions[mod] = None
        write_json_atomic(
            step_dir / META,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "step": state.step,
                "tokens_seen": state.tokens_seen,
                "world_size": world,
                "zero_stage": self.cfg.deepspeed.zero_stage,
                "precision": self.cfg.train.precision,
                "model": to_dict(self.cfg)["model"],
                "tokenizer": tok,
                "tokenizer_source": str(Path(self.tokenizer_path).resolve()) if self.tokenizer_path else None,
                "scrub_manifests": source_summaries(self.cfg),
                "versions": versions,
            },
        )

    # ---- resume -------------------------------------------------------------------------

    def resume(self) -> tuple[TrainState, dict | None] | None:
        """Per checkpoint.resume: load engine + RNG, return (TrainState, this rank's loader state).

        None means a fresh start. The loader state is remapped when the world size changed.
        """
        c = self.cfg.checkpoint
        rank = self.info.rank
        mode = c.resume
        decision: dict
        if rank == 0:
            decision = self._decide(mode, c.overwrite)
        else:
            decision = {}
        decision = _broadcast_obj(decision)
        if "error" in decision:
            raise CheckpointError(decision["error"])
        if decision.get("delete_after") is not None:  # checkpoint.overwrite=true
            if rank == 0:
                doomed = [p for s, p in list_checkpoints(self.dir) if s > decision["delete_after"]]
                for p in doomed:
                    _delete_checkpoint(p)
                (self.dir / LATEST).unlink(missing_ok=True)
                log.warning("checkpoint.overwrite=true: deleted %s in %s", ", ".join(p.name for p in doomed), self.dir)
            _barrier()
        path = decision.get("path")
        if path is None:
            if mode == "auto":
                log.info("no complete checkpoint in %s: starting fresh", self.dir)
            return None
        return self._load(Path(path))

    def _decide(self, mode: str, overwrite: bool) -> dict:
        if mode == "never":
            from pretrain.monitor import METRICS_FILE

            existing = [p.name for _, p in list_checkpoints(self.dir)]
            metrics = Path(self.cfg.run.dir) / METRICS_FILE
            if (existing or metrics.is_file()) and not overwrite:
                what = f"{self.dir} already holds checkpoints ({existing[-1]} is the newest)" if existing else \
                    f"run.dir already holds a run ({metrics})"
                return {
                    "error": f"checkpoint.resume=never but {what}: set checkpoint.resume=auto to continue that run, "
                    "checkpoint.overwrite=true to start over (deleting its checkpoints and metrics), or choose "
                    "another run.dir"
                }
            return {"path": None, "delete_after": -1 if existing else None}
        if mode == "auto":
            latest = find_latest_complete(self.dir)
            skipped = [p.name for s, p in list_checkpoints(self.dir) if latest is None or s > int(latest.name[5:])]
            if skipped:
                log.warning("ignoring incomplete checkpoint(s) %s in %s (interrupted saves)", ", ".join(skipped), self.dir)
            pointer = self.dir / LATEST
            if latest is not None and pointer.is_file() and pointer.read_text().strip() != latest.name:
                log.warning("%s names %s but the newest complete checkpoint is %s; using the latter",
                            pointer, pointer.read_text().strip(), latest.name)
            return {"path": str(latest) if latest else None}
        try:
            path = resolve_checkpoint(mode)
        except CheckpointError as e:
            return {"error": f"checkpoint.resume={mode}: {e}"}
        # Checkpoints in our directory past the one we branch from belong to an abandoned future:
        # left there, a later resume=auto (a requeue) would continue from them, and this run's
        # save of the same step would be mistaken for them.
        step = int(read_marker(path).get("step", -1))
        newer = [q for s, q in list_checkpoints(self.dir) if s > step and q.resolve() != path.resolve() and is_complete(q)]
        if newer and not overwrite:
            return {
                "error": f"checkpoint.resume={mode} starts from step {step}, but checkpoint.dir {self.dir} holds later "
                f"checkpoints ({', '.join(q.name for q in newer)}): set checkpoint.resume=auto to continue from the "
                "newest, checkpoint.overwrite=true to delete the later ones and branch, or choose another checkpoint.dir"
            }
        return {"path": str(path), "delete_after": step if newer else None}

    def _verify_distributed(self, step_dir: Path) -> dict:
        """Every rank hashes a share of the files; any problem anywhere stops every rank."""
        rank, world = self.info.rank, self.info.world_size
        try:
            marker = read_marker(step_dir)
            problems = _check_sizes(step_dir, marker["files"])
            if not problems:
                mine = sorted(marker["files"])[rank::world]
                problems = _check_hashes(step_dir, marker["files"], mine) or _check_pickles(step_dir, mine)
        except CheckpointError as e:
            marker, problems = {}, [str(e)]
        all_problems = [p for part in _all_gather_obj(problems) for p in part]
        if all_problems:
            raise CheckpointError(f"refusing checkpoint {step_dir}:\n  " + "\n  ".join(sorted(set(all_problems))))
        return marker

    def _load(self, step_dir: Path) -> tuple[TrainState, dict | None]:
        from pretrain.config import to_dict

        rank, world = self.info.rank, self.info.world_size
        t0 = time.monotonic()
        self._verify_distributed(step_dir)
        meta = json.loads((step_dir / META).read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{step_dir / META} is not a {FORMAT} file")

        # The model must be the same one; everything else (batch, LR, steps) may change on resume.
        saved_model, model_now = meta["model"], to_dict(self.cfg)["model"]
        shape_keys = ("vocab_size", "vocab_multiple_of", "n_layers", "n_heads", "n_kv_heads", "d_model",
                      "ffn_hidden", "ffn_multiple_of", "tie_embeddings")
        diff = [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {model_now.get(k)!r}"
                for k in shape_keys if saved_model.get(k) != model_now.get(k)]
        if diff:
            raise CheckpointError(f"checkpoint {step_dir} holds a different model:\n  " + "\n  ".join(diff))

        saved_world, saved_stage = int(meta["world_size"]), int(meta["zero_stage"])
        stage = self.cfg.deepspeed.zero_stage
        elastic = saved_world != world or (saved_stage == 3) != (stage == 3)
        if elastic and 0 in (saved_stage, stage) and saved_stage != stage:
            raise CheckpointError(
                f"checkpoint {step_dir} was written with deepspeed.zero_stage={saved_stage}; resuming it with "
                f"deepspeed.zero_stage={stage} is not supported (use the same stage, or both >= 1)"
            )
        if elastic and saved_stage > 0:
            self._ensure_universal(step_dir, saved_world, world)
            self._load_engine(step_dir, UNIVERSAL_TAG, universal=True)
        else:
            self._load_engine(step_dir, ENGINE_TAG, universal=False)

        rank_files = sorted(step_dir.glob("rank_*.json"))
        if len(rank_files) != saved_world:
            raise CheckpointError(f"checkpoint {step_dir} has {len(rank_files)} rank_*.json files for world size {saved_world}")
        per_rank = [json.loads(p.read_text()) for p in rank_files]
        state = TrainState.from_dict(per_rank[0]["train_state"])
        states = [r["loader"] for r in per_rank]
        # Loader streams per rank: data.num_workers may change on resume as well as the world size.
        saved_workers = states[0].get("workers") if isinstance(states[0], dict) else None
        workers = max(1, self.cfg.data.num_workers)
        if saved_world == world and saved_workers in (None, workers):
            loader_state = states[rank]
        else:
            reshard = self.reshard or reshard_states
            resharded = all(s is not None for s in states)
            loader_state = reshard(states, world, self.cfg.data.num_workers)[rank] if resharded else None
            log.info("elastic resume: %d -> %d data-parallel ranks, %s -> %d loader streams per rank (loader state "
                     "resharded)", saved_world, world, saved_workers, workers)
        # Bitwise continuation is impossible across world sizes anyway (other batch split); keep
        # the RNG streams deterministic by taking the saved rank r mod saved_world.
        set_rng_state(per_rank[rank % saved_world]["rng"])
        log.info("resumed from %s (step %d, %d tokens seen) in %.1fs", step_dir, state.step, state.tokens_seen,
                 time.monotonic() - t0)
        self._last_saved_step = state.step
        self._last_save_time = time.monotonic()
        return state, loader_state

    def _load_engine(self, step_dir: Path, tag: str, universal: bool) -> None:
        cfg_obj = self.engine._config
        before = cfg_obj.load_universal_checkpoint
        cfg_obj.load_universal_checkpoint = universal  # DeepSpeed reads the flag at load time only
        try:
            load_path, _ = self.engine.load_checkpoint(str(step_dir), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        finally:
            cfg_obj.load_universal_checkpoint = before
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {step_dir / tag}")

    def _ensure_universal(self, step_dir: Path, saved_world: int, world: int) -> None:
        """Convert the ZeRO shards to DeepSpeed's universal format once (rank 0), with its own marker."""
        udir = step_dir / UNIVERSAL_TAG
        umarker = udir / MARKER
        err = None
        if self.info.rank == 0 and umarker.is_file():
            try:  # converted by an earlier elastic resume: reuse it only if it is intact
                m = read_marker(udir)
                names = sorted(m["files"])
                bad = (_check_sizes(udir, m["files"]) or _check_hashes(udir, m["files"], names)
                       or _check_pickles(udir, names))
            except CheckpointError as e:
                bad = [str(e)]
            if bad:
                log.warning("universal checkpoint %s is damaged (%s); converting again", udir, bad[0])
                umarker.unlink()
        if self.info.rank == 0 and not umarker.is_file():
            try:
                convert_to_universal(step_dir)
            except Exception as e:  # report on every rank instead of hanging the others
                err = f"universal checkpoint conversion of {step_dir} failed: {type(e).__name__}: {e}"
        err = _broadcast_obj(err)
        if err:
            raise CheckpointError(err)
        log.info("loading universal checkpoint %s (%d -> %d ranks)", udir, saved_world, world)


def convert_to_universal(step_dir: str | os.PathLike) -> Path:
    """``ds_to_universal`` on ``step_dir/engine`` -> ``step_dir/universal`` (atomic via marker)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    step_dir = Path(step_dir)
    udir = step_dir / UNIVERSAL_TAG
    if udir.exists():
        shutil.rmtree(udir)
    t0 = time.monotonic()
    args = argparse.Namespace(
        input_folder=str(step_dir / ENGINE_TAG), output_folder=str(udir), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    ds_to_universal.main(args)
    files = {}
    for p in sorted(udir.rglob("*")):
        if p.is_file():
            files[p.relative_to(udir).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p, fsync=True)}
    fsync_dir(udir)
    write_json_atomic(udir / MARKER, {"format": FORMAT, "format_version": FORMAT_VERSION, "universal": True, "files": files})
    log.info("converted %s to a universal checkpoint in %.1fs", step_dir, time.monotonic() - t0)
    return udir


# --------------------------------------------------------------------------------------------
# Consolidated weights (export, generate): any ZeRO stage -> one fp32 state dict
# --------------------------------------------------------------------------------------------

_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _clean_key(k: str) -> str:
    for part in _WRAPPER_PARTS:
        k = k.replace(part, "")
    return k.removeprefix("module.")


def load_checkpoint_config(step_dir: str | os.PathLike) -> Config:
    from pretrain.config import load_config

    step_dir = Path(step_dir)
    meta = json.loads((step_dir / META).read_text())
    return load_config(step_dir / CONFIG_FILE, world_size=int(meta["world_size"]))


def consolidated_state_dict(step_dir: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights from a verified checkpoint of any ZeRO stage."""
    import torch

    step_dir = Path(step_dir)
    if verify:
        verify_checkpoint(step_dir)
    engine_dir = step_dir / ENGINE_TAG
    if list(engine_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=ENGINE_TAG)
    else:  # ZeRO-0: the full module lies in the model-states file
        files = sorted(engine_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{engine_dir} holds no model states file")
        sd = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return {_clean_key(k): v.detach().float().contiguous() for k, v in sd.items()}
