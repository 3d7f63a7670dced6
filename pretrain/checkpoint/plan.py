"""What a resume will do, decided before anything is loaded.

Two decisions, both plain data so they can be broadcast from rank 0 and unit-tested:

* :func:`choose_checkpoint` (rank 0, from ``checkpoint.resume`` and the directory): which step
  directory, if any, and which later checkpoints ``checkpoint.overwrite`` deletes -> ResumeChoice;
* :func:`plan_resume` (every rank, from the verified checkpoint's metadata): same or changed world,
  universal conversion or not, loader states as saved, resharded or missing -> ResumePlan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pretrain.checkpoint.format import (
    CheckpointError,
    find_latest_complete,
    is_complete,
    list_checkpoints,
    read_latest_pointer,
    read_marker,
    resolve_checkpoint,
)
from pretrain.monitor import METRICS_FILE

log = logging.getLogger(__name__)

# The model must be the same one; everything else (batch, LR, steps) may change on resume.
MODEL_SHAPE_KEYS = ("vocab_size", "vocab_multiple_of", "n_layers", "n_heads", "n_kv_heads", "d_model",
                    "ffn_hidden", "ffn_multiple_of", "tie_embeddings")

# ResumePlan.loader
LOADER_AS_SAVED = "as_saved"  # same world and streams per rank: each rank takes its own saved state
LOADER_RESHARD = "reshard"  # world or data.num_workers changed: reshard_states remaps every rank's state
LOADER_MISSING = "missing"  # changed, and some rank saved no loader state: the loader starts without one


@dataclass(frozen=True)
class ResumeChoice:
    """Rank 0's answer to checkpoint.resume; the same object reaches every rank."""

    step_dir: Path | None = None  # None: start fresh
    delete_after: int | None = None  # delete checkpoints past this step first (checkpoint.overwrite=true)
    error: str | None = None  # refuse, with this message, on every rank


@dataclass(frozen=True)
class ResumePlan:
    """How a verified checkpoint is loaded into this run."""

    step_dir: Path
    saved_world: int
    world: int
    saved_stage: int
    stage: int
    universal: bool  # convert the ZeRO shards to DeepSpeed's universal format and load that
    loader: str  # LOADER_AS_SAVED, LOADER_RESHARD or LOADER_MISSING
    saved_workers: int | None  # loader streams per rank at save time (None: not recorded)
    workers: int  # loader streams per rank now

    @property
    def world_changed(self) -> bool:
        return self.saved_world != self.world


def choose_checkpoint(ckpt_dir: Path, mode: str, overwrite: bool, run_dir: Path) -> ResumeChoice:
    """checkpoint.resume (never | auto | a path) and checkpoint.overwrite -> ResumeChoice."""
    if mode == "never":
        existing = [p.name for _, p in list_checkpoints(ckpt_dir)]
        metrics = run_dir / METRICS_FILE
        if (existing or metrics.is_file()) and not overwrite:
            what = f"{ckpt_dir} already holds checkpoints ({existing[-1]} is the newest)" if existing else \
                f"run.dir already holds a run ({metrics})"
            return ResumeChoice(error=f"checkpoint.resume=never but {what}: set checkpoint.resume=auto to continue that "
                                "run, checkpoint.overwrite=true to start over (deleting its checkpoints and metrics), "
                                "or choose another run.dir")
        return ResumeChoice(delete_after=-1 if existing else None)
    if mode == "auto":
        latest = find_latest_complete(ckpt_dir)
        skipped = [p.name for s, p in list_checkpoints(ckpt_dir) if latest is None or s > int(latest.name[5:])]
        if skipped:
            log.warning("ignoring incomplete checkpoint(s) %s in %s (interrupted saves)", ", ".join(skipped), ckpt_dir)
        pointer = read_latest_pointer(ckpt_dir)
        if latest is not None and pointer is not None and pointer != latest.name:
            log.warning("%s names %s but the newest complete checkpoint is %s; using the latter",
                        ckpt_dir / "latest", pointer, latest.name)
        return ResumeChoice(step_dir=latest)
    try:
        path = resolve_checkpoint(mode)
    except CheckpointError as e:
        return ResumeChoice(error=f"checkpoint.resume={mode}: {e}")
    # Checkpoints in our directory past the one we branch from belong to an abandoned future:
    # left there, a later resume=auto (a requeue) would continue from them, and this run's
    # save of the same step would be mistaken for them.
    step = int(read_marker(path).get("step", -1))
    newer = [q for s, q in list_checkpoints(ckpt_dir) if s > step and q.resolve() != path.resolve() and is_complete(q)]
    if newer and not overwrite:
        return ResumeChoice(error=f"checkpoint.resume={mode} starts from step {step}, but checkpoint.dir {ckpt_dir} "
                            f"holds later checkpoints ({', '.join(q.name for q in newer)}): set checkpoint.resume=auto "
                            "to continue from the newest, checkpoint.overwrite=true to delete the later ones and "
                            "branch, or choose another checkpoint.dir")
    return ResumeChoice(step_dir=path, delete_after=step if newer else None)


