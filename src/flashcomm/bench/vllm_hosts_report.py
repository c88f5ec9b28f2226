"""The report of flashcomm.bench.vllm_hosts: ratios to stock, link bytes, share and limit per
strategy, and with --in-instance each instance's FlashComm2 prefill against its own all-reduce
one (summarize), one line per strategy (print_rate), and the plot against the link rate."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def summarize(res: dict[str, Any], share: float | None = None) -> dict[str, Any]:
    """Ratios to stock (median of per-round ratios), link bytes ratio, share (measured here, or
    given from another group of the same link), limit, tokens."""
    stock = res["stock"]
    if stock.get("prefill_unshaped_s"):
        share = stock_share(stock)
    # stock's own T / T-1 (both its all-reduce) is the control for the one token
    control = (in_instance(stock, share)["in_instance_ratio"] if stock.get("prefill_below_s")
               else None)
    rows = {}
    for n, r in res.items():
        if "error" in r or not r.get("prefill_s"):
            rows[n] = {"error": r.get("error", "no rounds")}
            continue
        row: dict[str, Any] = {}
        for k in ("prefill", "generate"):
            per = [t / b for t, b in zip(r[f"{k}_s"], stock[f"{k}_s"], strict=True)]
            row[f"{k}_ratio"] = statistics.median(per)
            row[f"{k}_ratio_range"] = [min(per), max(per)]
            row[f"{k}_median_s"] = statistics.median(r[f"{k}_s"])
            row[f"{k}_link_bytes"] = statistics.median(r[f"{k}_bytes"])
            if r.get(f"{k}_retrans"):  # TCP segments host 0 sent again (runs after 2026-12-07)
                row[f"{k}_retrans"] = statistics.median(r[f"{k}_retrans"])
            row[f"{k}_bytes_ratio"] = row[f"{k}_link_bytes"] / statistics.median(
                stock[f"{k}_bytes"])
            same = [a == b for a, b in zip(r[f"{k}_tokens"], stock[f"{k}_tokens"], strict=True)]
            row[f"{k}_same_tokens"] = all(same)
            flat = [(x == y) for a, b in zip(r[f"{k}_tokens"], stock[f"{k}_tokens"], strict=True)
                    for x, y in zip(a, b, strict=True)]
            row[f"{k}_token_agreement"] = sum(flat) / len(flat)
        if r.get("prefill_below_s"):
            row.update(in_instance(r, share))
        if share is not None:
            row["limit"] = 1 - share * (1 - row["prefill_bytes_ratio"])
            row["prefill_vs_limit"] = row["prefill_ratio"] - row["limit"]
        if "in_instance_ratio" in row and control is not None:
            row["in_instance_vs_control"] = row["in_instance_ratio"] / control
            if share is not None:
                row["in_instance_vs_control_minus_limit"] = (row["in_instance_vs_control"]
                                                             - row["in_instance_limit"])
        row["facts"] = r.get("facts")
        if row["facts"]:  # fewest FlashComm2 o_proj calls of any rank: 0 = it never ran
            row["fc2_o_proj_calls"] = min(f.get("o_proj_fc2_calls") or 0 for f in row["facts"])
        rows[n] = row
    return {"stock_comm_share": share, "strategies": rows}


def stock_share(stock: dict[str, Any]) -> float:
    """Stock's communication share of its prefill: 1 - median over rounds of unshaped / shaped
    time, paired per round (older runs without the paired shaped prefills: the medians)."""
    if stock.get("prefill_shaped_s"):
        per = [u / s for u, s in zip(stock["prefill_unshaped_s"], stock["prefill_shaped_s"],
                                     strict=True)]
        return 1 - statistics.median(per)
    return 1 - statistics.median(stock["prefill_unshaped_s"]) / statistics.median(
        stock["prefill_s"])


def in_instance(r: dict[str, Any], share: float | None) -> dict[str, Any]:
    """One instance's prefill (T tokens) against its prefill_below (T - 1) in the same round:
    FlashComm2 against vLLM's all-reduce where the threshold is T, the one-token control in
    stock; its link bytes ratio and the limit that gives."""
    per = [t / b for t, b in zip(r["prefill_s"], r["prefill_below_s"], strict=True)]
    out: dict[str, Any] = {
        "in_instance_ratio": statistics.median(per),
        "in_instance_ratio_range": [min(per), max(per)],
        "in_instance_ratio_quartiles": statistics.quantiles(per, n=4)[::2] if len(per) > 1
        else [per[0], per[0]],
        "in_instance_bytes_ratio": statistics.median(r["prefill_bytes"])
        / statistics.median(r["prefill_below_bytes"]),
        "in_instance_prompt_tokens": [r.get("prefill_prompt_tokens"),
                                      r.get("prefill_below_prompt_tokens")]}
    if share is not None:
        out["in_instance_limit"] = 1 - share * (1 - out["in_instance_bytes_ratio"])
        out["in_instance_vs_limit"] = out["in_instance_ratio"] - out["in_instance_limit"]
    return out


def print_rate(rate: float, r: dict[str, Any]) -> None:
    """One rate's rows, a line per strategy."""
    share = r["stock_comm_share"]
    print(f"--- {rate:g} Mbit/s: stock comm share of prefill "
          f"{'n/a' if share is None else f'{share:.3f}'}  load {r['loadavg']}")
    for n, row in r["strategies"].items():
        if "error" in row:
            print(f"{n:12s} ERROR {row['error']}")
            continue
        print(f"{n:12s} prefill {row['prefill_median_s'] * 1e3:8.1f} ms x{row['prefill_ratio']:.3f}"
              f" bytes x{row['prefill_bytes_ratio']:.3f} limit {row.get('limit', float('nan')):.3f}"
              f"  generate {row['generate_median_s'] * 1e3:8.1f} ms x{row['generate_ratio']:.3f}"
              f"  same tokens {row['prefill_same_tokens'] and row['generate_same_tokens']}"
              f" agreement {row['generate_token_agreement']:.3f}"
              f"  TCP retransmits per prefill {row.get('prefill_retrans', 'n/a')}")
        if "in_instance_ratio" in row:
            q1, q3 = row["in_instance_ratio_quartiles"]
            print(f"{'':12s} in instance: T / T-1 x{row['in_instance_ratio']:.3f} "
                  f"(quartiles {q1:.3f}-{q3:.3f}) bytes "
                  f"x{row['in_instance_bytes_ratio']:.3f} limit "
                  f"{row.get('in_instance_limit', float('nan')):.3f}  over stock's control "
                  f"x{row['in_instance_vs_control']:.3f}  prompt tokens "
                  f"{row['in_instance_prompt_tokens']}  FlashComm2 o_proj calls "
                  f"{row.get('fc2_o_proj_calls', 'n/a')}")


def plot(report: dict[str, Any], path: Path) -> None:
    """Prefill and generate time over stock's against the link rate, with int8's limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(report["rates"], key=float)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [n for n in report["rates"][rates[0]]["strategies"] if n != "stock"]
    for ax, key in zip(axes, ("prefill", "generate"), strict=True):
        for n in names:
            ys = [report["rates"][r]["strategies"][n].get(f"{key}_ratio") for r in rates]
            ax.plot([float(r) for r in rates], ys, marker="o", label=n)
        if key == "prefill":
            lim = [report["rates"][r]["strategies"].get("fc2_int8", {}).get("limit")
                   for r in rates]
            if all(v is not None for v in lim):
                ax.plot([float(r) for r in rates], lim, "k--", lw=0.8, label="limit (fc2_int8)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("link rate (Mbit/s)")
        ax.set_ylabel(f"{key} time / stock vLLM")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"vLLM TP={report['args']['tp']} over 2 hosts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
