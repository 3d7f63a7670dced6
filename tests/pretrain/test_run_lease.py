"""The run-directory lease: atomic create, stale rules, takeover, the holder's message, release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pretrain.errors import UserError
from pretrain.run_lease import LEASE_NAME, Holder, RunLease, read_holder, stale_reason


def _write_lease(d, **over) -> Holder:
    now = time.time()
    h = Holder(**{**dict(host="othernode", pid=4242, job_id="777", started=now - 50, heartbeat=now - 5,
                         token="t-other"), **over})
    d.mkdir(parents=True, exist_ok=True)
    (d / LEASE_NAME).write_text(json.dumps(h.__dict__))
    return h


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


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


def test_acquire_release_and_heartbeat(tmp_path):
    d = tmp_path / "run"
    lease = RunLease.acquire(d, heartbeat_s=0.05, stale_s=5)
    held = read_holder(d / LEASE_NAME)
    assert held.pid == os.getpid() and held.token == lease.holder.token
    first = held.heartbeat
    time.sleep(0.3)
    assert read_holder(d / LEASE_NAME).heartbeat > first  # the daemon thread refreshes it
    lease.release()
    assert not (d / LEASE_NAME).exists()
    assert sorted(p.name for p in d.iterdir()) == []  # no temporary files left behind
    lease.release()  # idempotent


def test_live_holder_is_named_and_nothing_changes(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    first = RunLease.acquire(d, heartbeat_s=30, stale_s=60, start_heartbeat=False)
    assert first.holder.job_id == "123"
    before = (d / LEASE_NAME).read_bytes()
    with pytest.raises(UserError) as e:
        RunLease.acquire(d, heartbeat_s=30, stale_s=60)
    msg = str(e.value)
    for part in (f"run.dir {d} is in use", f"pid {os.getpid()}", "SLURM job 123", "last heartbeat 0 s ago",
                 "60 s without a heartbeat"):
        assert part in msg, msg
    assert (d / LEASE_NAME).read_bytes() == before and [p.name for p in d.iterdir()] == [LEASE_NAME]
    first.release()


def test_live_lease_from_another_host_blocks(tmp_path):
    d = tmp_path / "run"
    _write_lease(d, host="othernode", pid=_dead_pid())  # its pid means nothing on this host
    with pytest.raises(UserError, match="host othernode, pid .*SLURM job 777, last heartbeat 5 s ago"):
        RunLease.acquire(d, heartbeat_s=10, stale_s=60)


@pytest.mark.parametrize("case", ["dead_pid_same_host", "old_heartbeat_other_host", "unreadable"])
def test_stale_lease_is_taken_over_with_a_warning(tmp_path, caplog, case):
    import socket

    d = tmp_path / "run"
    if case == "dead_pid_same_host":
        _write_lease(d, host=socket.gethostname(), pid=_dead_pid())
    elif case == "old_heartbeat_other_host":
        _write_lease(d, heartbeat=time.time() - 500)
    else:
        d.mkdir()
        (d / LEASE_NAME).write_text("{torn")
    with caplog.at_level("WARNING"):
        lease = RunLease.acquire(d, heartbeat_s=10, stale_s=60, start_heartbeat=False)
    assert read_holder(d / LEASE_NAME).token == lease.holder.token
    assert "taking over a stale lease" in caplog.text
    lease.release()


def test_a_taken_over_lease_is_not_refreshed_or_released_by_its_old_holder(tmp_path):
    d = tmp_path / "run"
    old = RunLease.acquire(d, heartbeat_s=10, stale_s=60, start_heartbeat=False)
    new = _write_lease(d, token="t-new")  # a successor took it over
    assert old.beat() is False
    old.release()
    assert read_holder(d / LEASE_NAME) == new


def test_concurrent_acquires_one_winner(tmp_path):
    """Threads racing on a stale lease: exactly one takes it, the rest see a live holder."""
    d = tmp_path / "run"
    _write_lease(d, heartbeat=time.time() - 500)
    won, lost = [], []
    barrier = threading.Barrier(6)

    def contend():
        barrier.wait()
        try:
            won.append(RunLease.acquire(d, heartbeat_s=10, stale_s=60, start_heartbeat=False))
        except UserError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5, (won, lost)
    assert read_holder(d / LEASE_NAME).token == won[0].holder.token


def test_stale_must_exceed_heartbeat(tmp_path):
    with pytest.raises(UserError, match="stale_s=5 must be larger than heartbeat_s=10"):
        RunLease.acquire(tmp_path, heartbeat_s=10, stale_s=5)
    from pretrain.config import load_config

    with pytest.raises(UserError, match=r"run.lease_stale_s \(5.0\) must exceed run.lease_heartbeat_s"):
        load_config(None, ["run.lease_stale_s=5", "run.lease_heartbeat_s=10"])


def test_breaking_a_stale_lease_that_was_already_replaced_puts_the_new_one_back(tmp_path):
    """Contender A judged lease S stale; before A moved it aside, B had replaced S by its own
    lease N. A must not break N."""
    d = tmp_path / "run"
    stale = _write_lease(d, heartbeat=time.time() - 500, token="t-stale")
    fresh = _write_lease(d, token="t-fresh")  # B took over first
    a = RunLease(d, Holder.current(), heartbeat_s=10)
    assert a._break(stale) is False
    assert read_holder(d / LEASE_NAME) == fresh and [p.name for p in d.iterdir()] == [LEASE_NAME]
