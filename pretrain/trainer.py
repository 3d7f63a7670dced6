"""The training loop: ``train(cfg) -> exit status``.

Layout, top to bottom::

    setup(cfg)                 process group, seed, tokenizer, loader, model, DeepSpeed engine
    train(cfg)                 signals -> setup -> resume -> monitor -> loop -> final save -> status
      loop:  train_step        micro-batches (from the Prefetcher thread) through forward /
                               backward / engine.step
             agree             one all-reduce: mean loss + stop requests (signal, time budget)
             NonFinite         skipped / non-finite steps (DeepSpeed skips the update itself)
             _log_step         progress bar, metrics.jsonl + wandb every train.log_every steps
             evaluate          every train.eval_every steps (and at a normal end)
             checkpoint        when due, and on every exit path (checkpoint.save_on_exit)
             _signal_since     after an evaluation or save: a signal that came meanwhile stops here

``bench`` reuses ``setup``, ``Prefetcher`` and ``train_step``: the benchmark times this code.

Every rank takes every decision from reduced values, so ranks never disagree about stopping,
skipping or saving. Exit status: 0 on a normal stop or a signal (SIGTERM/SIGUSR1: the current
step finishes, the run saves and exits 0 so SLURM can requeue it), 3 after
``train.max_nonfinite_in_a_row`` consecutive non-finite steps (also when a signal came at the same
time: a diverged run must not be requeued), 1 on an exception (wandb marks the run failed).

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
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipelines.loaders import Prefetcher, build_train_loader, build_val_loader, load_tokenizer
from pretrain.config import Config, save_resolved
from pretrain.errors import UserError

log = logging.getLogger(__name__)

EXIT_NONFINITE = 3
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
    val_cache: list | None = field(default=None)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: Config, write_run_files: bool = True) -> Session:
    """Process group, tokenizer, loader, model and engine, identical for train and bench."""
    from pretrain.dist import init_distributed, select_accelerator
    from pretrain.engine import build_engine, check_device_support, model_init_context

    check_device_support(cfg, select_accelerator())
    info = init_distributed()
    run_dir = Path(cfg.run.dir)
    if write_run_files and info.rank == 0:
        save_resolved(cfg, run_dir)

    tokenizer, tokenizer_path = _load_tokenizer(cfg)
    loader = build_train_loader(cfg, info.rank, info.world_size, tokenizer=tokenizer)

    import torch

    from pretrain.model import Transformer

    seed_everything(cfg.run.seed)  # same init on every rank
    init_context = model_init_context(cfg, info)
    with init_context:
        model = Transformer(cfg.model)
    if info.device != "cpu" and isinstance(init_context, contextlib.nullcontext):
        model = model.to(info.device)  # (zero.Init already placed its partitions)
    engine, _ = build_engine(cfg, model, info, run_dir if write_run_files else None)
    torch.manual_seed(cfg.run.seed + 1 + info.rank)  # per-rank stream for anything stochastic after init
    t = cfg.train
    tokens = t.micro_batch_size * t.grad_accum_steps * info.world_size * cfg.data.seq_len
    return Session(cfg, info, model, engine, loader, tokenizer, tokenizer_path, run_dir, tokens)


def _load_tokenizer(cfg: Config):
    """The tokenizer, loaded once and shared by both loaders (None in pretokenized mode without one)."""
    path = cfg.data.tokenizer
    if cfg.data.mode == "pretokenized" and not Path(path).is_file():
        return None, None
    return load_tokenizer(path), str(path)


# --------------------------------------------------------------------------------------------
# One step, agreement, evaluation
# --------------------------------------------------------------------------------------------


def _to_device(batch: dict, device: str) -> dict:
    out = {k: batch[k] for k in BATCH_KEYS if k in batch}
    if device != "cpu":
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def train_step(engine, batches: Prefetcher, accum: int, device: str, inject_nan: bool = False,
               phases: dict[str, float] | None = None):
    """One optimizer step over ``accum`` micro-batches; returns (this rank's mean loss, wait seconds).

    DeepSpeed owns accumulation: ``engine.step()`` after every micro-batch applies the update
    only at the boundary (and skips it, on all ranks, when the gradient norm is not finite).
    ``phases`` (bench): accumulates seconds spent in forward, backward and step (synchronizing
    CUDA around each phase, so leave it None in training).
    """
    import torch

    def mark(name: str, since: float) -> float:
        now = _sync_time(device)
        phases[name] = phases.get(name, 0.0) + now - since
        return now

    losses = []
    wait = 0.0
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = batches.next()
        wait += time.perf_counter() - t0
        t = _sync_time(device) if phases is not None else 0.0
        loss = engine(**_to_device(batch, device))
        if inject_nan:
            loss = loss * float("nan")
        if phases is not None:
            t = mark("forward", t)
        engine.backward(loss)
        if phases is not None:
            t = mark("backward", t)
        engine.step()
        if phases is not None:
            mark("optimizer_step", t)
        losses.append(loss.detach().float())
    return torch.stack(losses).mean(), wait


def _sync_time(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter()


def agree(local_loss, stop_signal: bool, stop_time: bool, device: str, world: int) -> tuple[float, bool, bool]:
    """One all-reduce per step: the global mean loss and whether any rank wants to stop."""
    import torch

    if world == 1:
        return float(local_loss), stop_signal, stop_time
    import torch.distributed as dist

    t = torch.stack([local_loss.to(device), torch.tensor(float(stop_signal), device=device),
                     torch.tensor(float(stop_time), device=device)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    loss, sig, tim = t.tolist()
    return loss / world, sig > 0, tim > 0


def evaluate(session: Session) -> dict | None:
    """Validation loss (token-weighted) and perplexity over train.eval_batches batches per rank.

    The batches are read once and kept: every evaluation sees the same tokens. All ranks run the
    same number of forwards (the minimum any rank has), which ZeRO-3's parameter gathers require.
    """
    import torch
    import torch.distributed as dist

    cfg, info, engine = session.cfg, session.info, session.engine
    if session.val_cache is None:
        from itertools import islice

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


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves and exits 0."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving and exiting", self.received)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _nan_steps() -> set[int]:
    raw = os.environ.get(INJECT_NAN_ENV, "")
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError:
        raise UserError(f"{INJECT_NAN_ENV}={raw!r}: expected comma-separated step numbers") from None


def local_param_numel(engine) -> int:
    """Parameter elements this rank holds (its ZeRO-3 partition, or everything below stage 3)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _make_checkpointer(session: Session):
    from pretrain.checkpoint import Checkpointer

    return Checkpointer(session.cfg, session.engine, session.info, session.tokenizer_path)


def train(cfg: Config) -> int:
    """Train until a stop condition; returns the process exit status."""
    started = time.monotonic()  # train.max_time_s counts set-up and resume too: it is the job's budget
    nan_steps = _nan_steps()  # a malformed test hook fails before any set-up
    with StopSignals() as signals:  # installed first: a preemption during set-up still saves
        return _train(cfg, signals, nan_steps, started)


@dataclass
class NonFinite:
    """Skipped updates and the current run of non-finite steps (identical on every rank)."""

    precision: str
    in_a_row: int = 0

    def account(self, state, step: int, loss: float, applied: bool, gnorm: float | None) -> bool:
        """Update the counters after a step; returns True when the step was non-finite.

        DeepSpeed already skipped the update on every rank (see engine.py). With fp16 a skip with
        a finite loss is the loss scaler calibrating, not a failure, even though DeepSpeed then
        reports an infinite gradient norm (a start at 2**16 overflows several steps in a row); a
        real fp16 divergence ends in DeepSpeed's own error at its minimum loss scale.
        """
        if self.precision == "fp16":
            nonfinite = not math.isfinite(loss)
        else:
            nonfinite = not math.isfinite(loss) or not applied or (gnorm is not None and not math.isfinite(gnorm))
        if not applied:
            state.skipped_steps += 1
        if not nonfinite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s): update skipped (%d in a row)",
                    step, loss, gnorm, self.in_a_row)
        if applied:
            log.error("step %d: non-finite loss but DeepSpeed applied the update", step)
        return True


