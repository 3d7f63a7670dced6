"""The training loop end to end, through the real CLI, on CPU with gloo.

Each multi-process run costs ~10 s of torch + deepspeed start-up per rank, so one run checks
several things: ZeRO-0 also checks wandb offline, evaluation and a skipped NaN step; ZeRO-1 and
ZeRO-2 (fp32, micro 8 x accumulation 1 against micro 4 x accumulation 2) must give the same
losses; ZeRO-3 checks the parameter partition.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time

import pytest
from _trainer_helpers import (
    REPO,
    TIMEOUT,
    assert_loss_falls,
    command,
    losses,
    metrics,
    run_train,
    tiny_data_fixture,  # noqa: F401 - registers the tiny_data fixture
    write_config,
)

# --------------------------------------------------------------------------------------------
# ZeRO stages
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_zero0_fp32_wandb_eval_and_skipped_nan(tiny_data, tmp_path):
    """ZeRO-0 fp32 (the GuardedAdamW path): trains, evaluates, skips an injected NaN, logs to wandb."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    run_train(cfg, ["deepspeed.zero_stage=0", "train.precision=fp32", "train.eval_every=10", "wandb.mode=offline"],
              env={"PRETRAIN_INJECT_NAN_STEPS": "5", "WANDB_MODE": "offline"})
    assert_loss_falls(run)
    rows = {r["step"]: r for r in metrics(run, "train")}
    assert not math.isfinite(rows[5]["train/loss"])
    assert rows[5]["train/skipped_steps"] == 1 and rows[20]["train/skipped_steps"] == 1
    assert all(math.isfinite(rows[s]["train/loss"]) for s in range(6, 21))  # parameters survived
    # The logged rate is the one each step used; a skipped update does not advance the schedule.
    from pretrain.schedules import lr_at

    for s in range(1, 21):
        applied_before = s - 1 - (1 if s > 5 else 0)
        assert rows[s]["train/lr"] == pytest.approx(
            lr_at(applied_before, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=20), rel=1e-6), s
    evals = metrics(run, "eval")
    assert [e["step"] for e in evals] == [10, 20]
    assert all(math.isclose(e["val/ppl"], math.exp(e["val/loss"]), rel_tol=1e-6) for e in evals)
    setup = metrics(run, "setup")[0]
    assert setup["setup/param_numel_per_rank"] == [setup["setup/params"]] * 2
    assert setup["setup/device"] == "cpu" and setup["setup/backend"] == "gloo" and setup["setup/world_size"] == 2
    assert setup["setup/unscrubbed_sources"], "training on unscrubbed data must be recorded with the run"
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0
    assert (run / "loss_curve.png").stat().st_size > 1000
    (offline,) = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    blob = offline.read_bytes()
    for key in (b"train/loss", b"val/ppl", b"perf/tokens_per_s", b"train/skipped_steps"):
        assert key in blob, key


