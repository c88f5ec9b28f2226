"""Ratios, predictions, acceptance checks, tables and plots of a `flashcomm bench e2e` result.

Pure post-processing of the raw dict e2e.e2e_rank returns (no torch.distributed): testable and
re-runnable on a saved e2e.json.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

from flashcomm.config import AttnOut, FlashCommConfig, ShardSource
from flashcomm.plan.costmodel import (
    HardwareProfile,
    Shape,
    comm_time,
    counted_bytes,
    crossover_tokens,
    exposed_fetch_s,
    step_calls,
)
from flashcomm.plan.strategy import Strategy

BASE = Strategy()
FC2 = Strategy(AttnOut.FLASHCOMM2, otp=1)
AUTO = replace(FC2, attn_out=AttnOut.AUTO)
OSHARD1 = replace(FC2, oshard_k=1)
OSHARD_LATENCY_LIMIT = 1.10
"""Acceptance: O-Shard (k=1) prefill latency at T=1024 within this factor of replicated FC2."""
AUTO_LIMIT = 1.05
"""Acceptance: auto's latency within this factor of the better fixed strategy at every T."""
AUTO_GATHER1 = replace(AUTO, oshard_k=1, shard_source=ShardSource.GATHER)
GATHER_DECODE_LIMIT = 1.05
"""Acceptance: auto+gather(k=1) decode B=1 latency within this factor of allreduce's."""
GATHER_PREFILL_LIMIT = 1.10
"""Acceptance: auto+gather(k=1) prefill T=1024 latency within this factor of replicated FC2's."""


def strategy_of(entry: dict) -> Strategy:
    """The Strategy of one result entry (from its knobs)."""
    return Strategy.from_config(FlashCommConfig.from_mapping(entry["config"]))


def first_win(a: list[float], b: list[float]) -> int:
    """Smallest grid index from which a < b at every larger index (len(a) if never)."""
    i = len(a)
    while i > 0 and a[i - 1] < b[i - 1]:
        i -= 1
    return i


def summarize(raw: dict) -> dict:
    """Add per-step statistics, ratios, predictions, crossovers and checks to a raw result."""
    res = dict(raw)
    profile = HardwareProfile.from_dict(raw["profile"])
    shape = Shape(**raw["shape"])
    grid = [c["tokens"] for c in raw["cases"]]
    replay = [[statistics.median(t) for t in p["times_s"]] for p in raw["comm_replay"]]
    by = {strategy_of(s): s for s in raw["strategies"]}
    for strategy, s in by.items():
        s["auto"] = strategy.attn_out == AttnOut.AUTO
        for ci, st in enumerate(s["steps"]):
            t, lat = grid[ci], st["latency_s"]
            st["median_s"], st["min_s"], st["max_s"] = statistics.median(lat), min(lat), max(lat)
            st["blocked_wait_median_s"] = statistics.median(st["blocked_wait_s"])
            st["bytes_total"] = sum(st["bytes_sent"].values())
            path = strategy.path(t, s.get("auto_threshold", raw["auto_threshold"]))
            if s["auto"]:
                st["auto_path"] = "flashcomm2" if path.flashcomm2 else "allreduce"
            st["measured_comm_s"] = replay[st["comm_pattern"]][ci]
            calls = step_calls(path, shape, t)
            st["predicted_bytes"] = counted_bytes(calls)  # tests: == bytes_sent
            st["predicted_comm_s"] = comm_time(profile, calls)
            st["predicted_exposed_broadcast_s"] = exposed_fetch_s(profile, strategy, shape, t,
                                                                  s.get("auto_threshold",
                                                                        raw["auto_threshold"]))
    base = by[BASE]["steps"]
    for s in raw["strategies"]:
        for ci, st in enumerate(s["steps"]):
            b = base[ci]
            st["ratio_to_allreduce"] = st["median_s"] / b["median_s"]
            st["measured_delta_s"] = st["median_s"] - b["median_s"]
            st["predicted_delta_s"] = (st["predicted_comm_s"] + st["predicted_exposed_broadcast_s"]
                                       - b["predicted_comm_s"])
    res["crossover"] = _crossover(grid, profile, shape, by)
    res["checks"] = _checks(raw, by)
    return res


def _crossover(grid: list[int], profile: HardwareProfile, shape: Shape, by: dict) -> dict:
    if FC2 not in by:
        return {}
    fc2, base = by[FC2]["steps"], by[BASE]["steps"]
    cont = crossover_tokens(profile, shape, FC2, BASE)
    pred_idx = len(grid) if cont is None else next(
        (i for i, t in enumerate(grid) if t >= cont), len(grid))
    comm_idx = first_win([s["measured_comm_s"] for s in fc2], [s["measured_comm_s"] for s in base])
    lat_idx = first_win([s["median_s"] for s in fc2], [s["median_s"] for s in base])

    def at(i: int) -> int | None:
        return grid[i] if i < len(grid) else None

    return {"grid": grid, "predicted_tokens": cont, "predicted_grid_index": pred_idx,
            "predicted_grid_T": at(pred_idx), "measured_comm_grid_index": comm_idx,
            "measured_comm_grid_T": at(comm_idx), "measured_latency_grid_index": lat_idx,
            "measured_latency_grid_T": at(lat_idx),
            "within_one_step": abs(pred_idx - comm_idx) <= 1}


