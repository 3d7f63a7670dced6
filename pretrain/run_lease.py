"""One live job per output directory: a generation-numbered lease, taken before anything else is written.

Two jobs on one run directory (a double submission, a requeue while the old job still saves, a
restart of a job thought dead) would otherwise both resume from the same checkpoint and write the
same metrics and checkpoints. So a job first takes the directory's lease; a second job finds it
held and exits 2 naming the holder, unless the holder is stale.

The lease is a directory of generation files, ``DIR/.lease/gen-000042``, each written by one job
and holding its host, pid, SLURM job, start time and heartbeat. The design assumes only what the
shared filesystems of clusters (NFS, Lustre) guarantee, no ``flock`` or ``fcntl`` locks: ``link``
of a new name fails if the name exists (an atomic exclusive create, also across hosts), ``rename``
replaces a file atomically, and the hosts' clocks agree to well within ``stale_s``.

The protocol, and why it has one owner by construction:

- **The owner is the holder of the highest generation**, unless that file says "released".
- **Taking the lease** means creating the next generation, N+1, with ``link`` (the record is
  complete before its name appears). It is allowed only when generation N is released, or stale:
  its process is gone (same host, ``kill(pid, 0)``) or its heartbeat is older than ``stale_s`` (any
  host: a crashed node, a stalled job, a reused pid). Of any number of contenders that judged N
  stale, exactly one creates N+1; the others get EEXIST, look again and find a live holder. The
  winner then checks that N+1 is the highest generation (a contender that read the directory long
  ago may create a number that was cleaned up since: it finds the newer one and backs off),
  removes the older generations, and logs a warning naming the holder it took over from.
- **A live lease is never moved aside or overwritten.** A contender only creates a new name (the
  older generations a winner removes belong to holders it has just dispossessed). Each owner
  writes only its own generation's file, and checks before every heartbeat that no higher
  generation exists and its own file is still there; the highest generation is never removed. So a
  heartbeat can never clobber a successor, and a dispossessed owner can never own the lease again.
- **Losing the lease is loud.** An owner that finds a higher generation (or its own file gone,
  or that could not read the lease for ``stale_s``) is dispossessed: :attr:`RunLease.lost` is set
  to an error naming the new owner, ``on_lost`` is called once, every later :meth:`RunLease.confirm`
  raises it, and the job must stop without writing anything more (pretrain.trainer,
  data_pipelines.scrub.runner; exit status ``EXIT_LEASE_LOST``). A writer calls
  :meth:`RunLease.confirm` (or :meth:`RunLease.still_ours`) right before it writes, so nothing is
  written unless ownership was confirmed on disk within the last heartbeat interval.
- **Releasing** writes "released" into the owner's own file (never deletes it: the generation
  numbers only grow, see above).

Lease files are written without fsync: what matters is that a name appears atomically, and a
machine crash that loses a lease file ended its holder too.

A lease of the previous release (the single file ``DIR/.lease.json``, or ``.lease-rank-N.json``)
is read as generation 0: a live one blocks like any holder, a stale one is taken over by creating
generation 1, which removes the old file.

Used by the trainer (global rank 0) and the scrub (one lease per scrub rank)::

    with RunLease.acquire(run_dir, heartbeat_s=10, stale_s=120, what="run.dir") as lease:
        ...  # lease.confirm() before writing; the heartbeat thread refreshes it; released on exit
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NoReturn

import psutil

from pretrain.errors import EXIT_LEASE_LOST, LeaseLostError, UserError, stderr_line
from pretrain.fileio import write_json_atomic

log = logging.getLogger(__name__)

LEASE_NAME = ".lease"  # the directory of generation files inside the leased directory
GENERATION = re.compile(r"gen-(\d{6,})")
ATTEMPTS = 10  # only contenders racing on one stale lease ever loop


@dataclass(frozen=True)
class Holder:
    """What a generation file says about the job holding it."""

    host: str
    pid: int
    job_id: str | None  # SLURM_JOB_ID (with the array task when there is one)
    started: float  # unix time the lease was taken
    heartbeat: float  # unix time of the last refresh
    token: str  # unique per acquisition: tells our lease from a successor's
    released: bool = False

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
    """The record at ``path``; None when there is none. A foreign or damaged file reads as a holder
    with heartbeat 0 (stale), so garbage never blocks a run forever."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw)
        return Holder(str(d["host"]), int(d["pid"]), d.get("job_id"), float(d["started"]), float(d["heartbeat"]),
                      str(d["token"]), bool(d.get("released", False)))
    except (ValueError, KeyError, TypeError):
        return Holder("?", -1, None, 0.0, 0.0, f"unreadable:{raw[:32]!r}")


