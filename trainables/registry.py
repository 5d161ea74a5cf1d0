"""Name -> object registries for every sweep axis (datasets, backbones, paradigms, ...).

An unknown name fails with the valid names and the closest match, so a typo in a spec
teaches the fix instead of surfacing as a KeyError deep inside a trial.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from trainables.errors import UserError

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(UserError, KeyError):
    """A name that no registry entry carries."""

    def __init__(self, kind: str, name: object, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, valid
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(valid)}.{hint}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class Registry(Generic[T]):
    """A small ordered mapping of names to entries, filled with the ``register`` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove and return an entry (a plugin or test that registered it cleans up after itself)."""
        try:
            return self._entries.pop(name)
        except KeyError:
            raise UnknownNameError(self.kind, name, self.names()) from None

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, name, self.names()) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)