def _checks(raw: dict, by: dict) -> dict:
    out: dict = {}
    cases = raw["cases"]
    i1024 = next((i for i, c in enumerate(cases) if c["kind"] == "prefill" and c["size"] == 1024),
                 None)
    if OSHARD1 in by and FC2 in by:
        if i1024 is not None:
            r = by[OSHARD1]["steps"][i1024]["median_s"] / by[FC2]["steps"][i1024]["median_s"]
            out["oshard_k1_latency_ratio_T1024"] = {"value": r, "limit": OSHARD_LATENCY_LIMIT,
                                                    "ok": r <= OSHARD_LATENCY_LIMIT}
        layers, g = raw["model"]["layers"], raw["N"]  # shard group = N ranks at otp=1, dp=1

        def o_bytes(s: Strategy) -> int:
            return max(r[s.label]["o_proj"] + r[s.label]["ring"] for r in raw["memory_per_rank"])

        mem = o_bytes(OSHARD1) / o_bytes(FC2)
        limit = (math.ceil(layers / g) + 2) / layers
        out["oshard_k1_o_proj_memory_ratio"] = {"value": mem, "limit": limit, "ok": mem <= limit}
    if AUTO in by and FC2 in by:
        worst, rows = 0.0, []
        for ci, c in enumerate(cases):
            best = min(by[FC2]["steps"][ci]["median_s"], by[BASE]["steps"][ci]["median_s"])
            r = by[AUTO]["steps"][ci]["median_s"] / best
            rows.append({"case": c["label"], "ratio_to_best_fixed": r})
            worst = max(worst, r)
        out["auto_vs_best_fixed"] = {"value": worst, "limit": AUTO_LIMIT, "ok": worst <= AUTO_LIMIT,
                                     "per_case": rows}
    if AUTO_GATHER1 in by and FC2 in by:
        out |= _gather_checks(raw, by, i1024)
    return out


def _gather_checks(raw: dict, by: dict, i1024: int | None) -> dict:
    """auto+gather(k=1): decode B=1 against allreduce, prefill T=1024 against replicated FC2,
    o_proj memory against (L/N + 2)/L of replicated FC2, and no W_o byte on decode steps."""
    out: dict = {}
    cases, steps = raw["cases"], by[AUTO_GATHER1]["steps"]
    i_b1 = next((i for i, c in enumerate(cases) if c["kind"] == "decode" and c["size"] == 1),
                None)
    if i_b1 is not None:
        r = steps[i_b1]["median_s"] / by[BASE]["steps"][i_b1]["median_s"]
        out["gather_auto_k1_decode_B1_ratio_to_allreduce"] = {
            "value": r, "limit": GATHER_DECODE_LIMIT, "ok": r <= GATHER_DECODE_LIMIT}
    if i1024 is not None:
        r = steps[i1024]["median_s"] / by[FC2]["steps"][i1024]["median_s"]
        out["gather_auto_k1_prefill_T1024_ratio_to_fc2"] = {
            "value": r, "limit": GATHER_PREFILL_LIMIT, "ok": r <= GATHER_PREFILL_LIMIT}

    def o_bytes(s: Strategy) -> int:
        return max(r[s.label]["o_proj"] + r[s.label]["ring"] for r in raw["memory_per_rank"])

    layers, n = raw["model"]["layers"], raw["N"]
    mem, limit = o_bytes(AUTO_GATHER1) / o_bytes(FC2), (layers / n + 2) / layers
    out["gather_auto_k1_o_proj_memory_ratio"] = {"value": mem, "limit": limit,
                                                 "ok": mem <= limit}
    fetched = max((st["fetch_bytes"] for c, st in zip(cases, steps, strict=True)
                   if c["kind"] == "decode"), default=0)
    out["gather_auto_k1_decode_fetch_bytes"] = {"value": fetched, "limit": 0,
                                                "ok": fetched == 0}
    return out


