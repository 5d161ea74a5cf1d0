"""fairsweep's Python API: launch a sweep, resume it, ask where it stands and query its front.

    from orchestrator import launch, front
    result = launch("sweeps/quickstart.yaml", quiet=True)   # a SweepResult: .front, .parent_run_id, .trials
    front("quickstart")                                      # the same front, read back from MLflow later

The functions are ``orchestrator.api``'s (see there and the README's "From Python"); they load on first
use, so importing this package (as the ``fairsweep`` command does) stays light.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__all__ = ["launch", "resume", "status", "trials", "front", "best", "compare", "SweepResult"]

if TYPE_CHECKING:
    from orchestrator.api import SweepResult, best, compare, front, launch, resume, status, trials


def __getattr__(name: str) -> Any:
    """``orchestrator.launch`` and the rest, imported from ``orchestrator.api`` when first asked for."""
    if name in __all__:
        return getattr(importlib.import_module("orchestrator.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``orchestrator.launch`` and ``orchestrator.status`` the API's functions. Python binds a submodule
    to its package's attribute of the same name when it is first imported (``orchestrator/launch.py``,
    ``orchestrator/status.py``); that binding is skipped here, so the attribute stays resolved by
    ``__getattr__``. The submodules stay importable as ever: ``from orchestrator.launch import LaunchOptions``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
