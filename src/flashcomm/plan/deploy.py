"""Per-phase costs of a strategy and the recommendation for three deployments: a prefill-only
node, a decode-only node and mixed serving, within a memory budget.

A phase is a step size: prefill steps of `prefill_tokens` tokens, decode steps of `decode_batch`
tokens. Per phase a strategy costs its communication (on the path that step takes: FlashComm2
or the all-reduce, by its threshold) plus the W_o fetch time compute does not hide. The owner
source fetches on every step (its ring turns on decode too); the gather source only on
FlashComm2 steps, so under a threshold above the decode batch its decode moves no weight byte.
The three deployments rank strategies by prefill time, decode time, and prefill + decode_steps
x decode time (one request: a prefill, then decode_steps decode steps); ties go to the smaller
weight footprint. Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flashcomm.config import AttnOut
from flashcomm.plan.costmodel import (
    HardwareProfile,
    Shape,
    comm_time,
    crossover_tokens,
    exposed_fetch_s,
    fetch_bytes_per_step,
    oshard_window_fits,
    step_calls,
    step_fetches,
)
from flashcomm.plan.strategy import Strategy

DEPLOYMENTS = ("prefill_only", "decode_only", "mixed")
MIB = 1 << 20


@dataclass(frozen=True)
class PhaseCost:
    """One step of a phase under one strategy."""

    tokens: int
    """Tokens per step."""
    flashcomm2: bool
    """Whether the step takes FlashComm2 (else the row-parallel o_proj and its all-reduce)."""
    comm_s: float
    """Predicted communication seconds of the step (all layers)."""
    fetch_bytes: float
    """W_o bytes one rank receives in the step (mean over its group; 0: nothing fetched)."""
    fetch_hidden: bool | None
    """Whether each layer's fetch fits in its compute window (None: the step fetches nothing)."""
    exposed_s: float
    """Predicted fetch seconds not hidden by compute (all layers)."""
    fetch_s: float = 0.0
    """Predicted fetch seconds, hidden or not (all layers): the link time the fetches take."""

    @property
    def total_s(self) -> float:
        """comm_s + exposed_s: what the phase costs this strategy."""
        return self.comm_s + self.exposed_s


def threshold_of(s: Strategy, cross: int | None) -> int | None:
    """The token count from which `s` takes FlashComm2 (0: every step; None: never)."""
    if not s.flashcomm2:
        return None
    return s.min_tokens if s.attn_out == AttnOut.FLASHCOMM2 else cross


def phase_cost(profile: HardwareProfile, s: Strategy, shape: Shape, tokens: int,
               cross: int | None) -> PhaseCost:
    """`s` on one step of `tokens` tokens; `cross` is auto's resolved crossover."""
    path = s.path(tokens, cross)
    fetches = step_fetches(s, shape, tokens, cross)
    hidden = oshard_window_fits(profile, s, shape, tokens)[0] if fetches else None
    return PhaseCost(tokens, path.flashcomm2, comm_time(profile, step_calls(path, shape, tokens)),
                     fetch_bytes_per_step(s, shape, tokens, cross), hidden,
                     exposed_fetch_s(profile, s, shape, tokens, cross),
                     comm_time(profile, fetches))


@dataclass(frozen=True)
class Option:
    """One strategy as a deployment candidate: its memory and both phases."""

    strategy: Strategy
    """The strategy."""
    threshold: int | None
    """FlashComm2 from this many tokens per step (0: every step; None: never)."""
    o_proj_bytes: int
    """Resident o_proj bytes per rank."""
    weight_bytes: int
    """All resident weight bytes per rank."""
    prefill: PhaseCost
    """A prefill step."""
    decode: PhaseCost
    """A decode step."""

    @classmethod
    def evaluate(cls, profile: HardwareProfile, s: Strategy, shape: Shape, o_bytes: int,
                 w_bytes: int, prefill_tokens: int, decode_batch: int) -> Option:
        """Both phases of `s` (auto: at its crossover on `profile`)."""
        cross = crossover_tokens(profile, shape, s.fixed(), s.baseline()) if s.flashcomm2 \
            else None
        return cls(s, threshold_of(s, cross), o_bytes, w_bytes,
                   phase_cost(profile, s, shape, prefill_tokens, cross),
                   phase_cost(profile, s, shape, decode_batch, cross))

    def cost(self, deployment: str, decode_steps: int) -> float:
        """Predicted seconds that rank strategies for `deployment`."""
        if deployment == "prefill_only":
            return self.prefill.total_s
        if deployment == "decode_only":
            return self.decode.total_s
        return self.prefill.total_s + decode_steps * self.decode.total_s


