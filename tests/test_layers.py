"""The import rules of docs/architecture.md, read from the source (lazy imports inside functions too).

The agents, the checkpoint stores and the kernels run on the workers: of the control plane they
may import only `spotrain.contracts`, which imports nothing else of spotrain. And no module imports itself back.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ALLOWED = {  # a package: the parts of spotrain its modules may import
    "spotrain.agents": ("spotrain.contracts", "spotrain.agents", "spotrain.kernels", "spotrain.stores"),
    "spotrain.kernels": ("spotrain.contracts", "spotrain.kernels"),
    "spotrain.stores": ("spotrain.contracts", "spotrain.stores"),
    "spotrain.contracts": ("spotrain.contracts",),
}
MAX_FUNCTION_LINES = 59  # the house rule: every function of the package under 60 lines


def source_files() -> dict[str, Path]:
    """Module name -> file, through pyproject's package-dir (the folder agents/ is spotrain.agents)."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        package_dirs = tomllib.load(handle)["tool"]["setuptools"]["package-dir"]
    files = {}
    for package, folder in package_dirs.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            files[".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return files


def imported(module: str, path: Path, modules: set[str]) -> set[str]:
    """What `module` imports: `from a import b` counts as a.b where that is a module, else as a."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            for alias in node.names:
                names.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


FILES = source_files()
IMPORTS = {module: imported(module, path, set(FILES)) for module, path in FILES.items()}


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The modules of every import cycle, one set per cycle (strongly connected component)."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for following in graph[todo.pop()] - seen:
                seen.add(following)
                todo.append(following)
        reach[start] = seen
    return {frozenset(m for m in reach[start] if start in reach[m]) for start in graph if start in reach[start]}


def test_the_worker_side_imports_only_the_contracts_of_the_control_plane():
    broken = [f"{module} imports {name}" for module, names in sorted(IMPORTS.items())
              for package, allowed in ALLOWED.items() if within(module, package)
              for name in sorted(names) if within(name, "spotrain") and not any(within(name, a) for a in allowed)]
    assert not broken, "\n".join(broken)


def test_no_import_cycle():
    graph = {module: {name for name in names if name in IMPORTS and name != module}
             for module, names in IMPORTS.items()}
    found = sorted(" <-> ".join(sorted(cycle)) for cycle in cycles(graph))
    assert not found, "import cycles between:\n" + "\n".join(found)


def test_the_rules_see_lazy_and_relative_imports(tmp_path):
    path = tmp_path / "__init__.py"
    path.write_text("from . import a\n\ndef f():\n    from ..b import c\n    import d.e\n")
    assert imported("p.q", path, {"p.q.a", "p.b.c"}) == {"p.q.a", "p.b.c", "d.e"}
    assert "spotrain.kernels.accelerated" in IMPORTS["spotrain.kernels.blockwise"]  # inside a function


def test_every_function_outside_tests_and_benchmarks_is_under_60_lines():
    scripts = {f"examples/{path.name}": path for path in sorted((ROOT / "examples").glob("*.py"))}
    assert scripts  # the demo checks: not in the package, still under the rule
    long = [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for module, path in sorted({**FILES, **scripts}.items())
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)
