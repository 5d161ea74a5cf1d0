"""The public surface is what it says: every module's ``__all__`` names what exists and every public
function and class the module defines; the package's API resolves to ``orchestrator.api``'s functions
even where a submodule has the same name; importing the package stays light; an import inside a
function says why it is there."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
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


# A module may give one reason for all its imports inside functions in its docstring ("... imported inside
# functions: ..."); otherwise each group of such imports carries a comment on it or just above it.
_MODULE_REASON = re.compile(r"import(?:ed|s)?(?:\s+only)?\s+inside\s+(?:a\s+|the\s+)?functions?", re.I)


def _unexplained_imports(source: str) -> list[int]:
    """Line numbers of imports inside functions whose group has no comment (on a line of it or just above)."""
    tree = ast.parse(source)
    if _MODULE_REASON.search(ast.get_docstring(tree) or ""):
        return []
    lines = source.splitlines()
    found: list[ast.stmt] = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if inside and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    spans = sorted((n.lineno, n.end_lineno) for n in found)
    groups: list[list[tuple[int, int]]] = []
    for span in spans:  # imports separated only by blank lines form a group
        if groups and all(not lines[i].strip() for i in range(groups[-1][-1][1], span[0] - 1)):
            groups[-1].append(span)
        else:
            groups.append([span])
    bad = []
    for group in groups:
        start = group[0][0]
        above = lines[start - 2].strip() if start >= 2 else ""
        text = [lines[i - 1] for a, b in group for i in range(a, b + 1)]
        if not above.startswith("#") and not any("#" in line for line in text):
            bad.extend(a for a, _ in group)
    return bad


def _source_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for d in ("orchestrator", "trainables") for p in (REPO / d).rglob("*.py"))


@pytest.mark.parametrize("path", _source_files())
def test_an_import_inside_a_function_says_why(path):
    bad = _unexplained_imports((REPO / path).read_text())
    assert not bad, (f"{path}: imports inside functions at lines {bad} give no reason (a comment on the import "
                     "or the line above it; or one reason for all in the module docstring); or move them to the top")


def test_the_import_check_sees_what_it_should():
    quiet = '"""Doc."""\n\n\ndef f():\n    import json\n\n    return json\n'
    assert _unexplained_imports(quiet) == [5]
    assert _unexplained_imports(quiet.replace("import json\n", "import json  # why\n")) == []
    assert _unexplained_imports(quiet.replace("    import json\n", "    # why\n    import json\n")) == []
    assert _unexplained_imports(quiet.replace('"""Doc."""', '"""Doc; json is imported inside functions."""')) == []
    assert _unexplained_imports('import json\n\n\ndef f():\n    return json\n') == []
