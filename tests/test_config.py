"""Configuration parsing and validation: every bad value names its knob."""

from __future__ import annotations

import argparse

import pytest

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError


def _bad(match: str, cfg: FlashCommConfig | None = None, world: int | None = None, **kw) -> None:
    with pytest.raises(ConfigError, match=match):
        (cfg or FlashCommConfig(**kw)).validate(world)


def test_defaults_are_valid() -> None:
    assert FlashCommConfig().validate(1).world == 1


def test_otp_must_divide_tp() -> None:
    _bad(r"flashcomm2_otp=3: must divide tp=4 \(allowed: \[1, 2\]\)", tp=4, flashcomm2_otp=3)


def test_otp_must_be_below_tp() -> None:
    _bad(r"flashcomm2_otp=4: must be smaller than tp=4", tp=4, flashcomm2_otp=4)
    _bad(r"flashcomm2_otp=8: must be smaller than tp=4", tp=4, flashcomm2_otp=8)
    _bad(r"flashcomm2_otp=-1", tp=4, flashcomm2_otp=-1)


def test_world_must_equal_product() -> None:
    _bad(r"world=6: must equal tp\*pp\*dp = 2\*2\*1 = 4", world=6, tp=2, pp=2)


def test_negative_prefetch_step() -> None:
    _bad(r"prefetch_step=-1: must be >= 0", tp=2, flashcomm2_otp=1, prefetch_step=-1)


def test_unknown_weight_name() -> None:
    _bad(r"layer_sharding: unknown weight name 'o_porj'; allowed: \('o_proj'",
         tp=2, flashcomm2_otp=1, layer_sharding=("o_porj",))


def test_oshard_without_replication_says_what_to_turn_on() -> None:
    with pytest.raises(ConfigError) as e:
        FlashCommConfig(tp=4, layer_sharding=("o_proj",)).validate()
    msg = str(e.value)
    assert "layer_sharding" in msg and "flashcomm2_otp" in msg and "FLASHCOMM2_PARALLEL_SIZE" in msg
    assert "dp > 1" in msg
    FlashCommConfig(tp=4, dp=2, layer_sharding=("o_proj",)).validate()  # DP copies can be shared
    FlashCommConfig(tp=4, flashcomm2_otp=1, layer_sharding=("o_proj",)).validate()


def test_non_integer_values_name_the_knob() -> None:
    for knob in ("tp", "pp", "dp", "flashcomm2_otp", "prefetch_step"):
        with pytest.raises(ConfigError, match=rf"{knob}='two': expected an integer"):
            FlashCommConfig.from_mapping({knob: "two"})
        with pytest.raises(ConfigError, match=rf"{knob}=2.5: expected an integer"):
            FlashCommConfig(**{knob: 2.5}).validate()


def test_comm_dtype() -> None:
    _bad(r"comm_dtype='fp8': allowed values are \['auto', 'int8'\]", comm_dtype="fp8")
    _bad(r"comm_dtype='int8'.*flashcomm2_otp", tp=2, comm_dtype="int8")


def test_from_env() -> None:
    env = {
        "FLASHCOMM2_PARALLEL_SIZE": "1",
        "FLASHCOMM_LAYER_SHARDING": "o_proj",
        "FLASHCOMM_PREFETCH_STEP": "2",
        "FLASHCOMM1": "1",
    }
    cfg = FlashCommConfig.from_env(env, FlashCommConfig(tp=4)).validate(4)
    assert cfg == FlashCommConfig(tp=4, flashcomm1=True, flashcomm2_otp=1,
                                  layer_sharding=("o_proj",), prefetch_step=2)
    with pytest.raises(ConfigError, match=r"FLASHCOMM_PREFETCH_STEP.*prefetch_step='x'"):
        FlashCommConfig.from_env({"FLASHCOMM_PREFETCH_STEP": "x"})
    with pytest.raises(ConfigError, match=r"FLASHCOMM1.*expected a boolean"):
        FlashCommConfig.from_env({"FLASHCOMM1": "maybe"})
    assert FlashCommConfig.from_env({"FLASHCOMM_LAYER_SHARDING": '["o_proj"]'}).layer_sharding == (
        "o_proj",
    )


