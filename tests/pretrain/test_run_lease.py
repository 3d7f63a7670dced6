"""The run-directory lease: generations, stale rules, takeover, the holder's message, release, loss.

The races of the old single-file protocol are replayed deterministically: a contender runs inside
``run_lease.protocol_step``, the fault point between two steps of the protocol, so each
interleaving happens exactly as written, every time. The stress test races forked processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pretrain.run_lease as run_lease
from pretrain.errors import EXIT_LEASE_LOST, LeaseLostError, UserError
from pretrain.run_lease import (
    LEASE_NAME,
    Holder,
    RunLease,
    generation_file,
    generations,
    holder_of,
    legacy_file,
    read_holder,
    stale_reason,
)

REPO = Path(__file__).resolve().parents[2]
OTHER = dict(host="othernode", pid=4242, job_id="777")  # a job on another host: only its heartbeat counts


def _record(**over) -> Holder:
    now = time.time()
    return Holder(**{**OTHER, "started": now - 50, "heartbeat": now - 5, "token": "t-other", **over})


def _plant(d: Path, generation: int, **over) -> Holder:
    """Write generation ``generation`` of d's lease as another job would have."""
    h = _record(**over)
    (d / LEASE_NAME).mkdir(parents=True, exist_ok=True)
    generation_file(d / LEASE_NAME, generation).write_text(json.dumps(h.__dict__))
    return h


def _stall(lease: RunLease) -> None:
    """Make ``lease``'s holder look stalled: its heartbeat 500 s old, as after a long SIGSTOP."""
    generation_file(lease.lease_dir, lease.generation).write_text(
        json.dumps({**lease.holder.__dict__, "heartbeat": time.time() - 500}))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _hook_once(monkeypatch, step: str, action) -> list:
    """Run ``action(lease)`` the first time the protocol reaches ``step``; returns the leases that reached it."""
    reached: list = []

    def hook(name: str, lease: RunLease) -> None:
        if name == step and not reached:
            reached.append(lease)
            action(lease)

    monkeypatch.setattr(run_lease, "protocol_step", hook)
    return reached


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_stale_rules():
    now = 1000.0
    h = Holder("a", 10, None, 0.0, now - 5, "t")
    assert stale_reason(h, now, 60, host="a", alive=lambda pid: True) is None
    assert "gone" in stale_reason(h, now, 60, host="a", alive=lambda pid: False)
    # Another host's pid means nothing here: only the heartbeat's age counts.
    assert stale_reason(h, now, 60, host="b", alive=lambda pid: False) is None
    old = Holder("a", 10, None, 0.0, now - 61, "t")
    assert "61 s old" in stale_reason(old, now, 60, host="b", alive=lambda pid: True)
    assert "61 s old" in stale_reason(old, now, 60, host="a", alive=lambda pid: True)  # a reused pid


def test_acquire_heartbeat_release_and_the_next_generation(tmp_path):
    d = tmp_path / "run"
    lease = RunLease.acquire(d, heartbeat_s=0.05, stale_s=5)
    assert lease.generation == 1 and holder_of(d).token == lease.holder.token
    first = read_holder(lease.path).heartbeat
    deadline = time.monotonic() + 30
    while read_holder(lease.path).heartbeat == first:  # the daemon thread refreshes it
        assert time.monotonic() < deadline, "no heartbeat written"
        time.sleep(0.01)
    lease.release()
    assert holder_of(d) is None and read_holder(lease.path).released  # the file stays: generations only grow
    lease.release()  # idempotent
    again = RunLease.acquire(d, heartbeat_s=10, stale_s=60, start_heartbeat=False)
    assert again.generation == 2 and holder_of(d).token == again.holder.token
    assert _files(d) == [LEASE_NAME, f"{LEASE_NAME}/gen-000002"]  # the older one removed, no temporary files


