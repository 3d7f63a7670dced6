"""User-facing errors: anything the user can fix by changing their input.

The command-line entry points catch :class:`UserError`, print its message without a traceback and
exit with status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., int | None])


class UserError(Exception):
    """Bad input (config, path, data): the message names the input and says what is wrong."""


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


def exit_on_user_error(fn: F) -> F:
    """Decorator for CLI mains: a UserError becomes one message on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            msg = str(e)
            if not msg.startswith(("config error", "error")):
                msg = f"error: {msg}"
            print(msg, file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