@pytest.mark.slow
def test_zero1_and_zero2_grad_accumulation_match(tiny_data, tmp_path):
    """fp32: ZeRO-1 micro 8 x accum 1 and ZeRO-2 micro 4 x accum 2 see the same data, same losses."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(write_config(tmp_path / "a.yaml", tiny_data, a),
              ["deepspeed.zero_stage=1", "train.precision=fp32", "train.micro_batch_size=8", "train.grad_accum_steps=1"])
    run_train(write_config(tmp_path / "b.yaml", tiny_data, b),
              ["deepspeed.zero_stage=2", "train.precision=fp32", "train.micro_batch_size=4", "train.grad_accum_steps=2"])
    assert_loss_falls(a)
    assert_loss_falls(b)
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 20
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 2e-4, list(zip(la, lb, strict=True))
    assert metrics(a, "train")[-1]["train/tokens_seen"] == metrics(b, "train")[-1]["train/tokens_seen"] == 20 * 2 * 8 * 64


@pytest.mark.slow
def test_zero3_partitions_parameters(tiny_data, tmp_path):
    run = tmp_path / "run"
    run_train(write_config(tmp_path / "c.yaml", tiny_data, run),
              ["deepspeed.zero_stage=3", "train.precision=bf16", "deepspeed.stage3_param_persistence_threshold=0",
               "train.eval_every=10"])
    assert_loss_falls(run)
    evals = metrics(run, "eval")  # forwards through gathered parameters on both ranks
    assert [e["step"] for e in evals] == [10, 20] and evals[1]["val/loss"] < evals[0]["val/loss"]
    setup = metrics(run, "setup")[0]
    total, per_rank = setup["setup/params"], setup["setup/param_numel_per_rank"]
    assert len(per_rank) == 2
    for n in per_rank:
        assert abs(n - total / 2) <= 0.02 * total, (n, total)


# --------------------------------------------------------------------------------------------
# Stopping: signals and non-finite steps
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_finishes_step_saves_and_exits_zero(tiny_data, tmp_path):
    """SIGTERM to one rank only: both ranks agree to stop after the step, save, exit 0."""
    import psutil

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    p = subprocess.Popen(
        command(cfg, ["deepspeed.zero_stage=2", "train.max_steps=100000", "checkpoint.save_on_exit=true"], 2),
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and len(metrics(run, "train")) < 3:
            assert p.poll() is None, p.stdout.read()[-4000:]
            time.sleep(0.5)
        workers = [c for c in psutil.Process(p.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-4000:]
    assert "stop signal" in out
    last = metrics(run, "train")[-1]["step"]
    assert 3 <= last < 100000
    from pretrain.checkpoint import find_latest_complete

    latest = find_latest_complete(run / "checkpoints")
    assert latest is not None and latest.name.endswith(f"{last:08d}")


@pytest.mark.slow
def test_nonfinite_in_a_row_saves_and_stops_nonzero(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    p = run_train(cfg, ["deepspeed.zero_stage=1", "train.precision=bf16", "train.max_nonfinite_in_a_row=2",
                        "checkpoint.save_on_exit=true"], nproc=1, env={"PRETRAIN_INJECT_NAN_STEPS": "3,4"}, ok=False)
    assert p.returncode == 3, p.stderr[-4000:]
    assert "2 non-finite steps in a row" in p.stderr
    rows = metrics(run, "train")
    assert rows[-1]["step"] == 4 and rows[-1]["train/skipped_steps"] == 2
    from pretrain.checkpoint import find_latest_complete

    assert find_latest_complete(run / "checkpoints").name.endswith("00000004")


@pytest.mark.slow
def test_resume_continues_exactly_and_in_the_same_wandb_run(tiny_data, tmp_path):
    """Stop at 6 + resume to 10 equals 10 uninterrupted steps (fp32), and wandb continues one run.

    Checks the loop's side of exact resume: the loader state saved is the one after the last batch
    the loop consumed, not after the batches the prefetch thread had already read.
    """
    run, ref = tmp_path / "run", tmp_path / "ref"
    common = ["deepspeed.zero_stage=1", "train.precision=fp32", "optim.schedule=constant", "wandb.mode=offline",
              "checkpoint.every_steps=3", "checkpoint.save_on_exit=true"]
    env = {"WANDB_MODE": "offline"}
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    run_train(cfg, [*common, "train.max_steps=6"], nproc=1, env=env)
    p = run_train(cfg, [*common, "train.max_steps=10"], nproc=1, env=env)
    assert "resumed at step 6" in p.stderr
    assert [r["step"] for r in metrics(run, "train")] == list(range(1, 11))
    assert metrics(run, "train")[-1]["train/tokens_seen"] == 10 * 4 * 64
    ids = {d.name.rsplit("-", 1)[-1] for d in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, ids

    run_train(write_config(tmp_path / "r.yaml", tiny_data, ref), [*common, "train.max_steps=10", "wandb.mode=disabled"],
              nproc=1)
    assert losses(run) == pytest.approx(losses(ref), abs=1e-6)


# --------------------------------------------------------------------------------------------
# Limits, edge cases, progress bar
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_time_budget_on_step_1_then_max_tokens_then_resume_at_max_steps_and_max_steps_0(tiny_data, tmp_path):
    """One process, three attempts on one run dir: every stop condition saves, and an attempt that
    resumes exactly at max_steps trains nothing, keeps the checkpoint and exits 0."""
    from pretrain.checkpoint import MARKER, find_latest_complete

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    common = ["deepspeed.zero_stage=1", "checkpoint.save_on_exit=true"]
    # 1 s is less than torch + DeepSpeed take to start: the budget counts set-up, so one step runs.
    p = run_train(cfg, [*common, "train.max_time_s=1"], nproc=1)
    assert "stopping at step 1: reached train.max_time_s" in p.stderr
    assert [r["step"] for r in metrics(run, "train")] == [1]
    assert find_latest_complete(run / "checkpoints").name == "step_00000001"

    p = run_train(cfg, [*common, f"train.max_tokens={3 * 4 * 64}"], nproc=1)  # 4 x 64 tokens per step
    assert "stopping at step 3: reached train.max_tokens=768" in p.stderr
    step3 = find_latest_complete(run / "checkpoints")
    assert step3.name == "step_00000003"
    marker = (step3 / MARKER).read_text()

    p = run_train(cfg, [*common, "train.max_steps=3"], nproc=1)
    assert "resumed at step 3" in p.stderr and "stopping at step 3: reached train.max_steps=3" in p.stderr
    assert [r["step"] for r in metrics(run, "train")] == [1, 2, 3]
    assert (step3 / MARKER).read_text() == marker  # not rewritten

    empty = tmp_path / "empty"
    p = run_train(write_config(tmp_path / "e.yaml", tiny_data, empty), [*common, "train.max_steps=0"], nproc=1)
    assert "stopping at step 0: reached train.max_steps=0" in p.stderr
    assert metrics(empty, "train") == [] and find_latest_complete(empty / "checkpoints") is None


def test_progress_bar_shows_throughput_between_metric_logs():
    """Steps between logs still show tokens/s and MFU on the bar (with the last loss read: reading
    the current one would wait for the device); metrics only when the loop read the step stats."""
    from types import SimpleNamespace

    from pretrain.monitor import Throughput
    from pretrain.stepstats import StepReport
    from pretrain.trainer import _log_step

    bar, logged = [], []
    monitor = SimpleNamespace(progress=lambda *a: bar.append(a), log_train=lambda *a: logged.append(a))
    session = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(log_every=10)), engine=None, info=None)
    meter = Throughput(flops_per_token=1e6, peak_flops=1e10, world_size=1)
    for step in (1, 2, 3):
        meter.update(global_tokens=1000, step_time=0.5, wait_time=0.0)
        state = SimpleNamespace(step=step, tokens_seen=1000 * step, skipped_steps=0)
        _log_step(session, monitor, meter, state, None, None, bar_loss=None)
    assert [(b[0], b[1], b[2], b[3]) for b in bar] == [(s, None, pytest.approx(2000.0), pytest.approx(0.2)) for s in (1, 2, 3)]
    assert logged == []  # metrics only every log_every steps
    report = StepReport(loss=2.5, grad_norm=1.0, skipped_steps=0, nonfinite_in_a_row=0, longest_nonfinite_run=0,
                        applied_nonfinite=0)
    session.engine = SimpleNamespace(fp16_enabled=lambda: False)
    session.info = SimpleNamespace(device="cpu")
    _log_step(session, monitor, meter, SimpleNamespace(step=10, tokens_seen=10_000, skipped_steps=0), report, 1e-3,
              bar_loss=report.loss)
    assert bar[-1][1] == 2.5 and logged[0][0] == 10 and logged[0][1]["train/loss"] == 2.5


@pytest.mark.slow
def test_signal_during_a_save_stops_there(tiny_data, tmp_path):
    """SIGTERM that lands while step 2's checkpoint is written: stop at step 2 (its checkpoint is
    current), not one more step and a second save inside the preemption grace period."""
    import sys

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    script = f"""
import os, signal, sys
import pretrain.checkpoint as ck
real_save = ck.Checkpointer.save
def save(self, state, loader_state):
    out = real_save(self, state, loader_state)
    if state.step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return out
ck.Checkpointer.save = save
from pretrain.__main__ import main
sys.exit(main(["train", {str(cfg)!r}, "checkpoint.every_steps=2", "checkpoint.save_on_exit=true"]))
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "stopping at step 2: stop signal (SIGTERM/SIGUSR1) during evaluation or a save" in p.stderr
    assert metrics(run, "train")[-1]["step"] == 2
    from pretrain.checkpoint import list_checkpoints

    assert [p.name for _, p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]
