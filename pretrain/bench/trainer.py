"""`python -m pretrain bench CONFIG`: time the real training step; last stdout line is one JSON object.

The same :func:`pretrain.trainer.setup` and :func:`pretrain.trainer.run_step` as training
(engine, loader with its prefetch thread, model, the step statistics kept on the device),
``bench.warmup_steps`` untimed steps, then ``bench.steps`` timed ones. Like training, the timed
steps never wait for the device: the window is synchronized at its start and end only, and on a
GPU each step's own time comes from CUDA events. Nothing is written to the run directory except,
with ``bench.profile=true``, a torch.profiler operator table (``bench_profile.txt``).

Output keys: ``tokens_per_s`` (global), ``tokens_per_s_per_device``, ``mfu`` (per device, against
``peak_flops`` = the device's peak in the run dtype: datasheet on GPUs, a matmul probe on CPU),
``step_time_s`` (mean; ``_min``/``_median`` too, and ``tokens_per_s_median`` for noisy shared
machines), ``loader_wait_frac`` (time blocked on the loader / step time) and ``phase_frac``
(forward / backward / optimizer step shares of step time, from a few more steps timed phase by
phase with a device sync around each phase: a diagnosis, not the headline).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from data_pipelines.loaders import Prefetcher
from pretrain.config import Config
from pretrain.engine import param_counts
from pretrain.monitor import flops_and_peak, memory_bytes
from pretrain.stepstats import StepStats
from pretrain.trainer import run_step, setup, train_step

log = logging.getLogger(__name__)


class PhaseTimer:
    """Wraps the engine for :func:`pretrain.trainer.train_step` and adds up the seconds spent in
    forward, backward and optimizer step (synchronizing CUDA around each phase, which is why
    training does not use it)."""

    def __init__(self, engine: Any, device: str):
        self.engine, self.device = engine, device
        self.seconds: dict[str, float] = {}

    def _timed(self, phase: str, fn, *args, **kwargs):
        t0 = self._now()
        out = fn(*args, **kwargs)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + self._now() - t0
        return out

    def _now(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, **batch):
        return self._timed("forward", self.engine, **batch)

    def backward(self, loss) -> None:
        self._timed("backward", self.engine.backward, loss)

    def step(self) -> None:
        self._timed("optimizer_step", self.engine.step)


PHASE_STEPS = 3  # steps timed phase by phase after the window (see module doc)


def bench(cfg: Config) -> int:
    s = setup(cfg, write_run_files=False)
    cfg = s.cfg  # precision resolved for this device
    info, engine, t = s.info, s.engine, cfg.train
    batches = Prefetcher(s.loader, depth=max(2, cfg.data.prefetch))
    stats = StepStats(t.precision, info.device, info.world_size)
    clock = StepClock(info.device)
    engine.train()
    try:
        for _ in range(cfg.bench.warmup_steps):
            run_step(s, batches, stats)
        prof = _profiler() if cfg.bench.profile else None
        if prof is not None:
            prof.__enter__()
        clock.start()
        waits = []
        for _ in range(cfg.bench.steps):
            waits.append(run_step(s, batches, stats))
            clock.lap()
        step_times = clock.stop()
        if prof is not None:
            prof.__exit__(None, None, None)
            _write_profile(prof, Path(cfg.run.dir) / "bench_profile.txt", info.rank)
        final_loss = stats.read().loss
        timer = PhaseTimer(engine, info.device)
        for _ in range(PHASE_STEPS):
            train_step(timer, batches, t.grad_accum_steps, info.device)
    finally:
        batches.close()

    flops_per_token, peak = flops_and_peak(cfg, info.device)
    total = sum(step_times)
    tps = s.tokens_per_step * len(step_times) / total
    per_device = tps / info.world_size
    result = {
        "tokens_per_s": round(tps, 1),
        "tokens_per_s_per_device": round(per_device, 1),
        "mfu": None if not peak else round(per_device * flops_per_token / peak, 4),
        "peak_flops": peak,
        "flops_per_token": flops_per_token,
        "step_time_s": round(total / len(step_times), 4),
        "step_time_s_min": round(min(step_times), 4),
        "step_time_s_median": round(statistics.median(step_times), 4),
        # Robust to a neighbour stealing the CPU for a few steps (shared machines); not the headline.
        "tokens_per_s_median": round(s.tokens_per_step / statistics.median(step_times), 1),
        "step_time_s_stdev": round(statistics.pstdev(step_times), 4),
        "loader_wait_frac": round(sum(waits) / total, 4),
        "phase_frac": {k: round(v / sum(timer.seconds.values()), 3) for k, v in timer.seconds.items()},
        "tokens_per_step": s.tokens_per_step,
        "steps": len(step_times),
        "warmup_steps": cfg.bench.warmup_steps,
        "world_size": info.world_size,
        "device": info.device,
        "precision": t.precision,
        "zero_stage": cfg.deepspeed.zero_stage,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "seq_len": cfg.data.seq_len,
        "params": param_counts(engine)[0],
        "memory_bytes": memory_bytes(info.device),
        "final_loss": round(final_loss, 4),
    }
    if info.rank == 0:
        sys.stdout.flush()
        print(json.dumps(result), flush=True)
    return 0


class StepClock:
    """Per-step times without syncing inside the window: CUDA events on a GPU (read after the
    window), the host clock on the CPU (where every kernel has run when the call returns)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.marks: list = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # earlier work must not count towards the first step
        self.marks = [self._mark()]

    def lap(self) -> None:
        """End of a step."""
        self.marks.append(self._mark())

    def stop(self) -> list[float]:
        """Seconds of each step since :meth:`start` (one sync, on a GPU)."""
        if not self.cuda:
            return [b - a for a, b in pairwise(self.marks)]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in pairwise(self.marks)]


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=acts, record_shapes=False)


def _write_profile(prof, path: Path, rank: int) -> None:
    """Top operators by self time: where the step's time goes."""
    sort = "self_cuda_time_total" if any(e.device_type.name == "CUDA" for e in prof.key_averages()) else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n")
        log.info("profile (top operators by self time), also in %s:\n%s", path, table)
