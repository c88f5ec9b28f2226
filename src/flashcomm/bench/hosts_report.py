"""The report of `flashcomm bench hosts`: ratios to stock, link bytes, the physical limit and the
planner's prediction per link rate (hosts.json), and the speed-up plot (hosts.png).

Per rate and strategy:
- prefill_ratio / generate_ratio: the median over rounds of the round's time over stock's in the
  same round (rounds interleave the strategies); `allreduce(A/A)` is stock against itself;
- stock_comm_share: stock's collectives of one prefill replayed alone (no compute) over stock's
  prefill time;
- prefill_link_bytes: TCP payload that crossed the links (both hosts) during one timed prefill
  (median over rounds), next to model_link_bytes (flashcomm.bench.link_model.link_bytes);
- limit = 1 - share * (1 - bytes_ratio), bytes_ratio = the strategy's link bytes over stock's:
  the prefill ratio if communication time scaled with link bytes and compute stayed the same;
- predicted_prefill_ratio: the planner on the profile fitted across these hosts (`bench comm
  --fit` under torchrun): (C + comm) / (C + stock's comm), C = the cost model's FLOPs of the
  prefill at the fitted matmul rate, comm = plan.deploy.phase_cost.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from flashcomm.bench.link_model import link_bytes
from flashcomm.model_args import ModelArgs
from flashcomm.plan.costmodel import HardwareProfile, Shape, crossover_tokens, layer_flops
from flashcomm.plan.crossing import (
    crossover,
    median_slower,
    monotone_crossover,
    significantly_slower,
)
from flashcomm.plan.deploy import phase_cost
from flashcomm.plan.strategy import Strategy

STOCK = "allreduce"


def _strategy(d: dict) -> Strategy:
    return Strategy(**{k: v for k, v in d.items() if k != "profile"})


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _link(ranks: list[dict], i: int) -> float:
    """Median payload bytes per timed prefill of strategy i, summed over the hosts."""
    total = 0.0
    for r in ranks:
        sent = [x["payload"] for x in r["timing"]["prefill_link"][i] if x]
        total += statistics.median(sent) if sent else 0.0
    return total


def measured_crossover(tokens: list[int], fc2_s: list[list[float]],
                       stock_s: list[list[float]]) -> dict:
    """Where fc2's prefill starts to beat stock's, from the sweep's paired rounds at each size,
    by the planner's own rule (plan.crossing.monotone_crossover: the non-increasing fit of the
    per-size median ratios reaches 1), interpolated on log T.
    `bound` says whether the value is a point ("at"), or lies outside the sweep ("below" the
    first size, "above" the last). Three other readings come with it (None: never):
    `sign_test`, the first win after the last size that a sign test calls slower;
    `first_win`, where the median ratio first drops to 1 or below; and `for_good`, where it
    drops to 1 or below and stays there."""
    diffs = [[f / s - 1.0 for f, s in zip(fr, sr, strict=True)]
             for fr, sr in zip(fc2_s, stock_s, strict=True)]  # ratio - 1 per round
    others = {"sign_test": crossover(tokens, diffs, significantly_slower),
              "first_win": crossover(tokens, diffs, lambda _: False),  # no size a loss
              "for_good": crossover(tokens, diffs, median_slower)}
    at = monotone_crossover(tokens, diffs)
    if at is None:
        return {"tokens": tokens[-1], "bound": "above", "text": f"> {tokens[-1]}", **others}
    if at == tokens[0]:  # the first size already wins
        return {"tokens": tokens[0], "bound": "below", "text": f"<= {tokens[0]}", **others}
    return {"tokens": at, "bound": "at", "text": f"{at:.0f}", **others}


def _sweep_rows(timing: dict) -> dict | None:
    sweep = timing.get("sweep")
    if not sweep:
        return None
    stock, fc2 = sweep["prefill_s"]
    ratios = [_median_ratio(f, s) for f, s in zip(fc2, stock, strict=True)]
    extra = [statistics.median(a - b for a, b in zip(f, s, strict=True))
             for f, s in zip(fc2, stock, strict=True)]  # paired by round
    return {"tokens": sweep["tokens"], "fc2_prefill_ratio": ratios, "fc2_extra_s": extra,
            "stock_prefill_s": [statistics.median(s) for s in stock],
            "crossover": measured_crossover(sweep["tokens"], fc2, stock)}


def summarize_rate(raw: dict, args: ModelArgs, tokens: int) -> dict:
    """The rows of one link rate (see the module doc)."""
    out = raw["ranks"]
    timing = out["ranks"][0]["timing"]
    labels = out["labels"]
    stock = labels.index(STOCK)
    profile = HardwareProfile.from_dict(raw["profile"])
    world = out["world"]
    shape = Shape(hidden=args.dim, q_dim=args.q_dim, tp=world, elt_bytes=4,
                  layers=args.n_layers, head_dim=args.head_dim, kv_heads=args.n_kv_heads,
                  intermediate=args.intermediate_size)
    compute = args.n_layers * layer_flops(shape, tokens)[0] / profile.matmul_flops_per_s
    pre, gen = timing["prefill_s"], timing["generate_s"]
    share = statistics.median(timing["stock_comm_s"]) / statistics.median(pre[stock])
    stock_link = _link(out["ranks"], stock)
    stock_pred = compute + phase_cost(profile, Strategy(), shape, tokens, None).total_s
    rows = []
    for i, (label, d) in enumerate(zip(labels, out["strategies"], strict=True)):
        s = _strategy(d)
        thr = out["thresholds"][i]
        crossed = _link(out["ranks"], i)
        bytes_ratio = crossed / stock_link
        pred = compute + phase_cost(profile, s, shape, tokens, thr).total_s
        rows.append({
            "label": label, "threshold": thr,
            "prefill_ratio": _median_ratio(pre[i], pre[stock]),
            "generate_ratio": _median_ratio(gen[i], gen[stock]),
            "prefill_s": statistics.median(pre[i]), "generate_s": statistics.median(gen[i]),
            "prefill_link_bytes": crossed,
            "model_link_bytes": link_bytes(s, shape, tokens, world // 2, thr),
            "bytes_ratio": bytes_ratio, "limit": 1 - share * (1 - bytes_ratio),
            "predicted_prefill_ratio": pred / stock_pred,
        })
    fc2 = Strategy("flashcomm2", 1)
    sweep = _sweep_rows(timing)
    return {"rate_mbit": raw["rate_mbit"], "stock_comm_share": share,
            "predicted_stock_comm_share": 1 - compute / stock_pred,
            "predicted_crossover_tokens": crossover_tokens(profile, shape, fc2, Strategy()),
            "sweep": sweep,
            "measured_crossover": sweep["crossover"] if sweep else {"text": "not swept"},
            "profile": raw["profile"], "strategies": rows}


def summarize(raw: list[dict], model: str, args: Any) -> dict:
    """hosts.json: the setup and one entry per link rate."""
    margs = ModelArgs.from_dir(model)
    return {"setup": {"hosts": 2, "ranks_per_host": 1, "cores_per_host": 1,
                      "model": {"hidden": margs.dim, "q_dim": margs.q_dim,
                                "layers": margs.n_layers, "intermediate": margs.intermediate_size,
                                "dtype": "float32"},
                      "prefill_tokens": args.prefill_tokens, "decode_batch": args.decode_batch,
                      "decode_tokens": args.decode_tokens, "rounds": args.rounds,
                      "sweep_rounds": args.sweep_rounds},
            "rates": [summarize_rate(r, margs, args.prefill_tokens) for r in raw]}


def plot(result: dict, path: Path) -> None:
    """Speed-up over stock (stock time / strategy time) against the link rate: prefill (measured
    solid, planner dashed) and decode-heavy generate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate_mbit"] / 1000 for r in result["rates"]]
    labels = [s["label"] for s in result["rates"][0]["strategies"] if s["label"] != STOCK]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.2))
    for k, label in enumerate(labels):
        rows = [next(s for s in r["strategies"] if s["label"] == label) for r in result["rates"]]
        color = f"C{k}"
        a.plot(rates, [1 / s["prefill_ratio"] for s in rows], "o-", color=color, label=label)
        a.plot(rates, [1 / s["predicted_prefill_ratio"] for s in rows], "x--", color=color,
               alpha=0.6)
        b.plot(rates, [1 / s["generate_ratio"] for s in rows], "o-", color=color, label=label)
    for k, r in enumerate(result["rates"]):
        if r.get("sweep"):
            color = f"C{k}"
            c.plot(r["sweep"]["tokens"], [1 / x for x in r["sweep"]["fc2_prefill_ratio"]], "o-",
                   color=color, label=f"{r['rate_mbit'] / 1000:g} Gbit/s")
            if r["predicted_crossover_tokens"]:
                c.axvline(r["predicted_crossover_tokens"], color=color, ls="--", alpha=0.6)
    c.set_xscale("log")
    c.axhline(1.0, color="grey", lw=0.8)
    c.set_xlabel("prefill tokens T")
    c.set_ylabel("fc2 speed-up over stock")
    c.set_title("crossover (dashed: planner's T)")
    c.legend(fontsize=8)
    t = result["setup"]["prefill_tokens"]
    for ax, title in ((a, f"prefill T={t} (dashed: planner)"),
                      (b, "decode-heavy generate")):
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("link rate (Gbit/s)")
        ax.set_ylabel("speed-up over stock all-reduce")
        ax.set_title(title)
    a.legend(fontsize=8)
    fig.suptitle("engine, TP=2 across 2 emulated hosts (1 core each, tbf-shaped link)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
