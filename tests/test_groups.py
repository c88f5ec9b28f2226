"""ParallelGroups with real gloo processes: each group reduces over exactly its layout members."""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashcomm.config import FlashCommConfig
from flashcomm.groups import ParallelGroups
from flashcomm.knobs import ConfigError
from flashcomm.launch import run_local
from flashcomm.layout import ParallelLayout

CONFIGS = [  # world = 4
    FlashCommConfig(tp=4, flashcomm2_otp=2, layer_sharding=("o_proj",)),
    FlashCommConfig(tp=2, dp=2),
    FlashCommConfig(tp=2, dp=2, layer_sharding=("o_proj", "q_b_proj")),
]


def _sum_of_ranks(handle) -> int:
    t = torch.tensor([dist.get_rank()], dtype=torch.int64)
    if handle.group is not None:
        dist.all_reduce(t, group=handle.group)
    return int(t.item())


def _build_and_reduce(rank: int, world: int, layouts: list[ParallelLayout]) -> dict:
    out = []
    for layout in layouts:
        g = ParallelGroups.build(layout, shard_weights=("o_proj", "q_b_proj"))
        fams = {"tp": g.tp, "pp": g.pp, "dp": g.dp, "shard": g.shard["o_proj"],
                "shard_q_b": g.shard["q_b_proj"]}
        if g.odp is not None:
            fams |= {"odp": g.odp, "otp": g.otp}
        out.append({k: (list(h.ranks), h.rank, _sum_of_ranks(h)) for k, h in fams.items()})
    from_config = []
    for cfg in CONFIGS:  # the world size comes from torch.distributed
        g = ParallelGroups.from_config(cfg)
        from_config.append((g.layout, {w: (list(h.ranks), _sum_of_ranks(h))
                                       for w, h in g.shard.items()}))
    try:
        ParallelGroups.from_config(FlashCommConfig(tp=2, flashcomm2_otp=1))
        mismatch = "no error"
    except ConfigError as e:
        mismatch = str(e)
    return {"layouts": out, "from_config": from_config, "mismatch": mismatch}


def test_groups_match_layout_and_communicate() -> None:
    layouts = [
        ParallelLayout(tp=4, otp=2),
        ParallelLayout(tp=2, dp=2, otp=1),
        ParallelLayout(tp=2, pp=2),
        ParallelLayout(tp=1, dp=4),
    ]
    results = run_local(_build_and_reduce, 4, layouts, timeout_s=180)
    for i, lay in enumerate(layouts):
        expected = {"tp": lay.tp_groups(), "pp": lay.pp_groups(), "dp": lay.dp_groups(),
                    "shard": lay.shard_groups(), "shard_q_b": lay.shard_groups("q_b_proj")}
        if lay.otp:
            expected |= {"odp": lay.odp_groups(), "otp": lay.otp_groups()}
        for rank, per_layout in enumerate(r["layouts"][i] for r in results):
            assert set(per_layout) == set(expected)
            for fam, (ranks, group_rank, total) in per_layout.items():
                mine = lay.group_of(rank, expected[fam])
                assert ranks == mine and ranks[group_rank] == rank
                assert total == sum(mine), f"{fam} all-reduce crossed its group"
    # from_config: the config's layout, and a shard group for each weight in layer_sharding
    for rank, res in enumerate(results):
        for cfg, (layout, shard) in zip(CONFIGS, res["from_config"], strict=True):
            assert layout == ParallelLayout.from_config(cfg, 4)
            assert tuple(shard) == cfg.layer_sharding
            for w, (ranks, total) in shard.items():
                assert ranks == layout.group_of(rank, layout.shard_groups(w))
                assert total == sum(ranks)
        assert "world=4: must equal tp*pp*dp = 2*1*1 = 2" in res["mismatch"], res["mismatch"]