def test_from_json() -> None:
    cfg = FlashCommConfig.from_json(
        '{"tp": 8, "dp": 2, "flashcomm2_otp": 2, "layer_sharding": ["o_proj"]}'
    ).validate(16)
    assert (cfg.odp, cfg.flashcomm2) == (4, True)
    with pytest.raises(ConfigError, match="unknown knob"):
        FlashCommConfig.from_json('{"tensor_parallel": 2}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        FlashCommConfig.from_json("{tp: 2")
    with pytest.raises(ConfigError, match="expected an object"):
        FlashCommConfig.from_json("[1, 2]")


def test_cli_flags_override_json_and_env() -> None:
    parser = argparse.ArgumentParser()
    FlashCommConfig.add_cli_arguments(parser)
    args = parser.parse_args(
        ["--tp", "4", "--otp", "2", "--config-json", '{"tp": 2, "prefetch_step": 0}']
    )
    cfg = FlashCommConfig.from_cli(args, env={"FLASHCOMM_PREFETCH_STEP": "3"})
    assert (cfg.tp, cfg.flashcomm2_otp, cfg.prefetch_step) == (4, 2, 0)


def test_min_tokens_knob() -> None:
    cfg = FlashCommConfig.from_env({"FLASHCOMM2_MIN_TOKENS": "auto"})
    assert cfg.flashcomm2_min_tokens == "auto"
    assert FlashCommConfig.from_env({"FLASHCOMM2_MIN_TOKENS": "64"}).flashcomm2_min_tokens == 64
    with pytest.raises(ConfigError, match=r"FLASHCOMM2_MIN_TOKENS.*flashcomm2_min_tokens=-1: must"):
        FlashCommConfig.from_env({"FLASHCOMM2_MIN_TOKENS": "-1"})
    _bad(r"flashcomm2_min_tokens=8: .*needs flashcomm2_otp >= 1", tp=2, flashcomm2_min_tokens=8)
    cfg = FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm2_min_tokens="auto").validate(2)
    assert cfg.attn_out == "auto"


def test_shard_source_knob() -> None:
    cfg = FlashCommConfig.from_env({"FLASHCOMM_SHARD_SOURCE": "gather"})
    assert cfg.shard_source == "gather"
    with pytest.raises(ConfigError, match=r"FLASHCOMM_SHARD_SOURCE.*allowed values are"):
        FlashCommConfig.from_env({"FLASHCOMM_SHARD_SOURCE": "peer"})
    _bad(r"shard_source='gather'.*layer_sharding=o_proj", tp=2, flashcomm2_otp=1,
         shard_source="gather")
    _bad(r"shard_source='gather'.*flashcomm2_otp >= 1", tp=2, dp=2, layer_sharding=("o_proj",),
         shard_source="gather")


def test_every_knob_has_one_flag_env_and_json_key() -> None:
    knobs = FlashCommConfig.knobs()
    assert set(FlashCommConfig().to_dict()) == set(knobs)
    envs = [k.env for k in knobs.values() if k.env]
    assert len(envs) == len(set(envs)) and set(envs) == set(FlashCommConfig.env_names())
    parser = argparse.ArgumentParser()
    FlashCommConfig.add_cli_arguments(parser)
    args = parser.parse_args(["--otp", "1", "--tp", "2", "--shard-source", "gather",
                              "--layer-sharding", "o_proj", "--flashcomm2-min-tokens", "auto"])
    cfg = FlashCommConfig.from_cli(args, env={}).validate(2)
    assert (cfg.shard_source, cfg.flashcomm2_min_tokens) == ("gather", "auto")
