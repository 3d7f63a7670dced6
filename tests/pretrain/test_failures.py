"""Failures a cluster throws at a run, through the real command (torchrun, 2 ranks, gloo, CPU):
a second job on a live run directory, a job whose lease is taken over while it stalls, a SIGKILLed
launcher, a stopped rank, a full disk in a save."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _trainer_helpers import (
    REPO,
    TIMEOUT,
    command,
    metrics,
    run_train,
    tiny_data_fixture,  # noqa: F401 - registers the tiny_data fixture
    write_config,
)

from pretrain.checkpoint import find_latest_complete, list_checkpoints
from pretrain.checkpoint.format import read_latest_pointer
from pretrain.errors import EXIT_DISK_FULL, EXIT_LEASE_LOST, UserError
from pretrain.faults import FAULT_ENV
from pretrain.hang import EXIT_HANG, stack_file
from pretrain.run_lease import RunLease, holder_of, pid_alive

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(cfg, overrides, nproc=2, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(cfg, overrides, nproc), cwd=REPO, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(p: subprocess.Popen, cond, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if p.poll() is not None:
            pytest.fail(f"job ended (status {p.returncode}) before {what}:\n{p.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _workers(p: subprocess.Popen) -> list:
    """The launcher's descendants: the training ranks and their DataLoader workers."""
    import psutil

    return psutil.Process(p.pid).children(recursive=True)


def _rank(workers: list, rank: int):
    (w,) = [c for c in workers if c.environ().get("RANK") == str(rank) and c.environ().get("LOCAL_RANK") is not None
            and c.ppid() not in {x.pid for x in workers}]
    return w


def _steps(run) -> list[int]:
    return [r["step"] for r in metrics(run, "train")]


