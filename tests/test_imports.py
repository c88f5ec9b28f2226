"""Imports point one way (DESIGN.md section 6), read from the source with `ast`.

Every `import` and `from ... import` in src/flashcomm counts, lazy ones inside functions and
TYPE_CHECKING blocks included: an arrow that runs backwards only at call time still ties the
lower layer to the upper one.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "flashcomm"
CORE = ("knobs", "config", "model_args", "layout", "groups", "comm", "sharding", "series", "launch",
        "gathered")
"""The flat core; anything else at the top level must be added here or to a rule below."""
# (importer prefix, forbidden import prefixes, why)
RULES = (
    ("core", ("models", "plan", "cli", "bench", "vllm"), "the core never imports an audience"),
    ("vllm", ("models", "cli", "bench"), "the plugin runs vLLM's own models, never ours"),
    ("plan", ("cli", "bench", "models"),
     "planning reads the checkpoint's args from the core (model_args), never the engine"),
    ("models", ("cli", "bench"), "the engine never imports its commands or benchmarks"),
)


def module_name(path: Path) -> str:
    """'flashcomm.models.engine' -> 'models.engine' for src/flashcomm/models/engine.py."""
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_statements(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in `path`: `import a.b` -> ('a.b', []),
    `from a import b, c` -> ('a', ['b', 'c']), relative imports resolved against the package."""
    tree = ast.parse(path.read_text(), str(path))
    package = [p for p in module_name(path).split(".") if p]
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[: len(package) - node.level + 1]
                mod = ".".join(["flashcomm", *base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out.append((mod, [a.name for a in node.names]))
    return out


def local(name: str) -> str | None:
    """'flashcomm.models.engine' -> 'models.engine', 'flashcomm' -> '', others -> None."""
    if name == "flashcomm":
        return ""
    return name.removeprefix("flashcomm.") if name.startswith("flashcomm.") else None


def imports_of(path: Path) -> set[str]:
    """Every flashcomm module `path` imports, relative to the package ('' = flashcomm); a
    `from m import x` counts as m and m.x (x may be a module)."""
    out = set()
    for mod, names in import_statements(path):
        for n in [mod] + [f"{mod}.{a}" for a in names]:
            if (m := local(n)) is not None:
                out.add(m)
    return out


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The flashcomm modules `path` really depends on: `from pkg import sub` is an edge to the
    module pkg.sub only (Python runs pkg's __init__ first for any submodule; that is not an
    edge of ours), `from m import name` an edge to m."""
    out = set()
    for mod, names in import_statements(path):
        if (m := local(mod)) is None:
            continue
        subs = {f"{m}.{a}" if m else a for a in names} & modules
        out |= subs
        if not names or len(subs) < len(names):
            out.add(m)
    return out


def module_graph() -> dict[str, set[str]]:
    """module -> the flashcomm modules it depends on (see module_imports)."""
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): module_imports(p, modules) for p in paths}


def layer_of(module: str) -> str:
    """The layer a module belongs to: 'core' for the flat modules and the package's own
    __init__ ('' : what `import flashcomm` re-exports), else its package."""
    top = module.split(".")[0]
    return "core" if top in CORE or module == "" else top


def edges() -> dict[str, set[str]]:
    """module -> the flashcomm modules it imports."""
    return {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import edge that breaks a rule, as 'importer -> imported (why)'."""
    out = []
    for importer, imported in graph.items():
        for layer, forbidden, why in RULES:
            if layer_of(importer) != layer:
                continue
            for target in imported:
                if any(target == f or target.startswith(f + ".") for f in forbidden):
                    out.append(f"{importer} -> {target} ({why})")
    return sorted(out)


def test_imports_point_one_way() -> None:
    graph = edges()
    assert {"config", "models.engine", "plan.auto", "cli", "vllm.context"} <= set(graph)
    # the reader sees real edges (so the rules below can fail)
    assert "knobs" in graph["model_args"] and "plan.costmodel" in graph["plan.auto"]
    assert violations(graph) == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle between flashcomm modules (strongly connected components of more
    than one module), found with Tarjan's algorithm. The package root '' is left out: its
    lazy re-exports point at the core, which imports its siblings through it."""
    nodes = {m for m in graph if m}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, set()) & nodes):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_cycle() -> None:
    graph = module_graph()
    assert "models.layers" in graph["models.transformer"]  # the reader sees real edges
    assert "vllm" not in graph["vllm.layers"]  # `from flashcomm.vllm import ops` is vllm.ops
    assert cycles(graph) == []


@pytest.mark.parametrize("planted", [
    {"models.transformer": {"models.moe"}, "models.moe": {"models.transformer"}},
    {"models.layers": {"models.parallel"}, "models.parallel": {"models.step"},
     "models.step": {"models.layers"}},
    {"plan.planner": {"plan.auto"}, "plan.auto": {"plan.strategy"},
     "plan.strategy": {"plan.planner"}},
])
def test_a_planted_cycle_is_caught(planted: dict[str, set[str]]) -> None:
    graph = module_graph()
    for importer, imported in planted.items():
        graph[importer] = graph.get(importer, set()) | imported
    found = cycles(graph)
    assert any(set(planted) <= set(c) for c in found), found


def test_every_top_level_module_is_placed() -> None:
    tops = {m.split(".")[0] for m in edges() if m}
    packages = {layer for layer, _, _ in RULES} | {"cli", "bench", "profiles"}
    assert tops <= set(CORE) | packages, tops - set(CORE) - packages


@pytest.mark.parametrize("source, name, bad", [
    ("from flashcomm.models.engine import Engine\n", "comm.py", "comm -> models.engine"),
    ("def f():\n    import flashcomm.cli.run\n", "layout.py", "layout -> cli.run"),
    ("from flashcomm.models import transformer\n", "vllm/ops.py", "vllm.ops -> models"),
    ("from ..cli import main\n", "plan/auto.py", "plan.auto -> cli"),
    ("from ..bench import e2e\n", "models/engine.py", "models.engine -> bench"),
    ("from flashcomm.models.engine import Engine\n", "__init__.py", " -> models.engine"),
    ("from flashcomm.models.args import ModelArgs\n", "plan/planner.py", "plan.planner -> models"),
    ("from ..models.parallel import TPPlan\n", "model_args.py", "model_args -> models"),
])
def test_a_backward_import_is_caught(tmp_path: Path, monkeypatch, source: str, name: str,
                                     bad: str) -> None:
    f = tmp_path / "flashcomm" / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "flashcomm")
    found = violations({module_name(f): imports_of(f)})
    assert found and found[0].startswith(bad), found


def test_docs_layout_names_every_module() -> None:
    section = (SRC.parents[1] / "docs" / "layout.md").read_text()
    named = {n for n in re.findall(r"`([\w/]+\.py)`", section) if not n.startswith("tests/")}
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
               if p.name != "__main__.py" and (p.name != "__init__.py" or p.read_text().strip())}
    assert modules - named == set(), "modules docs/layout.md does not name"
    assert named - modules == set(), "modules docs/layout.md names but are gone"