def _train(cfg: Config, signals: StopSignals, nan_steps: set[int], started: float) -> int:
    import torch

    from pretrain.checkpoint import TrainState
    from pretrain.engine import grad_norm, schedule_horizon
    from pretrain.monitor import Monitor, Throughput, flops_and_peak

    s = setup(cfg)
    info, engine, t = s.info, s.engine, cfg.train
    checkpointer = _make_checkpointer(s)
    state = TrainState()
    resumed = checkpointer.resume()  # before wandb: the wandb run id lives in the checkpoint
    if resumed is not None:
        state, loader_state = resumed
        if loader_state is not None:
            s.loader.load_state_dict(loader_state)
        log.info("resumed at step %d (%d tokens seen)", state.step, state.tokens_seen)

    monitor = Monitor(cfg, info.rank, s.run_dir, state.step, state.wandb_run_id, schedule_horizon(cfg, info.world_size))
    state.wandb_run_id = monitor.wandb_run_id or state.wandb_run_id
    flops_per_token, peak = flops_and_peak(cfg, info.device)
    meter = Throughput(flops_per_token, peak, info.world_size)
    _log_setup(s, monitor, flops_per_token, peak)

    batches = Prefetcher(s.loader, depth=max(2, cfg.data.prefetch))
    nonfinite = NonFinite(t.precision)
    stop_reason, exit_code, preempted = "", 0, False
    engine.train()
    try:
        while not (stop_reason := _limit_reached(state, t)):
            t0 = time.perf_counter()
            step = state.step + 1
            lr = engine.get_lr()[0]  # the rate this step's update uses
            local_loss, wait = train_step(engine, batches, t.grad_accum_steps, info.device,
                                          inject_nan=step in nan_steps and info.rank == 0)
            over_time = t.max_time_s is not None and time.monotonic() - started >= t.max_time_s
            loss, by_signal, by_time = agree(local_loss, signals.received is not None, over_time,
                                             info.device, info.world_size)
            state.step, state.tokens_seen = step, state.tokens_seen + s.tokens_per_step
            meter.update(s.tokens_per_step, time.perf_counter() - t0, wait)
            gnorm = grad_norm(engine)
            bad = nonfinite.account(state, step, loss, engine.was_step_applied(), gnorm)

            stop_reason, exit_code = _stop_reason(by_signal, by_time, nonfinite.in_a_row, t)
            preempted = by_signal

            _log_step(s, monitor, meter, state, loss, lr, gnorm, nonfinite.in_a_row, force=bad)
            evaluating = bool(t.eval_every) and step % t.eval_every == 0 and not preempted  # short grace period
            if evaluating:
                _eval_and_log(s, monitor, step)
            saving = checkpointer.due(step)
            if saving:
                checkpointer.save(state, batches.state)
            if (evaluating or saving) and not stop_reason and _signal_since(signals, info):
                stop_reason, preempted = "stop signal (SIGTERM/SIGUSR1) during evaluation or a save", True
            if stop_reason:
                break

        # A final evaluation on a normal end (not on preemption: the grace period is short).
        if exit_code == 0 and not preempted and t.eval_every and state.step > 0 and state.step % t.eval_every:
            _eval_and_log(s, monitor, state.step)
        if cfg.checkpoint.save_on_exit and state.step > 0:
            checkpointer.save(state, batches.state)
    except BaseException:
        exit_code = exit_code or 1  # wandb records the run as failed, not finished
        raise
    finally:
        batches.close()
        monitor.close(exit_code)
    (log.error if exit_code else log.info)("stopping at step %d: %s", state.step, stop_reason)
    if info.world_size > 1:
        torch.distributed.barrier()
    return exit_code


