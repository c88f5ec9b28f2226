"""Ratios, predictions, acceptance checks, tables and plots of a `flashcomm bench e2e` result.

Pure post-processing of the raw dict e2e.e2e_rank returns (no torch.distributed): testable and
re-runnable on a saved e2e.json.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

from flashcomm.plan.costmodel import (
    HardwareProfile,
    Shape,
    comm_time,
    layer_traffic,
    oshard_window_fits,
)
from flashcomm.plan.costmodel import Strategy as CostStrategy

FC2, BASE, AUTO, OSHARD1 = "fc2(otp=1)", "allreduce", "auto", "fc2+oshard(k=1)"
OSHARD_LATENCY_LIMIT = 1.10
"""Acceptance: O-Shard (k=1) prefill latency at T=1024 within this factor of replicated FC2."""
AUTO_LIMIT = 1.05
"""Acceptance: auto's latency within this factor of the better fixed strategy at every T."""


def _cost(d: dict) -> CostStrategy:
    return CostStrategy(d["attn_out"], d["otp"], d["flashcomm1"], d["comm_dtype"], d["oshard_k"])


def predicted_comm_s(profile: HardwareProfile, s: CostStrategy, shape: Shape, layers: int,
                     tokens: int) -> float:
    """Cost-model seconds of one step's collectives (FlashComm1: plus the final all-gather)."""
    t = layers * comm_time(profile, layer_traffic(s, shape, tokens))
    if s.flashcomm1:
        n = shape.tp
        t_pad = -(-tokens // n) * n
        gather = (n - 1) / n * t_pad * shape.hidden * shape.elt_bytes
        t += profile.cost("all_gather", n).time(gather)
    return t


def exposed_broadcast_s(profile: HardwareProfile, s: CostStrategy, m: dict, n: int,
                        tokens: int) -> float:
    """Predicted O-Shard broadcast time not hidden by compute, per step (all layers)."""
    if s.oshard_k is None:
        return 0.0
    h, d, ff, e = m["hidden"], m["q_dim"], m["intermediate"], m["elt_bytes"]
    kv = max(1, m["kv_heads"] // n) * d // m["heads"]
    qkv = 2 * tokens * h * (d // n + 2 * kv)
    attn = 2 * tokens * tokens * d // n
    full = qkv + attn + 2 * tokens * h * d // n + 6 * tokens * h * ff // n
    _, bcast, window = oshard_window_fits(profile, h * d // s.otp * e, n // s.otp, s.oshard_k,
                                          full, qkv + attn)
    return m["layers"] * max(0.0, bcast - window)


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
    m, n = raw["model"], raw["N"]
    shape = Shape(hidden=m["hidden"], q_dim=m["q_dim"], tp=n, elt_bytes=m["elt_bytes"])
    grid = [c["tokens"] for c in raw["cases"]]
    by_name = {s["name"]: s for s in raw["strategies"]}
    replay = [[statistics.median(t) for t in p["times_s"]] for p in raw["comm_replay"]]
    threshold = raw["auto_threshold"] if raw["auto_threshold"] is not None else math.inf
    for s in raw["strategies"]:
        cost = _cost(s["cost"])
        for ci, st in enumerate(s["steps"]):
            t = grid[ci]
            lat = st["latency_s"]
            st["median_s"], st["min_s"], st["max_s"] = statistics.median(lat), min(lat), max(lat)
            st["blocked_wait_median_s"] = statistics.median(st["blocked_wait_s"])
            st["bytes_total"] = sum(st["bytes_sent"].values())
            path = cost
            if s["auto"]:
                path = cost if t >= threshold else CostStrategy(flashcomm1=cost.flashcomm1)
                st["auto_path"] = "flashcomm2" if t >= threshold else "allreduce"
            pattern = s["comm_pattern"]
            if pattern is None:  # auto: the pattern of the path it took
                pattern = by_name[FC2 if t >= threshold else BASE]["comm_pattern"]
            st["measured_comm_s"] = replay[pattern][ci]
            st["predicted_comm_s"] = predicted_comm_s(profile, replace(path, oshard_k=None),
                                                      shape, m["layers"], t)
            st["predicted_exposed_broadcast_s"] = exposed_broadcast_s(profile, cost, m, n, t)
    base = by_name[BASE]["steps"]
    for s in raw["strategies"]:
        for ci, st in enumerate(s["steps"]):
            b = base[ci]
            st["ratio_to_allreduce"] = st["median_s"] / b["median_s"]
            st["measured_delta_s"] = st["median_s"] - b["median_s"]
            st["predicted_delta_s"] = (st["predicted_comm_s"] + st["predicted_exposed_broadcast_s"]
                                       - b["predicted_comm_s"])
    res["crossover"] = _crossover(raw, grid, profile, shape, by_name)
    res["checks"] = _checks(raw, grid, by_name)
    return res


def _crossover(raw: dict, grid: list[int], profile: HardwareProfile, shape: Shape,
               by_name: dict) -> dict:
    from flashcomm.plan.costmodel import crossover_tokens

    if FC2 not in by_name:
        return {}
    fc2, base = by_name[FC2]["steps"], by_name[BASE]["steps"]
    cont = crossover_tokens(profile, shape, _cost(by_name[FC2]["cost"]), CostStrategy())
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


def _checks(raw: dict, grid: list[int], by_name: dict) -> dict:
    out: dict = {}
    cases = raw["cases"]
    i1024 = next((i for i, c in enumerate(cases) if c["kind"] == "prefill" and c["size"] == 1024),
                 None)
    if OSHARD1 in by_name and FC2 in by_name:
        if i1024 is not None:
            r = by_name[OSHARD1]["steps"][i1024]["median_s"] / by_name[FC2]["steps"][i1024][
                "median_s"]
            out["oshard_k1_latency_ratio_T1024"] = {"value": r, "limit": OSHARD_LATENCY_LIMIT,
                                                    "ok": r <= OSHARD_LATENCY_LIMIT}
        layers, g = raw["model"]["layers"], raw["N"]  # shard group = N ranks at otp=1, dp=1

        def o_bytes(name: str) -> int:
            return max(r[name]["o_proj"] + r[name]["ring"] for r in raw["memory_per_rank"])

        mem = o_bytes(OSHARD1) / o_bytes(FC2)
        limit = (math.ceil(layers / g) + 2) / layers
        out["oshard_k1_o_proj_memory_ratio"] = {"value": mem, "limit": limit, "ok": mem <= limit}
    if AUTO in by_name and FC2 in by_name:
        worst, rows = 0.0, []
        for ci, c in enumerate(cases):
            best = min(by_name[FC2]["steps"][ci]["median_s"],
                       by_name[BASE]["steps"][ci]["median_s"])
            r = by_name[AUTO]["steps"][ci]["median_s"] / best
            rows.append({"case": c["label"], "ratio_to_best_fixed": r})
            worst = max(worst, r)
        out["auto_vs_best_fixed"] = {"value": worst, "limit": AUTO_LIMIT, "ok": worst <= AUTO_LIMIT,
                                     "per_case": rows}
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
    if any("auto_path" in st for s in res["strategies"] for st in s["steps"]):
        auto = next(s for s in res["strategies"] if s["auto"])
        lines.append(f"{'auto path':<18} " + " ".join(f"{st['auto_path']:>24}"
                                                      for st in auto["steps"]))
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
