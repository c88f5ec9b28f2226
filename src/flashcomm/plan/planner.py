"""Predict memory and communication per strategy for a model and recommend one.

Every prediction comes from flashcomm.plan.costmodel, on a shipped hardware profile
(h100-nvlink, pcie-gen4) or one fitted on the current backend; `flashcomm plan` prints it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from flashcomm.config import AttnOut, ShardSource, divisors_below
from flashcomm.knobs import ConfigError
from flashcomm.model_args import ModelArgs
from flashcomm.plan.costmodel import HardwareProfile, Shape, crossover_tokens
from flashcomm.plan.deploy import Option, recommend_deployments
from flashcomm.plan.strategy import Strategy, candidates


@dataclass(frozen=True)
class PlanRow:
    """One strategy's predicted memory per rank, communication per step and W_o fetch."""

    strategy: str
    """Strategy label."""
    o_proj_bytes: int
    """Resident o_proj bytes per rank (ring included for O-Shard)."""
    weight_bytes: int
    """All resident weight bytes per rank."""
    prefill_comm_s: float
    """Predicted communication seconds of one prefill step (auto: on the path it takes)."""
    decode_comm_s: float
    """Predicted communication seconds of one decode step (auto: on the path it takes)."""
    crossover_tokens: int | None
    """Token count from which this strategy's comm beats all-reduce's (None: never / baseline)."""
    oshard_hidden: bool | None
    """Whether the layer-sharded W_o fetch fits in its compute window at the prefill size."""
    exposed_s: float
    """Predicted W_o fetch time not hidden by compute, per prefill step (all layers)."""
    fits_budget: bool
    """Whether weight_bytes is within the memory budget."""
    threshold: int | None = None
    """FlashComm2 from this many tokens per step (0: every step; None: never)."""
    prefill_fetch_bytes: float = 0.0
    """W_o bytes one rank receives per prefill step (layer-sharded o_proj; 0 otherwise)."""
    decode_fetch_bytes: float = 0.0
    """W_o bytes one rank receives per decode step: the owner ring turns on decode too, the
    gather source fetches nothing on a row-parallel decode step."""
    decode_fetch_hidden: bool | None = None
    """Whether the decode step's W_o fetch fits in its compute window (None: no fetch)."""
    decode_exposed_s: float = 0.0
    """Predicted W_o fetch time not hidden by compute, per decode step (all layers)."""


GIB = 1 << 30
"""Bytes per GiB (--memory-budget is in GiB)."""


def model_shape(m: ModelArgs, tp: int, elt: int) -> Shape:
    """The cost model's Shape of `m` at TP size `tp` with `elt`-byte activations (MoE: the
    dense inner size with the FLOPs of a token's top-k experts and router)."""
    inner = round(m.mlp_active_weights(1) / (3 * m.dim)) if m.is_moe else m.intermediate_size
    return Shape(hidden=m.dim, q_dim=m.q_dim, tp=tp, elt_bytes=elt, layers=m.n_layers,
                 head_dim=m.head_dim, kv_heads=m.n_kv_heads, intermediate=inner)


def weight_bytes_per_rank(m: ModelArgs, tp: int, s: Strategy, elt: int) -> tuple[int, int]:
    """(o_proj bytes, all weight bytes) resident on one rank for strategy `s`; under uneven
    expert parallelism, on the rank holding the most experts."""
    h, d, L = m.dim, m.q_dim, m.n_layers
    if not s.flashcomm2:
        o_total = L * h * d // tp * elt
    else:
        o_layer = h * d // s.otp * elt  # FlashComm2's W_o: full (otp = 1) or a 1/otp slice
        group = tp // s.otp  # the odp ranks that share a slice (dp = 1 here)
        if s.oshard_k is None:
            o_total = L * o_layer
        elif s.shard_source == ShardSource.GATHER:  # resident D/N slices + the ring
            o_total = L * o_layer // group + (s.oshard_k + 1) * o_layer
        else:  # owned layers + the ring
            o_total = (math.ceil(L / group) + s.oshard_k + 1) * o_layer
    embed = m.vocab_size * h * (1 if m.tie_word_embeddings else 2)
    attn = m.attn_weights(tp) + 2 * h  # per layer: q/k/v (MLA: its projections), both norms
    mlp = m.mlp_weights(tp, s.expert_parallel)  # MoE: experts + router
    other = (L * attn + mlp + embed + h) * elt
    return o_total, o_total + other