def generations(lease_dir: Path) -> list[int]:
    """The generation numbers present in ``lease_dir``, ascending (none when it does not exist)."""
    try:
        names = os.listdir(lease_dir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(GENERATION.fullmatch, names) if m)


def generation_file(lease_dir: Path, generation: int) -> Path:
    return lease_dir / f"gen-{generation:06d}"


def legacy_file(directory: Path, name: str = LEASE_NAME) -> Path:
    """Where the previous release kept this lease: one file, ``.lease.json`` (``.lease-rank-N.json``)."""
    return directory / f"{name}.json"


@dataclass(frozen=True)
class Top:
    """The highest generation of a lease and its record (generation 0: the previous release's file)."""

    generation: int
    holder: Holder | None
    path: Path | None


def top_of(directory: str | os.PathLike, name: str = LEASE_NAME) -> Top:
    """The highest generation of the lease ``name`` in ``directory``."""
    directory = Path(directory)
    lease_dir = directory / name
    for _ in range(ATTEMPTS):
        gens = generations(lease_dir)
        if not gens:
            legacy = legacy_file(directory, name)
            holder = read_holder(legacy)
            return Top(0, holder, legacy if holder else None)
        path = generation_file(lease_dir, gens[-1])
        holder = read_holder(path)
        if holder is not None:
            return Top(gens[-1], holder, path)
        # Removed between listing and reading: only ever because a newer generation exists.
    raise OSError(f"{lease_dir}: the lease's generations keep changing while read")


def holder_of(directory: str | os.PathLike, name: str = LEASE_NAME) -> Holder | None:
    """Who holds the lease on ``directory`` (live or stale); None when free (never taken, or released)."""
    top = top_of(directory, name)
    return top.holder if top.holder is not None and not top.holder.released else None


def protocol_step(step: str, lease: RunLease) -> None:
    """A fault point between the steps of the protocol: does nothing. Tests replace it to run a
    contender at exactly this point ("read": acquire read the top generation; "created": acquire
    created its generation, not yet checked; "confirmed": a heartbeat confirmed ownership and is
    about to write)."""


def stop_process(lost: LeaseLostError) -> NoReturn:
    """End this process at once after the lease was lost: one line on stderr, this process's own
    descendants killed (DataLoader or pool workers, wandb's service), exit ``EXIT_LEASE_LOST``.

    ``os._exit``: no ``finally`` block, exit hook or save-on-exit runs, so nothing more reaches the
    directory (wandb's exit hook, for one, would mark the run the new owner continues as finished;
    its service process would flush its files on the way out).
    """
    stderr_line(f"error: {lost}")
    try:
        descendants = psutil.Process().children(recursive=True)  # ours: found by parent pid, not by name
    except psutil.Error:
        descendants = []
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()
    logging.shutdown()
    os._exit(EXIT_LEASE_LOST)


