"""The architecture, checked from the source (docs/architecture.md describes it):

- no import cycle among the package's modules, function-level imports counted (imports under
  ``if TYPE_CHECKING:`` are annotations only and not counted);
- no private name (``_x``) imported from another module;
- the library path (the family pipelines, the branch model, the row alterations, the sampler
  core) names no method and no method's branch, and reads no attribute a single method defines,
  outside the provider table (pipelines/conditions.py, with GFCG's pipelines/guide_classifier.py):
  a method is its own file, and a new one costs that file plus at most one provider.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from guidance_engine import method_class, method_names
from guidance_engine.guidance import Guidance

ROOT = Path(__file__).resolve().parents[1]
#: package name -> source folder (pyproject.toml's package-dir)
PACKAGES = {"guidance_engine": ROOT / "guidance_engine", "guidance_engine.pipelines": ROOT / "pipelines",
            "guidance_engine.samplers": ROOT / "samplers", "guidance_engine.cuda": ROOT / "cuda"}
#: where methods and their branches may be named in pipelines/: the provider table
PROVIDERS = {"guidance_engine.pipelines.conditions", "guidance_engine.pipelines.guide_classifier"}
#: the apps (CLI, batch, demo) and the toy world (data set, training, tiny models, evaluation kit):
#: they choose methods for people (defaults, benchmark settings), they do not wire them
OUTSIDE = ("guidance_engine.pipelines.apps", "guidance_engine.pipelines.toy")


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def _runtime_imports(tree: ast.Module):
    """Every import node outside ``if TYPE_CHECKING:`` blocks, at any depth."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped]


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    private = []
    for module, path in MODULES.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges[module].update(alias.name for alias in node.names if alias.name in MODULES)
                continue
            target = _target(module, path, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    edges[module].add(f"{target}.{alias.name}")
                elif target in MODULES:
                    edges[module].add(target)
                if alias.name.startswith("_") and target != "__future__" and target.startswith("guidance_engine"):
                    private.append((module, target, alias.name))
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert _cycles(_graph()[0]) == []


def test_an_import_cycle_is_detected() -> None:
    """The check can fail: a cycle added to the graph is found."""
    edges = {m: set(targets) for m, targets in _graph()[0].items()}
    edges["guidance_engine.samplers.loop"].add("guidance_engine.pipelines.common")
    assert any("guidance_engine.pipelines.common" in cycle for cycle in _cycles(edges))


def test_no_private_name_is_imported_across_modules() -> None:
    assert _graph()[1] == []


def _outside(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in OUTSIDE)


def _library_modules() -> dict[str, Path]:
    """The library path: the pipelines package (not its apps and toy world) and the sampler core."""
    return {m: p for m, p in MODULES.items()
            if (m.startswith("guidance_engine.pipelines") or m.startswith("guidance_engine.samplers"))
            and not _outside(m)}


def _module_level_imports(module: str) -> set[str]:
    """The package modules ``module`` imports when it is imported (top-level statements)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            target = _target(module, path, node)
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return {m for m in found | parents if m in MODULES}


def test_importing_the_library_loads_neither_the_apps_nor_the_toy_world() -> None:
    """The library path never imports the apps, and reaches the toy world (the shipped shapes
    classes) only inside a call that asks for GFCG on the shipped models."""
    bridge = "guidance_engine.pipelines.guide_classifier"  # GFCG on the shipped shapes models
    for start in set(_library_modules()) - {bridge}:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            todo.extend(_module_level_imports(module))
        reached = sorted(m for m in seen if _outside(m) or m == bridge)
        assert not reached, f"importing {start} imports {reached}"


def _method_vocabulary() -> tuple[set[str], set[str]]:
    """(names a method owns: registered names and the branch names methods declare, attributes
    that only method classes define)."""
    names, attributes = set(method_names()), set()
    base = set(dir(Guidance))
    for name in method_names():
        cls = method_class(name)
        for klass in cls.__mro__:
            if klass in (Guidance, object):
                break
            attributes.update(a for a in vars(klass) if a not in base and not a.startswith("__"))
    names |= {"negative", "cond2", "icg_random_tokens", "icg_noise", "gfcg_class_0"}
    return names, attributes


def _strings_and_reads(tree: ast.Module) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """String constants that are not docstrings, and attributes read on a guidance object
    (receivers named guide / guidance / method / inner)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    strings, reads = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            strings.append((node.lineno, node.value))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id in ("guide", "guidance", "method", "inner"):
            reads.append((node.lineno, node.attr))
    return strings, reads


@pytest.mark.parametrize("module", sorted(set(_library_modules()) - PROVIDERS))
def test_the_library_path_names_no_method(module) -> None:
    names, attributes = _method_vocabulary()
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    strings, reads = _strings_and_reads(tree)
    named = [(line, text) for line, text in strings if text in names]
    read = [(line, attr) for line, attr in reads if attr in attributes]
    imported = [node.lineno for node in _runtime_imports(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("guidance_engine.methods")]
    assert not named, f"{path.name} names methods or their branches at lines {named}: move it to conditions.py"
    assert not read, f"{path.name} reads method-specific attributes {read}: declare them on Guidance"
    assert not imported, f"{path.name} imports a method (lines {imported}): go through the provider table"


def test_every_lazy_export_of_the_pipelines_package_resolves() -> None:
    """``guidance_engine.pipelines`` imports its attributes on first use, from the module its
    table names: each must be found there (a class moved to another module, its entry not)."""
    import guidance_engine.pipelines as pipelines
    for name in pipelines.__all__:
        assert getattr(pipelines, name) is not None, name
