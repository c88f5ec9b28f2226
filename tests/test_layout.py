"""Rank layout: property tests over every valid deployment with world <= 64, worked examples."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError
from flashcomm.layout import ParallelLayout


def _valid_layouts(max_world: int = 64) -> list[ParallelLayout]:
    out = []
    for tp in range(1, max_world + 1):
        for pp in range(1, max_world // tp + 1):
            for dp in range(1, max_world // (tp * pp) + 1):
                for otp in [0] + [d for d in range(1, tp) if tp % d == 0]:
                    out.append(ParallelLayout(tp=tp, pp=pp, dp=dp, otp=otp))
    return out


VALID = _valid_layouts()
layouts = st.sampled_from(VALID)


def _assert_partition(groups: list[list[int]], world: int) -> None:
    flat = [r for g in groups for r in g]
    assert sorted(flat) == list(range(world)), groups


def test_enumeration_is_nonempty_and_valid() -> None:
    assert len(VALID) > 500
    for lay in VALID[:: max(1, len(VALID) // 200)]:
        cfg = FlashCommConfig(tp=lay.tp, pp=lay.pp, dp=lay.dp, flashcomm2_otp=lay.otp)
        assert ParallelLayout.from_config(cfg, lay.world) == lay


@settings(max_examples=400, deadline=None)
@given(layouts)
def test_every_family_partitions_the_ranks(lay: ParallelLayout) -> None:
    for groups in (lay.tp_groups(), lay.pp_groups(), lay.dp_groups(), lay.shard_groups()):
        _assert_partition(groups, lay.world)
    if lay.otp:
        _assert_partition(lay.otp_groups(), lay.world)
        _assert_partition(lay.odp_groups(), lay.world)
        assert lay.otp * lay.odp == lay.tp
        assert all(len(g) == lay.odp for g in lay.odp_groups())
        assert all(len(g) == lay.otp for g in lay.otp_groups())
    else:
        assert lay.otp_groups() == [] and lay.odp_groups() == []


@settings(max_examples=400, deadline=None)
@given(layouts)
def test_rank_order_is_dp_pp_tp_with_tp_fastest(lay: ParallelLayout) -> None:
    for r in range(lay.world):
        c = lay.coords(r)
        assert lay.rank(c.dp, c.pp, c.tp) == r
        assert r == (c.dp * lay.pp + c.pp) * lay.tp + c.tp
    for g in lay.tp_groups():
        assert g == list(range(g[0], g[0] + lay.tp))


def _held_rows(lay: ParallelLayout, rank: int, d: int) -> tuple[int, int, int]:
    """Independent model of which input rows of W_o [H, D] a rank stores: (stage, lo, hi).

    Row-parallel TP rank t holds heads t*D/N...; under FlashComm2 the all-to-all inside the odp
    group gathers the heads of every member, so a rank holds the union of its odp group's slices."""
    c = lay.coords(rank)
    per_rank = d // lay.tp
    if not lay.otp:
        return (c.pp, c.tp * per_rank, (c.tp + 1) * per_rank)
    members = [lay.coords(m).tp for m in lay.group_of(rank, lay.odp_groups())]
    return (c.pp, min(members) * per_rank, (max(members) + 1) * per_rank)


@settings(max_examples=400, deadline=None)
@given(layouts)
def test_shard_groups_hold_identical_slices_within_one_stage(lay: ParallelLayout) -> None:
    d = lay.tp * 4 * max(lay.otp, 1)
    seen = set()
    for group in lay.shard_groups():
        slices = {_held_rows(lay, r, d) for r in group}
        assert len(slices) == 1, f"members of {group} hold different slices {slices}"
        stages = {lay.coords(r).pp for r in group}
        assert len(stages) == 1, f"shard group {group} spans stages {stages}"
        seen |= slices
    # maximal: two groups never hold the same slice of the same stage
    assert len(seen) == len(lay.shard_groups())


@settings(max_examples=400, deadline=None)
@given(layouts)
def test_chunk_order_replay_leaves_rank_r_with_chunk_r(lay: ParallelLayout) -> None:
    if not lay.otp:
        assert lay.chunk_order == list(range(lay.tp))
        return
    n, otp = lay.tp, lay.otp
    order = lay.chunk_order
    assert sorted(order) == list(range(n))
    # symbolic all-to-all inside each odp group: the send buffer holds the N chunks in `order`,
    # split into odp equal blocks; block i goes to odp peer i.
    received: dict[int, list[int]] = {}
    for odp_group in lay.odp_groups():
        for peer_idx, rank in enumerate(odp_group):
            received[rank] = order[peer_idx * otp:(peer_idx + 1) * otp]
    # every member of an odp group receives the same chunk ids (with all heads of its group)
    # symbolic reduce-scatter inside each otp group: member j keeps block j of the partial sums
    final: dict[int, int] = {}
    for otp_group in lay.otp_groups():
        blocks = {tuple(received[r]) for r in otp_group}
        assert len(blocks) == 1, "otp members must reduce the same chunks"
        (chunks,) = blocks
        for j, rank in enumerate(otp_group):
            final[rank] = chunks[j]
    for rank, chunk in final.items():
        assert chunk == lay.coords(rank).tp, f"TP rank {lay.coords(rank).tp} ended with {chunk}"


