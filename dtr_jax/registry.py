"""Registries: name -> entry for one config field (data sources, evaluators, decoders).

A new dataset, metric or decoder is one `register` call next to its code; the
config field that names it is validated against the registered names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from dtr_jax.errors import ConfigError, choice_problems

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, for the config field `field` (e.g. 'data.name')."""

    def __init__(self, field: str):
        self.field = field
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Registers `entry` under `name`; without `entry`, a decorator."""
        if entry is None:
            return lambda e: self.register(name, e)
        if name in self._entries:
            raise ValueError(f"{self.field}: {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def problems(self, name: str) -> list[str]:
        """[] if `name` is registered; else the problem, named by the field's last part
        (`name=...` for 'data.name'), as the validation of its section reports it."""
        local = self.field.rsplit(".", 1)[-1]
        return choice_problems(local, name, self._entries)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(choice_problems(self.field, name, self._entries))
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
