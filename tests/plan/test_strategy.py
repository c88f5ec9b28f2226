"""The one Strategy type: to and from FlashCommConfig, labels, paths and bad combinations."""

from __future__ import annotations

import pytest

from flashcomm.config import AttnOut, CommDtype, FlashCommConfig, ShardSource
from flashcomm.knobs import ConfigError
from flashcomm.plan.strategy import Strategy, candidates


def test_every_candidate_round_trips_through_the_config_with_a_unique_label() -> None:
    rows = candidates(4, 6, sources=(ShardSource.OWNER, ShardSource.GATHER))
    labels = [s.label for s in rows]
    assert len(set(labels)) == len(labels) == 2 + 2 * 10
    for s in rows:
        cfg = s.to_config(4)
        assert Strategy.from_config(cfg) == s, s
        assert Strategy.from_config(FlashCommConfig.from_mapping(cfg.to_dict())) == s
        assert cfg.attn_out == s.attn_out and cfg.flashcomm2_otp == s.otp


def test_labels_and_config_of_the_rows_other_code_names() -> None:
    fc2 = Strategy(AttnOut.FLASHCOMM2, 1)
    want = {
        Strategy(): "allreduce",
        Strategy(flashcomm1=True): "flashcomm1",
        fc2: "fc2",
        Strategy("flashcomm2", 2, flashcomm1=True, comm_dtype="int8"): "fc2(otp=2)+fc1+int8",
        Strategy("flashcomm2", 1, min_tokens=64): "fc2(min=64)",
        Strategy("flashcomm2", 2, min_tokens=None): "fc2(otp=2,min=never)",
        Strategy("flashcomm2", 1, oshard_k=1): "fc2+oshard(k=1)",
        Strategy("flashcomm2", 1, oshard_k=1, shard_source="gather"): "fc2+gather(k=1)",
        Strategy("auto", 1, oshard_k=1, shard_source="gather"): "auto+gather(k=1)",
        Strategy("auto", 2): "auto(otp=2)",
    }
    assert {s: s.label for s in want} == want
    cfg = Strategy("auto", 1, oshard_k=1, shard_source="gather").to_config(4, profile="pcie-gen4")
    assert (cfg.flashcomm2_min_tokens, cfg.layer_sharding, cfg.prefetch_step, cfg.shard_source,
            cfg.profile) == ("auto", ("o_proj",), 1, ShardSource.GATHER, "pcie-gen4")
    assert Strategy("flashcomm2").otp == 1  # FlashComm2 implies otp >= 1
    assert Strategy(comm_dtype="auto").comm_dtype is CommDtype.AUTO  # strings become enums
    # dp = 2: the shard group spans replicas, so all-reduce + layer sharding is a strategy too
    dp2 = FlashCommConfig(tp=2, dp=2, layer_sharding=("o_proj",))
    assert Strategy.from_config(dp2).label == "allreduce+oshard(k=1)"


def test_paths_of_thresholds_and_auto() -> None:
    fc2 = Strategy("flashcomm2", 1, flashcomm1=True)
    gated = Strategy("flashcomm2", 1, flashcomm1=True, min_tokens=8, oshard_k=0)
    assert gated.path(7) == Strategy(flashcomm1=True) and gated.path(8) == fc2
    auto = Strategy("auto", 1, flashcomm1=True)
    assert auto.fixed() == fc2 and auto.baseline() == Strategy(flashcomm1=True)
    assert [auto.path(t, 8) for t in (7, 8)] == [Strategy(flashcomm1=True), fc2]
    assert auto.path(10**9, None) == Strategy(flashcomm1=True)
    # auto resolved to "never" (flashcomm2_min_tokens=None): every step takes the all-reduce
    never = FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm2_min_tokens=None).validate(2)
    assert Strategy.from_config(never).path(10**9) == Strategy()
    assert Strategy.from_config(never).to_config(2) == never


@pytest.mark.parametrize("kwargs, match", [
    (dict(otp=2), "otp=2 with attn_out='allreduce'"),
    (dict(min_tokens=4), "min_tokens=4 with attn_out='allreduce'"),
    (dict(attn_out="auto", min_tokens=4), "min_tokens=4 with attn_out='auto'"),
    (dict(attn_out="fc3"), r"attn_out='fc3': allowed values are \['allreduce'"),
])
def test_bad_combinations_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Strategy(**kwargs)


def test_to_config_validates() -> None:
    with pytest.raises(ConfigError, match="flashcomm2_otp=3: must divide tp=4"):
        Strategy("flashcomm2", 3).to_config(4)
    with pytest.raises(ConfigError, match="layer_sharding"):
        Strategy(oshard_k=1).to_config(4)  # all-reduce + O-Shard needs dp > 1
