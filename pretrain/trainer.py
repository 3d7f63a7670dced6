"""The training loop: ``train(cfg) -> exit status``.

Layout, top to bottom::

    setup(cfg)                 process group, run-dir lease, seed, tokenizer, loader, model, engine
    train(cfg)                 signals -> setup -> resume -> monitor -> loop -> final save -> status
      loop:  run_step          micro-batches (from the Prefetcher thread) through forward /
                               backward / engine.step, then StepStats.record: no host sync
             LateAgreement     stop requests (signal, time budget, rank 0 found the run
                               directory's lease lost) OR-ed over ranks, one step late
             StepStats.read    loss, skipped / non-finite steps: the one host sync, on logging
                               steps and before a decision that needs them (a save, a stop)
             StopPolicy        every reason to stop, in one place (pretrain/stopping.py)
             _log_step         progress bar, metrics.jsonl + wandb every train.log_every steps
             evaluate          every train.eval_every steps (and at a normal end)
             checkpoint        when due, and on every exit path (checkpoint.save_on_exit)
             HangWatchdog      beaten after every step, paused for evaluation and saves

``bench`` reuses ``setup``, ``Prefetcher`` and ``run_step``: the benchmark times this code.

A step that is not a logging step never reads a value the device computed, so the host runs ahead
of the GPU (the optimizer's clip / skip / learning rate stay on the device, pretrain/optimizer.py).
Every rank takes every decision from reduced values, so ranks never disagree about stopping,
skipping or saving. With several ranks a signal or the time budget stops the run one step after
the step in which some rank saw it (one rank: that step); ``train.max_nonfinite_in_a_row`` stops
it at the first read after a run of that many non-finite steps (the next logging step; their
updates were all skipped). Exit status: 0 on a normal stop or a signal (SIGTERM/SIGUSR1: the current
step finishes, the run saves and exits 0 so SLURM can requeue it), 3 after
``train.max_nonfinite_in_a_row`` consecutive non-finite steps (also when a signal came at the same
time: a diverged run must not be requeued), 4 when the hang watchdog fired (pretrain/hang.py; nothing
is saved), 2 when another job holds the run directory's lease (pretrain/run_lease.py), 5 when a
checkpoint save ran out of disk space (pretrain/checkpoint/checkpointer.py; not worth a blind
requeue), 6 when another job took the run directory's lease over while this one ran (every rank
stops at once, writing nothing more; do not requeue: the directory is the other job's now), 1 on an
exception (wandb marks the run failed).

Test hook: ``PRETRAIN_INJECT_NAN_STEPS=5,6`` multiplies global rank 0's loss by NaN at those
(1-based) steps; the NaN reaches every rank through the gradient all-reduce, exactly like a real
divergence on one rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipelines.loaders import Prefetcher, build_train_loader, build_val_loader, load_tokenizer
from pretrain.checkpoint import Checkpointer, TrainState
from pretrain.config import Config, save_resolved
from pretrain.dist import (
    LateAgreement,
    broadcast_flag,
    broadcast_object,
    init_distributed,
    select_accelerator,
)
from pretrain.engine import (
    HostStepOutcome,
    build_engine,
    builds_partitioned,
    check_device_support,
    loss_scale,
    model_init_context,
    param_counts,
    resolve_precision,
    schedule_horizon,
    step_outcome,
)
from pretrain.errors import LeaseLostError, UserError
from pretrain.hang import HangWatchdog
from pretrain.model import Transformer
from pretrain.monitor import Monitor, Throughput, flops_and_peak, memory_bytes
from pretrain.plan.check import check_memory_plan
from pretrain.run_lease import RunLease, stop_process
from pretrain.stepstats import StepReport, StepStats
from pretrain.stopping import Stop, StopPolicy, StopSignals

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "labels", "position_ids", "doc_ids")
INJECT_NAN_ENV = "PRETRAIN_INJECT_NAN_STEPS"


# --------------------------------------------------------------------------------------------
# Set-up shared by train and bench
# --------------------------------------------------------------------------------------------


@dataclass
class Session:
    cfg: Config
    info: Any  # pretrain.dist.DistInfo
    model: Any
    engine: Any
    loader: Any
    tokenizer: Any
    tokenizer_path: str | None
    run_dir: Path
    tokens_per_step: int  # global tokens per optimizer step
    guard: Any = field(default=None)  # the device step's StepGuard, or HostStepOutcome (DeepSpeed's own step)
    val_cache: list | None = field(default=None)
    lease: RunLease | None = field(default=None)  # held by global rank 0 of a training run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: Config, write_run_files: bool = True, held: contextlib.ExitStack | None = None) -> Session:
    """Process group, tokenizer, loader, model and engine, identical for train and bench.

    A run that writes its run directory first takes the directory's lease (released by ``held``).
    """
    accelerator = select_accelerator()
    cfg = resolve_precision(cfg, accelerator)  # train.precision=auto -> this device's
    check_device_support(cfg, accelerator)
    info = init_distributed(cfg.train.collective_timeout_s)
    run_dir = Path(cfg.run.dir)
    lease = take_lease(cfg, info) if write_run_files else None
    if lease is not None and held is not None:
        held.callback(lease.release)
    if write_run_files and info.rank == 0:
        save_resolved(cfg, run_dir)

    tokenizer, tokenizer_path = _load_tokenizer(cfg)
    loader = build_train_loader(cfg, info.rank, info.world_size, tokenizer=tokenizer)

    seed_everything(cfg.run.seed)  # same init on every rank
    init_context = model_init_context(cfg, info)
    with init_context:
        model = Transformer(cfg.model)
    if info.device != "cpu" and not builds_partitioned(cfg):
        model = model.to(info.device)  # (zero.Init already placed its partitions)
    engine, guard = build_engine(cfg, model, info, run_dir if write_run_files else None)
    guard = HostStepOutcome(info.device) if guard is None else guard
    torch.manual_seed(cfg.run.seed + 1 + info.rank)  # per-rank stream for anything stochastic after init
    t = cfg.train
    tokens = t.micro_batch_size * t.grad_accum_steps * info.world_size * cfg.data.seq_len
    return Session(cfg, info, model, engine, loader, tokenizer, tokenizer_path, run_dir, tokens, guard=guard, lease=lease)


def take_lease(cfg: Config, info) -> RunLease | None:
    """Global rank 0 takes run.dir's lease; every rank learns the outcome before writing anything.

    One broadcast: if rank 0 could not take it, every rank raises (rank 0 the holder's message,
    the others a pointer to it), so all exit 2 and nothing is written to the run directory.
    """
    lease, error = None, None
    if info.rank == 0:
        try:
            lease = RunLease.acquire(cfg.run.dir, cfg.run.lease_heartbeat_s, cfg.run.lease_stale_s, what="run.dir")
        except BaseException as e:  # re-raised below, once the other ranks know
            error = e
    if not broadcast_flag(error is None, info.device, src=0):
        if info.rank:
            raise UserError(f"run.dir {cfg.run.dir}: global rank 0 could not take the run directory's lease "
                            "(its message says why); this rank writes nothing")
        raise error
    return lease


def lease_lost_here(s: Session) -> bool:
    """This rank's view: the lease's holder (global rank 0) found it lost (heartbeat or a writer)."""
    return s.lease is not None and s.lease.lost is not None


def lost_lease_everywhere(s: Session) -> LeaseLostError:
    """Collective, once every rank agreed the lease is lost: rank 0's message naming the new owner."""
    return LeaseLostError(broadcast_object(str(s.lease.lost) if s.lease else None))


