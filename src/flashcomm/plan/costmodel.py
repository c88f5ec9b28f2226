"""An alpha-beta cost model of each strategy's per-layer communication, and hardware profiles.

Each collective costs `alpha + bytes_sent_per_rank / bandwidth`, with bytes counted as in
DESIGN.md (ring algorithms; T padded to a multiple of N where the op works on token chunks).
Profiles come from published figures (shipped JSON under flashcomm/profiles/) or from a fit to
`flashcomm bench comm --fit` measurements on the current backend.

Pure Python: no torch, so `flashcomm plan` runs anywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

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
        return cls(name=str(d.get("name", "profile")), ops=ops,
                   matmul_flops_per_s=float(d["matmul_flops_per_s"]), per_tp=per_tp,
                   source=str(d.get("source", "")))

    def to_dict(self) -> dict:
        """A JSON-ready dict (inverse of from_dict)."""
        return {
            "name": self.name, "source": self.source,
            "matmul_flops_per_s": self.matmul_flops_per_s,
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
                raise ValueError(
                    f"--profile={name_or_path!r}: not a file and not a shipped profile "
                    f"{SHIPPED_PROFILES}"
                )
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


# ---- what each strategy sends per layer -------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """One attention-output strategy, as the engine and benchmarks name it."""

    attn_out: str = "allreduce"
    """'allreduce' (row-parallel o_proj) or 'flashcomm2'."""
    otp: int = 0
    """FlashComm2 o_proj parallel size (>= 1 with flashcomm2)."""
    flashcomm1: bool = False
    """Sequence-parallel layout around the norms."""
    comm_dtype: str = "auto"
    """'auto' or 'int8' for the all-to-all payload."""
    oshard_k: int | None = None
    """Prefetch step when o_proj is layer-sharded, else None."""

    @property
    def label(self) -> str:
        """Readable name such as 'flashcomm2(otp=1)+fc1+oshard(k=1)'."""
        s = "allreduce" if self.attn_out == "allreduce" else f"flashcomm2(otp={self.otp})"
        if self.flashcomm1:
            s = "flashcomm1" if self.attn_out == "allreduce" else s + "+fc1"
        if self.comm_dtype == "int8":
            s += "+int8"
        if self.oshard_k is not None:
            s += f"+oshard(k={self.oshard_k})"
        return s


@dataclass(frozen=True)
class Shape:
    """The sizes that set a layer's traffic."""

    hidden: int
    """H, the residual width."""
    q_dim: int
    """D = heads * head_dim, the o_proj input width."""
    tp: int
    """N, the TP size."""
    elt_bytes: int = 2
    """Bytes per activation element (2 for bf16, 4 for fp32)."""


def layer_traffic(s: Strategy, shape: Shape, tokens: int) -> list[tuple[str, int, float]]:
    """(op, group size, bytes sent per rank) for one decoder layer at `tokens` tokens."""
    n, h, e = shape.tp, shape.hidden, shape.elt_bytes
    if n == 1:
        return []
    t_pad = math.ceil(tokens / n) * n
    rs_ag = (n - 1) / n * t_pad * h * e
    out: list[tuple[str, int, float]] = []
    if s.attn_out == "allreduce":
        out.append(("reduce_scatter", n, rs_ag) if s.flashcomm1
                   else ("all_reduce", n, 2 * (n - 1) / n * t_pad * h * e))
    else:
        otp = s.otp
        odp = n // otp
        payload = t_pad * shape.q_dim / n * (1 if s.comm_dtype == "int8" else e)
        scales = t_pad * 4 if s.comm_dtype == "int8" else 0  # one fp32 scale per token row
        out.append(("all_to_all", odp, (odp - 1) / odp * (payload + scales)))
        if otp > 1:
            out.append(("reduce_scatter", otp, (otp - 1) / n * t_pad * h * e))
    # the attention output back to what the MLP needs: [T, H] (FC1 off after FC2) or chunks
    if s.flashcomm1 or s.attn_out == "flashcomm2":
        out.append(("all_gather", n, rs_ag))
    if s.flashcomm1:  # MLP down-proj reduce-scatter + the all-gather before the next QKV
        out += [("reduce_scatter", n, rs_ag), ("all_gather", n, rs_ag)]
    else:
        out.append(("all_reduce", n, 2 * (n - 1) / n * t_pad * h * e))
    return out


def attn_out_traffic(s: Strategy, shape: Shape, tokens: int) -> list[tuple[str, int, float]]:
    """Only the ops of the attention-output path (what FlashComm2 changes), per layer."""
    full = layer_traffic(s, shape, tokens)
    mlp_ops = 2 if s.flashcomm1 else 1
    return full[: len(full) - mlp_ops]


def comm_time(profile: HardwareProfile, ops: list[tuple[str, int, float]]) -> float:
    """Predicted seconds of a list of (op, group size, bytes) calls."""
    return sum(profile.cost(op, g).time(b) for op, g, b in ops if g > 1)


def crossover_tokens(
    profile: HardwareProfile, shape: Shape, fc2: Strategy, base: Strategy, max_tokens: int = 1 << 20
) -> int | None:
    """Smallest token count from which `fc2`'s per-layer comm beats `base`'s, or None."""
    def wins(t: int) -> bool:
        return (comm_time(profile, layer_traffic(fc2, shape, t))
                < comm_time(profile, layer_traffic(base, shape, t)))

    if not wins(max_tokens):
        return None
    lo, hi = 1, max_tokens  # assumes one crossing: alpha terms favour base, beta terms fc2
    if wins(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


def oshard_window_fits(
    profile: HardwareProfile, weight_bytes: float, group: int, k: int,
    layer_flops: float, attn_flops: float,
) -> tuple[bool, float, float]:
    """(fits, broadcast seconds, compute window seconds) for one layer's prefetch.

    The broadcast of layer i+k starts at layer i's QKV; with k = 0 only QKV + attention hide
    it, with k >= 1 roughly k whole layers do."""
    bcast = profile.cost("broadcast", group).time(weight_bytes)
    window_flops = attn_flops if k == 0 else k * layer_flops
    window = window_flops / profile.matmul_flops_per_s
    return bcast <= window, bcast, window
