"""flashcomm.bench.vllm_hosts_report: ratios to stock across instances and, with --in-instance,
FlashComm2 against the all-reduce inside one instance (prefill over prefill_below per round)."""

from __future__ import annotations

import pytest

from flashcomm.bench.vllm_hosts_report import stock_share, summarize


def instance(prefill: list[float], below: list[float], nbytes: int, below_bytes: int) -> dict:
    """A driver's record of one instance: 3 rounds of both prefills and of generate."""
    return {"prefill_s": prefill, "prefill_bytes": [nbytes] * 3, "prefill_frames": [1] * 3,
            "prefill_below_s": below, "prefill_below_bytes": [below_bytes] * 3,
            "prefill_tokens": [[7]], "prefill_prompt_tokens": [64],
            "prefill_below_prompt_tokens": [63],
            "generate_s": [1.0] * 3, "generate_bytes": [10] * 3, "generate_tokens": [[1, 2]]}


def test_in_instance_reads_each_instance_against_itself():
    # fc2's instance runs 20 % slower than stock's on every call (the offset between instances),
    # and its FlashComm2 prefill takes 0.8 of its own all-reduce prefill in every round
    stock = instance([1.0, 1.2, 1.1], [1.0, 1.2, 1.1], 1000, 1000)
    fc2 = instance([0.96, 1.152, 1.056], [1.2, 1.44, 1.32], 500, 1000)
    rows = summarize({"stock": stock, "fc2": fc2}, share=0.4)["strategies"]
    assert rows["fc2"]["prefill_ratio"] == pytest.approx(0.96)  # across instances: offset in
    assert rows["fc2"]["in_instance_ratio"] == pytest.approx(0.8)  # in the instance: none
    assert rows["fc2"]["in_instance_bytes_ratio"] == pytest.approx(0.5)
    assert rows["fc2"]["in_instance_limit"] == pytest.approx(1 - 0.4 * 0.5)
    assert rows["fc2"]["in_instance_vs_limit"] == pytest.approx(0.0)
    assert rows["fc2"]["in_instance_prompt_tokens"] == [[64], [63]]
    assert rows["stock"]["in_instance_ratio"] == pytest.approx(1.0)  # the one-token control
    assert rows["fc2"]["in_instance_vs_control"] == pytest.approx(0.8)


def test_in_instance_over_stock_control():
    # T = 2048 runs 5 % slower than T - 1 on the all-reduce path too: the control divides it out
    stock = instance([1.05] * 3, [1.0] * 3, 1000, 1000)
    fc2 = instance([0.84] * 3, [1.0] * 3, 500, 1000)
    rows = summarize({"stock": stock, "fc2": fc2}, share=0.4)["strategies"]
    assert rows["stock"]["in_instance_ratio"] == pytest.approx(1.05)
    assert rows["fc2"]["in_instance_vs_control"] == pytest.approx(0.8)
    assert rows["fc2"]["in_instance_vs_control_minus_limit"] == pytest.approx(0.0)


def test_in_instance_median_over_rounds_and_no_limit_without_share():
    stock = instance([1.0] * 3, [1.0] * 3, 1000, 1000)
    fc2 = instance([0.9, 3.0, 0.7], [1.0, 1.0, 1.0], 600, 1000)  # one round disturbed
    rows = summarize({"stock": stock, "fc2": fc2})["strategies"]
    assert rows["fc2"]["in_instance_ratio"] == pytest.approx(0.9)
    assert rows["fc2"]["in_instance_ratio_range"] == pytest.approx([0.7, 3.0])
    q1, q3 = rows["fc2"]["in_instance_ratio_quartiles"]
    assert 0.7 <= q1 <= 0.9 <= q3 <= 3.0
    assert "in_instance_limit" not in rows["fc2"] and "limit" not in rows["fc2"]


def test_no_in_instance_rows_without_prefill_below():
    stock = instance([1.0] * 3, [1.0] * 3, 1000, 1000)
    del stock["prefill_below_s"]
    rows = summarize({"stock": stock}, share=0.5)["strategies"]
    assert "in_instance_ratio" not in rows["stock"]
    assert rows["stock"]["limit"] == pytest.approx(1.0)


def test_share_pairs_each_unshaped_prefill_with_its_shaped_neighbour():
    # the machine slows down over the rounds: paired, the share stays 0.25 in every round
    stock = {"prefill_s": [1.0] * 3, "prefill_shaped_s": [1.0, 2.0, 4.0],
             "prefill_unshaped_s": [0.75, 1.5, 3.0]}
    assert stock_share(stock) == pytest.approx(0.25)
    del stock["prefill_shaped_s"]  # an older run: medians of the timed rounds and unshaped
    assert stock_share(stock) == pytest.approx(1 - 1.5)
