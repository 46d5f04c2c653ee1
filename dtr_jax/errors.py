"""Failures a user can fix: each carries the message that says how, and its exit code.

The bottom layers raise these without importing the config; `dtr_jax.main` prints
`dtr_jax: <message>` and exits with the error's `exit_code`, without a traceback
(`--verbose` shows one). Bugs are not DtrErrors: they end in a traceback (exit 1).
Validation functions return *problems*: strings that start with the name of the
field at fault (`beta=1.5 must lie in (0, 1]`); `config.validate` prefixes the
section the field lives in (`model.routing.`) and raises them together.

  exit  error               when
  2     ConfigError         an invalid or unknown config field or flag
  3     InputFileError      a file a field names is missing, unreadable or of the wrong kind
  4     WorkdirError        a workdir of another model, or one that cannot be written
        WriteError          writing an output failed (disk full, ...): nothing replaced
  5     WorkdirLocked       another trainer owns the workdir
  6     CheckpointError     no valid checkpoint to read, or a checkpoint could not be written
  7     TrainingDiverged    the loss (or the state to save) is not finite
  8     LostPeer            a multi-host run lost one of its processes (or its coordinator)
"""

from __future__ import annotations

import re


class DtrError(Exception):
    """An anticipated failure, reported as one message (no traceback)."""

    exit_code = 1  # each subclass has its own (module docstring)


class ConfigError(DtrError, ValueError):
    """One or more config fields (or the files they name) are invalid; lists each one."""

    heading = "invalid config"
    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{self.heading}:\n  - " + "\n  - ".join(self.problems))


class InputFileError(ConfigError):
    """A file named by a config field is missing, unreadable or not what the field needs."""

    heading = "unusable input file"
    exit_code = 3


class WorkdirError(ConfigError):
    """The workdir belongs to another model, or a place to write is not writable."""

    heading = "refused workdir or output directory"
    exit_code = 4


class WriteError(WorkdirError):
    """Writing an output failed (a full disk, a lost mount, ...); nothing was replaced."""

    heading = "could not write"


class WorkdirLocked(DtrError):
    """Another trainer (named in the message) owns the workdir."""

    exit_code = 5


class CheckpointError(DtrError):
    """No checkpoint can be read, or one could not be written; says what was found."""

    exit_code = 6


class TrainingDiverged(DtrError, FloatingPointError):
    """The loss became non-finite: the run stops, the last good checkpoint stays."""

    exit_code = 7


class LostPeer(DtrError):
    """A process of a multi-host run (or the coordinator) stopped answering: this one
    stopped too. The message says which, and how the run resumes."""

    exit_code = 8


class FromOtherProcess(DtrError):
    """A DtrError another process of a multi-host run raised, raised here too (same
    message and exit code), so that every process stops alike instead of waiting for
    the one that stopped."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def prefixed(prefix: str, problems: list[str], fields=()) -> list[str]:
    """Problems of a section's fields, named by their full path (`model.routing.beta=...`).

    Each problem starts with the field at fault; other `fields` of the same section
    it mentions as `name=value` are named by their full path too.
    """
    names = "|".join(sorted(map(re.escape, fields), key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.])({names})=") if names else None

    def qualify(problem: str) -> str:
        problem = prefix + problem
        return pattern.sub(rf"{prefix}\1=", problem) if pattern else problem

    return [qualify(p) for p in problems]


def integer_problems(name: str, value, *, allow_zero: bool = False) -> list[str]:
    """[] if `value` is a positive (or, with allow_zero, non-negative) integer."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (value >= 0 if allow_zero else value > 0):
        return []
    return [f"{name}={value!r} must be a {'non-negative' if allow_zero else 'positive'} integer"]


def choice_problems(name: str, value, allowed) -> list[str]:
    """[] if `value` is one of `allowed`."""
    return [] if value in allowed else [f"{name}={value!r} is unknown: allowed {list(allowed)}"]
