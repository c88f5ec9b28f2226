"""What one tensor-parallel rank holds (TPPlan, expert_split) and the strategy its forward
follows (TPContext): the pieces every model file shares, below all of them."""

from __future__ import annotations

from dataclasses import dataclass

from flashcomm import comm
from flashcomm.config import FlashCommConfig
from flashcomm.gathered import GatheredSeries
from flashcomm.groups import GroupHandle, ParallelGroups
from flashcomm.knobs import AUTO, ConfigError
from flashcomm.model_args import ModelArgs, expert_range
from flashcomm.sharding import ShardedSeries


def expert_split(args: ModelArgs, tp: int, rank: int,
                 expert_parallel: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(experts held, inner columns held of each) by TP rank `rank` of `tp`."""
    e, inner = args.n_experts, args.moe_intermediate_size
    if not args.is_moe:
        return (0, 0), (0, 0)
    if expert_parallel:
        if e < tp:  # a rank without an expert would idle through every MoE layer: refuse it
            raise ConfigError(
                f"expert_parallel=True (--expert-parallel) at tp={tp}: num_experts={e} is below "
                f"tp (every rank holds at least one whole expert); allowed tp: 1 to {e}, or "
                f"drop --expert-parallel")
        return expert_range(e, tp, rank), (0, inner)
    if inner % tp:
        raise ConfigError(
            f"tp={tp}: moe_intermediate_size={inner} is not divisible by tp (TP experts split "
            f"each expert's inner columns); use --expert-parallel or tp in "
            f"{[n for n in range(1, min(inner, 64) + 1) if not inner % n]}")
    return (0, e), (rank * inner // tp, (rank + 1) * inner // tp)


@dataclass(frozen=True)
class TPPlan:
    """The slices of every weight that one TP rank holds (head / column ranges)."""

    tp: int
    """TP size N (1 = single process)."""
    rank: int
    """This rank's TP index."""
    q_heads: tuple[int, int]
    """[start, end) of the query heads computed here."""
    kv_heads: tuple[int, int]
    """[start, end) of the kv heads held here (replicated when n_kv_heads < N)."""
    kv_index: tuple[int, ...]
    """For each local q head, its local kv head."""
    ffn: tuple[int, int]
    """[start, end) of the MLP intermediate columns."""
    o_cols: tuple[int, int]
    """[start, end) of o_proj input columns (of D) held: D/N, D/otp or all of D."""
    experts: tuple[int, int] = (0, 0)
    """MoE: [start, end) of the experts held (all of them, or under expert parallelism
    floor(E/N) whole ones, one more on the first E mod N ranks: model_args.expert_range)."""
    expert_ffn: tuple[int, int] = (0, 0)
    """MoE: [start, end) of each held expert's inner columns (I/N, or all of I under EP)."""

    @classmethod
    def build(cls, args: ModelArgs, tp: int, rank: int, otp: int = 0,
              expert_parallel: bool = False) -> TPPlan:
        """Split `args` over `tp` ranks; otp > 0 means FlashComm2 (W_o slice of its odp group);
        expert_parallel: MoE ranks hold whole experts (E/N, +1 on the first E mod N ranks)
        instead of 1/N of every expert."""
        if args.n_heads % tp or args.intermediate_size % tp or (
                args.n_kv_heads % tp and tp % args.n_kv_heads):
            ok = [n for n in range(1, args.n_heads + 1) if not args.n_heads % n
                  and not args.intermediate_size % n
                  and not (args.n_kv_heads % n and n % args.n_kv_heads)]
            raise ConfigError(
                f"tp={tp} (--nproc): this model splits over tp in {ok} (num_attention_heads="
                f"{args.n_heads}, num_key_value_heads={args.n_kv_heads} and intermediate_size="
                f"{args.intermediate_size} must divide evenly)")
        hq = args.n_heads // tp
        group = args.n_heads // args.n_kv_heads  # q heads per kv head
        q0, q1 = rank * hq, (rank + 1) * hq
        kv0, kv1 = q0 // group, (q1 - 1) // group + 1
        kv_index = tuple(q // group - kv0 for q in range(q0, q1))
        ff = args.intermediate_size // tp
        d = args.q_dim
        if otp:  # FlashComm2: odp group j = rank // odp holds rows j of W_o's otp split
            j, width = rank // (tp // otp), d // otp
            o_cols = (j * width, (j + 1) * width)
        else:
            o_cols = (rank * d // tp, (rank + 1) * d // tp)
        experts, expert_ffn = expert_split(args, tp, rank, expert_parallel)
        return cls(tp, rank, (q0, q1), (kv0, kv1), kv_index, (rank * ff, (rank + 1) * ff), o_cols,
                   experts, expert_ffn)

    @property
    def n_q(self) -> int:
        """Local query heads."""
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv(self) -> int:
        """Local kv heads."""
        return self.kv_heads[1] - self.kv_heads[0]


@dataclass(frozen=True)
class TPContext:
    """Everything a forward needs about parallelism; one per rank, passed explicitly."""

    cfg: FlashCommConfig
    """The strategy knobs (tp, flashcomm2_otp, flashcomm1, layer_sharding, comm_dtype)."""
    groups: ParallelGroups | None = None
    """This rank's process groups; None for the single-process reference."""
    counter: comm.CommCounter | None = None
    """Bytes moved by this rank's collectives."""
    o_series: ShardedSeries | GatheredSeries | None = None
    """The layer-sharded o_proj weights, owner or gather source (None when not layer-sharded)."""

    def __post_init__(self) -> None:
        if self.cfg.flashcomm2_min_tokens == AUTO:
            raise ConfigError("flashcomm2_min_tokens='auto': resolve it to a threshold before "
                              "building the model (flashcomm.plan.auto.resolve_auto)")

    @property
    def tp_group(self) -> GroupHandle | None:
        """The TP group, or None when single-process."""
        return None if self.groups is None else self.groups.tp

    @property
    def flashcomm1(self) -> bool:
        """Whether the residual stream is token-chunked between layers."""
        return self.groups is not None and self.cfg.flashcomm1
