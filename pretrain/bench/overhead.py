"""Framework-overhead proxy: ``python -m pretrain.bench.overhead [CONFIG] [key=value ...]``.

At a near-zero-compute shape (configs/bench/cpu_overhead.yaml: batch 1, sequence 32, d_model 64,
2 layers, vocabulary 4096) a step's time is almost all host work: Python, dispatch, DeepSpeed's
bookkeeping. Three steps are timed interleaved (A B C A B C ...), so a neighbour's burst on a
shared machine hits all three alike:

- ``trainer``: the training loop's step, exactly as ``pretrain train`` runs it: the session of
  :func:`pretrain.trainer.setup` (DeepSpeed engine, ZeRO as configured), batches from the
  ``Prefetcher`` thread, :func:`pretrain.trainer.train_step`, then the loop's per-step work
  (:func:`pretrain.trainer.agree`, :func:`pretrain.trainer.step_grad_norm`, ``NonFinite``,
  ``Throughput``);
- ``bare``: our Transformer's forward + backward + AdamW step with no engine (bench_model's
  ``bf16_master`` variant when the config trains in bf16: what DeepSpeed's bf16 optimizer does,
  minus the engine; ``autocast``-free fp32 otherwise);
- ``nanogpt``: nanoGPT's step at the same shape (bench_model's ``nanogpt_autocast``).

Prints one JSON object, last on stdout: the medians, ``trainer_over_bare`` and
``bare_over_nanogpt`` (the ratios of those medians), the bars (1.3 and 1.15, issue 12) and the
raw per-step times, so anyone can recompute the medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from data_pipelines.loaders import Prefetcher
from pretrain.bench.model import build_step
from pretrain.checkpoint import TrainState
from pretrain.config import Config, load_config
from pretrain.errors import exit_on_user_error
from pretrain.logging_setup import setup_logging
from pretrain.monitor import Throughput
from pretrain.stopping import NonFinite
from pretrain.trainer import agree, setup, step_grad_norm, train_step

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = _REPO / "configs" / "bench" / "cpu_overhead.yaml"
BARS = {"trainer_over_bare": 1.3, "bare_over_nanogpt": 1.15}


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
    state, nonfinite = TrainState(), NonFinite(t.precision)
    meter = Throughput(0.0, None, 1)
    engine.train()

    def trainer_step(step: int) -> None:  # the body of pretrain.trainer._train's loop, minus I/O
        t0 = time.perf_counter()
        local_loss, wait = train_step(engine, batches, t.grad_accum_steps, info.device)
        loss, _ = agree(local_loss, (False,), info.device, 1)
        state.step, state.tokens_seen = step, state.tokens_seen + s.tokens_per_step
        meter.update(s.tokens_per_step, time.perf_counter() - t0, wait)
        applied = engine.was_step_applied()
        gnorm = step_grad_norm(engine, applied, step % t.log_every == 0)
        nonfinite.account(state, step, loss, applied, gnorm)

    variant = "bf16_master" if t.precision == "bf16" else "autocast"
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
    finally:
        batches.close()
        if gc_freeze:
            gc.unfreeze()
    med = {k: _median(v) for k, v in times.items()}
    ratios = {"trainer_over_bare": med["trainer"] / med["bare"], "bare_over_nanogpt": med["bare"] / med["nanogpt"]}
    return {
        "trainer_step_s_median": round(med["trainer"], 6),
        "bare_step_s_median": round(med["bare"], 6),
        "nanogpt_step_s_median": round(med["nanogpt"], 6),
        **{k: round(v, 3) for k, v in ratios.items()},
        "bars": BARS,
        "meets_bars": {k: ratios[k] <= BARS[k] for k in BARS},
        "bare_variant": variant,
        "steps": cfg.bench.steps,
        "warmup_steps": cfg.bench.warmup_steps,
        "gc_freeze": gc_freeze,
        "shape": {"micro_batch_size": t.micro_batch_size, "seq_len": cfg.data.seq_len, "d_model": cfg.model.d_model,
                  "n_layers": cfg.model.n_layers, "vocab_size": cfg.model.vocab_size},
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": t.precision,
        "device": info.device,
        "threads": torch.get_num_threads(),
        "times_s": {k: [round(x, 6) for x in v] for k, v in times.items()},
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.bench.overhead", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML config (default: the overhead shape)")
    p.add_argument("overrides", nargs="*", default=[], help="dotlist overrides, e.g. bench.steps=200")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: at this shape more threads only add synchronization)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() after warm-up (train() does not: it measured no gain, README)")
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
