"""One schema dialect for everything a user writes in a sweep file: the spec's sections, each dataset's
``dataset.options`` and each paradigm's ``pretraining.paradigms.NAME``.

A ``Field`` parses one value at a dotted path and describes itself as JSON Schema; ``Option`` is the
scalar field (an integer, a number, true/false, a string, a path or a list of names, with bounds),
``ListOf`` an axis (one value or a list of distinct values) and ``Section`` a mapping of named fields
(unknown keys are refused with the closest match; required keys are named). A check that none of these
covers is a ``Custom`` field: its own parse function and its own JSON Schema. Every mistake raises
``SchemaError(path, value, allowed)``, printed as ``PATH: got VALUE; ALLOWED``; each boundary re-types it
once (``SpecError`` in the spec, ``DatasetOptionError`` for dataset options). Because the sweep file's
JSON Schema (``fairsweep schema``) is generated from the same fields, the editor's completion and the
validator cannot disagree.

A home-grown dialect rather than pydantic models: the file is untrusted input, so every message holds a
bounded excerpt of the value in one form whatever failed, and the sweep's own checks (a range only under
optuna, a GPU share that Ray can place, ``file:`` checkpoint paths) stay plain functions at a field path
(``Custom``) instead of validators translated back from pydantic's error records.

This module imports neither torch nor numpy (only trainables.errors), so ``fairsweep validate`` stays fast.
"""
from __future__ import annotations

import difflib
import math
import numbers
import os
import reprlib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Mapping

from trainables.errors import UserError

__all__ = ["SchemaError", "Field", "Option", "ListOf", "Section", "Custom", "REQUIRED", "PATH", "NAMES",
           "excerpt", "clip", "at", "did_you_mean", "as_mapping", "distinct", "path_shape_problem", "json_default",
           "MAX_PATH_BYTES", "MAX_PATH_PART_BYTES"]

EXCERPT_CHARS = 200
MAX_PATH_BYTES, MAX_PATH_PART_BYTES = 4096, 255  # Linux's PATH_MAX and NAME_MAX


class _ExcerptRepr(reprlib.Repr):
    """reprlib's bounded repr (a few levels, a few items each), also for ints too long to print."""

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # beyond Python's int -> str digit limit
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"