def _signal_since(signals: StopSignals, info) -> bool:
    """Whether any rank got a stop signal, agreed: one that arrived during a long evaluation or save
    stops the run there (the checkpoint just written is current) instead of one step and save later."""
    import torch

    return agree(torch.zeros(()), signals.received is not None, False, info.device, info.world_size)[1]


def _stop_reason(by_signal: bool, by_time: bool, nonfinite_in_a_row: int, t) -> tuple[str, int]:
    """The stop decisions taken after a step from agreed values: (reason or '', exit status).

    Divergence wins over a signal or the budget: exit 0 would let SLURM requeue a diverged run.
    """
    if nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
        return (f"{nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_in_a_row="
                f"{t.max_nonfinite_in_a_row}); lower optim.lr, check the data, or resume from an earlier checkpoint",
                EXIT_NONFINITE)
    if by_signal:
        return "stop signal (SIGTERM/SIGUSR1)", 0
    if by_time:
        return f"reached train.max_time_s={t.max_time_s}", 0
    return "", 0


def _limit_reached(state, t) -> str:
    """The deterministic limits (same on every rank without communication); '' when none."""
    if state.step >= t.max_steps:
        return f"reached train.max_steps={t.max_steps}"
    if t.max_tokens is not None and state.tokens_seen >= t.max_tokens:
        return f"reached train.max_tokens={t.max_tokens}"
    return ""


def _log_step(s: Session, monitor, meter, state, loss: float, lr: float, gnorm: float | None,
              in_a_row: int, force: bool) -> None:
    """Progress bar every step; metrics every train.log_every steps (and on every non-finite step)."""
    from pretrain.engine import loss_scale
    from pretrain.monitor import memory_bytes

    step, engine = state.step, s.engine
    due = step % s.cfg.train.log_every == 0
    perf = meter.summary()  # the window so far: the bar shows a rate on every step
    monitor.progress(step, loss, perf.get("tokens_per_s"), perf.get("mfu"))
    if not (due or force):
        return
    monitor.log_train(step, {
        "train/loss": loss,
        "train/lr": lr,
        "train/grad_norm": gnorm,
        "train/tokens_seen": state.tokens_seen,
        "train/skipped_steps": state.skipped_steps,
        "train/nonfinite_in_a_row": in_a_row,
        "train/loss_scale": loss_scale(engine),
        "perf/tokens_per_s": perf.get("tokens_per_s"),
        "perf/tokens_per_s_per_device": perf.get("tokens_per_s_per_device"),
        "perf/step_time_s": perf.get("step_time_s"),
        "perf/mfu": perf.get("mfu"),
        "perf/loader_wait_frac": perf.get("loader_wait_frac"),
        "perf/memory_bytes": memory_bytes(s.info.device),
    })
    if due:
        meter.reset()


def _eval_and_log(s: Session, monitor, step: int) -> None:
    metrics = evaluate(s)
    if metrics is not None:
        monitor.log_eval(step, metrics)


def _log_setup(s: Session, monitor, flops_per_token, peak) -> None:
    """Once per run: sizes, batch shape and the parameters each rank holds (ZeRO partitioning)."""
    import torch
    import torch.distributed as dist

    info, cfg = s.info, s.cfg
    local = torch.tensor([local_param_numel(s.engine)], dtype=torch.int64, device=info.device)  # NCCL: on the GPU
    per_rank = [local.clone() for _ in range(info.world_size)]
    if info.world_size > 1:
        dist.all_gather(per_rank, local)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in s.engine.module.parameters())
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
