"""hardmix's error types: one root, one line each.

Every error a user can fix (a config value, an input file, a results file, the environment) is a
:class:`HardmixError`. The command line prints its :meth:`~HardmixError.line` and exits with
code 2, before any work starts where the check allows it. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any


class HardmixError(Exception):
    """Root of the errors a user can fix. ``str(err)`` is the one line the CLI prints."""

    exit_code = 2

    def line(self) -> str:
        return f"hardmix: error: {self}"


class ConfigError(HardmixError, ValueError):
    """A bad configuration value or input: ``field``, the ``value`` given and what is ``allowed``.

    Also used for input files named by a config field (``data.path``, ``--config``,
    ``checkpoint``): the field is the name the user gave it under.
    """

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field} = {_short(value)}: {allowed}")

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields intact
        return (type(self), (self.field, self.value, self.allowed))


class ResultsError(HardmixError):
    """A results file that cannot be used: corrupt (``reason="corrupt"``) or written by a schema
    version this code does not know (``reason="version"``)."""

    def __init__(self, file: str, problem: str, reason: str = "corrupt"):
        self.file, self.problem, self.reason = file, problem, reason
        super().__init__(f"results file {file!r}: {problem}")

    def __reduce__(self):
        return (type(self), (self.file, self.problem, self.reason))


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fail(exc: HardmixError, stream=None) -> int:
    """Print an error as its one line; the exit code the CLI returns."""
    import sys

    print(exc.line(), file=stream or sys.stderr)
    return exc.exit_code
