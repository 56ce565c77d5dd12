"""The package layout tells the design: product code never imports the harness, every import
is one ordinary tools resolve, module-level imports have no cycle, and ``import modes_fx`` loads
neither torchao, scikit-learn, calibration nor the harness."""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import modes_fx

ROOT = Path(modes_fx.__file__).resolve().parent
HARNESS = "modes_fx.harness"
FRONT_END = "modes_fx.cli"  # the `modes` command: runs product and harness commands alike
HARNESS_ONLY = ("sklearn", "matplotlib", "pytest", "hypothesis", "llama_cpp", "gguf")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved; ``from X
    import y`` counts X.y when it is a module, else X)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            submodules = {f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")}
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``base`` itself
                found.add(base)
    return found


def _is_module(name: str) -> bool:
    if not name.startswith("modes_fx."):
        return False
    relative = Path(*name.split(".")[1:])
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
PRODUCT = sorted(m for m in MODULES if not m.startswith(HARNESS) and m != FRONT_END)


def test_the_walk_sees_the_layout():
    assert {"modes_fx.backend", "modes_fx.calib.session", "modes_fx.passes.match_moe_sites", "modes_fx.quant.quantize"} <= set(PRODUCT)
    assert "modes_fx.harness.testing" in MODULES and "modes_fx.harness.testing" not in PRODUCT
    # the walk finds function-level and relative imports
    assert "modes_fx.quant.quantize" in imports_of(MODULES["modes_fx"])
    assert "modes_fx.calib.calibrate" in imports_of(MODULES["modes_fx.calib"])


@pytest.mark.parametrize("name", PRODUCT)
def test_product_code_never_imports_the_harness(name):
    imported = imports_of(MODULES[name])
    assert not [m for m in imported if m == HARNESS or m.startswith(HARNESS + ".")]
    assert not [m for m in imported if m.split(".")[0] in HARNESS_ONLY]


def test_every_modes_fx_import_resolves():
    unresolved = sorted(
        f"{name} imports {target}"
        for name, path in MODULES.items()
        for target in imports_of(path)
        if target.startswith("modes_fx") and importlib.util.find_spec(target) is None
    )
    assert not unresolved


def test_module_level_imports_have_no_cycle():
    """A package's ``__init__`` importing its submodules is no cycle; a module importing a
    package whose ``__init__`` (transitively) imports that module back is."""
    graph = {name: {t for t in imports_of(path, top_level_only=True) if t in MODULES and t != name} for name, path in MODULES.items()}
    done, path = set(), []

    def visit(node: str) -> None:
        if node in path:
            cycle = path[path.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for target in sorted(graph[node]):
            visit(target)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_import_modes_fx_loads_only_the_runtime():
    code = "import sys, modes_fx; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    unwanted = [m for m in loaded if m.split(".")[0] in ("torchao", "sklearn", "matplotlib") or m.startswith((HARNESS, "modes_fx.calib", "modes_fx.quant"))]
    assert not unwanted
    assert "modes_fx.backend" in loaded
