"""Plugins: modules named in a sweep file (``plugins: [mypkg.myparadigm]``) that register their own
datasets, backbones, paradigms, interventions, metrics or samplers when imported.

The driver imports them before the file is validated (``orchestrator.spec.parse_spec``), so their names
are known to every check; every Ray worker imports them before it builds a trial or a pretraining job
(``with_plugins`` wraps the worker's entry point), so a registered name works inside trials too. A plugin
must therefore be importable where fairsweep runs and on every Ray node: installed, or on PYTHONPATH.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from typing import Any, Callable, Sequence, TypeVar

from trainables.errors import UserError

__all__ = ["PluginError", "MODULE_PATTERN", "TRIAL_WORKER_ENV", "TRIAL_WORKER_MODULES", "import_plugin",
           "import_plugins", "with_plugins"]

MODULE_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
"""A dotted module name, as ``import`` accepts it."""
_MODULE_RE = re.compile(MODULE_PATTERN)

F = TypeVar("F", bound=Callable[..., Any])


class PluginError(UserError, ImportError):
    """A plugin module that cannot be imported; the message names it and the cause."""


def import_plugin(module: str) -> None:
    """Import ``module`` (once per process; a second import is a dictionary look-up).

    Any exception its import raises is the plugin's own (its code or its install), so it becomes a
    PluginError naming the module and the original error; the original stays as ``__cause__``.
    """
    if not isinstance(module, str) or not _MODULE_RE.fullmatch(module):
        raise PluginError(f"plugin {module!r} is not a module name; write it as for `import`, e.g. mypkg.myparadigm")
    if module in sys.modules:
        return
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever the plugin's import raises is reported with its name
        raise PluginError(f"plugin module {module!r} cannot be imported: {type(exc).__name__}: {exc}; it must be "
                          "importable where fairsweep runs and on every Ray node (installed, or on PYTHONPATH)") from exc


def import_plugins(modules: Sequence[str]) -> None:
    """Import every module in order (see ``import_plugin``)."""
    for module in modules:
        import_plugin(module)


# What Tune's own runtime_env for trial actors sets (for PyTorch Lightning, which a plugin may use). The launch
# leaves that env out so that trials start in Ray's idle workers (orchestrator/launch.py,
# _trial_actors_in_idle_workers); the worker's entry point sets it instead, before any plugin is imported.
TRIAL_WORKER_ENV = {"PL_DISABLE_FORK": "1"}

# What every trial imports before it trains: torch and timm (with torchvision), Tune's trainable API, the
# training loop and the data. A local launch has Ray's idle workers import them while the driver builds the plan,
# so the workers that run the trials start with them loaded (orchestrator/launch.py, _worker_preload).
TRIAL_WORKER_MODULES = ("torch", "timm", "ray.tune", "trainables.finetune", "trainables.loop",
                        "trainables.feature_cache", "trainables.data")


def with_plugins(fn: F, modules: Sequence[str]) -> F:
    """``fn`` preceded by importing ``modules``: the entry point a Ray worker runs, so a name a plugin
    registers resolves in the worker as in the driver. First it sets TRIAL_WORKER_ENV where the worker has no
    value of its own."""
    names = tuple(modules)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for key, value in TRIAL_WORKER_ENV.items():
            os.environ.setdefault(key, value)
        import_plugins(names)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