_REPR = _ExcerptRepr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = EXCERPT_CHARS, EXCERPT_CHARS, 60


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A repr of ``value`` of at most ``limit`` characters, built without walking all of it: a huge
    or deeply shared value in an error must not exhaust memory or flood the terminal."""
    return clip(_REPR.repr(value), limit)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def at(path: str, key: Any) -> str:
    """``path.key`` for messages; a key that is not a short one-line string shows as an excerpt."""
    text = key if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60 else excerpt(key, 60)
    return f"{path}.{text}" if path else text


def did_you_mean(name: Any, valid: Iterable[str], *, n: int = 1, cutoff: float = 0.6, sentence: bool = False) -> str:
    """``"did you mean 'x'?"`` (or several, comma-separated) for the names closest to ``name``; "" when
    none is close; ``sentence=True``: `` Did you mean 'x'?``, to end a message. The one place a typo is
    answered with its likely fix."""
    close = difflib.get_close_matches(str(name), list(valid), n=n, cutoff=cutoff)
    if not close:
        return ""
    return f"{' Did' if sentence else 'did'} you mean {', '.join(map(repr, close))}?"


class SchemaError(UserError, ValueError):
    """A value a schema refuses (a user's mistake: the CLI exits 2); ``path`` is the dotted field path (e.g. ``axes.seed[1]``).

    The message holds an excerpt of the value and a bounded ``allowed`` text (it may quote other
    libraries' messages), so any error prints in a few lines whatever the file held.
    """

    def __init__(self, path: str, value: Any, allowed: str):
        self.path, self.value, self.allowed = path, value, allowed
        super().__init__(f"{clip(str(path), 300)}: got {excerpt(value)}; {clip(str(allowed), 2000)}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles errors raised in workers; a subclass's own __init__ signature must not matter.
        return (_rebuild, (type(self), self.path, self.value, self.allowed), self.__dict__)


def _rebuild(cls: type, path: str, value: Any, allowed: str) -> SchemaError:
    err = SchemaError.__new__(cls)
    SchemaError.__init__(err, path, value, allowed)
    return err


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a field the user must give (e.g. a dataset's ``root``); also "no default" for ``Field``."""
PATH = "path"
"""Option kind: a filesystem path (a non-empty string; ``~`` expanded)."""
NAMES = "names"
"""Option kind: one name or a list of distinct names (columns, attributes); parsed to a tuple."""

_WORDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a non-empty string",
          PATH: "a path (absolute, or relative as documented)", NAMES: "a name or a list of distinct names"}


def json_default(value: Any) -> Any:
    """A default as JSON: tuples become lists, mappings dicts."""
    if isinstance(value, (tuple, list)):
        return [json_default(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_default(v) for k, v in value.items()}
    return value


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


class Field:
    """Something a user writes: ``parse(value, path)`` checks and converts it (raising SchemaError),
    ``json_schema()`` describes it. ``default`` is REQUIRED when there is none; ``doc`` says what it means."""

    default: Any = REQUIRED
    doc: str = ""

    def parse(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def json_schema(self) -> dict:
        raise NotImplementedError

    def _annotate(self, schema: Mapping[str, Any]) -> dict:
        out = dict(schema)
        if self.doc:
            out["description"] = self.doc
        if self.default is not REQUIRED:
            out["default"] = json_default(self.default)
        return out


def _resolve(schema: Mapping[str, Any] | Callable[[], Mapping[str, Any]]) -> dict:
    """A JSON Schema given as is, or by a function that builds it from registries when asked."""
    return dict(schema() if callable(schema) else schema)


def as_mapping(raw: Any, path: str) -> Mapping[str, Any]:
    """``raw`` as a mapping (None is empty); anything else is refused."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SchemaError(path, raw, "expected a mapping of option: value")
    return raw


def distinct(values: Iterable[Any], path: str) -> tuple:
    """The (parsed, hence hashable) values as a tuple; a repeat is an error naming its index."""
    out = tuple(values)
    seen: set = set()
    for i, v in enumerate(out):
        if v in seen:
            raise SchemaError(f"{path}[{i}]", v, "duplicate value; each axis value must appear once")
        seen.add(v)
    return out


@dataclass(frozen=True)
class Option(Field):
    """A scalar field: ``kind`` (int, float, bool, str, PATH or NAMES; None: the default's type),
    inclusive bounds (``low_open``: the value must be > low) and ``choices`` for a str (a tuple, or a
    registry consulted when the value is parsed, so names registered later count).

    A default of None makes the option optional (None = not set); REQUIRED makes it mandatory.
    ``doc`` says what the option means; errors quote it. ``identity=False`` marks dataset options that
    do not change the data (e.g. loader workers): fingerprints leave them out, so changing them reuses
    cached pretrained bases. ``under_root=True`` marks a PATH that a relative value places inside the
    dataset's ``root`` rather than the working directory.
    """

    default: Any = REQUIRED
    kind: type | str | None = None
    low: float | None = None
    high: float | None = None
    doc: str = ""
    low_open: bool = False
    choices: Collection[str] | None = None
    identity: bool = True
    under_root: bool = False

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.default is REQUIRED or self.default is None:
                raise TypeError("Option needs a kind when its default is REQUIRED or None")
            object.__setattr__(self, "kind", type(self.default))
        if self.kind not in _WORDS:
            raise TypeError(f"Option kind {self.kind!r} is not one of int, float, bool, str, PATH, NAMES")

    # ------------------------------------------------------------------ words

    def _bounds(self) -> str:
        def show(x: float) -> str:
            return f"{x:,}" if self.kind is int else str(x)

        parts = [f"{'>' if self.low_open else '>='} {show(self.low)}"] if self.low is not None else []
        parts += [f"<= {show(self.high)}"] if self.high is not None else []
        return " and ".join(parts)

    def _because(self) -> str:
        return f" ({self.doc})" if self.doc else ""

    def describe(self) -> str:
        """What the option accepts, e.g. ``an integer >= 1 and <= 10,000 (epochs per trial)``."""
        if self.choices is not None:
            return f"one of: {', '.join(self.choices)}{self._because()}"
        return f"{_WORDS[self.kind]} {self._bounds()}".rstrip() + self._because()

    # ------------------------------------------------------------------ parsing

    def parse(self, value: Any, path: str) -> Any:
        if value is REQUIRED:
            raise SchemaError(path, None, f"this field is required: {self.describe()}")
        if value is None and self.default is None:
            return None
        kind = self.kind
        if kind in (int, float):
            return self._number(value, path)
        if kind is bool:
            if not _is_bool(value):
                raise SchemaError(path, value, f"expected {self.describe()}")
            return bool(value)
        if kind is str:
            if self.choices is not None:
                if not isinstance(value, str) or value not in self.choices:
                    hint = did_you_mean(value, self.choices) if isinstance(value, str) else ""
                    raise SchemaError(path, value, f"expected {self.describe()}" + (f"; {hint}" if hint else ""))
                return value
            if not isinstance(value, str) or not value.strip():
                raise SchemaError(path, value, f"expected {self.describe()}")
            return value
        if kind == PATH:
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str) or not value.strip():
                raise SchemaError(path, value, f"expected {self.describe()}")
            problem = path_shape_problem(value)
            if problem:
                raise SchemaError(path, value, problem)
            return str(Path(os.path.expanduser(value)))  # an unknown ~user stays as written (pathlib raises)
        return self._names(value, path)

    def _number(self, value: Any, path: str) -> int | float:
        if _is_bool(value) or not isinstance(value, numbers.Real):
            raise SchemaError(path, value, f"expected {self.describe()}")
        if self.kind is int:
            if isinstance(value, numbers.Integral):
                out: int | float = int(value)
            elif math.isfinite(float(value)) and float(value).is_integer():
                out = int(value)  # 2.0 is the integer 2
            else:
                raise SchemaError(path, value, f"expected {self.describe()}")
        else:
            try:
                out = float(value)  # an int of hundreds of digits overflows here
            except OverflowError:
                raise SchemaError(path, value, f"expected {self.describe()}; this integer is too large for a "
                                               "float") from None
            if not math.isfinite(out):
                raise SchemaError(path, value, f"expected {self.describe()}")
        low_ok = self.low is None or (out > self.low if self.low_open else out >= self.low)
        if not low_ok or (self.high is not None and out > self.high):
            raise SchemaError(path, value, f"must be {self._bounds()}{self._because()}")
        return out

    def _names(self, value: Any, path: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise SchemaError(path, value, f"expected {self.describe()}")
        bad = [v for v in items if not isinstance(v, str) or not v.strip()]
        if bad:
            raise SchemaError(path, value, f"entries {bad!r} are not names; expected {self.describe()}")
        dupes = sorted({v for v in items if items.count(v) > 1})
        if dupes:
            raise SchemaError(path, value, f"names {dupes} appear more than once; list each once")
        return tuple(items)

    # ------------------------------------------------------------------ JSON Schema

    def json_schema(self) -> dict:
        kind = self.kind
        if kind in (int, float):
            schema: dict = {"type": "integer" if kind is int else "number"}
            if self.low is not None:
                schema["exclusiveMinimum" if self.low_open else "minimum"] = self.low
            if self.high is not None:
                schema["maximum"] = self.high
        elif kind is bool:
            schema = {"type": "boolean"}
        elif kind is str and self.choices is not None:
            schema = ({"enum": list(self.choices)} if isinstance(self.choices, (tuple, list, frozenset, set))
                      else {"type": "string", "anyOf": [{"enum": list(self.choices)}, {"minLength": 1}]})
        elif kind in (str, PATH):
            schema = {"type": "string", "minLength": 1}
        else:
            name = {"type": "string", "minLength": 1}
            schema = {"anyOf": [name, {"type": "array", "items": name, "minItems": 1, "uniqueItems": True}]}
        return self._annotate(_nullable(schema) if self.default is None else schema)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool, without importing numpy


def path_shape_problem(value: str) -> str:
    """Why the filesystem could not look ``value`` up ("" when it can): a NUL, more than PATH_MAX bytes,
    or a part longer than NAME_MAX (which makes the lookup itself fail instead of "does not exist")."""
    try:
        raw = os.fsencode(value) if "\x00" not in value else None
    except UnicodeError:  # a lone surrogate (YAML's "\ud800" escape)
        raw = None
    if raw is None or len(raw) > MAX_PATH_BYTES or any(len(part) > MAX_PATH_PART_BYTES for part in raw.split(b"/")):
        return (f"must be a path without NUL or unencodable characters, at most {MAX_PATH_BYTES} bytes long, "
                f"each folder or file name at most {MAX_PATH_PART_BYTES}")
    return ""


@dataclass(frozen=True)
class Custom(Field):
    """A check no other field expresses: ``check(value, path)`` returns the parsed value or raises
    SchemaError; ``schema`` is its JSON Schema, or a function building it (from registries) when asked."""

    check: Callable[[Any, str], Any]
    schema: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
    doc: str = ""
    default: Any = REQUIRED

    def parse(self, value: Any, path: str) -> Any:
        return self.check(value, path)

    def json_schema(self) -> dict:
        return self._annotate(_resolve(self.schema))


@dataclass(frozen=True)
class ListOf(Field):
    """An axis: one value (a one-element list) or a non-empty list of distinct values, each parsed by
    ``item`` at ``PATH[i]``; returned as a tuple. ``empty=True`` also accepts an empty list."""

    item: Field
    doc: str = ""
    default: Any = REQUIRED
    empty: bool = False

    def parse(self, value: Any, path: str) -> tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value is a one-element axis
        if not isinstance(value, list) or not (value or self.empty):
            raise SchemaError(path, value, "expected a list" if self.empty else "expected a non-empty list")
        return distinct((self.item.parse(v, f"{path}[{i}]") for i, v in enumerate(value)), path)

    def json_schema(self) -> dict:
        item = self.item.json_schema()
        return self._annotate({"anyOf": [item, {"type": "array", "items": item, "minItems": 0 if self.empty else 1}]})


@dataclass(frozen=True)
class Section(Field):
    """A mapping of named fields. ``parse`` checks the keys (an unknown one is refused with the closest
    known key and the list of them; a missing required one is named) and returns the parsed values of
    the keys present; ``complete`` also fills every absent key with its field's default."""

    fields: Mapping[str, Field]
    required: tuple[str, ...] = ()
    doc: str = ""
    default: Any = REQUIRED
    # More JSON Schema keywords (e.g. allOf), or a function building them from registries when asked.
    extra: Mapping[str, Any] | Callable[[], Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, record: type, fields_: Mapping[str, Field], *, doc: str = "", required: tuple[str, ...] = ()) -> Section:
        """The section for a dataclass: each field's default is the dataclass's, so a default lives in
        one place and the JSON Schema shows it."""
        defaults = {}
        for f in fields(record):
            if f.default is not MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not MISSING:
                defaults[f.name] = f.default_factory()
        filled = {k: replace(v, default=defaults[k]) if k in defaults else v for k, v in fields_.items()}
        return cls(filled, required, doc)

    def check_keys(self, raw: Mapping[str, Any], path: str) -> None:
        allowed = list(self.fields)
        for key in raw:
            if key not in self.fields:
                hint = did_you_mean(key, allowed)
                listed = f"allowed keys here: {', '.join(allowed)}" if allowed else "nothing may be set here"
                raise SchemaError(at(path, key), raw[key], f"unknown key{f' ({hint})' if hint else ''}; {listed}")
        for key in self.required:
            if key not in raw:
                raise SchemaError(f"{path}.{key}" if path else key, None, "this field is required")

    def parse(self, raw: Any, path: str) -> dict[str, Any]:
        raw = as_mapping(raw, path)
        self.check_keys(raw, path)
        return {k: f.parse(raw[k], at(path, k)) for k, f in self.fields.items() if k in raw}

    def complete(self, raw: Any, path: str) -> dict[str, Any]:
        raw = as_mapping(raw, path)
        self.check_keys(raw, path)
        return {k: f.parse(raw.get(k, f.default), at(path, k)) for k, f in self.fields.items()}

    def json_schema(self) -> dict:
        schema: dict = {"type": "object", "additionalProperties": False,
                        "properties": {k: f.json_schema() for k, f in self.fields.items()}}
        # Named required keys, else those without a default (a dataset's REQUIRED options).
        required = list(self.required) or [k for k, f in self.fields.items() if f.default is REQUIRED]
        if required:
            schema["required"] = required
        schema.update(_resolve(self.extra))
        return self._annotate(schema)
