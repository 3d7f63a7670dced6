"""Framework-overhead proxy: ``python -m pretrain.bench.overhead [CONFIG] [key=value ...]``.

At a near-zero-compute shape (configs/bench/cpu_overhead.yaml: batch 1, sequence 32, d_model 64,
2 layers, vocabulary 4096) a step's time is almost all host work: Python, dispatch, DeepSpeed's
bookkeeping. Three steps are timed interleaved (A B C A B C ...), so a neighbour's burst on a
shared machine hits all three alike:

- ``trainer``: the training loop's step, exactly as ``pretrain train`` runs it: the session of
  :func:`pretrain.trainer.setup` (DeepSpeed engine, ZeRO as configured), batches from the
  ``Prefetcher`` thread, :func:`pretrain.trainer.run_step`, then the loop's per-step work
  (``LateAgreement``, ``Throughput``, and on logging steps ``StepStats.read`` and the rate);
- ``bare``: our Transformer's forward + backward + AdamW step with no engine, in the same
  precision path (pretrain.engine.precision_path): bench_model's ``bf16_master`` for bf16
  parameters with fp32 masters (ZeRO 1-3), ``autocast`` for fp32 parameters under bf16 autocast
  (ZeRO-0), ``fp32`` for fp32;
- ``nanogpt``: nanoGPT's step at the same shape (bench_model's ``nanogpt_autocast``).

Then, deterministic and independent of the machine's load, it counts what one step dispatches
(pretrain.bench.dispatch_count) over ``train.log_every`` trainer steps (one of them a logging
step) and as many bare steps: host syncs per non-logging trainer step (bar: 0) and dispatched
aten operators per step (bar: trainer <= 1.25 x bare).

Prints one JSON object, last on stdout: the medians, ``trainer_over_bare`` and
``bare_over_nanogpt`` (the ratios of those medians), the counts (``trainer_syncs_per_step``,
``bare_syncs_per_step``, ``trainer_ops_per_step``, ``bare_ops_per_step``, ``ops_trainer_over_bare``),
the bars and the raw per-step times, so anyone can recompute the medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from data_pipelines.loaders import Prefetcher
from pretrain.bench.dispatch_count import DispatchCounter
from pretrain.bench.model import build_step
from pretrain.config import Config, load_config
from pretrain.dist import LateAgreement
from pretrain.engine import precision_path
from pretrain.errors import exit_on_user_error
from pretrain.logging_setup import setup_logging
from pretrain.monitor import Throughput
from pretrain.stepstats import StepStats
from pretrain.trainer import run_step, setup

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = _REPO / "configs" / "bench" / "cpu_overhead.yaml"
BARS = {"trainer_over_bare": 1.3, "bare_over_nanogpt": 1.15, "trainer_syncs_per_step": 0,
        "ops_trainer_over_bare": 1.25}


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def overhead(cfg: Config, gc_freeze: bool = False) -> dict:
    """Time the three steps interleaved; returns the result object (see module doc)."""
    s = setup(cfg, write_run_files=False)
    cfg = s.cfg  # precision resolved for this device
    info, engine, t = s.info, s.engine, cfg.train
    if info.world_size != 1:
        raise SystemExit("bench_overhead runs on one process (it compares against single-process steps)")
    batches = Prefetcher(s.loader, depth=max(2, cfg.data.prefetch))
    stats = StepStats(t.precision, info.device, 1)
    agreement = LateAgreement(3)
    meter = Throughput(0.0, None, 1)
    engine.train()

    def trainer_step(step: int) -> None:  # the body of pretrain.trainer._train's loop, minus I/O
        t0 = time.perf_counter()
        logging = step % t.log_every == 0
        lr = engine.lr_scheduler.current() if logging else None
        wait = run_step(s, batches, stats)
        agreement.exchange((False, False, False))  # signal, time budget, lease lost
        if logging:
            stats.read()
            float(lr)
        meter.update(s.tokens_per_step, time.perf_counter() - t0, wait)

    variant = bare_variant(cfg)
    bare, _ = build_step(variant + ("_compile" if cfg.model.compile else ""), cfg.model, fused_adamw=True, device=info.device)
    nano, _ = build_step("nanogpt_autocast", cfg.model, fused_adamw=True, device=info.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=gen).to(info.device)
    inp, lab = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    sync = torch.cuda.synchronize if info.device.startswith("cuda") else (lambda: None)
    steps = {"trainer": trainer_step, "bare": lambda _: bare(inp, lab), "nanogpt": lambda _: nano(inp, lab)}
    try:
        for i in range(cfg.bench.warmup_steps):
            for fn in steps.values():
                fn(i + 1)
        sync()
        if gc_freeze:  # torchtitan-style: set-up objects out of the cyclic collector's way
            gc.collect()
            gc.freeze()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for i in range(cfg.bench.steps):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                fn(cfg.bench.warmup_steps + i + 1)
                sync()
                times[name].append(time.perf_counter() - t0)
        counts = count_dispatch(trainer_step, steps["bare"], cfg.bench.warmup_steps + cfg.bench.steps, t.log_every)
    finally:
        batches.close()
        if gc_freeze:
            gc.unfreeze()
    med = {k: _median(v) for k, v in times.items()}
    ratios = {"trainer_over_bare": med["trainer"] / med["bare"], "bare_over_nanogpt": med["bare"] / med["nanogpt"]}
    meets = {k: ratios[k] <= BARS[k] for k in ("trainer_over_bare", "bare_over_nanogpt")}
    meets["trainer_syncs_per_step"] = counts["trainer_syncs_per_step"] <= BARS["trainer_syncs_per_step"]
    meets["ops_trainer_over_bare"] = counts["ops_trainer_over_bare"] <= BARS["ops_trainer_over_bare"]
    return {
        "trainer_step_s_median": round(med["trainer"], 6),
        "bare_step_s_median": round(med["bare"], 6),
        "nanogpt_step_s_median": round(med["nanogpt"], 6),
        **{k: round(v, 3) for k, v in ratios.items()},
        "bars": BARS,
        "meets_bars": meets,
        "bare_variant": variant,
        "precision_path": dataclasses.asdict(precision_path(cfg)),
        "steps": cfg.bench.steps,
        "warmup_steps": cfg.bench.warmup_steps,
        "gc_freeze": gc_freeze,
        "shape": {"micro_batch_size": t.micro_batch_size, "seq_len": cfg.data.seq_len, "d_model": cfg.model.d_model,
                  "n_layers": cfg.model.n_layers, "vocab_size": cfg.model.vocab_size},
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": t.precision,
        "device": info.device,
        "threads": torch.get_num_threads(),
        **counts,
        "times_s": {k: [round(x, 6) for x in v] for k, v in times.items()},
    }


def bare_variant(cfg: Config) -> str:
    """bench_model's variant with the trainer's precision path, minus the engine (see module doc)."""
    path = precision_path(cfg)
    if path.params == "bf16":
        return "bf16_master"
    return "autocast" if path.autocast else "fp32"


def count_dispatch(trainer_step, bare_step, first_step: int, log_every: int) -> dict:
    """Operators and host syncs per step, counted over ``log_every`` trainer steps from
    ``first_step + 1`` (exactly one logging step) and as many bare steps (see module doc)."""
    n = log_every
    trainer = {"logging": DispatchCounter(), "other": DispatchCounter()}
    for step in range(first_step + 1, first_step + 1 + n):
        with trainer["logging" if step % log_every == 0 else "other"]:
            trainer_step(step)
    bare = DispatchCounter()
    for _ in range(n):
        with bare:
            bare_step(0)
    other_steps = n - 1
    trainer_ops = (trainer["logging"].ops + trainer["other"].ops) / n
    return {
        "trainer_syncs_per_step": trainer["other"].syncs / other_steps if other_steps else None,
        "bare_syncs_per_step": bare.syncs / n,
        "trainer_ops_per_step": trainer_ops,
        "bare_ops_per_step": bare.ops / n,
        "ops_trainer_over_bare": round(trainer_ops / (bare.ops / n), 3),
        "trainer_logging_step_syncs": trainer["logging"].syncs,
        "count_steps": n,
        "trainer_sync_ops": dict(trainer["other"].sync_names),
        "trainer_logging_sync_ops": dict(trainer["logging"].sync_names),
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.bench.overhead", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML config (default: the overhead shape)")
    p.add_argument("overrides", nargs="*", default=[], help="dotlist overrides, e.g. bench.steps=200")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: at this shape more threads only add synchronization)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() after warm-up (train() does not: it measured no gain, docs/benchmarks.md)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(cfg.run.log_level, cfg.run.log_all_ranks)
    result = overhead(cfg, gc_freeze=args.gc_freeze)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
