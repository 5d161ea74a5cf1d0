"""Name -> entry registries for everything a user extends: datasets, backbones, paradigms,
interventions, metrics and Optuna samplers, all filled in one decorator style::

    @DATASETS.register("my_data", options={...}, doc="...")
    def my_data(options): ...

A registry built with an ``entry`` factory turns the decorated object and the decorator's keywords into
its entry (a ``DatasetEntry``, a ``Paradigm``, a ``MetricSpec``); one without stores the object itself
(a backbone factory, a sampler factory). A module named under ``plugins:`` in a sweep file registers
its own entries this way (trainables/plugins.py). An unknown name fails with the valid names and the
closest match, so a typo in a spec teaches the fix instead of surfacing as a KeyError deep in a trial.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from trainables.errors import UserError
from trainables.schema import did_you_mean

T = TypeVar("T")
F = TypeVar("F")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(UserError, KeyError):
    """A name that no registry entry carries."""

    def __init__(self, kind: str, name: object, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, valid
        hint = did_you_mean(name, valid, sentence=True)
        super().__init__(f"unknown {kind} {name!r}; valid: {', '.join(valid)}.{hint}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]

    def __reduce__(self) -> tuple:  # Ray pickles a worker's error; its args are the message, not these three
        return (type(self), (self.kind, self.name, self.valid))


class Registry(Generic[T]):
    """An ordered mapping of names to entries, filled with the ``register`` decorator.

    ``entry(name, obj, **attributes)`` builds the entry from what ``register(name, **attributes)``
    decorates; without it the decorated object is the entry and ``register`` takes no attributes.
    """

    def __init__(self, kind: str, entry: Callable[..., T] | None = None):
        self.kind = kind
        self._entry = entry
        self._entries: dict[str, T] = {}

    def register(self, name: str, **attributes: Any) -> Callable[[F], F]:
        """Decorator registering ``obj`` under ``name``; returns ``obj`` unchanged, so one function may
        be registered under several names (``register("a", ...)(fn)`` as a plain call)."""
        if self._entry is None and attributes:
            raise TypeError(f"{self.kind} entries take no attributes; got {', '.join(attributes)}")

        def deco(obj: F) -> F:
            entry = obj if self._entry is None else self._entry(name, obj, **attributes)  # checks the attributes
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered; unregister it first or choose "
                                 "another name")
            self._entries[name] = entry
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

    def entries(self) -> Mapping[str, T]:
        """A read-only live view of the entries, in registration order."""
        return MappingProxyType(self._entries)