def _load_tokenizer(cfg: Config):
    """The tokenizer, loaded once and shared by both loaders (None in pretokenized mode without one),
    and its file (data.tokenizer may name the directory holding it)."""
    path = cfg.data.tokenizer
    if cfg.data.mode == "pretokenized" and not Path(path).is_file():
        return None, None
    tokenizer = load_tokenizer(path)
    return tokenizer, tokenizer.source_path


# --------------------------------------------------------------------------------------------
# One step, agreement, evaluation
# --------------------------------------------------------------------------------------------


def _to_device(batch: dict, device: str) -> dict:
    out = {k: batch[k] for k in BATCH_KEYS if k in batch}
    if device != "cpu":
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def train_step(engine, batches: Prefetcher, accum: int, device: str, inject_nan: bool = False):
    """One optimizer step over ``accum`` micro-batches; returns (this rank's mean loss, wait seconds).

    DeepSpeed owns accumulation: ``engine.step()`` after every micro-batch applies the update
    only at the boundary (and skips it, on all ranks, when the gradient norm is not finite).
    """
    losses = []
    wait = 0.0
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = batches.next()
        wait += time.perf_counter() - t0
        loss = engine(**_to_device(batch, device))
        if inject_nan:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
    return torch.stack(losses).mean(), wait


