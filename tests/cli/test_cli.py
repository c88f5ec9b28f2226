"""The `flashcomm layout` command, run as a user would (console script in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _flashcomm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flashcomm.cli", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_layout_table() -> None:
    out = _flashcomm("layout", "--world", "16", "--tp", "8", "--dp", "2", "--pp", "1", "--otp", "2")
    assert out.returncode == 0, out.stderr
    assert "shard" in out.stdout and "[0,1,2,3,8,9,10,11]" in out.stdout
    assert "[0,4]" in out.stdout


def test_layout_json_keys() -> None:
    out = _flashcomm("layout", "--tp", "4", "--pp", "2", "--dp", "2", "--otp", "2", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("tp", "pp", "dp", "otp", "odp", "shard", "chunk_order"):
        assert key in d
    assert d["chunk_order"] == [0, 2, 1, 3]
    assert d["shard"] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]


@pytest.mark.parametrize(
    "args, knob",
    [
        (["--tp", "4", "--otp", "3"], "flashcomm2_otp"),
        (["--tp", "4", "--otp", "4"], "flashcomm2_otp"),
        (["--world", "6", "--tp", "4"], "world"),
        (["--tp", "2", "--otp", "1", "--prefetch-step", "-1"], "prefetch_step"),
        (["--tp", "2", "--otp", "1", "--layer-sharding", "qkv"], "layer_sharding"),
        (["--tp", "4", "--layer-sharding", "o_proj"], "flashcomm2_otp"),
        (["--tp", "four"], "tp"),
    ],
)
def test_layout_bad_input_exits_nonzero_with_message(args: list[str], knob: str) -> None:
    out = _flashcomm("layout", *args)
    assert out.returncode != 0
    assert knob in out.stderr and out.stdout == ""
