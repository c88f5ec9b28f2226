"""`flashcomm bench comm` on real gloo ranks (N = 2): the counted bytes of every strategy's path
equal the cost model's (the run exits 1 when one does not)."""

from __future__ import annotations

import json
from pathlib import Path


def test_bench_comm_bytes_equal_the_cost_model(tmp_path: Path) -> None:
    from flashcomm import cli

    out = tmp_path / "comm"
    rc = cli.main(["bench", "comm", "--world", "2", "--tokens", "5,16", "--attn-dim", "64",
                   "--hidden", "32", "--rounds", "1", "--out", str(out), "--timeout", "120"])
    assert rc == 0
    res = json.loads((out / "comm.json").read_text())
    rows = res["strategies"]
    assert [r["strategy"] for r in rows if r["T"] == 5] == [
        "allreduce", "flashcomm1", "fc2", "fc2+fc1", "fc2+fc1+int8"]
    for r in rows:
        assert r["bytes_sent"] == r["formula_bytes"] and r["bytes_match_formula"], r
    int8 = next(r for r in rows if r["strategy"] == "fc2+fc1+int8" and r["T"] == 5)
    # T_pad = 6: the peer gets 3 rows of D/N = 32 int8 values plus one fp32 scale each
    assert int8["bytes_sent"] == {"all_to_all": 3 * 32, "all_to_all_scales": 3 * 4,
                                  "all_gather": 3 * 32 * 4}
    assert (out / "comm.png").stat().st_size > 0