def test_live_holder_is_named_and_nothing_changes(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    first = RunLease.acquire(d, heartbeat_s=30, stale_s=60, start_heartbeat=False)
    assert first.holder.job_id == "123"
    before = first.path.read_bytes()
    with pytest.raises(UserError) as e:
        RunLease.acquire(d, heartbeat_s=30, stale_s=60)
    msg = str(e.value)
    for part in (f"run.dir {d} is in use", f"pid {os.getpid()}", "SLURM job 123", "last heartbeat 0 s ago",
                 "60 s without a heartbeat", str(first.path)):
        assert part in msg, msg
    assert first.path.read_bytes() == before and _files(d) == [LEASE_NAME, f"{LEASE_NAME}/gen-000001"]
    first.release()


def test_live_lease_from_another_host_blocks(tmp_path):
    d = tmp_path / "run"
    _plant(d, 7, pid=_dead_pid())  # its pid means nothing on this host
    with pytest.raises(UserError, match="host othernode, pid .*SLURM job 777, last heartbeat 5 s ago"):
        RunLease.acquire(d, heartbeat_s=10, stale_s=60)
    assert generations(d / LEASE_NAME) == [7]


@pytest.mark.parametrize("case", ["dead_pid_same_host", "old_heartbeat_other_host", "unreadable"])
def test_stale_lease_is_taken_over_with_a_warning_naming_the_old_holder(tmp_path, caplog, case):
    d = tmp_path / "run"
    if case == "dead_pid_same_host":
        _plant(d, 3, host=socket.gethostname(), pid=_dead_pid())
        expect = ["is gone"]
    elif case == "old_heartbeat_other_host":
        _plant(d, 3, heartbeat=time.time() - 500)
        expect = ["host othernode, pid 4242, SLURM job 777", "heartbeat is 500 s old (more than 60 s)"]
    else:
        (d / LEASE_NAME).mkdir(parents=True)
        generation_file(d / LEASE_NAME, 3).write_text("{torn")
        expect = ["host ?"]
    _plant(d, 1, heartbeat=0.0)  # an older generation left behind: garbage once a newer one is taken
    with caplog.at_level("WARNING"):
        lease = RunLease.acquire(d, heartbeat_s=10, stale_s=60, start_heartbeat=False)
    assert lease.generation == 4 and holder_of(d).token == lease.holder.token
    assert generations(d / LEASE_NAME) == [4]
    assert "taking over a stale lease" in caplog.text
    for part in expect:
        assert part in caplog.text, caplog.text
    lease.release()


def test_a_lease_file_of_the_previous_release_is_generation_0(tmp_path, caplog):
    d = tmp_path / "run"
    d.mkdir()
    old = legacy_file(d)
    assert old.name == ".lease.json"
    old.write_text(json.dumps(_record().__dict__))  # a live job of the previous release
    with pytest.raises(UserError, match=rf"in use by another job \(host othernode.*it holds {old}"):
        RunLease.acquire(d, heartbeat_s=10, stale_s=60)
    old.write_text(json.dumps(_record(heartbeat=time.time() - 500).__dict__))  # that job died
    with caplog.at_level("WARNING"):
        lease = RunLease.acquire(d, heartbeat_s=10, stale_s=60, start_heartbeat=False)
    assert lease.generation == 1 and not old.exists()  # migrated
    assert "taking over a stale lease (host othernode" in caplog.text


def test_stale_must_exceed_heartbeat(tmp_path):
    with pytest.raises(UserError, match="stale_s=5 must be larger than heartbeat_s=10"):
        RunLease.acquire(tmp_path, heartbeat_s=10, stale_s=5)
    from pretrain.config import load_config

    with pytest.raises(UserError, match=r"run.lease_stale_s \(5.0\) must exceed run.lease_heartbeat_s"):
        load_config(None, ["run.lease_stale_s=5", "run.lease_heartbeat_s=10"])


# --------------------------------------------------------------------------------------------
# The three races, replayed step by step
# --------------------------------------------------------------------------------------------


def test_a_contender_that_read_the_stale_lease_does_not_become_a_second_owner(tmp_path, monkeypatch):
    """Two owners: B read the stale lease S; before B acts, A takes S over. B must find A live and
    back off, A must keep the lease (the old protocol moved A's live lease aside here)."""
    d = tmp_path / "run"
    _plant(d, 1, heartbeat=time.time() - 500)  # S: a dead holder
    won = []
    reached = _hook_once(monkeypatch, "read", lambda b: won.append(RunLease.acquire(d, 10, 60, start_heartbeat=False)))
    with pytest.raises(UserError, match=rf"in use by another job \(host {socket.gethostname()}, pid {os.getpid()}"):
        RunLease.acquire(d, 10, 60, start_heartbeat=False)  # B
    (a,) = won
    assert len(reached) == 1 and reached[0] is not a  # the hook ran inside B's acquire
    a.confirm()
    assert holder_of(d).token == a.holder.token and generations(d / LEASE_NAME) == [2]


def test_a_contender_that_creates_below_a_newer_generation_backs_off(tmp_path, monkeypatch):
    """B read generation 1 (stale) long ago. Meanwhile A took it over (2) and released it, and C took
    over (3), removing 1 and 2. B's create of 2 now succeeds: B must see 3 and back off."""
    d = tmp_path / "run"
    _plant(d, 1, heartbeat=time.time() - 500)
    held = []

    def a_then_c(_b):
        RunLease.acquire(d, 10, 60, start_heartbeat=False).release()
        held.append(RunLease.acquire(d, 10, 60, start_heartbeat=False))

    _hook_once(monkeypatch, "read", a_then_c)
    with pytest.raises(UserError, match="in use by another job"):
        RunLease.acquire(d, 10, 60, start_heartbeat=False)  # B
    (c,) = held
    assert c.generation == 3 and generations(d / LEASE_NAME) == [3]  # B's generation 2 removed again
    c.confirm()


def test_a_heartbeat_never_clobbers_a_successor(tmp_path, monkeypatch):
    """The old holder's beat confirmed ownership; before it writes, a successor takes over (the old
    holder had stalled). The write must not touch the successor's lease, and the old holder's next
    check must find itself dispossessed, naming the successor."""
    d = tmp_path / "run"
    old = RunLease.acquire(d, 10, 60, start_heartbeat=False)
    successor = []

    def take_over(_old):
        _stall(old)
        successor.append(RunLease.acquire(d, 10, 60, start_heartbeat=False))

    _hook_once(monkeypatch, "confirmed", take_over)
    old.beat()
    (new,) = successor
    before = new.path.read_bytes()
    assert holder_of(d).token == new.holder.token and new.path.read_bytes() == before
    new.confirm()  # still the owner
    with pytest.raises(LeaseLostError, match=rf"lost the directory's lease to another job \(generation 2: host "
                                             rf"{socket.gethostname()}, pid {os.getpid()}"):
        old.beat()
    assert old.lost is not None and not old.still_ours()
    old.release()  # a lost lease is left alone
    assert holder_of(d).token == new.holder.token and new.path.read_bytes() == before


def test_the_heartbeat_thread_survives_a_failed_beat_and_reports_the_loss(tmp_path, monkeypatch):
    """A failing beat must not end the heartbeat thread (the old one stopped for good and the trainer
    trained on unaware); losing the lease must reach ``on_lost`` with the new owner's name."""
    d = tmp_path / "run"
    beats, lost, beating = [], [], threading.Event()
    reported = threading.Event()

    def hook(name: str, lease: RunLease) -> None:
        if name != "confirmed":
            return
        beats.append(name)
        if len(beats) == 1:
            raise OSError("injected: the filesystem hiccupped")
        if len(beats) == 3:
            beating.set()

    monkeypatch.setattr(run_lease, "protocol_step", hook)
    lease = RunLease.acquire(d, heartbeat_s=0.01, stale_s=60, on_lost=lambda e: (lost.append(e), reported.set()))
    assert beating.wait(60), "the heartbeat thread stopped after a failed beat"
    _plant(d, 2)  # a successor on another host
    assert reported.wait(60), "the loss was not reported"
    (e,) = lost
    assert "lost the directory's lease to another job (generation 2: host othernode, pid 4242, SLURM job 777" in str(e)
    assert lease.lost is e
    lease._thread.join(60)
    assert not lease._thread.is_alive()  # ended because the lease is lost, after reporting it
    with pytest.raises(LeaseLostError):
        lease.confirm()


def test_a_removed_lease_file_counts_as_lost(tmp_path):
    d = tmp_path / "run"
    lease = RunLease.acquire(d, 10, 60, start_heartbeat=False)
    lease.path.unlink()
    with pytest.raises(LeaseLostError, match="was removed or replaced"):
        lease.beat()
    assert not lease.path.exists()  # the beat wrote nothing


# --------------------------------------------------------------------------------------------
# Separate processes
# --------------------------------------------------------------------------------------------


def _die_holding(d: Path) -> None:
    """A forked process takes the lease on ``d`` and dies without releasing it."""
    pid = os.fork()
    if pid == 0:
        try:
            RunLease.acquire(d, 10, 60, start_heartbeat=False)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _racer(dirs: list[Path], start, results) -> None:
    for r, d in enumerate(dirs):
        start.wait()
        try:
            lease = RunLease.acquire(d, 10, 60, start_heartbeat=False)  # held while this process lives
            results.put((r, "won", lease.holder.token))
        except UserError as e:
            results.put((r, "lost", str(e)))
    start.wait()  # alive until the last round is checked: a dead winner's lease is rightly taken over


def test_forked_processes_racing_on_a_dead_holders_lease_leave_exactly_one_owner(tmp_path):
    """300 rounds of 6 processes (fork) racing through RunLease.acquire on a lease whose holder died:
    one owner per round, the one the lease names; the others were told the directory is in use."""
    rounds, racers = 300, 6
    ctx = multiprocessing.get_context("fork")
    dirs = [tmp_path / f"round{r:03d}" for r in range(rounds)]
    start, results = ctx.Barrier(racers + 1), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(dirs, start, results), daemon=True) for _ in range(racers)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    try:
        for r, d in enumerate(dirs):
            _die_holding(d)
            start.wait(timeout=60)
            got = [results.get(timeout=60) for _ in range(racers)]
            assert {g[0] for g in got} == {r}
            winners = [g[2] for g in got if g[1] == "won"]
            losers = [g[2] for g in got if g[1] == "lost"]
            assert len(winners) == 1, f"round {r}: {len(winners)} owners"
            assert holder_of(d).token == winners[0] and generations(d / LEASE_NAME) == [2]
            assert all("is in use by another job" in m for m in losers), losers
        start.wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.join()
    print(f"{rounds} rounds x {racers} processes: {time.monotonic() - t0:.1f} s")