def test_worked_example_tp8_otp2_dp2() -> None:
    lay = ParallelLayout.from_config(FlashCommConfig(tp=8, dp=2, flashcomm2_otp=2), 16)
    assert lay.otp_groups()[:4] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.odp_groups()[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.shard_groups() == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    assert lay.chunk_order == [0, 4, 1, 5, 2, 6, 3, 7]


def test_worked_example_tp4_pp2_dp2_otp2_never_mixes_stages() -> None:
    lay = ParallelLayout.from_config(
        FlashCommConfig(tp=4, pp=2, dp=2, flashcomm2_otp=2), 16
    )
    assert lay.tp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert lay.shard_groups() == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    for family in (lay.tp_groups(), lay.otp_groups(), lay.odp_groups(), lay.shard_groups(),
                   lay.dp_groups()):
        for g in family:
            assert len({lay.coords(r).pp for r in g}) == 1, f"{g} mixes stages"


def test_otp1_shard_group_is_every_tp_rank_of_the_stage_across_dp() -> None:
    lay = ParallelLayout(tp=4, pp=2, dp=2, otp=1)
    assert lay.shard_groups() == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    assert lay.chunk_order == [0, 1, 2, 3]


def test_plain_tp_shard_group_is_same_tp_index_across_dp() -> None:
    lay = ParallelLayout(tp=2, pp=1, dp=3, otp=0)
    assert lay.shard_groups() == [[0, 2, 4], [1, 3, 5]]
    # fully replicated weights (MLA up-projections) share across the whole stage
    assert lay.shard_groups("q_b_proj") == [[0, 1, 2, 3, 4, 5]]


def test_every_valid_layout_exhaustively() -> None:
    """Hypothesis samples; this walks all of them once, so no valid deployment is missed."""
    for lay in VALID:
        test_every_family_partitions_the_ranks.hypothesis.inner_test(lay)
        test_shard_groups_hold_identical_slices_within_one_stage.hypothesis.inner_test(lay)
        test_chunk_order_replay_leaves_rank_r_with_chunk_r.hypothesis.inner_test(lay)


def test_stage_layers_split_like_vllm() -> None:
    from flashcomm.layout import stage_layers

    assert stage_layers(7, 2) == [range(0, 4), range(4, 7)]  # remainder goes before the last
    assert stage_layers(10, 4) == [range(0, 2), range(2, 5), range(5, 8), range(8, 10)]
    assert [len(r) for r in stage_layers(11, 4)] == [3, 3, 3, 2]
    assert [len(r) for r in stage_layers(9, 4)] == [2, 2, 3, 2]  # middle stages first
    for L in range(1, 40):  # (tests/vllm/test_pp_layers.py compares with vLLM itself)
        for pp in range(1, min(L, 9) + 1):
            stages = stage_layers(L, pp)
            assert [i for r in stages for i in r] == list(range(L))
            assert max(map(len, stages)) - min(map(len, stages)) <= 1
            assert len(stages[-1]) == L // pp


def test_stage_layers_partition_and_errors() -> None:
    from flashcomm.layout import check_prefetch_step, stage_layers

    assert stage_layers(7, 2, (2, 5)) == [range(0, 2), range(2, 7)]
    with pytest.raises(ConfigError, match=r"pp=4: larger than num_hidden_layers=3"):
        stage_layers(3, 4)
    with pytest.raises(ConfigError, match=r"VLLM_PP_LAYER_PARTITION.*adds up to 6 layers, "
                       r"the model has 7"):
        stage_layers(7, 2, (3, 3))
    with pytest.raises(ConfigError, match=r"3 stages given, pp=2"):
        stage_layers(7, 2, (3, 3, 1))
    with pytest.raises(ConfigError, match=r"every stage needs >= 1 layer"):
        FlashCommConfig.from_env({"VLLM_PP_LAYER_PARTITION": "7,0"})
    with pytest.raises(ConfigError, match=r"prefetch_step=2: .*L_s-2 = 1 for stage 1 "
                       r"\(layers 4\.\.6, L_s=3\)"):
        check_prefetch_step(2, stage_layers(7, 2))
    check_prefetch_step(1, stage_layers(7, 2))
