"""The errors fairsweep raises on purpose, and which of them are the user's to fix.

Every such error is a ``FairsweepError``. A ``UserError`` is a mistake the user can fix without touching
the code: a sweep file, a name, a path, an option, a metric, a tracking or study store that cannot be
used as given, a sweep another driver runs. Its message says what was wrong and what to do, so the CLI
prints it and exits 2, without a traceback. Anything else (a ``FairsweepError`` that is not a
``UserError``, or a built-in exception raised by a bug) keeps its traceback and exits 1. That mapping
lives in one place, ``orchestrator.cli.main``; code that turns an error into a message about the user's
input (``build_plan``: a field path of the sweep file) catches ``UserError`` only, never a bare
``ValueError`` that a bug can raise too (docs/architecture.md, decision 13).

Each subclass also derives from the built-in exception it is a kind of (``ValueError``, ``KeyError``,
``RuntimeError``, ...), so callers that catch those keep working. This module sits at the bottom
layer (``trainables``), so the orchestrator and the trainables share one hierarchy.
"""
from __future__ import annotations

__all__ = ["FairsweepError", "UserError"]


class FairsweepError(Exception):
    """An error fairsweep raises on purpose; not necessarily the user's to fix (see ``UserError``)."""


class UserError(FairsweepError):
    """A mistake the user can fix (input, names, paths, environment); the message says how. The CLI exits 2."""
