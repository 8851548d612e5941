"""The layer rule, read from the source: each sub-package of eamvit imports only from layers below it.

ops → modules → methods → experiments and plots (side by side: neither imports the other) → cli, with
errors, config, choices and io at the bottom. Imports inside functions count as much as those at the
top of a file (they run too), and a module named by a string (``importlib.import_module("eamvit.…")``,
a table of module names) is refused outright: it hides an import from this check. The package's own
``__init__`` (the public API, imported lazily by name) is the one exception.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, Optional

SRC = Path(__file__).resolve().parents[1] / "src" / "eamvit"

BASE = {"errors", "config", "choices", "columns", "io"}
MODULE_STRING = re.compile(r"eamvit(\.[A-Za-z_]\w*)+")
LAYER = {"base": 0, "ops": 1, "modules": 2, "methods": 3, "experiments": 4, "plots": 4, "cli": 5}


def group(module: str) -> Optional[str]:
    """The layer group of a dotted ``eamvit`` module name (``None`` for the package itself)."""
    parts = module.split(".")
    if parts[0] != "eamvit":
        return None
    if len(parts) == 1 or parts[1] in ("__version__",):
        return "base"  # the package's __init__ imports nothing eagerly: its version is bottom-layer
    return "base" if parts[1] in BASE else parts[1]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted module)`` of every eamvit import in the file, relative ones resolved."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from eamvit import ops` names a sub-package: its layer is the sub-package's
            yield from ((node.lineno, f"{target}.{a.name}" if target == root.name else target) for a in node.names)


def string_imports(path: Path) -> Iterator[int]:
    """Lines that name an eamvit module by a string (to import it out of this check's sight)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
            yield node.lineno


def violations(root: Path) -> list[str]:
    """Every import in ``root``'s files from a group of the same or a higher layer than the file's own
    group (other than the file's own group), and every import of an eamvit module by string."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel == Path("__init__.py"):
            continue  # the public API: names imported lazily, on first use, from every layer
        mine = group(_module_name(path, root))
        for line, target in imports(path, root):
            theirs = group(target)
            if theirs is None or theirs == mine:
                continue
            if LAYER[theirs] >= LAYER[mine]:
                bad.append(f"{rel}:{line} ({mine}) imports {target} ({theirs})")
        bad += [f"{rel}:{line} names an eamvit module by string" for line in string_imports(path)]
    return list(dict.fromkeys(bad))


def test_every_subpackage_has_a_layer():
    subpackages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    assert subpackages <= set(LAYER) and modules <= BASE, (subpackages - set(LAYER), modules - BASE)


def test_src_keeps_the_layer_rule():
    assert violations(SRC) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "eamvit"
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_the_check_finds_upward_sideways_and_string_imports(tmp_path):
    """A package built to break the rule in each way: the check names every breach and nothing else."""
    pkg = _write(tmp_path, {
        "__init__.py": "", "errors.py": "", "io.py": "from eamvit.errors import X\n",
        "ops/__init__.py": "", "ops/a.py": "from eamvit.methods.b import f\nfrom eamvit.io import g\n",
        "methods/__init__.py": "", "methods/b.py": "from ..ops import a\nfrom . import c\n",
        "methods/c.py": "def f():\n    import importlib\n    importlib.import_module('eamvit.methods.b')\n",
        "experiments/__init__.py": "", "experiments/d.py": "from eamvit import plots\n",
        "plots/__init__.py": "", "plots/e.py": "import eamvit.experiments.d\n",
        "cli/__init__.py": "", "cli/f.py": "from eamvit.plots.e import p\nfrom eamvit.experiments import d\n",
    })
    assert violations(pkg) == [
        "experiments/d.py:1 (experiments) imports eamvit.plots (plots)",
        "methods/c.py:3 names an eamvit module by string",
        "ops/a.py:1 (ops) imports eamvit.methods.b (methods)",
        "plots/e.py:1 (plots) imports eamvit.experiments.d (experiments)",
    ]