def run_step(s: Session, batches: Prefetcher, stats: StepStats, inject_nan: bool = False) -> float:
    """One optimizer step as training runs it, accounted on the device (no host sync); returns the
    seconds spent waiting for the loader."""
    info = s.info
    local_loss, wait = train_step(s.engine, batches, s.cfg.train.grad_accum_steps, info.device, inject_nan)
    stats.record(local_loss, *step_outcome(s.engine, s.guard))
    return wait


def evaluate(session: Session) -> dict | None:
    """Validation loss (token-weighted) and perplexity over train.eval_batches batches per rank.

    The batches are read once and kept: every evaluation sees the same tokens. All ranks run the
    same number of forwards (the minimum any rank has), which ZeRO-3's parameter gathers require.
    """
    cfg, info, engine = session.cfg, session.info, session.engine
    if session.val_cache is None:
        val = build_val_loader(cfg, info.rank, info.world_size, tokenizer=session.tokenizer)
        session.val_cache = [_to_device(b, info.device) for b in islice(iter(val), cfg.train.eval_batches)]
    n = torch.tensor([len(session.val_cache)], device=info.device)
    if info.world_size > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n = int(n.item())
    if n == 0:
        log.warning("validation loader yielded no batches on some rank; skipping evaluation")
        return None
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    engine.eval()
    with torch.no_grad():
        for batch in session.val_cache[:n]:
            loss = engine(**batch)
            count = (batch["labels"] != -100).sum()
            total += torch.stack([loss.double() * count, count.double()])
    engine.train()
    if info.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    val_loss = (total[0] / total[1].clamp(min=1)).item()
    return {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 80.0)), "val/tokens": int(total[1].item())}


def _nan_steps() -> set[int]:
    raw = os.environ.get(INJECT_NAN_ENV, "")
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError:
        raise UserError(f"{INJECT_NAN_ENV}={raw!r}: expected comma-separated step numbers") from None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: Config) -> int:
    """Train until a stop condition; returns the process exit status."""
    started = time.monotonic()  # train.max_time_s counts set-up and resume too: it is the job's budget
    nan_steps = _nan_steps()  # a malformed test hook fails before any set-up
    # Signals first (a preemption during set-up still saves); the lease is released on every way out.
    with StopSignals() as signals, contextlib.ExitStack() as held:
        try:
            return _train(cfg, StopPolicy(cfg.train, signals, started), nan_steps, held)
        except LeaseLostError as lost:  # every rank, at the same step or save phase
            stop_process(lost)


