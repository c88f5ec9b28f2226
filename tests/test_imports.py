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
CORE = ("knobs", "config", "layout", "groups", "comm", "sharding", "series", "launch", "gathered")
"""The flat core; anything else at the top level must be added here or to a rule below."""
# (importer prefix, forbidden import prefixes, why)
RULES = (
    ("core", ("models", "plan", "cli", "bench", "vllm"), "the core never imports an audience"),
    ("vllm", ("models", "cli", "bench"), "the plugin runs vLLM's own models, never ours"),
    ("plan", ("cli", "bench", "models.engine", "models.launcher"),
     "planning reads model args, never runs the engine"),
    ("models", ("cli", "bench"), "the engine never imports its commands or benchmarks"),
)


def module_name(path: Path) -> str:
    """'flashcomm.models.engine' -> 'models.engine' for src/flashcomm/models/engine.py."""
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every flashcomm module `path` imports, relative to the package ('' = flashcomm)."""
    tree = ast.parse(path.read_text(), str(path))
    package = [p for p in module_name(path).split(".") if p]
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[: len(package) - node.level + 1]
                mod = ".".join(["flashcomm", *base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            # `from flashcomm.models import engine` imports flashcomm.models.engine too
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n.removeprefix("flashcomm.") if n != "flashcomm" else ""
                for n in names if n == "flashcomm" or n.startswith("flashcomm.")}
    return out


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
    assert "knobs" in graph["models.args"] and "plan.costmodel" in graph["plan.auto"]
    assert violations(graph) == []


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
])
def test_a_backward_import_is_caught(tmp_path: Path, monkeypatch, source: str, name: str,
                                     bad: str) -> None:
    f = tmp_path / "flashcomm" / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "flashcomm")
    found = violations({module_name(f): imports_of(f)})
    assert found and found[0].startswith(bad), found


def test_readme_layout_names_every_module() -> None:
    readme = (SRC.parents[1] / "README.md").read_text()
    section = readme.split("## Layout of the code", 1)[1].split("\n## ", 1)[0]
    named = {n for n in re.findall(r"`([\w/]+\.py)`", section) if not n.startswith("tests/")}
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
               if p.name != "__main__.py" and (p.name != "__init__.py" or p.read_text().strip())}
    assert modules - named == set(), "modules the README's layout section does not name"
    assert named - modules == set(), "modules the README's layout section names but are gone"
