"""The layer rules of DESIGN.md ("Layout"), checked on what importing each layer really loads.

Each package is imported whole, every module found by walking it, in a fresh interpreter; the modules
that appeared in ``sys.modules`` meanwhile are compared with what the layer may use:

- ``policies`` uses the standard library only (and itself);
- ``storage`` never imports torch (nor transformers, peft, avalanche);
- ``learners`` never imports ``storage`` or SQLAlchemy;
- only ``daemon`` imports ``daemon``: the other layers never do;
- inside ``daemon`` no module-level imports go round in a circle (read from the source).
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("policies", "storage", "learners")
"""Every package except ``daemon``, which wires them together and may import anything."""
NOT_IMPORTABLE = {"selftune.storage.migrations.env": "Alembic loads it (it needs alembic's context): run a migration"}
"""Modules that only a tool loads, and how the walk loads them instead."""
RUN_AFTER_IMPORT = {
    "storage": "from selftune.storage import make_engine, migrate, sqlite_url\n"
    "engine = make_engine(sqlite_url(sys.argv[2]))\nmigrate(engine)\nengine.dispose()\n",
}
"""Code run in the fresh interpreter after the imports, so that the modules in ``NOT_IMPORTABLE`` run too."""
TORCH_STACK = {"torch", "transformers", "peft", "avalanche"}
WALK = """
import importlib, json, pkgutil, sys
before = set(sys.modules)
package = importlib.import_module(sys.argv[1])
imported = [package.__name__]
skip = set(json.loads(sys.argv[3]))

def fail(name):
    raise ImportError(f"walking {sys.argv[1]}: could not import {name}")

for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".", onerror=fail):
    if info.name not in skip:
        importlib.import_module(info.name)
        imported.append(info.name)
"""


@functools.cache
def load(layer: str, scratch: Path) -> tuple[list[str], set[str]]:
    """Import every module of ``selftune.<layer>`` in a fresh interpreter: the modules imported, and every
    module that the imports added to ``sys.modules``."""
    code = WALK + RUN_AFTER_IMPORT.get(layer, "") + (
        'print(json.dumps({"imported": imported, "loaded": sorted(set(sys.modules) - before)}))\n'
    )
    database = scratch / f"{layer}.db"  # a fresh one: the migration really runs
    args = [sys.executable, "-c", code, f"selftune.{layer}", str(database), json.dumps(list(NOT_IMPORTABLE))]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=scratch)
    assert done.returncode == 0, f"importing selftune.{layer} failed:\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.splitlines()[-1])
    return result["imported"], set(result["loaded"])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layers")


def top_levels(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def first_party(modules: set[str]) -> set[str]:
    """The selftune packages among ``modules``: {"policies", "storage", ...}."""
    return {name.split(".")[1] for name in modules if name.startswith("selftune.")}


@pytest.mark.parametrize("layer", LAYERS)
def test_the_walk_imports_every_module_of_the_layer(layer: str, scratch: Path) -> None:
    imported, _ = load(layer, scratch)
    folder = ROOT / layer
    on_disk = {
        ".".join(["selftune", layer, *path.relative_to(folder).with_suffix("").parts]).removesuffix(".__init__")
        for path in folder.rglob("*.py")
    }
    assert set(imported) == on_disk - set(NOT_IMPORTABLE)


def test_policies_imports_the_standard_library_only(scratch: Path) -> None:
    _, loaded = load("policies", scratch)
    third_party = top_levels(loaded) - set(sys.stdlib_module_names) - {"selftune"}
    assert third_party == set(), f"selftune.policies loaded {sorted(third_party)}: it may use the standard library only"
    assert first_party(loaded) == {"policies"}


def test_storage_never_imports_torch(scratch: Path) -> None:
    _, loaded = load("storage", scratch)
    heavy = top_levels(loaded) & TORCH_STACK  # with the migration run too, so env.py is covered
    assert heavy == set(), f"selftune.storage loaded {sorted(heavy)}: storage never imports torch and its stack"
    assert first_party(loaded) <= {"storage", "policies"}


def test_learners_never_import_storage_or_sqlalchemy(scratch: Path) -> None:
    _, loaded = load("learners", scratch)
    assert "sqlalchemy" not in top_levels(loaded)
    assert first_party(loaded) <= {"learners", "policies"}


@pytest.mark.parametrize("layer", LAYERS)
def test_only_the_daemon_imports_the_daemon(layer: str, scratch: Path) -> None:
    _, loaded = load(layer, scratch)
    assert "daemon" not in first_party(loaded)


def _module_level_daemon_imports(path: Path) -> set[str]:
    """The ``selftune.daemon`` modules that ``path`` imports when it is imported (not those inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selftune.daemon"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if (ROOT / "daemon" / (submodule.removeprefix("selftune.daemon.")
                                                            .replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("selftune.daemon")}
    return found


def test_no_import_circle_inside_the_daemon() -> None:
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        name = "selftune." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = _module_level_daemon_imports(path)
    assert len(graph) > 20, "the walk found too few daemon modules"
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path[path.index(module):] + (module,))}"
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + (module,))
        done.add(module)

    for module in graph:
        visit(module, ())