def _train(cfg: Config, policy: StopPolicy, nan_steps: set[int], held: contextlib.ExitStack) -> int:
    check_memory_plan(cfg)  # a config that cannot fit stops here, not with an out-of-memory error at step 1
    s = setup(cfg, held=held)
    cfg = s.cfg  # precision resolved for this device
    info, engine, t = s.info, s.engine, cfg.train
    checkpointer = Checkpointer(cfg, engine, info, s.tokenizer_path, lease=s.lease)
    state = TrainState()
    resumed = checkpointer.resume()  # before wandb: the wandb run id lives in the checkpoint
    if resumed is not None:
        state, loader_state = resumed
        if loader_state is not None:
            s.loader.load_state_dict(loader_state)
        log.info("resumed at step %d (%d tokens seen)", state.step, state.tokens_seen)

    monitor = Monitor(cfg, info.rank, s.run_dir, state.step, state.wandb_run_id, schedule_horizon(cfg, info.world_size),
                      may_write=s.lease.still_ours if s.lease else None)
    state.wandb_run_id = monitor.wandb_run_id or state.wandb_run_id
    flops_per_token, peak = flops_and_peak(cfg, info.device)
    meter = Throughput(flops_per_token, peak, info.world_size)
    _log_setup(s, monitor, flops_per_token, peak)

    batches = Prefetcher(s.loader, depth=max(2, cfg.data.prefetch))
    stats = StepStats(t.precision, info.device, info.world_size)
    agreement = LateAgreement(len(policy.requests()) + 1, t.collective_timeout_s)  # + the lease
    skipped_before = state.skipped_steps  # a resumed run's; the stats count this run's
    report: StepReport | None = None
    # Armed by the first step's beat: start-up, resume and compilation never count as a hang.
    watchdog = HangWatchdog(t.hang_timeout_s, s.run_dir, info.rank, info.world_size,
                            on_fire=s.lease.release if s.lease else None).start()
    held.callback(watchdog.stop)
    stop: Stop | None = policy.limit(state)
    engine.train()
    try:
        while stop is None:
            t0 = time.perf_counter()
            step = state.step + 1
            logging = step % t.log_every == 0
            lr = engine.lr_scheduler.current() if logging else None  # the rate this step's update uses
            wait = run_step(s, batches, stats, inject_nan=step in nan_steps and info.rank == 0)
            # The previous step's requests, agreed by every rank (see LateAgreement).
            *agreed, lease_lost = agreement.exchange((*policy.requests(), lease_lost_here(s)))
            agreed = tuple(agreed)
            if lease_lost:  # nothing more is written: no metrics, no evaluation, no checkpoint
                raise lost_lease_everywhere(s)
            watchdog.beat()
            state.step, state.tokens_seen = step, state.tokens_seen + s.tokens_per_step
            report_now = None  # read only where a log line or a decision needs the counts
            limited = policy.limit(state)  # evaluation and saves below change no step or token count
            if logging or any(agreed) or limited:
                report = report_now = _read_stats(stats, state, skipped_before, step)
            # After the read: its wait for the device is the time the steps since the last read took.
            meter.update(s.tokens_per_step, time.perf_counter() - t0, wait)
            stop = policy.after_step(agreed, report_now.longest_nonfinite_run if report_now else 0)
            _log_step(s, monitor, meter, state, report_now if logging else None, lr,
                      bar_loss=report.loss if report else None)
            saving = checkpointer.due(step)
            if saving and report_now is None:  # the checkpoint records the skipped steps: count them first
                report = report_now = _read_stats(stats, state, skipped_before, step)
                stop = policy.after_step(agreed, report_now.longest_nonfinite_run)
            evaluating = bool(t.eval_every) and step % t.eval_every == 0 and not (stop and stop.preempted)
            with watchdog.paused():
                if evaluating:
                    _eval_and_log(s, monitor, step)
                if saving:
                    checkpointer.save(state, batches.state)
            if (evaluating or saving) and stop is None:  # a signal that came meanwhile stops here
                signalled, *_, lease_lost = agreement.now((*policy.requests(), lease_lost_here(s)))
                if lease_lost:
                    raise lost_lease_everywhere(s)
                stop = policy.after_pause(signalled)
            stop = stop or limited
        agreement.close()
        if stats.steps_unread:  # a stop right after an evaluation: count its steps before the save
            _read_stats(stats, state, skipped_before, state.step)

        watchdog.stop()  # the final evaluation and save are not steps
        # A final evaluation on a normal end (not on preemption: the grace period is short).
        if stop.exit_code == 0 and not stop.preempted and t.eval_every and state.step > 0 and state.step % t.eval_every:
            _eval_and_log(s, monitor, state.step)
        if cfg.checkpoint.save_on_exit and state.step > 0:
            checkpointer.save(state, batches.state)
    except BaseException:
        stop = Stop("exception", (stop.exit_code if stop else 0) or 1)  # wandb records the run as failed
        raise
    finally:
        batches.close()
        monitor.close(stop.exit_code)
    (log.error if stop.exit_code else log.info)("stopping at step %d: %s", state.step, stop.reason)
    if info.world_size > 1:
        dist.barrier()
    return stop.exit_code