STOPPED_HOLDER = """
import multiprocessing, sys, time
from pretrain.run_lease import RunLease, stop_process

def idle():
    time.sleep(600)

if __name__ == "__main__":
    RunLease.acquire(sys.argv[1], heartbeat_s=0.05, stale_s=60, what="scrub.output", on_lost=stop_process)
    child = multiprocessing.get_context("spawn").Process(target=idle)
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_stop_process_ends_the_job_and_its_children_with_one_line(tmp_path):
    """What the scrub does when it loses its lease: one line naming the new owner, its workers
    killed, exit EXIT_LEASE_LOST."""
    script = tmp_path / "holder.py"
    script.write_text(STOPPED_HOLDER)
    d = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(script), str(d)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child = int(p.stdout.readline())
        _plant(d, 2)  # a successor on another host
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == EXIT_LEASE_LOST, err
    (line,) = err.splitlines()
    assert re.fullmatch(
        rf"error: scrub.output {re.escape(str(d))}: this job lost the directory's lease to another job \(generation 2: "
        rf"host othernode, pid 4242, SLURM job 777, last heartbeat \d+ s ago\); this job's own is generation 1 "
        rf"\(pid {p.pid}\)\. It stopped without writing anything more there\. Do not requeue it: .*", line), line
    deadline = time.monotonic() + 30
    while run_lease.pid_alive(child):
        assert time.monotonic() < deadline, f"worker {child} outlived its job"
        time.sleep(0.05)
