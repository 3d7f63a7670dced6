"""The Checkpointer the trainer drives: when to save (``due``), ``save`` and ``resume``.

Save protocol: rank 0 confirms the run directory is still this job's, every rank writes its engine
shards and its rank file, a gather, the ranks hash the files between them, rank 0 writes
``COMPLETE.json`` (tmp + fsync + rename) and only then moves ``latest`` and prunes, confirming the
lease again right before each of those three writes (a job that lost the run directory to another
job must not mark, point at or delete checkpoints there).

Resume protocol: choose the checkpoint (rank 0) -> verify it (all ranks hash a share) -> is it the
same run (every setting compared, see plan.RULES; the tokenizer by content) -> plan (world size,
ZeRO stage, loader streams) -> convert to universal if the plan says so -> load the engine (the
config's optimizer settings kept) -> this rank's loader state -> RNG.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from data_pipelines.loaders import reshard_states, source_summaries
from pretrain.checkpoint.format import (
    CONFIG_FILE,
    ENGINE_TAG,
    MARKER,
    TOKENIZER_FILE,
    UNIVERSAL_TAG,
    CheckpointError,
    CheckpointSaveError,
    TokenizerRef,
    delete_checkpoint,
    file_problems,
    find_latest_complete,
    hash_files,
    is_complete,
    list_checkpoints,
    payload_files,
    point_latest,
    prune,
    read_config,
    read_latest_pointer,
    read_marker,
    read_meta,
    read_rank_files,
    read_tokenizer,
    remove_latest_pointer,
    saved_tokenizer,
    step_dir_name,
    utc_now,
    verify_checkpoint,
    write_marker,
    write_meta,
    write_rank_file,
)
from pretrain.checkpoint.plan import (
    ALLOWED,
    LOADER_AS_SAVED,
    LOADER_RESHARD,
    ResumeChoice,
    ResumePlan,
    check_settings,
    choose_checkpoint,
    plan_resume,
    run_settings,
)
from pretrain.checkpoint.state import TrainState, rng_state, set_rng_state
from pretrain.checkpoint.weights import convert_to_universal
from pretrain.config import Config, save_resolved, to_dict
from pretrain.dist import DistInfo, all_gather_objects, barrier, broadcast_flag, broadcast_object
from pretrain.engine import grad_clip_of, precision_path
from pretrain.errors import DiskFullError, LeaseLostError, is_disk_full
from pretrain.faults import fault_point
from pretrain.fileio import fsync_dir
from pretrain.optimizer import LRSchedule
from pretrain.run_lease import RunLease

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


def _failure_kind(e: BaseException, checkpoint_dir: Path) -> str | None:
    """What a failed save phase means for every rank: "disk_full", "lease_lost" or None (any other error)."""
    if isinstance(e, LeaseLostError):
        return "lease_lost"
    return "disk_full" if is_disk_full(e, checkpoint_dir) else None


def _one_line(e: BaseException) -> str:
    """An exception as one short line (torch's write errors span lines and carry C++ frames)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


_ADAMW_SETTINGS = ("betas", "eps", "weight_decay")


def _optimizer_settings(engine: Any) -> dict:
    """The optimizer settings the engine was built with from this run's config: per-group AdamW
    settings and the gradient clip."""
    opt = getattr(engine, "optimizer", None)
    return {
        "groups": [{k: g[k] for k in _ADAMW_SETTINGS if k in g} for g in opt.param_groups] if opt is not None else [],
        "clip_grad": grad_clip_of(engine),
    }


def _restore_optimizer_settings(engine: Any, configured: dict) -> None:
    """After DeepSpeed's load_checkpoint: the config's optimizer settings win over the checkpoint's.

    The load puts back the checkpoint's AdamW settings (with the optimizer state) and, where
    DeepSpeed clips, its gradient clip: here the config's values return. The learning rate needs
    nothing: the schedule (pretrain.optimizer.LRSchedule) is built from the config and takes only
    the count of applied updates from the checkpoint, so the next step's rate is the config's
    schedule at the checkpoint's step, and a resume named in the log is the one that runs.
    """
    opt, sched = getattr(engine, "optimizer", None), getattr(engine, "lr_scheduler", None)
    if opt is None:
        return
    for group, values in zip(opt.param_groups, configured["groups"], strict=True):
        group.update(values)
    if configured["clip_grad"] is not None and getattr(opt, "guard", None) is None:
        opt.clip_grad = configured["clip_grad"]  # DeepSpeed's own step clips (the device step's clip is its guard's)
    g = opt.param_groups[0]
    rate, at = (float(sched.current()), int(sched.applied)) if isinstance(sched, LRSchedule) else (float(g["lr"]), "-")
    log.info("optimizer after resume: lr %.6g at schedule step %s, betas %s, eps %.3g, weight decay %s, grad clip %s",
             rate, at, tuple(g["betas"]), g["eps"], [grp["weight_decay"] for grp in opt.param_groups],
             grad_clip_of(engine))


class Checkpointer:
    """Save / resume / prune for one run. Every rank constructs one and calls the same methods.

    ``save`` and ``resume`` are collective. ``due`` is collective when checkpoint.every_minutes > 0
    (rank 0's clock decides, so all ranks agree); call it on every rank at every step.
    """

    def __init__(self, cfg: Config, engine: Any, info: DistInfo, tokenizer_path: str | None,
                 lease: RunLease | None = None):
        self.cfg = cfg
        self.engine = engine
        self.info = info
        # The tokenizer is read once: every save keeps a copy of these bytes, the ones the run started
        # with, and a resume compares their content with the checkpoint's.
        self.tokenizer: TokenizerRef | None = None
        self._tokenizer_bytes = b""
        if tokenizer_path and Path(tokenizer_path).is_file():
            self._tokenizer_bytes, self.tokenizer = read_tokenizer(tokenizer_path)
        self.lease = lease  # the run directory's lease, on the rank holding it (global rank 0)
        self.dir = Path(cfg.checkpoint.dir)
        self._last_save_time = time.monotonic()
        self._last_saved_step: int | None = None
        self._last_size = 0  # bytes of the newest checkpoint this run saved or resumed from (rank 0)

    # ---- when ---------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Periodic save by steps (checkpoint.every_steps) or wall clock (checkpoint.every_minutes)."""
        fault_point("step", step)
        c = self.cfg.checkpoint
        if step <= 0 or step == self._last_saved_step:
            return False
        if c.every_steps > 0 and step % c.every_steps == 0:
            return True
        if c.every_minutes > 0:
            late = (time.monotonic() - self._last_save_time) >= c.every_minutes * 60
            return broadcast_flag(late, self.info.device)
        return False

    # ---- save ---------------------------------------------------------------------------

    def save(self, state: TrainState, loader_state: dict) -> str:
        """Write a checkpoint of ``state.step``; returns its directory. Collective and atomic.

        A failure on any rank (a full disk above all) fails the save on every rank with the same
        message: each phase ends in a gather of every rank's outcome, so no rank is left waiting in
        a collective for one that raised. On a full disk the unfinished step directory is removed and
        the previous complete checkpoint stays the newest (see :meth:`_fail`); a save that visibly
        cannot fit is refused before anything is written (:meth:`_check_free_space`).
        """
        rank, world = self.info.rank, self.info.world_size
        step_dir = self.dir / step_dir_name(state.step)
        t0 = time.monotonic()

        # This run already saved (or resumed from) this step, e.g. save-on-exit right after a
        # periodic save: keep it. Anything else there (an interrupted save) is replaced.
        if state.step == self._last_saved_step and broadcast_object(is_complete(step_dir) if rank == 0 else None):
            self._last_save_time = time.monotonic()
            return str(step_dir)
        self._check_owner()
        self._check_free_space(state.step)
        self._make_step_dir(step_dir)
        # 1-3. Every rank writes its engine shards and rank file (rank 0 also the run files).
        self._phase(step_dir, state.step, "writing", lambda: self._write_own_files(step_dir, state, loader_state))
        # 4. Hash the payload between the ranks (each also fsyncs what it reads), rank 0 writes
        #    the marker last, then moves `latest`, then prunes.
        names = broadcast_object(payload_files(step_dir) if rank == 0 else None)
        gathered = self._phase(step_dir, state.step, "hashing", lambda: hash_files(step_dir, names[rank::world]))
        self._phase(step_dir, state.step, "marking complete",
                    lambda: self._commit(step_dir, state.step, gathered, t0) if rank == 0 else None)
        self._last_saved_step, self._last_save_time = state.step, time.monotonic()
        return str(step_dir)

    def _check_owner(self) -> None:
        """Every rank learns whether this job still owns the run directory, read from disk now by
        the lease's holder: a save deletes, creates and prunes directories."""
        lost = None
        if self.lease is not None and not self.lease.still_ours(max_age_s=0):
            lost = str(self.lease.lost)
        lost = broadcast_object(lost)
        if lost:
            raise LeaseLostError(lost)

    def _confirm_owner(self) -> None:
        """The holder, right before a commit write (raises LeaseLostError, failing the save's phase)."""
        if self.lease is not None:
            self.lease.confirm()

    def _check_free_space(self, step: int) -> None:
        """Refuse, on every rank, a save that visibly cannot fit (less free space than the last
        checkpoint took). DeepSpeed's save_checkpoint ends in a barrier of its own: a rank that runs
        out of space inside it while the others finish would leave them waiting there."""
        short = None
        if self.info.rank == 0 and self._last_size:
            free = shutil.disk_usage(self.dir).free
            if free < self._last_size:
                newest = find_latest_complete(self.dir)
                short = (free, newest.name if newest else None, self._last_size)
        short = broadcast_object(short)
        if short:
            free, kept, need = short
            mib = 1 << 20
            resume = f"it resumes from {self.dir / kept}" if kept else "there is no complete checkpoint, it starts fresh"
            raise DiskFullError(
                f"checkpoint save of step {step} not started: no space left on device in {self.dir} (checkpoint.dir): "
                f"{free / mib:.1f} MiB free, the last checkpoint took {need / mib:.1f} MiB; the newest "
                f"complete checkpoint is still {kept or 'none'}. Free space there (or lower checkpoint.keep_last), "
                f"then rerun the same command: {resume}.")

    def _write_own_files(self, step_dir: Path, state: TrainState, loader_state: dict) -> None:
        fault_point("before_engine", state.step)
        # Engine shards (DeepSpeed: model, ZeRO partitions of every rank, LR schedule).
        self.engine.save_checkpoint(str(step_dir), tag=ENGINE_TAG, client_state={"step": state.step}, save_latest=False)
        fault_point("after_engine", state.step)
        # Our per-rank state.
        write_rank_file(step_dir, self.info.rank, world_size=self.info.world_size,
                        train_state=dataclasses.asdict(state), loader=loader_state, rng=rng_state())
        fault_point("after_rank_file", state.step)
        # Run-level files (rank 0).
        if self.info.rank == 0:
            self._write_run_files(step_dir, state, self.info.world_size)
        fault_point("after_shards", state.step)

    def _commit(self, step_dir: Path, step: int, gathered: list[dict], t0: float) -> None:
        """Rank 0: marker (after every file it lists is durable), then `latest`, then prune."""
        files: dict = {}
        for part in gathered:
            files.update(part)
        fsync_dir(step_dir)
        fsync_dir(step_dir / ENGINE_TAG)
        fault_point("before_marker", step)
        self._confirm_owner()
        write_marker(step_dir, files, step=step, world_size=self.info.world_size, created=utc_now())
        self._last_size = sum(f["size"] for f in files.values())
        fault_point("after_marker", step)
        self._confirm_owner()
        point_latest(self.dir, step_dir.name)
        fault_point("after_latest", step)
        self._confirm_owner()
        prune(self.dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        log.info("saved checkpoint %s (%.1fs)", step_dir, time.monotonic() - t0)

    def _phase(self, step_dir: Path, step: int, phase: str, work: Callable[[], Any]) -> list:
        """Run this rank's part of a save phase, then learn every rank's outcome (the gather is the
        phase's barrier). Returns every rank's result, or fails the save on every rank."""
        try:
            result, failure, exc = work(), None, None
        except Exception as e:  # every rank must hear of it, or the others wait in the next collective
            kind = _failure_kind(e, self.dir)
            text = str(e) if kind == "lease_lost" else _one_line(e)  # the lease's message, word for word
            result, failure, exc = None, (self.info.rank, kind, text), e
        outcomes = all_gather_objects((result, failure))
        failures = [f for _, f in outcomes if f is not None]
        if failures:
            self._fail(step_dir, step, phase, failures, exc)
        return [r for r, _ in outcomes]

    def _fail(self, step_dir: Path, step: int, phase: str, failures: list[tuple], exc: Exception | None) -> NoReturn:
        """Every rank raises the same error. On a full disk rank 0 first removes the unfinished step
        directory (marker first, so it is never mistaken for a checkpoint; it frees the space it took)
        unless `latest` already names it: then it is complete and stays the newest. Other failures
        leave it for inspection; resume skips it and the next save or prune deletes it. A lost lease
        changes nothing on disk: the directory is another job's now."""
        lost = [text for _, kind, text in failures if kind == "lease_lost"]
        if lost:
            raise LeaseLostError(lost[0]) from exc
        disk_full = any(kind == "disk_full" for _, kind, _ in failures)
        kept = None
        if self.info.rank == 0:
            if disk_full and not (read_latest_pointer(self.dir) == step_dir.name and is_complete(step_dir)):
                delete_checkpoint(step_dir)
            newest = find_latest_complete(self.dir)
            kept = newest.name if newest else None
        kept = broadcast_object(kept)
        where = "; ".join(f"rank {r}: {text}" for r, _, text in failures)
        if disk_full:
            resume = f"it resumes from {self.dir / kept}" if kept else "there is no complete checkpoint, it starts fresh"
            kept_note = ("the new checkpoint is complete and stays the newest" if kept == step_dir.name
                         else f"{step_dir} was removed and the newest complete checkpoint is still "
                              f"{kept or 'none'}")
            msg = (f"checkpoint save of step {step} failed while {phase}: no space left on device in "
                   f"{self.dir} (checkpoint.dir) [{where}]; {kept_note}. Free space there (or lower "
                   f"checkpoint.keep_last), then rerun the same command: {resume}.")
            raise DiskFullError(msg) from exc
        if exc is not None:  # this rank's own error, with its traceback
            raise exc
        raise CheckpointSaveError(f"checkpoint save of step {step} failed on another rank while {phase} "
                                  f"[{where}]; the newest complete checkpoint is {kept or 'none'}")

    def _make_step_dir(self, step_dir: Path) -> None:
        """Rank 0 (re)creates the step directory; on failure every rank raises, none waits."""
        err = None
        if self.info.rank == 0:
            try:
                if step_dir.exists():
                    delete_checkpoint(step_dir)
                step_dir.mkdir(parents=True)
            except OSError as e:
                err = f"cannot create checkpoint directory {step_dir} (checkpoint.dir): {e}"
        err = broadcast_object(err)
        if err:
            raise CheckpointError(err)

    def _write_run_files(self, step_dir: Path, state: TrainState, world: int) -> None:
        save_resolved(self.cfg, step_dir, CONFIG_FILE)
        if self.tokenizer is not None:  # durable once the marker's hashing pass has fsynced it
            (step_dir / TOKENIZER_FILE).write_bytes(self._tokenizer_bytes)
        versions = {}
        for mod in ("torch", "deepspeed"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # version reporting must never fail a save
                versions[mod] = None
        write_meta(
            step_dir,
            step=state.step,
            tokens_seen=state.tokens_seen,
            world_size=world,
            zero_stage=self.cfg.deepspeed.zero_stage,
            precision=self.cfg.train.precision,
            param_dtype=precision_path(self.cfg).params,
            model=to_dict(self.cfg)["model"],
            tokenizer=TOKENIZER_FILE if self.tokenizer else None,
            tokenizer_source=self.tokenizer.path if self.tokenizer else None,
            tokenizer_sha256=self.tokenizer.sha256 if self.tokenizer else None,
            scrub_manifests=source_summaries(self.cfg),
            versions=versions,
        )

    # ---- resume -------------------------------------------------------------------------

    def resume(self) -> tuple[TrainState, dict | None] | None:
        """Per checkpoint.resume: load engine + RNG, return (TrainState, this rank's loader state).

        None means a fresh start. The loader state is remapped when the world size changed.
        """
        c = self.cfg.checkpoint
        choice = None
        if self.info.rank == 0:
            choice = choose_checkpoint(self.dir, c.resume, c.overwrite, Path(self.cfg.run.dir))
        choice = broadcast_object(choice)
        if choice.error:
            raise CheckpointError(choice.error)
        if choice.delete_after is not None:  # checkpoint.overwrite=true
            self._delete_after(choice)
        if choice.step_dir is None:
            if c.resume == "auto":
                log.info("no complete checkpoint in %s: starting fresh", self.dir)
            return None
        return self._load(Path(choice.step_dir))

    def _delete_after(self, choice: ResumeChoice) -> None:
        if self.info.rank == 0:
            doomed = [p for s, p in list_checkpoints(self.dir) if s > choice.delete_after]
            for p in doomed:
                delete_checkpoint(p)
            remove_latest_pointer(self.dir)
            log.warning("checkpoint.overwrite=true: deleted %s in %s", ", ".join(p.name for p in doomed), self.dir)
        barrier()

    def _load(self, step_dir: Path) -> tuple[TrainState, dict | None]:
        t0 = time.monotonic()
        marker = self._verify_distributed(step_dir)
        self._last_size = sum(f["size"] for f in marker["files"].values())
        meta = read_meta(step_dir)
        self._check_same_run(step_dir, meta)
        per_rank = read_rank_files(step_dir, int(meta["world_size"]))
        plan = plan_resume(step_dir, meta, [r["loader"] for r in per_rank], self.info.world_size,
                           self.cfg.deepspeed.zero_stage, self.cfg.data.num_workers, precision_path(self.cfg).params)
        if plan.universal:
            self._ensure_universal(plan)
        self._load_engine(plan)
        loader_state = self._loader_state(plan, [r["loader"] for r in per_rank])
        # Bitwise continuation is impossible across world sizes anyway (other batch split); keep
        # the RNG streams deterministic by taking the saved rank r mod saved_world.
        set_rng_state(per_rank[self.info.rank % plan.saved_world]["rng"])
        state = TrainState.from_dict(per_rank[0]["train_state"])
        log.info("resumed from %s (step %d, %d tokens seen) in %.1fs", step_dir, state.step, state.tokens_seen,
                 time.monotonic() - t0)
        self._last_saved_step = state.step
        self._last_save_time = time.monotonic()
        return state, loader_state

    def _check_same_run(self, step_dir: Path, meta: dict) -> None:
        """Refuse (every rank, the same message) what cannot continue this checkpoint; log the rest."""
        saved = run_settings(read_config(step_dir), saved_tokenizer(step_dir, meta))
        now = run_settings(to_dict(self.cfg), self.tokenizer)
        changes = check_settings(step_dir, saved, now, self.cfg.checkpoint.allow_changes)
        if self.info.rank != 0:
            return
        for c in changes:
            if c.verdict == ALLOWED:
                log.warning("resuming with a changed setting, allowed by checkpoint.allow_changes: %s", c.describe())
            else:
                log.info("changed since the checkpoint: %s", c.describe())

    def _verify_distributed(self, step_dir: Path) -> dict:
        """Every rank hashes a share of the files; any problem anywhere stops every rank."""
        try:
            marker = read_marker(step_dir)
            problems = file_problems(step_dir, marker, self.info.rank, self.info.world_size)
        except CheckpointError as e:
            marker, problems = {}, [str(e)]
        all_problems = [p for part in all_gather_objects(problems) for p in part]
        if all_problems:
            raise CheckpointError(f"refusing checkpoint {step_dir}:\n  " + "\n  ".join(sorted(set(all_problems))))
        return marker

    def _ensure_universal(self, plan: ResumePlan) -> None:
        """Convert the ZeRO shards to DeepSpeed's universal format once (rank 0), with its own marker."""
        udir = plan.step_dir / UNIVERSAL_TAG
        umarker = udir / MARKER
        err = None
        if self.info.rank == 0 and umarker.is_file():
            try:  # converted by an earlier elastic resume: reuse it only if it is intact
                verify_checkpoint(udir)
            except CheckpointError as e:
                first = [line.strip() for line in str(e).splitlines()][1:2] or [str(e)]  # the first problem
                log.warning("universal checkpoint %s is damaged (%s); converting again", udir, first[0])
                umarker.unlink()
        if self.info.rank == 0 and not umarker.is_file():
            try:
                convert_to_universal(plan.step_dir)
            except Exception as e:  # report on every rank instead of hanging the others
                err = f"universal checkpoint conversion of {plan.step_dir} failed: {type(e).__name__}: {e}"
        err = broadcast_object(err)
        if err:
            raise CheckpointError(err)
        log.info("loading universal checkpoint %s (%d -> %d ranks)", udir, plan.saved_world, plan.world)

    def _load_engine(self, plan: ResumePlan) -> None:
        tag = UNIVERSAL_TAG if plan.universal else ENGINE_TAG
        cfg_obj = self.engine._config
        before = cfg_obj.load_universal_checkpoint
        cfg_obj.load_universal_checkpoint = plan.universal  # DeepSpeed reads the flag at load time only
        configured = _optimizer_settings(self.engine)
        try:
            load_path, _ = self.engine.load_checkpoint(str(plan.step_dir), tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        finally:
            cfg_obj.load_universal_checkpoint = before
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {plan.step_dir / tag}")
        _restore_optimizer_settings(self.engine, configured)

    def _loader_state(self, plan: ResumePlan, states: Sequence[dict | None]) -> dict | None:
        """This rank's loader state: as saved, resharded over the new ranks and streams, or none."""
        if plan.loader == LOADER_AS_SAVED:
            return states[self.info.rank]
        log.info("elastic resume: %d -> %d data-parallel ranks, %s -> %d loader streams per rank (loader state "
                 "resharded)", plan.saved_world, plan.world, plan.saved_workers, plan.workers)
        if plan.loader == LOADER_RESHARD:
            return reshard_states(list(states), plan.world, self.cfg.data.num_workers)[self.info.rank]
        return None
