"""Hang detection: no optimizer step for ``train.hang_timeout_s`` -> stacks on disk, exit 4.

A rank stuck in a collective (a dead or stopped peer, a stuck filesystem, a deadlock) keeps every
other rank waiting for the collective timeout, and the log says nothing about who or where. So
each rank runs a watchdog thread; the loop calls :meth:`HangWatchdog.beat` after every optimizer
step and wraps evaluation and saves in :meth:`HangWatchdog.paused`. The watchdog is armed by the
first beat, so start-up, compilation and the first step never count.

When it fires, the rank writes all its threads' Python stacks to ``RUN_DIR/hang/rank_NNNNN.txt``
(``faulthandler``: no locks, works while the main thread waits in C code), global rank 0 waits a
grace period and logs which ranks wrote a stack file and which did not (those are the suspects:
stopped, or stuck without the GIL), and the process exits with :data:`EXIT_HANG` without saving
so the scheduler can requeue the job; it resumes from the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_HANG = 4
HANG_DIR = "hang"


def stack_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HANG_DIR / f"rank_{rank:05d}.txt"


def reported_ranks(run_dir: Path, world_size: int, since: float) -> tuple[list[int], list[int]]:
    """(ranks with a stack file written at or after ``since`` (unix time), ranks without one)."""
    reported, missing = [], []
    for r in range(world_size):
        try:
            fresh = stack_file(run_dir, r).stat().st_mtime >= since
        except FileNotFoundError:
            fresh = False
        (reported if fresh else missing).append(r)
    return reported, missing


class HangWatchdog:
    """A daemon thread that fires when no beat came for ``timeout_s`` seconds while armed."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int, world_size: int,
                 grace_s: float = 5.0, on_fire: Callable[[], None] | None = None,
                 exit: Callable[[int], None] = os._exit):
        self.timeout_s = timeout_s
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.grace_s = grace_s
        self.on_fire = on_fire  # e.g. release the run's lease (rank 0)
        self._exit = exit
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._armed = False
        self._pauses = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HangWatchdog:
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self) -> None:
        """An optimizer step completed (the first one arms the watchdog)."""
        with self._lock:
            self._last = time.monotonic()
            self._armed = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation, saves: long, legitimate pauses between steps; the clock restarts after."""
        with self._lock:
            self._pauses += 1
        try:
            yield
        finally:
            with self._lock:
                self._pauses -= 1
                self._last = time.monotonic()

    def _idle_s(self) -> float:
        with self._lock:
            if not self._armed or self._pauses:
                self._last = time.monotonic()
                return 0.0
            return time.monotonic() - self._last

    def _watch(self) -> None:
        poll = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            idle = self._idle_s()
            if idle >= self.timeout_s:
                self.fire(idle)
                return

    def fire(self, idle: float) -> None:
        """Write this rank's stacks, report (rank 0), exit with EXIT_HANG."""
        since = time.time() - 1.0
        path = stack_file(self.run_dir, self.rank)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"rank {self.rank} (pid {os.getpid()}): no optimizer step completed for {idle:.0f} s "
                        f"(train.hang_timeout_s={self.timeout_s:g}); Python stacks of all threads:\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            log.error("rank %d: no optimizer step for %.0f s (train.hang_timeout_s=%g): stacks written to %s",
                      self.rank, idle, self.timeout_s, path)
        except OSError as e:
            log.error("rank %d: hang detected but the stack file %s could not be written: %s", self.rank, path, e)
        if self.rank == 0:
            self._report(since)
        if self.on_fire is not None:
            try:
                self.on_fire()
            except Exception as e:  # exiting anyway: report, do not mask the hang
                log.error("hang exit: %s", e)
        logging.shutdown()
        self._exit(EXIT_HANG)

    def _report(self, since: float) -> None:
        deadline = time.monotonic() + self.grace_s
        reported, missing = reported_ranks(self.run_dir, self.world_size, since)
        while missing and time.monotonic() < deadline:
            time.sleep(0.5)
            reported, missing = reported_ranks(self.run_dir, self.world_size, since)
        log.error("hang: stack files in %s from ranks %s; no stack file from ranks %s (stopped, dead, or stuck "
                  "holding the GIL: look there first); exiting with status %d",
                  self.run_dir / HANG_DIR, reported or "none", missing or "none", EXIT_HANG)