def check_same_model(step_dir: Path, saved_model: dict, model_now: dict) -> None:
    """CheckpointError listing every model-shape key that differs between checkpoint and config."""
    diff = [f"model.{k}: checkpoint {saved_model.get(k)!r}, config {model_now.get(k)!r}"
            for k in MODEL_SHAPE_KEYS if saved_model.get(k) != model_now.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {step_dir} holds a different model:\n  " + "\n  ".join(diff))


def plan_resume(step_dir: Path, meta: dict, loader_states: list, world: int, stage: int, num_workers: int,
                param_dtype: str | None = None) -> ResumePlan:
    """The checkpoint's meta.json and per-rank loader states + this run's world, ZeRO stage,
    data.num_workers and parameter dtype (pretrain.engine.precision_path) -> ResumePlan;
    CheckpointError when the combination cannot be resumed."""
    saved_world, saved_stage = int(meta["world_size"]), int(meta["zero_stage"])
    # ZeRO-0 saves the optimizer as it is: its layout follows the parameters' dtype. Checkpoints
    # written before ZeRO-0 bf16 kept fp32 parameters under autocast record only the precision.
    saved_params = meta.get("param_dtype", meta.get("precision"))
    if param_dtype is not None and saved_stage == stage == 0 and saved_params != param_dtype:
        raise CheckpointError(
            f"checkpoint {step_dir} holds a ZeRO-0 optimizer for {saved_params} parameters, but this version trains "
            f"ZeRO-0 {meta.get('precision')} with {param_dtype} parameters (bf16 under autocast): its optimizer state "
            "cannot be loaded. Resume it with the version that wrote it, or start a new run from its weights "
            "(pretrain export)"
        )
    # ZeRO-3 partitions parameters, ZeRO-1/2 do not: switching between them reshapes the shards too.
    elastic = saved_world != world or (saved_stage == 3) != (stage == 3)
    if elastic and 0 in (saved_stage, stage) and saved_stage != stage:
        raise CheckpointError(
            f"checkpoint {step_dir} was written with deepspeed.zero_stage={saved_stage}; resuming it with "
            f"deepspeed.zero_stage={stage} is not supported (use the same stage, or both >= 1)"
        )
    # Loader streams per rank: data.num_workers may change on resume as well as the world size.
    saved_workers = loader_states[0].get("workers") if isinstance(loader_states[0], dict) else None
    workers = max(1, num_workers)
    if saved_world == world and saved_workers in (None, workers):
        loader = LOADER_AS_SAVED
    elif all(s is not None for s in loader_states):
        loader = LOADER_RESHARD
    else:
        loader = LOADER_MISSING
    return ResumePlan(step_dir=step_dir, saved_world=saved_world, world=world, saved_stage=saved_stage, stage=stage,
                      universal=elastic and saved_stage > 0, loader=loader, saved_workers=saved_workers,
                      workers=workers)