def recommend_deployments(options: list[Option], memory_budget_bytes: float | None,
                          decode_steps: int) -> dict[str, dict]:
    """Per deployment: the fastest option within the budget (ties: least memory, then least
    fetch link time), its weight source and threshold, and why (naming a faster option the
    budget rules out)."""
    fits = [o for o in options if memory_budget_bytes is None
            or o.weight_bytes <= memory_budget_bytes]
    out = {}
    for dep in DEPLOYMENTS:
        def key(o: Option, dep: str = dep) -> tuple[float, int, float]:
            link = {"prefill_only": o.prefill.fetch_s, "decode_only": o.decode.fetch_s,
                    "mixed": o.prefill.fetch_s + decode_steps * o.decode.fetch_s}[dep]
            return o.cost(dep, decode_steps), o.weight_bytes, link

        best_any = min(options, key=key)
        best = min(fits, key=key, default=None)
        out[dep] = _describe(dep, best, best_any, memory_budget_bytes, decode_steps)
    return out


def _describe(dep: str, best: Option | None, best_any: Option, budget: float | None,
              decode_steps: int) -> dict:
    if best is None:
        return {"strategy": None, "shard_source": None, "flashcomm2_min_tokens": None,
                "why": f"no strategy fits the memory budget of {budget / MIB:.1f} MiB per rank; "
                       f"the fastest, {best_any.strategy.label}, needs "
                       f"{best_any.weight_bytes / MIB:.1f} MiB; raise the budget or tp"}
    ruled_out = ""
    if best_any.cost(dep, decode_steps) < best.cost(dep, decode_steps):
        ruled_out = (f"{best_any.strategy.label} would be faster "
                     f"({best_any.cost(dep, decode_steps) * 1e3:.3f} ms) but needs "
                     f"{best_any.weight_bytes / MIB:.1f} MiB of weights per rank (o_proj "
                     f"{best_any.o_proj_bytes / MIB:.1f} MiB{_formula(best_any.strategy)}), over "
                     f"the memory budget of {budget / MIB:.1f} MiB")
    s = best.strategy
    why = [_phase_text(dep, best, decode_steps)]
    if ruled_out:
        why.append(ruled_out + f"; {s.label} is the fastest that fits")
    return {
        "strategy": s.label,
        "shard_source": None if s.oshard_k is None else str(s.shard_source),
        "prefetch_step": s.oshard_k,
        "flashcomm2_min_tokens": best.threshold,
        "predicted_s": best.cost(dep, decode_steps),
        "weight_bytes": best.weight_bytes,
        "o_proj_bytes": best.o_proj_bytes,
        "prefill": asdict(best.prefill),
        "decode": asdict(best.decode),
        "why": "; ".join(why),
    }


def _formula(s: Strategy) -> str:
    if s.oshard_k is None:
        return ""
    if s.shard_source == "gather":
        return ": L*|W|/odp + (k+1)*|W| under the gather source"
    return ": (ceil(L/G) + k + 1)*|W| under the owner source"


def _phase_text(dep: str, o: Option, decode_steps: int) -> str:
    def phase(name: str, p: PhaseCost) -> str:
        path = "FlashComm2" if p.flashcomm2 else "all-reduce"
        fetch = "no W_o fetch" if p.fetch_hidden is None else (
            f"{_size(p.fetch_bytes)} of W_o fetched per rank, "
            + ("hidden" if p.fetch_hidden else f"{p.exposed_s * 1e3:.3f} ms exposed"))
        return f"{name} (T={p.tokens}): {path}, {p.comm_s * 1e3:.3f} ms comm, {fetch}"

    when = {None: "never takes FlashComm2", 0: "takes FlashComm2 on every step"}.get(
        o.threshold, f"takes FlashComm2 from {o.threshold} tokens per step")
    parts = {"prefill_only": [phase("prefill", o.prefill)],
             "decode_only": [phase("decode", o.decode)],
             "mixed": [phase("prefill", o.prefill),
                       phase(f"decode x {decode_steps}", o.decode)]}[dep]
    return f"lowest predicted time; {o.strategy.label} {when}; " + "; ".join(parts)


def _size(nbytes: float) -> str:
    return f"{nbytes / 1024:.0f} KiB" if nbytes < 10 * MIB else f"{nbytes / MIB:.0f} MiB"
