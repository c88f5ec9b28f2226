"""The cost model: bytes each strategy sends per layer and per step, their alpha-beta time on a
hardware profile, the FlashComm2 crossover, and the FLOPs that hide an O-Shard broadcast.

The one source of these formulas: the planner, the auto policy, `bench comm` and `bench e2e`
all call it, and tests compare it with what `flashcomm.comm.CommCounter` counts at run time.
Bytes are integers, counted as DESIGN.md section 2 and CommCounter do (ring algorithms, T padded
to T_pad = ceil(T/N)*N for every token op), and keyed by CommCounter's op names.

Each collective costs `alpha + bytes_sent_per_rank / bandwidth`. Profiles come from published
figures (shipped JSON under flashcomm/profiles/) or from a fit on the current backend
(flashcomm.plan.fit). Pure Python: no torch, so `flashcomm plan` runs anywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from flashcomm.config import CommDtype, ShardSource
from flashcomm.plan.strategy import Strategy

OPS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast")
SHIPPED_PROFILES = ("h100-nvlink", "pcie-gen4")


@dataclass(frozen=True)
class OpCost:
    """Alpha-beta parameters of one collective."""

    alpha_s: float
    """Fixed latency per call, seconds."""
    bytes_per_s: float
    """Achieved per-rank send bandwidth, bytes/second."""

    def time(self, nbytes: float) -> float:
        """Predicted seconds for a call that sends `nbytes` per rank."""
        return self.alpha_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class HardwareProfile:
    """Collective costs (per TP size where fitted) plus a matmul rate for compute windows."""

    name: str
    """Short label, e.g. 'h100-nvlink' or 'gloo-fit'."""
    ops: dict[str, OpCost]
    """Default cost per op name in OPS."""
    matmul_flops_per_s: float
    """Achieved dense matmul rate (FLOP/s) in the inference dtype."""
    per_tp: dict[int, dict[str, OpCost]] = field(default_factory=dict)
    """Fitted costs per TP size N, preferred over `ops` when present."""
    source: str = ""
    """Where the figures come from."""
    overlap: float = 1.0
    """Fraction of a compute window in which a background W_o fetch progresses as if alone: 1
    where transfers run beside compute (a GPU's copy engines; the shipped profiles), measured by
    the fit on CPU hosts (flashcomm.plan.fit.fetch_overlap), where the fetch shares the cores."""

    def cost(self, op: str, n: int) -> OpCost:
        """The cost of `op` at group size `n` (nearest fitted N, else the default)."""
        if self.per_tp:
            nearest = min(self.per_tp, key=lambda k: (abs(k - n), k))
            if op in self.per_tp[nearest]:
                return self.per_tp[nearest][op]
        return self.ops[op]

    @classmethod
    def from_dict(cls, d: dict) -> HardwareProfile:
        """Parse a profile JSON object."""
        def costs(m: dict) -> dict[str, OpCost]:
            unknown = set(m) - set(OPS)
            if unknown:
                raise ValueError(f"profile: unknown op(s) {sorted(unknown)}; allowed: {OPS}")
            return {op: OpCost(float(v["alpha_s"]), float(v["bytes_per_s"])) for op, v in m.items()}

        ops = costs(d.get("ops", {}))
        per_tp = {int(n): costs(m) for n, m in d.get("per_tp", {}).items()}
        missing = [op for op in OPS if op not in ops and not all(op in m for m in per_tp.values())]
        if missing or (not ops and not per_tp):
            raise ValueError(f"profile {d.get('name')!r}: no cost for op(s) {missing or OPS}")
        overlap = float(d.get("overlap", 1.0))
        if not 0.0 <= overlap <= 1.0:
            raise ValueError(f"profile {d.get('name')!r}: overlap={overlap}; allowed: 0 to 1")
        return cls(name=str(d.get("name", "profile")), ops=ops,
                   matmul_flops_per_s=float(d["matmul_flops_per_s"]), per_tp=per_tp,
                   source=str(d.get("source", "")), overlap=overlap)

    def to_dict(self) -> dict:
        """A JSON-ready dict (inverse of from_dict)."""
        return {
            "name": self.name, "source": self.source,
            "matmul_flops_per_s": self.matmul_flops_per_s, "overlap": self.overlap,
            "ops": {op: asdict(c) for op, c in self.ops.items()},
            "per_tp": {str(n): {op: asdict(c) for op, c in m.items()}
                       for n, m in self.per_tp.items()},
        }

    @classmethod
    def load(cls, name_or_path: str) -> HardwareProfile:
        """A shipped profile by name (see SHIPPED_PROFILES) or a JSON file path."""
        if name_or_path in SHIPPED_PROFILES:
            shipped = resources.files("flashcomm.profiles").joinpath(f"{name_or_path}.json")
            text = shipped.read_text()
        else:
            p = Path(name_or_path)
            if not p.is_file():
                raise ValueError("not a file and not a shipped profile")
            text = p.read_text()
        return cls.from_dict(json.loads(text))


def fit_op(samples: list[tuple[float, float]], relative: bool = False) -> OpCost:
    """Least-squares alpha-beta fit of (bytes_sent, seconds) samples, clamped to alpha >= 0.

    relative=True minimises relative errors (weights 1/seconds^2), so samples spanning orders
    of magnitude fix alpha from the small ones and bandwidth from the large ones. A fit whose
    time does not grow with bytes (noise) falls back to the largest sample's bandwidth."""
    if len(samples) < 2:
        raise ValueError("fit_op: need at least two (bytes, seconds) samples")
    w = [1.0 / max(t, 1e-12) ** 2 if relative else 1.0 for _, t in samples]
    sw = sum(w)
    mx = sum(wi * b for wi, (b, _) in zip(w, samples, strict=True)) / sw
    my = sum(wi * t for wi, (_, t) in zip(w, samples, strict=True)) / sw
    sxx = sum(wi * (b - mx) ** 2 for wi, (b, _) in zip(w, samples, strict=True))
    sxy = sum(wi * (b - mx) * (t - my) for wi, (b, t) in zip(w, samples, strict=True))
    slope = sxy / sxx if sxx else 0.0
    if slope <= 0:  # noise swamped the size dependence: all time is transfer at the largest size
        b_max, t_max = max(samples)
        return OpCost(alpha_s=0.0, bytes_per_s=b_max / max(t_max, 1e-12))
    alpha = max(my - slope * mx, 0.0)
    return OpCost(alpha_s=alpha, bytes_per_s=1.0 / slope)


# ---- what each strategy sends ------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The sizes that set a layer's traffic (and, where given, its FLOPs)."""

    hidden: int
    """H, the residual width."""
    q_dim: int
    """D = heads * head_dim, the o_proj input width."""
    tp: int
    """N, the TP size."""
    elt_bytes: int = 2
    """Bytes per activation element (2 for bf16, 4 for fp32)."""
    layers: int = 1
    """L, decoder layers in a step."""
    head_dim: int = 0
    """Per-head width. This and the next two set the FLOPs of the compute window that hides a
    layer-sharded W_o fetch (layer_flops); traffic does not use them."""
    kv_heads: int = 0
    """Key/value heads of the whole model."""
    intermediate: int = 0
    """MLP inner size."""
    weight_bytes: int = 0
    """Bytes per W_o element fetched by O-Shard (1 for int8 weights); 0: elt_bytes."""

    @property
    def w_elt(self) -> int:
        """Bytes per weight element (weight_bytes, or elt_bytes when not given)."""
        return self.weight_bytes or self.elt_bytes


class Call(NamedTuple):
    """One collective call: its op (for the profile), group size and the bytes one rank sends,
    split by CommCounter key (an int8 all-to-all is one message: payload plus scales)."""

    op: str
    """Op name from OPS."""
    group: int
    """Group size."""
    parts: tuple[tuple[str, int], ...]
    """(CommCounter key, bytes) of this call."""

    @property
    def nbytes(self) -> int:
        """Bytes one rank sends in this call."""
        return sum(b for _, b in self.parts)


def attn_out_calls(s: Strategy, shape: Shape, tokens: int) -> list[Call]:
    """The attention-output path of one layer, from [T, D/N] until the MLP's input is ready:
    all-reduce, or FlashComm1's reduce-scatter, or FlashComm2's all-to-all (+ otp reduce-scatter),
    then the all-gather FlashComm1 or FlashComm2 needs. `s` is the path taken (see
    Strategy.path): auto is counted as FlashComm2."""
    n, h, e = shape.tp, shape.hidden, shape.elt_bytes
    if n == 1:
        return []
    c = math.ceil(tokens / n)
    ring = (n - 1) * c * h * e  # a reduce-scatter's or all-gather's bytes; all-reduce: twice
    if not s.flashcomm2:
        out = [Call("reduce_scatter", n, (("reduce_scatter", ring),)) if s.flashcomm1
               else Call("all_reduce", n, (("all_reduce", 2 * ring),))]
    else:
        odp = n // s.otp
        rows = c * n // odp  # T_pad / odp token rows to each odp peer
        dn = shape.q_dim // n
        if s.comm_dtype == CommDtype.INT8:  # one int8 byte per element + an fp32 scale per row
            parts = (("all_to_all", (odp - 1) * rows * dn),
                     ("all_to_all_scales", (odp - 1) * rows * 4))
        else:
            parts = (("all_to_all", (odp - 1) * rows * dn * e),)
        out = [Call("all_to_all", odp, parts)]
        if s.otp > 1:
            out.append(Call("reduce_scatter", s.otp,
                            (("otp_reduce_scatter", (s.otp - 1) * c * h * e),)))
    if s.flashcomm1 or s.flashcomm2:  # back to [T, H] (or FlashComm1's all-gather before the MLP)
        out.append(Call("all_gather", n, (("all_gather", ring),)))
    return out


def layer_calls(s: Strategy, shape: Shape, tokens: int) -> list[Call]:
    """One decoder layer: the attention-output path, then the MLP's all-reduce (FlashComm1: its
    reduce-scatter and the all-gather before the next layer's QKV)."""
    out = attn_out_calls(s, shape, tokens)
    n, h, e = shape.tp, shape.hidden, shape.elt_bytes
    if n == 1:
        return out
    ring = (n - 1) * math.ceil(tokens / n) * h * e
    if s.flashcomm1:
        return out + [Call("reduce_scatter", n, (("reduce_scatter", ring),)),
                      Call("all_gather", n, (("all_gather", ring),))]
    return out + [Call("all_reduce", n, (("all_reduce", 2 * ring),))]


def step_calls(s: Strategy, shape: Shape, tokens: int) -> list[Call]:
    """One forward step over shape.layers layers, plus FlashComm1's all-gather before the LM
    head: every collective the engine issues for a step of `tokens` tokens on path `s`."""
    out = shape.layers * layer_calls(s, shape, tokens)
    if s.flashcomm1 and shape.tp > 1:
        ring = (shape.tp - 1) * math.ceil(tokens / shape.tp) * shape.hidden * shape.elt_bytes
        out.append(Call("all_gather", shape.tp, (("all_gather", ring),)))
    return out


def counted_bytes(calls: list[Call]) -> dict[str, int]:
    """Bytes per CommCounter key of `calls`: what a CommCounter records for them."""
    out: dict[str, int] = {}
    for call in calls:
        for key, b in call.parts:
            out[key] = out.get(key, 0) + b
    return out


def comm_time(profile: HardwareProfile, calls: list[Call]) -> float:
    """Predicted seconds of `calls` on `profile` (size-1 groups are free)."""
    return sum(profile.cost(c.op, c.group).time(c.nbytes) for c in calls if c.group > 1)


def crossover_tokens(
    profile: HardwareProfile, shape: Shape, fc2: Strategy, base: Strategy, max_tokens: int = 1 << 20
) -> int | None:
    """Smallest token count from which `fc2`'s per-layer comm beats `base`'s (None: not up to
    max_tokens). Under the gather source only FlashComm2 steps fetch W_o, so such a step must
    also hide its fetch behind compute (oshard_window_fits): the source exists so that decode,
    whose window is one token's work, never waits for a weight; an exposed fetch the alpha-beta
    model deems small is the least certain term of all. The owner ring turns on both paths."""
    gather = fc2.oshard_k is not None and fc2.shard_source == ShardSource.GATHER

    def wins(t: int) -> bool:
        if gather and not oshard_window_fits(profile, fc2.fixed(), shape, t)[0]:
            return False
        return (comm_time(profile, layer_calls(fc2, shape, t))
                < comm_time(profile, layer_calls(base, shape, t)))

    if not wins(max_tokens):
        return None
    lo, hi = 1, max_tokens  # assumes one crossing: alpha terms favour base, beta terms fc2
    if wins(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


# ---- compute that hides an O-Shard broadcast ----------------------------------------------------


def layer_flops(shape: Shape, tokens: int) -> tuple[float, float]:
    """(whole-layer FLOPs, QKV + attention FLOPs) per rank for a prefill of `tokens` tokens."""
    n, h, d = shape.tp, shape.hidden, shape.q_dim
    kv = max(1, shape.kv_heads // n) * shape.head_dim
    qkv = 2 * tokens * h * (d // n + 2 * kv)
    attn = 2 * tokens * tokens * d // n  # causal QK^T + PV, halved by the mask
    o = 2 * tokens * h * d // n
    mlp = 2 * tokens * 3 * h * shape.intermediate // n
    return float(qkv + attn + o + mlp), float(qkv + attn)


def fetch_call(s: Strategy, shape: Shape) -> Call | None:
    """The call that fetches one layer's layer-sharded W_o ([H, D/otp]) at dp = 1: a broadcast
    from its owner over the odp ranks holding that slice (owner source), or an all-gather of
    the odp resident [H, D/N] slices (gather source); None when o_proj is not layer-sharded."""
    if s.oshard_k is None or not s.flashcomm2:
        return None
    n, odp = shape.tp, shape.tp // s.otp
    if s.shard_source == ShardSource.GATHER:
        nbytes = (odp - 1) * shape.hidden * (shape.q_dim // n) * shape.w_elt
        return Call("all_gather", odp, (("fetch", nbytes),))
    w_bytes = shape.hidden * shape.q_dim // s.otp * shape.w_elt
    return Call("broadcast", odp, (("fetch", w_bytes),))


def oshard_window_fits(profile: HardwareProfile, s: Strategy, shape: Shape,
                       tokens: int) -> tuple[bool, float, float]:
    """(fits, fetch seconds, compute window seconds) of one layer's W_o fetch at a prefill of
    `tokens` tokens. The fetch of layer i+k starts at layer i's QKV; with k = 0 only QKV +
    attention hide it, with k >= 1 roughly k whole layers do, to the profile's overlap (the
    window counted is the compute time times it)."""
    call = fetch_call(s, shape)
    if call is None:
        return True, 0.0, 0.0
    full, attn = layer_flops(shape, tokens)
    fetch = comm_time(profile, [call])
    window = ((attn if s.oshard_k == 0 else s.oshard_k * full) / profile.matmul_flops_per_s
              * profile.overlap)
    return fetch <= window, fetch, window


def step_fetches(s: Strategy, shape: Shape, tokens: int,
                 threshold: int | None = None) -> list[Call]:
    """The W_o fetches of one step of `tokens` tokens (one per layer, or none): the owner ring
    turns on every step whatever path the step takes (its row-parallel steps need their own
    columns from the owner too); the gather source fetches only on steps that take FlashComm2,
    its row-parallel steps read the resident slice. `threshold`: auto's resolved crossover."""
    call = fetch_call(s, shape)
    if call is None:
        return []
    if s.shard_source == ShardSource.GATHER and not s.path(tokens, threshold).flashcomm2:
        return []
    return shape.layers * [call]


def fetch_bytes_per_step(s: Strategy, shape: Shape, tokens: int,
                         threshold: int | None = None) -> float:
    """W_o bytes one rank receives in one step, mean over the G = odp ranks of its group:
    (G-1)/G * |W| per fetched layer for both sources (owner: |W| on the G-1 non-owners; gather:
    G-1 slices of |W|/G on every rank), |W| = H * D/otp * elt."""
    calls = step_fetches(s, shape, tokens, threshold)
    if not calls:
        return 0.0
    g = calls[0].group
    w = shape.hidden * shape.q_dim // s.otp * shape.w_elt
    return len(calls) * (g - 1) * w / g


def exposed_fetch_s(profile: HardwareProfile, s: Strategy, shape: Shape, tokens: int,
                    threshold: int | None = None) -> float:
    """Predicted W_o fetch time not hidden by compute, per step of `tokens` tokens (all layers;
    0 unless the step fetches: see step_fetches)."""
    if not step_fetches(s, shape, tokens, threshold):
        return 0.0
    _, fetch, window = oshard_window_fits(profile, s, shape, tokens)
    return shape.layers * max(0.0, fetch - window)