def make_plan(
    m: ModelArgs, tp: int, profile: HardwareProfile, *, otps: list[int] | None = None,
    prefill_tokens: int = 4096, decode_batch: int = 16, elt: int = 2,
    memory_budget_bytes: float | None = None, decode_steps: int = 256,
    weight_elt: int | None = None,
) -> dict:
    """Predictions per strategy, a recommendation, and one per deployment (prefill-only,
    decode-only, mixed: a prefill then `decode_steps` decode steps), as one JSON-ready dict.
    `elt`: bytes per activation element; `weight_elt`: per weight element (memory and W_o
    fetches; 1 for int8 weights), None: elt."""
    if tp < 2:
        raise ConfigError(f"tp={tp}: planning compares TP strategies, so tp must be >= 2")
    valid = divisors_below(tp)
    otps = valid if otps is None else otps
    for o in otps:
        if o not in valid:
            raise ConfigError(f"otp={o}: must divide tp={tp} and be below it (allowed: {valid})")
    w_elt = elt if weight_elt is None else weight_elt
    shape = replace(model_shape(m, tp, elt), weight_bytes=w_elt)
    rows, options = [], []
    sources = (ShardSource.OWNER, ShardSource.GATHER)
    cands = candidates(tp, m.n_layers, otps, sources=sources)
    cands += [replace(s, attn_out=AttnOut.AUTO) for s in cands if s.oshard_k is not None]
    for s in cands:
        o_bytes, w_bytes = weight_bytes_per_rank(m, tp, s, w_elt)
        cross = crossover_tokens(profile, shape, s.fixed(), s.baseline()) if s.flashcomm2 \
            else None
        o = Option.evaluate(profile, s, shape, o_bytes, w_bytes, prefill_tokens, decode_batch)
        options.append(o)
        fits = memory_budget_bytes is None or w_bytes <= memory_budget_bytes
        rows.append(PlanRow(s.label, o_bytes, w_bytes, o.prefill.comm_s, o.decode.comm_s,
                            cross, o.prefill.fetch_hidden, o.prefill.exposed_s, fits,
                            o.threshold, o.prefill.fetch_bytes, o.decode.fetch_bytes,
                            o.decode.fetch_hidden, o.decode.exposed_s))
    fitting = [r for r in rows if r.fits_budget]
    best = min(fitting, key=lambda r: (r.prefill_comm_s + r.exposed_s, r.weight_bytes),
               default=None)
    return {
        "model": {"model_type": m.model_type, "layers": m.n_layers, "hidden": m.dim,
                  "q_dim": m.q_dim, "experts": m.n_experts, "moe_layers": len(m.moe_layers)},
        "tp": tp, "profile": profile.name, "prefill_tokens": prefill_tokens,
        "decode_batch": decode_batch, "elt_bytes": elt, "weight_elt_bytes": w_elt,
        "memory_budget_bytes": memory_budget_bytes,
        "strategies": [r.__dict__ for r in rows],
        "recommendation": _recommend(best, decode_batch),
        "decode_steps": decode_steps,
        "deployments": recommend_deployments(options, memory_budget_bytes, decode_steps),
    }


def _recommend(best: PlanRow | None, decode_batch: int) -> dict:
    if best is None:
        return {"strategy": None, "why": "no strategy fits the memory budget; raise it or tp"}
    why = [f"lowest predicted prefill communication ({best.prefill_comm_s * 1e3:.2f} ms) "
           f"among strategies within the budget"]
    if best.crossover_tokens is not None:
        why.append(f"FlashComm2 wins from {best.crossover_tokens} tokens per step; "
                   f"with --attn-out auto smaller steps use all-reduce")
        if best.crossover_tokens > decode_batch:
            why.append(f"decode at batch {decode_batch} stays on all-reduce")
    if best.oshard_hidden is False:
        why.append("warning: the layer-sharded W_o fetch is not fully hidden at this size")
    return {"strategy": best.strategy, "why": "; ".join(why)}
