"""The packages import one way: no module-level import cycle, and each package imports only the
project packages its row of `RULES` names, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "cli", "datasets_io", "diffs", "registry", "serving", "settings", "worker")

# package -> the other project packages (or single modules) it may import, at any level.
# The same arrows are drawn in README.md ("Dependency direction").
RULES: dict[str, frozenset[str]] = {
    "settings": frozenset(),
    "diffs": frozenset({"settings"}),
    "datasets_io": frozenset({"settings"}),
    "registry": frozenset({"diffs", "settings"}),
    "serving": frozenset({"diffs", "registry", "settings"}),
    "worker": frozenset({"datasets_io", "diffs", "registry", "settings"}),
    # Of worker, only the light modules (no torch; tests/test_api_app.py checks the import):
    # the Celery app, the queueing names and the diff-pruning job parameters (quota, density).
    "api": frozenset(
        {
            "datasets_io",
            "diffs",
            "registry",
            "serving",
            "settings",
            "worker.app",
            "worker.queueing",
            "worker.diffprune.config",
        }
    ),
    "cli": frozenset({"datasets_io", "diffs", "registry", "serving", "settings", "worker"}),
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


def _imported(node: ast.AST, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules an import statement names (a `from` import of a submodule counts as
    that submodule)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    if not isinstance(node, ast.ImportFrom):
        return set()
    module = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        is_package = modules[name].name == "__init__.py"
        parts = name.split(".")[: len(name.split(".")) - node.level + is_package]
        module = ".".join(parts + ([module] if module else []))
    if module.split(".")[0] not in PACKAGES:
        return set()
    found = set()
    for alias in node.names:
        submodule = f"{module}.{alias.name}"
        found.add(submodule if submodule in modules else module)
    return found


def _module_graph(*, module_level_only: bool) -> dict[str, set[str]]:
    """Module -> the project modules it imports (module-level statements only, or all)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level_only else ast.walk(tree)
        for node in nodes:
            graph[name] |= _imported(node, name, modules)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state and nxt in graph:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def _allowed(package: str, module: str) -> bool:
    if module.split(".")[0] == package:
        return True
    return any(module == rule or module.startswith(rule + ".") for rule in RULES[package])


def test_no_module_level_import_cycle():
    # Module level only: an import inside a function runs after every module has loaded.
    graph = _module_graph(module_level_only=True)
    graph = {name: deps for name, deps in graph.items() if ".migrations." not in name}
    assert _cycles(graph) == []


def test_every_package_has_a_rule():
    assert set(RULES) == set(PACKAGES)


def test_each_package_imports_only_what_its_rule_allows():
    graph = _module_graph(module_level_only=False)
    broken = sorted(
        (name, dep)
        for name, deps in graph.items()
        for dep in deps
        if not _allowed(name.split(".")[0], dep)
    )
    assert broken == []


def test_the_rules_catch_a_function_level_import():
    tree = ast.parse("def f():\n    from worker.diffprune.trainer import train\n")
    modules = _modules()
    found = set().union(*(_imported(node, "api.app", modules) for node in ast.walk(tree)))
    assert found == {"worker.diffprune.trainer"}
    assert not _allowed("api", "worker.diffprune.trainer")
    assert _allowed("api", "worker.diffprune.config")
    assert not _allowed("serving", "api.app")
    assert not _allowed("diffs", "registry.models")