def format_report(res: dict) -> str:
    """Readable tables: latency and ratios, predicted vs measured comm, memory, checks."""
    cases = res["cases"]
    m = res["model"]
    lines = [f"model {m['dir']}: L={m['layers']} H={m['hidden']} D={m['q_dim']} "
             f"FF={m['intermediate']}; N={res['N']} {res['backend']}, "
             f"{res['threads_per_rank']} thread(s)/rank, {res['repeats']} repeats, fit "
             f"{res['fit_s']:.1f} s, auto: FlashComm2 from T >= {res['auto_threshold']} "
             f"(None = never)", ""]
    hdr = f"{'strategy':<18} " + " ".join(f"{c['label']:>24}" for c in cases)
    lines += ["step latency ms: median [min-max] (ratio to allreduce)", hdr, "-" * len(hdr)]
    for s in res["strategies"]:
        cells = [f"{st['median_s'] * 1e3:7.1f}[{st['min_s'] * 1e3:.0f}-{st['max_s'] * 1e3:.0f}]"
                 f"({st['ratio_to_allreduce']:.2f})" for st in s["steps"]]
        lines.append(f"{s['name']:<18} " + " ".join(f"{c:>24}" for c in cells))
    lines += ["", "bytes sent per rank per step (KiB) / blocked wait ms (O-Shard)", hdr]
    for s in res["strategies"]:
        cells = [f"{st['bytes_total'] / 1024:.0f} / {st['blocked_wait_median_s'] * 1e3:.2f}"
                 for st in s["steps"]]
        lines.append(f"{s['name']:<18} " + " ".join(f"{c:>24}" for c in cells))
    lines += ["", "comm ms per step: predicted / measured (replay); latency delta to allreduce "
              "ms: predicted / measured", hdr]
    for s in res["strategies"]:
        cells = [f"{st['predicted_comm_s'] * 1e3:.1f}/{st['measured_comm_s'] * 1e3:.1f}; "
                 f"{st['predicted_delta_s'] * 1e3:+.1f}/{st['measured_delta_s'] * 1e3:+.1f}"
                 for st in s["steps"]]
        lines.append(f"{s['name']:<18} " + " ".join(f"{c:>24}" for c in cells))
    autos = [s for s in res["strategies"] if s["auto"]]
    if autos:
        lines += ["", "path of the auto rows per step (threshold T; None = never)"]
    for auto in autos:
        lines.append(f"{auto['name']:<18} " + " ".join(
            f"{st['auto_path']:>24}" for st in auto["steps"])
            + f"   (T >= {auto.get('auto_threshold', res['auto_threshold'])})")
    lines += ["", "memory per rank MiB (max over ranks): o_proj + ring | other weights | KV cache"]
    for s in res["strategies"]:
        mem = [r[s["name"]] for r in res["memory_per_rank"]]
        lines.append(f"{s['name']:<18} {max(r['o_proj'] for r in mem) / 2**20:8.3f} + "
                     f"{max(r['ring'] for r in mem) / 2**20:.3f} | "
                     f"{max(r['other_weights'] for r in mem) / 2**20:8.3f} | "
                     f"{max(r['kv_cache'] for r in mem) / 2**20:8.3f}")
    x = res.get("crossover")
    if x:
        lines += ["", f"crossover FlashComm2(otp=1) vs allreduce on grid {x['grid']}: predicted "
                  f"T* = {x['predicted_tokens']} -> grid T {x['predicted_grid_T']}; measured "
                  f"(comm) grid T {x['measured_comm_grid_T']}; measured (latency) grid T "
                  f"{x['measured_latency_grid_T']}; within one step: {x['within_one_step']}"]
    lines += ["", "acceptance checks:"]
    for k, c in res["checks"].items():
        lines.append(f"  {k}: {c['value']:.3f} (limit {c['limit']:.3f}) "
                     f"{'OK' if c['ok'] else 'FAIL'}")
        for row in c.get("per_case", []):
            lines.append(f"    {row['case']:<16} auto / best fixed = "
                         f"{row['ratio_to_best_fixed']:.3f}")
    return "\n".join(lines)


def plot(res: dict, out: Path) -> None:
    """e2e_latency.png (ratio to allreduce vs tokens) and e2e_memory.png (per rank, stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = res["cases"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in zip(axes, ("decode", "prefill"), strict=True):
        idx = [i for i, c in enumerate(cases) if c["kind"] == kind]
        if not idx:
            continue
        xs = [cases[i]["tokens"] for i in idx]
        for s in res["strategies"]:
            ax.plot(xs, [s["steps"][i]["ratio_to_allreduce"] for i in idx], marker="o",
                    label=s["name"], linestyle="--" if s["auto"] else "-")
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set(xscale="log", xlabel="batch B (tokens per step)" if kind == "decode"
               else "prompt tokens T", ylabel="median step latency / allreduce",
               title=f"{kind}, N={res['N']}")
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "e2e_latency.png", dpi=100)
    plt.close(fig)

    names = [s["name"] for s in res["strategies"]]
    cats = ("o_proj", "ring", "other_weights", "kv_cache")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bottom = [0.0] * len(names)
    for cat in cats:
        vals = [max(r[nm][cat] for r in res["memory_per_rank"]) / 2**20 for nm in names]
        ax.bar(names, vals, bottom=bottom, label=cat)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set(ylabel="MiB per rank (max over ranks)", title=f"memory per rank, N={res['N']}")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "e2e_memory.png", dpi=100)
    plt.close(fig)
