"""The layers of ``llmpipe/`` (ARCHITECTURE.md): every import points down, no cycles, no private reach-ins.

Read from the sources with ``ast``, so imports inside functions and under
``TYPE_CHECKING`` count as much as those at the top. Each test also runs
the check on a deliberately broken copy of the sources, to show that it
fails when it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmpipe"

LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("defaults",),
    ("numerics", "format", "tokenization"),
    ("models",),
    ("engine",),
    ("codec",),
    ("steering",),
    ("pipeline",),
    ("scale",),
    ("api", "cli"),
    ("__main__", ""),  # "": the package's own __init__, which offers ``api`` lazily
]
"""Bottom to top. A module may import from its own unit (top-level module or subpackage of ``llmpipe``)
and from units of lower layers; never from its own layer's other units or from above."""
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def sources(root: Path = PACKAGE) -> dict[str, str]:
    """Every module of the package by dotted name (``llmpipe.codec.coder``; packages by their own name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path.read_text()
    return found


def imports(name: str, source: str, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from llmpipe import x`` is module ``llmpipe.x`` when
    there is one), wherever in the module the import statement is."""
    package = name if name in modules and _is_package(name, modules) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "llmpipe"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "llmpipe":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found - {name}


def _is_package(name: str, modules: set[str]) -> bool:
    return any(other.startswith(name + ".") for other in modules)


def unit(name: str) -> str:
    """``llmpipe.codec.coder`` -> ``codec``; the package itself -> ``""``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(modules: dict[str, str]) -> list[str]:
    """Every import that points sideways or up the layers, as ``importer -> imported``."""
    names = set(modules)
    bad = []
    for name, source in modules.items():
        for target in sorted(imports(name, source, names)):
            mine, theirs = unit(name), unit(target)
            if mine != theirs and LAYER_OF[theirs] >= LAYER_OF[mine]:
                bad.append(f"{name} -> {target}")
    return bad


def cycles(modules: dict[str, str]) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan's algorithm)."""
    names = set(modules)
    graph = {name: sorted(imports(name, source, names)) for name, source in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def private_reach_ins(modules: dict[str, str]) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``: another object's private field (third-party modules'
    private functions, such as ``torch._int_mm``, are the libraries' business)."""
    bad = []
    for name, source in modules.items():
        tree = ast.parse(source)
        outside = {
            (alias.asname or alias.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name.split(".")[0] != "llmpipe"
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls", *outside):
                continue
            bad.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_every_module_is_in_a_layer():
    assert {unit(name) for name in sources()} <= set(LAYER_OF)


def test_imports_point_down_the_layers():
    assert upward_imports(sources()) == []


def test_a_reversed_import_is_caught():
    broken = sources()
    broken["llmpipe.format.container"] += "\nfrom llmpipe.pipeline.compress import Compressor\n"
    broken["llmpipe.engine.session"] += "\ndef _late():\n    from llmpipe.codec import frequencies\n"
    assert upward_imports(broken) == [
        "llmpipe.engine.session -> llmpipe.codec.frequencies",
        "llmpipe.format.container -> llmpipe.pipeline.compress",
    ]


def test_no_import_cycles():
    assert cycles(sources()) == []


def test_a_cycle_is_caught():
    broken = sources()
    broken["llmpipe.engine.kernels"] += "\nfrom llmpipe.engine.integer_ops import ACT_MAX\n"
    assert ["llmpipe.engine.integer_ops", "llmpipe.engine.kernels"] in cycles(broken)


def test_no_module_reaches_into_another_objects_private_fields():
    assert private_reach_ins(sources()) == []
    broken = sources()
    broken["llmpipe.pipeline.resume"] += "\ndef _peek(reader):\n    return reader._source\n"
    assert private_reach_ins(broken) == ["llmpipe.pipeline.resume:47: reader._source"]


def test_modules_stay_small():
    """About 400 lines at most: a module that grows past it is doing two jobs (ARCHITECTURE.md)."""
    long = {name: source.count("\n") for name, source in sources().items() if source.count("\n") > 420}
    assert long == {}


def test_every_folder_of_the_package_is_a_package():
    """A folder without ``__init__.py`` is a namespace package: it imports from a checkout but is left out
    of an installed wheel (setuptools finds regular packages only)."""
    folders = {path.parent for path in PACKAGE.rglob("*.py")} - {PACKAGE}
    assert sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").exists()) == []