def _stop(p: subprocess.Popen, extra: list[int] = ()) -> None:
    for pid in extra:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_second_job_on_a_live_run_dir_exits_2_and_changes_nothing(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    first = _start(cfg, ["train.max_steps=100000", "checkpoint.every_steps=0", "checkpoint.save_on_exit=true"])
    try:
        _wait_for(first, lambda: len(metrics(run, "train")) >= 2, "the first job's step 2")
        config_before = (run / "config.yaml").read_bytes(), (run / "config.yaml").stat().st_mtime_ns
        files_before = sorted(p.name for p in run.iterdir())

        t0 = time.monotonic()
        second = run_train(cfg, ["train.max_steps=100000"], nproc=2, ok=False)  # torchrun, 2 ranks
        took = time.monotonic() - t0
        out = second.stdout + second.stderr
        assert second.returncode != 0 and len(re.findall(r"exitcode\s*:\s*2 \(pid", out)) == 2, out[-4000:]
        assert f"run.dir {run} is in use by another job (host " in out and f"pid {first.pid}" not in out
        assert re.search(r"pid \d+, no SLURM job, last heartbeat \d+ s ago", out), out[-3000:]
        assert "global rank 0 could not take the run directory's lease" in out
        single = run_train(cfg, [], nproc=1, ok=False)  # plain python: the status is the job's
        assert single.returncode == 2 and "is in use by another job" in single.stderr, single.stderr[-3000:]
        print(f"second job (torchrun, 2 ranks) exited after {took:.1f} s")
        assert ((run / "config.yaml").read_bytes(), (run / "config.yaml").stat().st_mtime_ns) == config_before
        assert sorted(p.name for p in run.iterdir()) == files_before
        assert first.poll() is None

        rank1 = _rank(_workers(first), 1)
        rank1.send_signal(signal.SIGTERM)  # stop the first job cleanly: it saves and exits 0
        out, _ = first.communicate(timeout=TIMEOUT)
    finally:
        _stop(first)
    assert first.returncode == 0, out[-4000:]
    steps = _steps(run)
    assert steps == list(range(1, len(steps) + 1))  # metrics.jsonl intact: one row per step, in order
    assert holder_of(run) is None  # released on the way out
    assert find_latest_complete(run / "checkpoints").name == f"step_{steps[-1]:08d}"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime_ns) by relative path."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _take_over_when_stale(run: Path, job: subprocess.Popen) -> RunLease:
    """Another job's view: retry until the stalled holder's heartbeat is older than run.lease_stale_s."""
    while True:
        try:
            return RunLease.acquire(run, heartbeat_s=0.5, stale_s=2, start_heartbeat=False)
        except UserError as e:
            assert "is in use by another job" in str(e), str(e)
            assert job.poll() is None, job.stdout.read()[-4000:]
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("stall", ["step@4%0", "before_marker@4%0"], ids=["between_steps", "saving"])
def test_a_job_whose_lease_is_taken_over_stops_every_rank_and_writes_nothing_more(tiny_data, tmp_path, stall):
    """Rank 0 (the lease's holder) stalls, between two steps or in a save right before the marker;
    meanwhile another job takes the stale lease over. On waking, every rank exits EXIT_LEASE_LOST
    with one line naming the new owner, and nothing in the run directory changes after the takeover:
    no metrics line, no checkpoint marked, moved or saved on exit, no wandb files, no loss curve."""
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    every = 4 if stall.startswith("before_marker") else 0
    job = _start(cfg, ["train.max_steps=100000", f"checkpoint.every_steps={every}", "checkpoint.save_on_exit=true",
                       "wandb.mode=offline", "run.lease_heartbeat_s=0.5", "run.lease_stale_s=2"],
                 env={FAULT_ENV: f"{stall}:stop", "WANDB_SILENT": "true"})
    rank0 = None
    try:
        _wait_for(job, lambda: len(_steps(run)) >= 4, "step 4")
        rank0 = _rank(_workers(job), 0)
        _wait_for(job, lambda: rank0.status() == "stopped", "rank 0 to stall")
        successor = _take_over_when_stale(run, job)
        before = _tree(run)
        rank0.send_signal(signal.SIGCONT)
        out, _ = job.communicate(timeout=TIMEOUT)
    finally:
        _stop(job, [rank0.pid] if rank0 else [])
    assert job.returncode != 0 and len(re.findall(rf"exitcode\s*:\s*{EXIT_LEASE_LOST} \(pid", out)) == 2, out[-4000:]
    owner = f"generation 2: host {socket.gethostname()}, pid {os.getpid()}, no SLURM job"
    lines = [line for line in out.splitlines() if "lost the directory's lease" in line]
    assert len(lines) == 2 and all(f"error: run.dir {run}: this job lost the directory's lease to another job "
                                   f"({owner}" in line for line in lines), out[-4000:]
    assert _tree(run) == before, "the dispossessed job wrote into the run directory"
    assert _steps(run)[-1] == 4 and holder_of(run).token == successor.holder.token
    assert find_latest_complete(run / "checkpoints") is None  # the save in flight was never marked complete


@pytest.mark.slow
def test_sigkill_of_torchrun_ends_its_workers_and_the_restart_resumes(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    common = ["checkpoint.every_steps=2", "checkpoint.save_on_exit=false", "data.num_workers=1"]
    job = _start(cfg, [*common, "train.max_steps=100000"])
    pids: list[int] = []
    try:
        _wait_for(job, lambda: find_latest_complete(run / "checkpoints") is not None and len(_steps(run)) >= 4,
                  "a complete checkpoint")
        workers = _workers(job)
        pids = [w.pid for w in workers]
        assert len(pids) == 4, [w.cmdline() for w in workers]  # 2 ranks + a DataLoader worker each
        job.send_signal(signal.SIGKILL)  # torchrun alone, like the OOM killer
        job.wait()
        deadline = time.monotonic() + 60
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in pids if pid_alive(p)], "orphaned workers survived their launcher"
        print(f"all {len(pids)} worker processes gone {60 - (deadline - time.monotonic()):.1f} s after SIGKILL of torchrun")
    finally:
        _stop(job, pids)
    assert holder_of(run) is not None  # SIGKILL: nobody released it; the restart takes it over
    resume_at = int(find_latest_complete(run / "checkpoints").name.split("_")[1])
    p = run_train(cfg, [*common, f"train.max_steps={resume_at + 3}"])
    assert "taking over a stale lease" in p.stderr and "is gone" in p.stderr
    assert f"resumed at step {resume_at}" in p.stderr
    assert f"stopping at step {resume_at + 3}" in p.stderr


