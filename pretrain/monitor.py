"""Everything the loop reports: throughput/MFU accounting, metrics.jsonl, wandb, progress bar, plot.

Kept out of the loop body (the loop calls ``monitor.log_train`` / ``log_eval`` and nothing else).
Only global rank 0 writes files, talks to wandb or draws the progress bar; other ranks get a
monitor whose methods do nothing, so the loop needs no ``if rank == 0``. Nothing is written once
``may_write`` says no (the run directory's lease was lost to another job): not a metrics line, not
wandb (its finish would close the run the new owner continues), not the loss curve.

metrics.jsonl holds one JSON object per line: ``{"kind": "train" | "eval", "step": …, "time": …,
<metric>: …}`` with the same metric names as wandb (``train/loss``, ``val/ppl``, …). A resumed run
appends; where a crashed attempt logged steps beyond the checkpoint it resumed from, the later line
for a step wins (see :func:`read_metrics`). A run that starts at step 0 truncates the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from data_pipelines.loaders import source_summaries
from pretrain.config import Config, to_dict
from pretrain.flops import flops_per_token, peak_flops_per_s

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


# --------------------------------------------------------------------------------------------
# Throughput, MFU, memory
# --------------------------------------------------------------------------------------------


class Throughput:
    """Tokens/s, MFU and loader-wait fraction over a window of steps (reset at each log)."""

    def __init__(self, flops_per_token: float | None, peak_flops: float | None, world_size: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # per device
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.tokens = 0  # global tokens in the window
        self.steps = 0
        self.step_time = 0.0
        self.wait_time = 0.0

    def update(self, global_tokens: int, step_time: float, wait_time: float) -> None:
        self.tokens += global_tokens
        self.steps += 1
        self.step_time += step_time
        self.wait_time += wait_time

    def summary(self) -> dict[str, float | None]:
        if self.steps == 0 or self.step_time <= 0:
            return {}
        tps = self.tokens / self.step_time
        per_device = tps / self.world_size
        mfu = None
        if self.flops_per_token and self.peak_flops:
            mfu = per_device * self.flops_per_token / self.peak_flops
        return {
            "tokens_per_s": tps,
            "tokens_per_s_per_device": per_device,
            "step_time_s": self.step_time / self.steps,
            "mfu": mfu,
            "loader_wait_frac": self.wait_time / self.step_time,
        }


def flops_and_peak(cfg: Config, device: str) -> tuple[float | None, float | None]:
    """Model FLOPs per token (6N + attention, pretrain.flops) and this device's peak in the run dtype."""
    dtype = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[cfg.train.precision]
    return flops_per_token(cfg.model, cfg.data.seq_len), peak_flops_per_s(device, dtype)


