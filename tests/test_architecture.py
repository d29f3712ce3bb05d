"""The package's shape (ARCHITECTURE.md §4): imports run one way, no module takes another's private name, files stay
small, every subpackage says what it holds. Read from the source with ``ast``: nothing is imported or run."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import timm_deprune

ROOT = Path(timm_deprune.__file__).parent
PACKAGE = "timm_deprune"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every package-internal import, lazy ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
            found.extend((node.module, alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend((a.name, "", node.lineno) for a in node.names if a.name.startswith(PACKAGE + "."))
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> modules whose import it triggers. A package's ``__init__`` runs before its modules, but the
    importer's own ancestors are already initialising, so they are no edge."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for target, imported, _ in _imports(name, path):
            module = f"{target}.{imported}" if f"{target}.{imported}" in MODULES else target
            chain = module.split(".")
            for i in range(2, len(chain) + 1):  # each package on the way, then the module itself
                dep = ".".join(chain[:i])
                if dep in MODULES and dep != name and not name.startswith(dep + "."):
                    deps.add(dep)
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_graph_sees_imports():
    # the checks above would pass on an empty graph: make sure they read real edges
    graph = _graph()
    assert "timm_deprune.kernels.op" in graph["timm_deprune.layers"]
    assert "timm_deprune.pruning.plan" in graph["timm_deprune.hub.io"]
    assert "timm_deprune.pruning" in graph["timm_deprune.hub.io"]  # the package's __init__ runs first


def test_no_private_name_crosses_modules():
    bad = []
    for name, path in MODULES.items():
        for target, imported, line in _imports(name, path):
            private = imported.startswith("_") and not imported.startswith("__")
            if private and f"{target}.{imported}" not in MODULES and imported != "_C":
                bad.append(f"{path.relative_to(ROOT)}:{line} takes {target}.{imported}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("name", sorted(n for n, p in MODULES.items() if p.name == "__init__.py"))
def test_packages_say_what_they_hold(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc and len(doc.split()) >= 8, f"{name}/__init__.py must open with a docstring saying what it holds"


def test_cited_documents_exist():
    repo = ROOT.parent.parent
    if not (repo / "pyproject.toml").is_file():
        pytest.skip("not a source checkout: the documents live in the repository")
    cited = set()
    for path in MODULES.values():
        text = path.read_text()
        cited.update(doc for doc in ("ARCHITECTURE.md", "BENCHMARKS.md", "RESULTS.md", "DESIGN.md", "README.md")
                     if doc in text)
    assert cited, "no module cites a design document"
    missing = sorted(d for d in cited if not (repo / d).is_file())
    assert not missing, f"documents cited by the source but missing from the repository: {missing}"
