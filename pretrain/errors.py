"""User-facing errors: anything the user can fix by changing their input.

The command-line entry points catch :class:`UserError`, print its message without a traceback and
exit with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2
EXIT_DISK_FULL = 5  # distinct: a requeue cannot help until someone frees space
EXIT_LEASE_LOST = 6  # distinct: another job owns the directory now; do not requeue this one

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """Bad input (config, path, data): the message names the input and says what is wrong."""

    exit_status = EXIT_USER_ERROR


class DiskFullError(UserError):
    """A write ran out of space: the message names the directory; free space, rerun the same command."""

    exit_status = EXIT_DISK_FULL


class LeaseLostError(UserError):
    """Another job took over the directory's lease while this one ran: the message names it. The job
    stops without writing anything more there (see pretrain.run_lease)."""

    exit_status = EXIT_LEASE_LOST


def is_disk_full(e: BaseException | None, path: str | os.PathLike | None = None) -> bool:
    """Did ``e`` come from a full disk? ENOSPC / EDQUOT anywhere in the exception chain, or its text.

    torch.save hides the errno behind RuntimeErrors ("basic_ios::clear: iostream error", "unexpected
    pos ...", "file write failed"), so with ``path`` a failure also counts when the filesystem
    holding ``path`` is (all but) full right after it: free space below min(16 MiB, 1% of its size).
    """
    seen, first = set(), e
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    if first is None or path is None:
        return False
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < min(16 << 20, usage.total // 100)


class ConfigError(UserError):
    """One or more configuration problems, each naming the dotted key(s) involved."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"config error: {self.problems[0]}"
        lines = [f"config error: {len(self.problems)} problems"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def stderr_line(msg: str) -> None:
    """Write one line to stderr in one write call.

    Ranks share their launcher's stderr, and trainers run with ``python -u``, where stderr writes
    through: ``print`` would send the text and its newline as two writes, and two ranks' messages
    could end up on one line. One write of a line shorter than the pipe buffer is never split.
    """
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def exit_on_user_error(fn: F) -> F:
    """Decorator for CLI mains: a UserError becomes one message on stderr and its exit status
    (2; 5 for a full disk; 6 for a lost lease)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            msg = str(e)
            if not msg.startswith(("config error", "error")):
                msg = f"error: {msg}"
            stderr_line(msg)
            sys.exit(e.exit_status)

    return wrapper  # type: ignore[return-value]
