"""Failures a user can fix: each carries the message that says how.

The bottom layers raise these without importing the config; `dtr_jax.main` prints
`dtr_jax: <message>` and exits with the error's `exit_code`, without a traceback.
Validation functions return *problems*: strings that start with the name of the
field at fault (`beta=1.5 must lie in (0, 1]`); `config.validate` prefixes the
section the field lives in (`model.routing.`) and raises them together.
"""

from __future__ import annotations

import re


class DtrError(Exception):
    """An anticipated failure, reported as one message (no traceback)."""

    exit_code = 1


class ConfigError(DtrError, ValueError):
    """One or more config fields (or the files they name) are invalid; lists each one."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


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