class RunLease:
    """A held lease on a directory; refreshes its heartbeat from a daemon thread until released."""

    def __init__(self, directory: Path, holder: Holder, heartbeat_s: float, stale_s: float,
                 name: str = LEASE_NAME, what: str = "run.dir",
                 on_lost: Callable[[LeaseLostError], None] | None = None):
        self.directory = Path(directory)
        self.lease_dir = self.directory / name
        self.name = name
        self.holder = holder
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.what = what
        self.on_lost = on_lost  # called once, in the thread that found the lease lost
        self.generation = 0  # ours, once acquired
        self.lost: LeaseLostError | None = None
        self.released = False
        self._confirmed_at = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> Path:
        """Our generation's file."""
        return generation_file(self.lease_dir, self.generation)

    # -- taking it ------------------------------------------------------------------------

    @classmethod
    def acquire(cls, directory: str | os.PathLike, heartbeat_s: float, stale_s: float, what: str = "run.dir",
                start_heartbeat: bool = True, name: str = LEASE_NAME,
                on_lost: Callable[[LeaseLostError], None] | None = None) -> RunLease:
        """Take the lease on ``directory`` (created if missing) or raise UserError naming its live holder.

        Nothing else in the directory is touched when the lease is held by someone else. ``name``:
        the lease, for jobs that legitimately share a directory (one lease each). ``on_lost``: what
        to do when the lease is found lost (default: only :attr:`lost` is set and ``confirm`` raises).
        """
        if stale_s <= heartbeat_s:
            raise UserError(f"lease: stale_s={stale_s:g} must be larger than heartbeat_s={heartbeat_s:g} "
                            "(a live job would look stale between two heartbeats)")
        directory = Path(directory)
        lease = cls(directory, Holder.current(), heartbeat_s, stale_s, name, what, on_lost)
        lease.lease_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(ATTEMPTS):
            top = top_of(directory, name)
            protocol_step("read", lease)
            now = time.time()
            taken_from = None
            if top.holder is not None and not top.holder.released:
                reason = stale_reason(top.holder, now, stale_s)
                if reason is None:
                    raise UserError(
                        f"{what} {directory} is in use by another job ({top.holder.describe(now)}); it holds "
                        f"{top.path}. Wait for it to end or stop it; a dead job's lease is taken over once its "
                        f"process is gone (same host) or after {stale_s:g} s without a heartbeat.")
                taken_from = f"{top.holder.describe(now)}; {reason}"
            if not lease._create(top.generation + 1):
                continue  # another contender created it first: look again (it is live now)
            protocol_step("created", lease)
            if generations(lease.lease_dir)[-1] != lease.generation:
                lease.path.unlink(missing_ok=True)  # below a newer generation: not ours to hold
                continue
            if taken_from:
                log.warning("%s %s: taking over a stale lease (%s)", what, directory, taken_from)
            lease._remove_older(legacy=top.generation == 0 and top.path is not None)
            break
        else:
            raise UserError(f"{what} {directory}: could not take the lease in {lease.lease_dir}: other jobs keep "
                            "taking it at the same time")
        lease._confirmed_at = time.monotonic()
        if start_heartbeat:
            lease.start_heartbeat()
        return lease

    def _create(self, generation: int) -> bool:
        """Atomically create ``generation``'s file with our record; False if it exists.

        Written to a private temporary file first, then ``link``ed to the generation's name: the
        record is never seen half written, and ``link`` fails with EEXIST if another job created it
        first. On NFS a ``link`` whose reply was lost may report an error although it succeeded:
        the temporary file's link count tells.
        """
        target = generation_file(self.lease_dir, generation)
        tmp = self.lease_dir / f".new.{self.holder.host}.{self.holder.pid}.{self.holder.token[:12]}"
        write_json_atomic(tmp, asdict(self.holder), durable=False)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        except OSError:
            if os.stat(tmp).st_nlink != 2:
                raise
        finally:
            tmp.unlink(missing_ok=True)
        self.generation = generation
        return True

    def _remove_older(self, legacy: bool) -> None:
        """Our generation is the highest: the older ones (and a migrated legacy file) are garbage."""
        for g in generations(self.lease_dir):
            if g < self.generation:
                generation_file(self.lease_dir, g).unlink(missing_ok=True)
        if legacy:
            legacy_file(self.directory, self.name).unlink(missing_ok=True)

    # -- holding it -----------------------------------------------------------------------

    def _successor(self) -> str | None:
        """Who took the lease from us (read from disk now); None while it is still ours."""
        gens = generations(self.lease_dir)
        if gens and gens[-1] > self.generation:
            newer = read_holder(generation_file(self.lease_dir, gens[-1]))
            who = newer.describe(time.time()) if newer else "its holder could not be read"
            return f"generation {gens[-1]}: {who}"
        mine = read_holder(self.path)
        if mine is None or mine.token != self.holder.token:
            return f"its lease file {self.path} was removed or replaced"
        return None

    def confirm(self, max_age_s: float = 0.0) -> None:
        """Raise LeaseLostError unless this job still owns the directory.

        Read from disk unless ownership was confirmed within the last ``max_age_s`` seconds. A read
        that fails (OSError) is raised as is while the last confirmation is younger than ``stale_s``;
        after that the lease counts as lost: another job may have taken it over meanwhile.
        """
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if max_age_s > 0 and time.monotonic() - self._confirmed_at <= max_age_s:
                return
            try:
                successor = self._successor()
            except OSError as e:
                unconfirmed = time.monotonic() - self._confirmed_at
                if unconfirmed <= self.stale_s:
                    raise
                successor = f"unknown: its lease could not be read for {unconfirmed:.0f} s ({e})"
            if successor is None:
                self._confirmed_at = time.monotonic()
                return
            self.lost = LeaseLostError(
                f"{self.what} {self.directory}: this job lost the directory's lease to another job "
                f"({successor}); this job's own is generation {self.generation} (pid {self.holder.pid}). It "
                "stopped without writing anything more there. Do not requeue it: the directory belongs to "
                "the other job now (a job whose heartbeat stops for longer than run.lease_stale_s, e.g. a "
                "stalled node or filesystem, is taken over).")
        if self.on_lost is not None:
            self.on_lost(self.lost)
        raise self.lost

    def still_ours(self, max_age_s: float | None = None) -> bool:
        """For writers: False once the lease is lost. Reads the disk only when the last confirmation
        is older than ``max_age_s`` (default: one heartbeat interval, so the heartbeat thread
        usually did; 0: now)."""
        try:
            self.confirm(max_age_s=self.heartbeat_s if max_age_s is None else max_age_s)
        except LeaseLostError:
            return False
        except OSError:
            return True  # a passing hiccup: confirm() declares the lease lost once it lasts stale_s
        return True

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat_forever, name="lease-heartbeat", daemon=True)
            self._thread.start()

    def _beat_forever(self) -> None:
        """Beat until released or lost; nothing else ends this thread (a failed beat is retried)."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except LeaseLostError:
                return  # confirm() recorded it and called on_lost; the owner's checks see it
            except Exception as e:  # a filesystem hiccup: the next beat may succeed
                log.warning("%s %s: lease heartbeat failed (%s: %s); retrying in %g s", self.what,
                            self.directory, type(e).__name__, e, self.heartbeat_s)

    def beat(self) -> None:
        """Confirm the lease is still ours, then refresh our generation's heartbeat (LeaseLostError if not)."""
        self.confirm()
        protocol_step("confirmed", self)
        with self._lock:  # never after release() marked our file released
            if self.released or self.lost is not None:
                return
            self.holder = replace(self.holder, heartbeat=time.time())
            write_json_atomic(self.path, asdict(self.holder), durable=False)

    def release(self) -> None:
        """Stop the heartbeat and mark our generation released if it is still ours; idempotent.

        A lost lease is left alone: nothing is written into a directory another job owns.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if self.released or self.lost is not None or self.generation == 0:
                return
            try:
                if self._successor() is not None:
                    return
            except OSError as e:
                log.warning("%s %s: lease not released, it could not be read (%s)", self.what, self.directory, e)
                return
            self.holder = replace(self.holder, heartbeat=time.time(), released=True)
            write_json_atomic(self.path, asdict(self.holder), durable=False)
            self.released = True

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