def _read_stats(stats: StepStats, state, skipped_before: int, step: int) -> StepReport:
    """Read the step statistics (a host sync), update the train state's skip count, warn."""
    report = stats.read()
    state.skipped_steps = skipped_before + report.skipped_steps
    if report.longest_nonfinite_run:
        log.warning("up to step %d: non-finite loss or gradient norm, update(s) skipped (longest run %d, %d in a "
                    "row now, %d skipped in all)", step, report.longest_nonfinite_run, report.nonfinite_in_a_row,
                    state.skipped_steps)
    return report


def _log_step(s: Session, monitor, meter, state, report: StepReport | None, lr, bar_loss: float | None) -> None:
    """Progress bar every step (with the last loss read, ``bar_loss``); metrics when ``report`` is
    given (every train.log_every steps)."""
    step, engine = state.step, s.engine
    perf = meter.summary()  # the window so far: the bar shows a rate on every step
    monitor.progress(step, bar_loss, perf.get("tokens_per_s"), perf.get("mfu"))
    if report is None:
        return
    monitor.log_train(step, {
        "train/loss": report.loss,
        "train/lr": float(lr),
        "train/grad_norm": report.grad_norm,
        "train/tokens_seen": state.tokens_seen,
        "train/skipped_steps": state.skipped_steps,
        "train/nonfinite_in_a_row": report.nonfinite_in_a_row,
        "train/loss_scale": loss_scale(engine),
        "perf/tokens_per_s": perf.get("tokens_per_s"),
        "perf/tokens_per_s_per_device": perf.get("tokens_per_s_per_device"),
        "perf/step_time_s": perf.get("step_time_s"),
        "perf/mfu": perf.get("mfu"),
        "perf/loader_wait_frac": perf.get("loader_wait_frac"),
        "perf/memory_bytes": memory_bytes(s.info.device),
    })
    meter.reset()


def _eval_and_log(s: Session, monitor, step: int) -> None:
    metrics = evaluate(s)
    if metrics is not None:
        monitor.log_eval(step, metrics)


def _log_setup(s: Session, monitor, flops_per_token, peak) -> None:
    """Once per run: sizes, batch shape and the parameters each rank holds (ZeRO partitioning)."""
    info, cfg = s.info, s.cfg
    total, local_numel = param_counts(s.engine)
    local = torch.tensor([local_numel], dtype=torch.int64, device=info.device)  # NCCL: on the GPU
    per_rank = [local.clone() for _ in range(info.world_size)]
    if info.world_size > 1:
        dist.all_gather(per_rank, local)
    row = {
        "setup/params": total,
        "setup/param_numel_per_rank": [int(x.item()) for x in per_rank],
        "setup/world_size": info.world_size,
        "setup/device": torch.cuda.get_device_name(info.device) if info.device.startswith("cuda") else "cpu",
        "setup/backend": info.backend,
        "setup/global_batch_tokens": s.tokens_per_step,
        "setup/flops_per_token": flops_per_token,
        "setup/peak_flops_per_device": peak,
        "setup/zero_stage": cfg.deepspeed.zero_stage,
        "setup/precision": cfg.train.precision,
        # The privacy gate's override, recorded with the run (empty unless data.require_scrubbed=false).
        "setup/unscrubbed_sources": list(getattr(s.loader, "unscrubbed_sources", [])),
    }
    log.info(
        "model %.2fM params; ZeRO-%d %s on %d rank(s) (%s, %s); global batch %d x %d tokens = %d tokens/step",
        total / 1e6, cfg.deepspeed.zero_stage, cfg.train.precision, info.world_size, row["setup/device"], info.backend,
        cfg.train.micro_batch_size * cfg.train.grad_accum_steps * info.world_size, cfg.data.seq_len, s.tokens_per_step,
    )
    monitor.log_setup(row)
