"""The house's shape, read from the code's own imports: the layer contract of pyproject.toml holds (and fails on an
import that runs up), no package has an import cycle, and no module or function outgrows its bound
(docs/architecture.md)."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "prep", "train", "evaluate", "benchmarks")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports, at the top or inside functions (``from pkg import mod`` counts
    as importing the module)."""

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    graph = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            found |= {r for n in names if (r := resolve(n)) and r != mod}
        graph[mod] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), a package's ``__init__`` re-exporting its
    own modules left out."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return [c for c in out if not any(m in PACKAGES for m in c)]


def test_the_layer_contract_holds():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, line, names", [
    ("store/format.py", "from train import config  # noqa: F401", "store is not allowed to import train"),
    ("train/config.py", "import prep.splits  # noqa: F401", "train is not allowed to import prep"),
])
def test_an_import_that_runs_up_or_across_breaks_the_contract(tmp_path, module, line, names):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0 and names in r.stdout, r.stdout + r.stderr


def test_no_import_cycle():
    assert _cycles(_imports(_modules())) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"evaluate.a": {"evaluate.b"}, "evaluate.b": {"evaluate.c"}, "evaluate.c": {"evaluate.a"},
             "evaluate": {"evaluate.a"}, "store.x": set()}
    assert _cycles(graph) == [["evaluate.a", "evaluate.b", "evaluate.c"]]


def test_modules_and_functions_stay_within_their_bounds():
    long_modules, long_functions = [], []
    for mod, path in _modules().items():
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            long_modules.append(f"{mod} {n}")
        for node in ast.walk(ast.parse(text)):
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                long_functions.append(f"{mod}.{node.name} {n}")
    assert long_modules == [] and long_functions == []
