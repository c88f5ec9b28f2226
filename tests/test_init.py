"""`import flashcomm` exports the library API lazily, and docs/library-api.md lists
exactly those names and runs as the script it claims to be."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flashcomm

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "library-api.md"


def _library_api_section() -> str:
    return API_PAGE.read_text()


def test_every_export_resolves_to_its_defining_module() -> None:
    assert sorted(flashcomm.__all__) == sorted(flashcomm._MODULE_OF)
    for name in flashcomm.__all__:
        module = importlib.import_module(flashcomm._MODULE_OF[name])
        assert getattr(flashcomm, name) is getattr(module, name), name
        assert name in dir(flashcomm)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        _ = flashcomm.NoSuchThing


def test_import_flashcomm_and_the_cli_load_no_torch() -> None:
    code = ("import sys, flashcomm, flashcomm.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
            "or m in ('flashcomm.groups', 'flashcomm.launch', 'flashcomm.sharding', "
            "'flashcomm.series')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_docs_library_api_lists_the_exports_and_its_example_runs(tmp_path: Path) -> None:
    section = _library_api_section()
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert listed == set(flashcomm.__all__)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    imported = {a.name for node in ast.walk(ast.parse(code)) if isinstance(node, ast.ImportFrom)
                and node.module == "flashcomm" for a in node.names}
    assert imported and imported <= set(flashcomm.__all__)
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    errors = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 and max(errors) < 1e-4, errors
