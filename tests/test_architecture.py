"""The codebase's shape, checked: no import cycles among moelab's modules (imports inside functions count), no file
over 800 lines, no function over 120 lines, and the torch-free modules import with torch blocked.

The import graph is built with ``ast`` from src/moelab, so it sees every import statement, lazy ones included.
An edge goes to the module an import names: ``from .x import y`` goes to ``x.y`` when that is a module, else to
``x`` (for a package, its ``__init__``). Importing a submodule is not counted as depending on its package's
``__init__`` (Python runs it, but an ``__init__`` that only re-exports its children adds no design dependency);
importing a *name* from a package does depend on the ``__init__``, and so on everything that ``__init__`` imports.
Imports under ``if TYPE_CHECKING:`` never run and are left out. A package ``__init__`` that loads its children
with ``importlib.import_module`` (moelab.sweep's lazy exports) is counted as importing every direct submodule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "moelab"
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 120


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The moelab modules that module ``name`` (file ``path``) imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and path.name == "__init__.py" and "import_module" in ast.unparse(node.func):
            out |= {m for m in known if m.rpartition(".")[0] == name}  # a lazy re-export table: all children
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base not in known:
                continue
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
            out |= subs
            if len(subs) < len(node.names):  # some names come from the module (or package __init__) itself
                out.add(base)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_known_cycle_and_ignores_a_chain():
    """The checker itself: a -> b -> c -> a is one cycle, a diamond is none."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []


def test_graph_sees_lazy_and_relative_imports():
    """Spot checks that the graph reads function-level and relative imports (else the no-cycle test is vacuous)."""
    g = import_graph()
    assert "moelab.analysis" in g["moelab.cli_study"]  # imports analysis inside its command functions
    assert "moelab.analysis.table" in g["moelab.analysis.surface"]  # from .table import ...
    assert "moelab.accounting" in g["moelab.analysis.table"]  # lazy, two levels up (from ..accounting import)
    assert "moelab.sweep.orchestrator" in g["moelab.sweep"]  # through the package's importlib re-export table


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_file_over_800_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    long = {f: n for f, n in sizes.items() if n > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_120_lines():
    long = {}
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(SRC)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


TORCH_FREE = ["moelab.tasks", "moelab.fileio", "moelab.errors", "moelab.artifacts", "moelab.analysis",
              "moelab.analysis.runs", "moelab.analysis.table", "moelab.analysis.surface", "moelab.analysis.shift"]
TORCH_FREE_PACKAGES = ["moelab.laws", "moelab.sweep"]  # every module in them

_BLOCK_TORCH = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
for m in sys.argv[1:]:
    importlib.import_module(m)
assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules), "torch got imported"
print("ok", len(sys.argv) - 1)
"""


def torch_free_modules() -> list[str]:
    names = set(modules())
    return TORCH_FREE + sorted(m for m in names if any(m == p or m.startswith(p + ".") for p in TORCH_FREE_PACKAGES))


@pytest.mark.parametrize("blocked", [False, True], ids=["control", "torch-blocked"])
def test_torch_free_modules_import_without_torch(blocked):
    """Each torch-free module imports in a fresh interpreter where ``import torch`` fails. The control run imports
    ``moelab.model`` (which needs torch) under the same hook and must fail, so the hook is known to work."""
    mods = ["moelab.model"] if not blocked else torch_free_modules()
    r = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, *mods], capture_output=True, text=True, cwd=SRC)
    if blocked:
        assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]
    else:
        assert r.returncode != 0 and "blocked: torch" in r.stderr
