"""The public surface is what it says: every module's ``__all__`` names what exists and every public
function and class the module defines; the package's API resolves to ``orchestrator.api``'s functions
even where a submodule has the same name; importing the package stays light."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import orchestrator
import trainables
from tests.helpers import REPO, cli_env


def _module_names() -> list[str]:
    return [info.name for package in (orchestrator, trainables)
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


@pytest.mark.parametrize("name", _module_names())
def test_all_is_true(name):
    module = importlib.import_module(name)
    listed = getattr(module, "__all__", None)
    assert listed is not None, f"{name} has no __all__"
    assert len(listed) == len(set(listed)), f"{name}.__all__ repeats a name"
    assert not [n for n in listed if not hasattr(module, n)], f"{name}.__all__ names what {name} lacks"
    defined = [n for n, obj in vars(module).items()
               if not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
               and obj.__module__ == name]
    assert not [n for n in defined if n not in listed], f"{name} defines public names its __all__ leaves out"


def test_the_package_exports_the_api_whatever_was_imported_first():
    """``orchestrator/launch.py`` and ``orchestrator/status.py`` share names with API functions; importing
    them first must not turn ``orchestrator.launch`` into a module."""
    code = ("import orchestrator.launch, orchestrator.status\n"
            "from orchestrator.launch import LaunchOptions\n"
            "import orchestrator\n"
            "from orchestrator import launch, status, front, best, compare, trials, resume, SweepResult\n"
            "import orchestrator.api as api\n"
            "assert launch is api.launch and status is api.status and orchestrator.launch is api.launch\n"
            "assert orchestrator.status is api.status and front is api.front and SweepResult is api.SweepResult\n"
            "assert sorted(orchestrator.__all__) == sorted(n for n in api.__all__ if n in orchestrator.__all__)\n"
            "print('ok', LaunchOptions.__module__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok orchestrator.launch"


def test_importing_the_package_loads_nothing_heavy():
    code = ("import sys, orchestrator\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas', 'orchestrator.api') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
