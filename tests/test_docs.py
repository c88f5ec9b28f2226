"""Every command shown in README.md and docs/*.md is run by some test, with its exact text.

A test takes a command with `doc_command(page, prefix)` (tests/doc_commands.py); this file reads
those calls out of every test with `ast` and checks that each shown command is taken once and
that no call names a command that is gone. The cheap CLI commands run here, on small random
checkpoints; the rest run in the tests that own their subject (vLLM, pipeline, benchmarks).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import PAGES, ROOT, doc_argv, doc_command, page_commands

from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint

TESTS = Path(__file__).resolve().parent
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def claims() -> list[tuple[str, str, str]]:
    """(page, prefix, test file) of every literal doc_command(page, prefix) call in tests/."""
    out = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "doc_command"
                    and len(node.args) == 2
                    and all(isinstance(a, ast.Constant) for a in node.args)):
                out.append((node.args[0].value, node.args[1].value,
                            str(path.relative_to(TESTS))))
    return out


def test_every_shown_command_is_run_by_a_test() -> None:
    taken = claims()
    assert len(taken) > 10  # the reader sees the calls (so the check below can fail)
    unclaimed, stale = [], []
    for page in PAGES:
        for cmd in page_commands(page):
            if not any(p == page and cmd.startswith(prefix) for p, prefix, _ in taken):
                unclaimed.append(f"{page}: {cmd}")
    for page, prefix, test in taken:
        if page not in PAGES or sum(c.startswith(prefix) for c in page_commands(page)) != 1:
            stale.append(f"{test}: doc_command({page!r}, {prefix!r})")
    assert unclaimed == [], "commands shown but run by no test"
    assert stale == [], "tests that take a command no page shows (exactly once)"


def test_page_commands_reads_blocks_continuations_and_comments(tmp_path: Path,
                                                                monkeypatch) -> None:
    import doc_commands

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.md").write_text(
        "```sh\na --b \\\n    c  # why\n# a comment line\n```\n```text\nnot a command\n```\n")
    monkeypatch.setattr(doc_commands, "ROOT", tmp_path)
    assert page_commands("docs/x.md") == ["a --b c"]
    env, argv = doc_argv('X=1 flashcomm run --model DIR --prompt "a b"', DIR="/m")
    assert env == {"X": "1"} and argv == ["flashcomm", "run", "--model", "/m", "--prompt", "a b"]
    with pytest.raises(KeyError, match="DIR"):
        doc_argv("flashcomm run --model DIR")


def test_make_commands_run_the_demo_and_the_tests() -> None:
    demo = doc_command("README.md", "make demo")
    test = doc_command("README.md", "make test")
    for cmd, expect in ((demo, "flashcomm demo"), (test, "pytest")):
        out = subprocess.run([*doc_argv(cmd)[1], "-n"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and expect in out.stdout, out.stdout + out.stderr
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's command


def _flashcomm(cmd: str, cwd: Path, timeout: float = 300, **fill: str) -> str:
    """Run a shown `flashcomm ...` command (placeholders filled) as a user would; stdout."""
    env, argv = doc_argv(cmd, **fill)
    assert argv[0] == "flashcomm"
    out = subprocess.run([sys.executable, "-m", "flashcomm.cli", *argv[1:]], cwd=cwd,
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def test_shown_cli_commands_run(tmp_path: Path) -> None:
    model = str(write_checkpoint(tmp_path / "tiny", small_llama_config(**TINY)))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "a b c"}\n')
    out = _flashcomm(doc_command("README.md", "flashcomm run"), tmp_path, DIR=model)
    assert "prefill" in out and "decode" in out
    out = _flashcomm(doc_command("docs/commands.md", "flashcomm run --model DIR --nproc 4 --otp"),
                     tmp_path, DIR=model)
    assert len(json.loads(out)["tokens"]) == 3
    out = _flashcomm(doc_command("docs/commands.md", "flashcomm run --model DIR --nproc 4 --attn"),
                     tmp_path, DIR=model)
    assert out.count("[1]") == 1 and "decode" in out  # the two prompts of prompts.jsonl
    assert "tp" in _flashcomm(doc_command("docs/commands.md", "flashcomm layout --world"), tmp_path)
    assert {"tp", "odp", "shard"} <= json.loads(
        _flashcomm(doc_command("docs/commands.md", "flashcomm layout --tp 4"), tmp_path)).keys()
    out = _flashcomm(doc_command("docs/commands.md", "flashcomm plan"), tmp_path, DIR=model)
    assert "fc2" in out
    out = _flashcomm(doc_command("docs/pipeline.md", "flashcomm layout"), tmp_path, DIR=model)
    assert "stage" in out
    out = _flashcomm(doc_command("docs/pipeline.md", "flashcomm run"), tmp_path, DIR=model)
    assert "decode" in out


def test_shown_torchrun_command_runs(tmp_path: Path) -> None:
    model = str(write_checkpoint(tmp_path / "tiny", small_llama_config(**TINY)))
    env, argv = doc_argv(doc_command("docs/multi-node.md", "torchrun --nproc-per-node"),
                         DIR=model)
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), *argv[1:]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, **env, "OMP_NUM_THREADS": "1",
                              "MALLOC_MMAP_THRESHOLD_": "34359738368",
                              "MALLOC_TRIM_THRESHOLD_": "34359738368"})
    assert out.returncode == 0, out.stderr[-4000:]
    assert "decode" in out.stdout


def test_shown_bench_comm_fit_runs(tmp_path: Path) -> None:
    from flashcomm import cli

    argv = doc_argv(doc_command("docs/commands.md", "flashcomm bench comm"))[1]
    small = ["--world", "2", "--tokens", "5,16", "--attn-dim", "64", "--hidden", "32",
             "--rounds", "1", "--out", str(tmp_path), "--timeout", "120"]
    assert cli.main([*argv[1:], *small]) == 0
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile  # the fitted cost profile a planner reads
