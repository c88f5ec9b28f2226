"""Our torch-free stage split (flashcomm.layout.stage_layers) against vLLM's get_pp_indices."""

from __future__ import annotations

import pytest

from flashcomm.knobs import ConfigError
from flashcomm.layout import stage_layers

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")


def test_even_split_matches_vllm(monkeypatch) -> None:
    from vllm.distributed.utils import get_pp_indices

    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    for num_layers in range(1, 64):
        for pp in range(1, min(num_layers, 12) + 1):
            ours = [(r.start, r.stop) for r in stage_layers(num_layers, pp)]
            theirs = [get_pp_indices(num_layers, s, pp) for s in range(pp)]
            assert ours == theirs, (num_layers, pp)


def test_partition_override_matches_vllm(monkeypatch) -> None:
    from vllm.distributed.utils import get_pp_indices

    for text, num_layers in (("4,3", 7), ("1,6", 7), ("2,2,3,1", 8)):
        monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", text)
        parts = tuple(int(p) for p in text.split(","))
        ours = [(r.start, r.stop) for r in stage_layers(num_layers, len(parts), parts)]
        assert ours == [get_pp_indices(num_layers, s, len(parts)) for s in range(len(parts))]
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "3,3")
    with pytest.raises(ValueError):  # vLLM refuses it too; ours names the knob
        get_pp_indices(7, 0, 2)
    with pytest.raises(ConfigError, match="VLLM_PP_LAYER_PARTITION"):
        stage_layers(7, 2, (3, 3))
