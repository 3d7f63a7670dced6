"""One live job per output directory: a lease file, taken before anything else is written.

Two jobs on one run directory (a double submission, a requeue while the old job still saves, a
restart of a job thought dead) would otherwise both resume from the same checkpoint and write the
same metrics and checkpoints. So a job first creates ``DIR/.lease.json`` atomically; a second job
finds it, and exits 2 naming the holder, unless the holder is stale.

Why a file and not ``flock``: locks are unreliable on the shared filesystems clusters use (NFS,
Lustre). The design assumes only what those guarantee: ``link`` of a new name fails if the name
exists (the create is atomic across hosts), ``rename`` replaces atomically, and the hosts' clocks
agree to well within ``stale_s`` (the heartbeat's age is compared across hosts).

A lease is stale when its holder's process is gone (same host: checked with ``kill(pid, 0)``) or
its heartbeat is older than ``stale_s`` (any host: a crashed node, a killed job, a reused pid).
A stale lease is taken over with a warning, so a restart is never blocked longer than ``stale_s``.

Used by the trainer (global rank 0) and meant for any command with an output directory::

    with RunLease.acquire(run_dir, heartbeat_s=10, stale_s=120, what="run.dir"):
        ...  # the heartbeat thread refreshes the lease; it is released on exit
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.errors import UserError
from pretrain.fileio import fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

LEASE_NAME = ".lease.json"


@dataclass(frozen=True)
class Holder:
    """What a lease file says about the job holding it."""

    host: str
    pid: int
    job_id: str | None  # SLURM_JOB_ID (with the array task when there is one)
    started: float  # unix time the lease was taken
    heartbeat: float  # unix time of the last refresh
    token: str  # unique per acquisition: tells our lease from a successor's

    @staticmethod
    def current(now: float | None = None) -> Holder:
        now = time.time() if now is None else now
        return Holder(socket.gethostname(), os.getpid(), slurm_job_id(), now, now, uuid.uuid4().hex)

    def describe(self, now: float) -> str:
        job = f"SLURM job {self.job_id}" if self.job_id else "no SLURM job"
        return f"host {self.host}, pid {self.pid}, {job}, last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago"


def slurm_job_id() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill() said it exists


def stale_reason(holder: Holder, now: float, stale_s: float, host: str | None = None,
                 alive=pid_alive) -> str | None:
    """Why ``holder`` no longer holds its lease, or None while it may still be running."""
    host = socket.gethostname() if host is None else host
    age = now - holder.heartbeat
    if holder.host == host and not alive(holder.pid):
        return f"its process {holder.pid} on this host ({host}) is gone"
    if age > stale_s:
        return f"its last heartbeat is {age:.0f} s old (more than {stale_s:g} s)"
    return None


def read_holder(path: Path) -> Holder | None:
    """The lease at ``path``; None when there is none. A torn or foreign file reads as a holder
    with heartbeat 0 (stale), so garbage never blocks a run forever."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw)
        return Holder(str(d["host"]), int(d["pid"]), d.get("job_id"), float(d["started"]), float(d["heartbeat"]),
                      str(d["token"]))
    except (ValueError, KeyError, TypeError):
        return Holder("?", -1, None, 0.0, 0.0, f"unreadable:{raw[:32]!r}")


class RunLease:
    """A held lease on a directory; refreshes its heartbeat from a daemon thread until released."""

    def __init__(self, directory: Path, holder: Holder, heartbeat_s: float, name: str = LEASE_NAME):
        self.directory = directory
        self.path = directory / name
        self.holder = holder
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking it ------------------------------------------------------------------------

    @classmethod
    def acquire(cls, directory: str | os.PathLike, heartbeat_s: float, stale_s: float, what: str = "run.dir",
                start_heartbeat: bool = True, name: str = LEASE_NAME) -> RunLease:
        """Take the lease on ``directory`` (created if missing) or raise UserError naming its live holder.

        Nothing else in the directory is touched when the lease is held by someone else. ``name``:
        the lease file, for jobs that legitimately share a directory (one lease each).
        """
        if stale_s <= heartbeat_s:
            raise UserError(f"lease: stale_s={stale_s:g} must be larger than heartbeat_s={heartbeat_s:g} "
                            "(a live job would look stale between two heartbeats)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lease = cls(directory, Holder.current(), heartbeat_s, name)
        for _ in range(10):  # only contenders racing on one stale lease ever loop
            if lease._create():
                break
            now = time.time()
            current = read_holder(lease.path)
            if current is None:
                continue  # released between our create and our read: try again
            reason = stale_reason(current, now, stale_s)
            if reason is None:
                raise UserError(
                    f"{what} {directory} is in use by another job ({current.describe(now)}); it holds "
                    f"{lease.path}. Wait for it to end or stop it; a dead job's lease is taken over once its "
                    f"process is gone (same host) or after {stale_s:g} s without a heartbeat.")
            if lease._break(current):
                log.warning("%s %s: taking over a stale lease (%s; %s)", what, directory, current.describe(now), reason)
        else:
            raise UserError(f"{what} {directory}: could not take {lease.path}: other jobs keep taking it at the "
                            "same time")
        if start_heartbeat:
            lease.start_heartbeat()
        return lease

    def _create(self) -> bool:
        """Atomically create the lease file with our holder; False if one exists.

        Written to a private temporary file first, then ``link``ed to the lease name: the lease is
        never seen half written, and ``link`` fails with EEXIST if another job created it first
        (also on NFS, where it is the classic lock-file idiom).
        """
        tmp = self.directory / f".lease.{self.holder.host}.{self.holder.pid}.{self.holder.token[:8]}.tmp"
        write_json_atomic(tmp, asdict(self.holder))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.directory)
        return True

    def _break(self, stale: Holder) -> bool:
        """Move the stale lease aside; True if the file we moved was that stale one.

        Two jobs may judge the same lease stale at once: each renames it to a private name, only
        one rename finds it. If what we moved turns out to be a newer lease (a contender already
        replaced the stale one), it is linked back.
        """
        aside = self.directory / f".lease.stale.{self.holder.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_holder(aside)
        try:
            if moved is not None and moved.token != stale.token:
                try:
                    os.link(aside, self.path)  # not ours to break: put it back
                except FileExistsError:
                    pass
                return False
            return True
        finally:
            aside.unlink(missing_ok=True)

    # -- holding it -----------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat_forever, name="lease-heartbeat", daemon=True)
            self._thread.start()

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.beat():
                    return
            except OSError as e:  # a filesystem hiccup: the next beat may succeed
                log.warning("lease %s: heartbeat failed: %s", self.path, e)

    def beat(self) -> bool:
        """Refresh the heartbeat; False (and an error logged) if the lease is no longer ours."""
        current = read_holder(self.path)
        if current is None or current.token != self.holder.token:
            log.error("lease %s was taken over by another job (%s); this job no longer owns the directory",
                      self.path, current.describe(time.time()) if current else "file removed")
            return False
        self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
        write_json_atomic(self.path, asdict(self.holder))
        return True

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours; idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
            fsync_dir(self.directory)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
