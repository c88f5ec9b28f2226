"""The commands shown in README.md and docs/*.md, for the tests that run them.

A command is a line of a fenced ```sh block (a trailing backslash continues it; `# ...` after
two spaces is a comment). A test takes one with `doc_command(page, prefix)` and runs exactly
that text, with placeholders (DIR, HOST, ...) filled in by `doc_argv`. tests/test_docs.py
checks that every command shown is taken by some test this way, so none can rot.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
"""Every page whose commands are checked, relative to the repository root."""


def page_commands(page: str) -> list[str]:
    """The commands of `page`'s ```sh blocks, continuation lines joined, comments dropped."""
    text = (ROOT / page).read_text()
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()
            if line and not line.startswith("#"):
                out.append(re.sub(r"\s+", " ", line))
    return out


def doc_command(page: str, prefix: str) -> str:
    """The one command of `page` that starts with `prefix` (an error if none or several)."""
    found = [c for c in page_commands(page) if c.startswith(prefix)]
    if len(found) != 1:
        raise LookupError(f"{page}: {len(found)} commands start with {prefix!r}: {found}")
    return found[0]


def doc_argv(command: str, **fill: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, argv) of a shown command, each placeholder word (DIR, HOST,
    R, ...) replaced by fill[word]; an unfilled placeholder is an error."""
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    out = []
    for w in words:
        for name, value in fill.items():
            w = re.sub(rf"\b{name}\b", value, w)
        if re.fullmatch(r"[A-Z]{1,4}", w) and w not in fill.values():
            raise KeyError(f"placeholder {w!r} of {command!r} is not filled")
        out.append(w)
    return env, out
