"""The subpackages depend on each other in one direction: io < core < model < generation < data < training <
analysis < top (the modules directly under mtprl: cli, and trl_surface, the registry of the whole program's private
TRL / transformers names). Every import statement in src/mtprl (at module level or inside a function, relative or absolute)
is read from the source; one that reaches a later layer fails here, naming file, line and the two layers."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src", "mtprl")
LAYERS = ["io", "core", "model", "generation", "data", "training", "analysis", "top"]


def layer_of(module: str) -> str | None:
    """'mtprl.core.occ' -> 'core'; 'mtprl.cli' -> 'top'; the package itself (re-exports) -> None."""
    parts = module.split(".")
    if parts[0] != "mtprl" or len(parts) == 1:
        return None
    if parts[1] in LAYERS[:-1]:
        return parts[1]
    return "top" if len(parts) == 2 else None


def imported_modules(path: str, module: str):
    """(line, absolute module name) of every mtprl import in one file."""
    package = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            for name in names:
                yield node.lineno, name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def source_files():
    for directory, _, names in os.walk(SRC):
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                rel = os.path.relpath(path, os.path.dirname(SRC))[: -len(".py")].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def violations(files) -> list[str]:
    found = []
    for path, module in files:
        mine = layer_of(module)
        if mine is None:
            continue
        for line, target in imported_modules(path, module):
            theirs = layer_of(target)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                found.append(f"{os.path.relpath(path, ROOT)}:{line}: {mine} imports {target} ({theirs}, a later "
                             "layer)")
    return found


def test_every_module_lives_in_a_layer():
    stray = [m for _, m in source_files() if m != "mtprl" and layer_of(m) is None]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_run_in_one_direction():
    assert violations(source_files()) == []


@pytest.mark.parametrize("statement", ["from ..training.trainer import MTPGRPOTrainer",
                                       "    from ..data.tasks import load_task",
                                       "import mtprl.cli"])
def test_an_import_against_the_direction_is_caught(tmp_path, statement):
    """The check itself: a core module importing from a later layer (relative, lazy, absolute) is reported."""
    path = tmp_path / "occ.py"
    path.write_text(f"def f():\n    pass\n{statement.strip() if not statement.startswith(' ') else 'def g():' + chr(10) + statement}\n")
    found = violations([(str(path), "mtprl.core.occ")])
    assert len(found) == 1 and "core imports" in found[0], found


def test_an_import_along_the_direction_passes(tmp_path):
    path = tmp_path / "trainer.py"
    path.write_text("from ..core.occ import occ_coefficient\nfrom .config import MTPGRPOConfig\nimport torch\n")
    assert violations([(str(path), "mtprl.training.trainer")]) == []
