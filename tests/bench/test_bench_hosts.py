"""`flashcomm bench hosts`: what it refuses before it starts any host."""

import pytest


def test_a_model_too_short_for_the_prefill_is_refused_before_any_host_starts(tmp_path) -> None:
    """`bench hosts --model M --prefill-tokens T` with T + 8 > M's max_position_embeddings ends
    in a FlashCommError naming both, before a cluster or a launch exists."""
    import argparse
    import json

    from flashcomm.bench import hosts
    from flashcomm.bench.cluster import unavailable
    from flashcomm.knobs import FlashCommError

    if unavailable():
        pytest.skip(unavailable())
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    parser = argparse.ArgumentParser()
    hosts.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--model", str(model),
                              "--prefill-tokens", "2048"])
    want = r"--prefill-tokens=2048.*max_position_embeddings=2048"
    with pytest.raises(FlashCommError, match=want):
        hosts.main(args)
    assert not (tmp_path / "out" / "rate500").exists()