@pytest.mark.slow
def test_a_stopped_rank_makes_the_other_write_its_stacks_and_exit(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    hang_timeout = 10
    run_train(cfg, ["train.max_steps=3", "checkpoint.save_on_exit=true"])  # the last complete checkpoint
    job = _start(cfg, ["train.max_steps=100000", "checkpoint.save_on_exit=true", f"train.hang_timeout_s={hang_timeout}"])
    rank1 = None
    try:
        _wait_for(job, lambda: len(_steps(run)) >= 5, "step 5")  # no saves and no evaluation from here
        rank1 = _rank(_workers(job), 1)
        rank1.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        out, _ = job.communicate(timeout=hang_timeout + 60)
        took = time.monotonic() - t0
    finally:
        _stop(job, [rank1.pid] if rank1 else [])
    assert job.returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_HANG} \(pid", out), out[-4000:]
    print(f"job with a stopped rank exited {took:.1f} s after SIGSTOP (train.hang_timeout_s={hang_timeout})")
    assert took < hang_timeout + 60
    stacks = stack_file(run, 0).read_text()
    assert "no optimizer step completed" in stacks
    # Where the main thread waits: in a collective of the loop, inside the step (gradient reduction),
    # at a logging step's read of the step statistics, or at the late agreement of stop requests:
    # whichever collective the stopped rank left unmatched.
    main = next(block for block in stacks.split("\n\n") if "in _train" in block)
    assert any(where in main for where in ("train_step", "_read_stats", "in exchange")), main
    assert stacks.count("hread 0x") >= 2  # all threads, not only the watchdog's
    assert not stack_file(run, 1).exists()
    assert "no stack file from ranks [1]" in out, out[-4000:]
    assert find_latest_complete(run / "checkpoints").name == "step_00000003"  # nothing saved by the hang
    assert holder_of(run) is None  # the hang exit released the lease: the rerun below is not blocked

    p = run_train(cfg, ["train.max_steps=5", "checkpoint.save_on_exit=true"])
    assert "resumed at step 3" in p.stderr and "stopping at step 5" in p.stderr


def _losses_by_step(run) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run, "train")}  # a resumed run's rows win


@pytest.mark.slow
def test_a_full_disk_during_a_save_fails_every_rank_and_the_rerun_resumes_exactly(tiny_data, tmp_path):
    """ENOSPC on rank 1 before the marker, then on rank 0 at the marker: every rank exits with
    EXIT_DISK_FULL and one message, step 2 stays the newest; the rerun matches an uninterrupted run."""
    common = ["train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.save_on_exit=true"]
    ref = tmp_path / "ref"
    run_train(write_config(tmp_path / "ref.yaml", tiny_data, ref), common)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    ckpts = run / "checkpoints"
    for fault in ("after_engine@4%1:enospc", "before_marker@4%0:enospc"):
        p = run_train(cfg, common, env={FAULT_ENV: fault}, ok=False)  # would hang past TIMEOUT without the fix
        out = p.stdout + p.stderr
        assert p.returncode != 0 and len(re.findall(rf"exitcode\s*:\s*{EXIT_DISK_FULL} \(pid", out)) == 2, out[-4000:]
        failing_rank = fault.split("%")[1][0]
        msg = ("error: checkpoint save of step 4 failed while writing" if failing_rank == "1"
               else "error: checkpoint save of step 4 failed while marking complete")
        assert out.count(msg) == 2, out[-4000:]  # the same one-line message from both ranks
        assert f"no space left on device in {ckpts} (checkpoint.dir) [rank {failing_rank}: OSError" in out
        assert f"rerun the same command: it resumes from {ckpts / 'step_00000002'}" in out
        assert [s for s, _ in list_checkpoints(ckpts)] == [2] and read_latest_pointer(ckpts) == "step_00000002"
        assert holder_of(run) is None  # released: the rerun is not blocked
    p = run_train(cfg, common)  # space freed: the same command
    assert "resumed at step 2" in p.stderr and "stopping at step 6" in p.stderr
    assert _losses_by_step(run) == _losses_by_step(ref)
    assert find_latest_complete(ckpts).name == "step_00000006"
