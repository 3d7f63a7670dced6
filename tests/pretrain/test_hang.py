"""The hang watchdog: armed by the first step, paused for evaluation/saves, stacks + exit 4."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pretrain.hang import EXIT_HANG, HangWatchdog, reported_ranks, stack_file
from pretrain.run_lease import RunLease, holder_of

REPO = Path(__file__).resolve().parents[2]


def _watchdog(tmp_path, fired: list, timeout_s: float = 0.3) -> HangWatchdog:
    return HangWatchdog(timeout_s, tmp_path, rank=1, world_size=2, grace_s=0, exit=fired.append).start()


def test_not_armed_before_the_first_step_and_paused_during_saves(tmp_path):
    fired: list = []
    w = _watchdog(tmp_path, fired)
    time.sleep(1.0)  # start-up / first step / compilation: not counted
    assert fired == []
    w.beat()
    with w.paused():  # a long save
        time.sleep(1.0)
    assert fired == []
    deadline = time.monotonic() + 10
    while not fired and time.monotonic() < deadline:  # no beat after the save: it fires
        time.sleep(0.05)
    assert fired == [EXIT_HANG]
    assert "no optimizer step completed" in stack_file(tmp_path, 1).read_text()


def test_beats_keep_it_quiet(tmp_path):
    fired: list = []
    w = _watchdog(tmp_path, fired)
    for _ in range(20):
        w.beat()
        time.sleep(0.05)
    w.stop()
    assert fired == [] and not (tmp_path / "hang").exists()


def test_timeout_zero_is_off(tmp_path):
    w = HangWatchdog(0, tmp_path, 0, 1, exit=lambda code: None).start()
    assert w._thread is None


def test_fires_in_a_stuck_process_with_all_stacks_and_exit_4(tmp_path):
    """A main thread stuck in a wait: the stack file names where it is stuck; rank 0 names the
    rank that wrote no stack file; the process exits 4."""
    script = f"""
import logging, threading, time
from pretrain.hang import HangWatchdog
logging.basicConfig(level=logging.INFO)
w = HangWatchdog(0.5, {str(tmp_path)!r}, rank=0, world_size=3, grace_s=1).start()
w.beat()
def stuck_in_a_collective():
    threading.Event().wait()
stuck_in_a_collective()
"""
    os.makedirs(tmp_path / "hang")
    stack_file(tmp_path, 2).write_text("rank 2 reported")  # another rank's report, written now
    old = stack_file(tmp_path, 1)
    old.write_text("from an earlier hang")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_HANG, p.stderr
    stacks = stack_file(tmp_path, 0).read_text()
    assert "stuck_in_a_collective" in stacks and "hang-watchdog" not in stacks.split("\n")[0]
    assert "Thread" in stacks
    assert "stack files in" in p.stderr and "from ranks [0, 2]; no stack file from ranks [1]" in p.stderr


def test_reported_ranks_counts_only_fresh_files(tmp_path):
    os.makedirs(tmp_path / "hang")
    stack_file(tmp_path, 0).write_text("x")
    assert reported_ranks(tmp_path, 2, since=time.time() - 60) == ([0], [1])
    assert reported_ranks(tmp_path, 2, since=time.time() + 60) == ([], [0, 1])


def test_a_hang_exit_releases_the_run_directory_lease(tmp_path):
    """The trainer passes ``on_fire=lease.release``: the requeued job must not wait for the lease."""
    lease = RunLease.acquire(tmp_path, heartbeat_s=10, stale_s=60, start_heartbeat=False)
    fired: list = []
    HangWatchdog(0.3, tmp_path, rank=0, world_size=1, grace_s=0, on_fire=lease.release, exit=fired.append).fire(1.0)
    assert fired == [EXIT_HANG] and holder_of(tmp_path) is None