def memory_bytes(device: str) -> int:
    """CUDA peak allocated bytes on GPUs, the process RSS on CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


# --------------------------------------------------------------------------------------------
# wandb
# --------------------------------------------------------------------------------------------


def resolve_wandb_mode(mode: str) -> str:
    """auto -> online when WANDB_API_KEY is set, else offline (a run never needs the network)."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class WandbLogger:
    """One wandb run per training run; a resumed run continues it (same id, resume='allow')."""

    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None):
        import wandb

        self.mode = resolve_wandb_mode(cfg.wandb.mode)
        self.run_id = run_id or uuid.uuid4().hex[:12]  # wandb ids: [a-z0-9]
        config = to_dict(cfg)
        config["data_manifests"] = source_summaries(cfg)
        wb_dir = run_dir / "wandb"
        wb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name or cfg.run.name,
            tags=list(cfg.wandb.tags),
            config=config,
            id=self.run_id,
            resume="allow",
            mode=self.mode,
            dir=str(run_dir),
            # Our stdout must stay ours (bench prints JSON as its last line).
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        # Our step is a metric, not wandb's internal counter: a run resumed from a checkpoint
        # older than the last logged step re-logs those steps instead of having them dropped.
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        for s in config["data_manifests"]:
            log.info("wandb: training source %s: %s", s["source"], {k: v for k, v in s.items() if k != "filters"})
        log.info("wandb %s run %s in %s", self.mode, self.run_id, self.run.dir)

    def log(self, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


# --------------------------------------------------------------------------------------------
# The monitor the loop talks to
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


class Monitor:
    """Rank 0: metrics.jsonl + wandb + progress bar + log lines. Other ranks: no-ops."""

    def __init__(self, cfg: Config, rank: int, run_dir: str | os.PathLike, start_step: int,
                 wandb_run_id: str | None, total_steps: int, may_write: Callable[[], bool] | None = None):
        self.enabled = rank == 0
        self.may_write = may_write or (lambda: True)  # e.g. RunLease.still_ours
        self.run_dir = Path(run_dir)
        self.wandb: WandbLogger | None = None
        self.bar = None
        self._file = None
        if self.enabled and not self.may_write():  # lost while setting up: do not even open the files
            self.enabled = False
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run appends; a run from step 0 starts the file over (rows of an earlier attempt
        # describe a trajectory that no longer exists, and would mix into the loss curve).
        self._file = open(self.run_dir / METRICS_FILE, "a" if start_step > 0 else "w", buffering=1)
        if resolve_wandb_mode(cfg.wandb.mode) != "disabled":
            self.wandb = WandbLogger(cfg, self.run_dir, wandb_run_id)
        if cfg.train.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0, smoothing=0.1)

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.run_id if self.wandb else None

    def _write(self, kind: str, step: int, metrics: dict) -> None:
        row = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        row.update({k: v for k, v in metrics.items() if v is not None})
        self._file.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log({"train/step": step, **metrics})

    def progress(self, step: int, loss: float | None, tokens_per_s: float | None, mfu: float | None) -> None:
        """Called every step on rank 0: advance the bar (``loss``: the last logged one; reading the
        current step's would make the host wait for the device)."""
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(
            f"loss {_fmt(loss, '.4f')} | {_fmt(tokens_per_s, ',.0f')} tok/s | MFU {_fmt(None if mfu is None else 100 * mfu, '.1f')}%",
            refresh=False,
        )

    def log_train(self, step: int, metrics: dict) -> None:
        if not self.enabled or not self.may_write():
            return
        self._write("train", step, metrics)
        msg = (
            f"step {step} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.3g}"
            f" | grad norm {_fmt(metrics.get('train/grad_norm'), '.3f')}"
            f" | {_fmt(metrics.get('perf/tokens_per_s'), ',.0f')} tok/s"
            f" | MFU {_fmt(None if metrics.get('perf/mfu') is None else 100 * metrics['perf/mfu'], '.1f')}%"
            f" | wait {_fmt(None if metrics.get('perf/loader_wait_frac') is None else 100 * metrics['perf/loader_wait_frac'], '.1f')}%"
        )
        if metrics.get("train/skipped_steps"):
            msg += f" | skipped {metrics['train/skipped_steps']}"
        self._log(msg)

    def log_setup(self, info: dict) -> None:
        """Once per run: model size, batch shape, per-rank parameter partition (JSON line + wandb config)."""
        if not self.enabled or not self.may_write():
            return
        self._file.write(json.dumps({"kind": "setup", "step": 0, "time": round(time.time(), 3), **info}) + "\n")
        if self.wandb:
            self.wandb.run.config.update(info, allow_val_change=True)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not self.enabled or not self.may_write():
            return
        self._write("eval", step, metrics)
        self._log(f"step {step} | val loss {metrics['val/loss']:.4f} | val ppl {metrics['val/ppl']:.2f}")

    def _log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=None)  # above the bar, not through it
        else:
            log.info(msg)

    def close(self, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self._file is not None:
            self._file.close()
        if not self.may_write():
            return
        if self.wandb:
            self.wandb.finish(exit_code)
        png = plot_loss_curve(self.run_dir / METRICS_FILE, self.run_dir / LOSS_CURVE_FILE)
        if png:
            log.info("loss curve: %s", png)


# --------------------------------------------------------------------------------------------
# metrics.jsonl -> loss curve
# --------------------------------------------------------------------------------------------


def read_metrics(path: str | os.PathLike, kind: str) -> list[dict]:
    """Rows of one kind, one per step (the last logged wins), sorted by step."""
    rows: dict[int, dict] = {}
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if row.get("kind") == kind:
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def plot_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Train (and validation) loss against step, as a PNG; None when there is nothing to plot."""
    train = [r for r in read_metrics(metrics_path, "train") if math.isfinite(r.get("train/loss", math.nan))]
    evals = [r for r in read_metrics(metrics_path, "eval") if math.isfinite(r.get("val/loss", math.nan))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val/loss"] for r in evals], "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
