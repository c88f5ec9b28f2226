"""Checkpoint loading: sharded index files, and clear errors for bad checkpoints (no hang)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import PROMPTS
from safetensors.torch import load_file, save_file

from flashcomm.config import FlashCommConfig
from flashcomm.launch import RankFailure, run_local
from flashcomm.model_args import CheckpointError
from flashcomm.models.engine import Engine
from flashcomm.models.loader import load_model

O0 = "model.layers.0.self_attn.o_proj.weight"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> Path:
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return path


@pytest.fixture
def bad_checkpoints(hf_checkpoints, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (directory, text the error must contain)."""
    src = hf_checkpoints["llama"]
    missing = _rewrite(_copy(src, tmp_path / "missing"), lambda t: t.pop(O0))
    shape = _rewrite(_copy(src, tmp_path / "shape"),
                     lambda t: t.__setitem__(O0, t[O0][:, :-1].contiguous()))
    truncated = _copy(src, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    unknown = _copy(src, tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    return {
        "missing": (missing, O0),
        "shape": (shape, O0),
        "truncated": (truncated, "truncated"),
        "unknown": (unknown, "model_type='falcon'"),
    }


def test_bad_checkpoints_raise_clear_errors(bad_checkpoints) -> None:
    for kind, (path, text) in bad_checkpoints.items():
        with pytest.raises(CheckpointError, match=text.replace(".", r"\.")):
            load_model(path, FlashCommConfig(), progress=False)
        assert kind


def _load_sharded(rank: int, world: int, path: str) -> None:
    from flashcomm.groups import ParallelGroups
    from flashcomm.layout import ParallelLayout

    cfg = FlashCommConfig(tp=world, flashcomm2_otp=1, layer_sharding=("o_proj",))
    groups = ParallelGroups.build(ParallelLayout.from_config(cfg, world), ("o_proj",))
    load_model(path, cfg, groups, progress=False)


def test_bad_checkpoint_fails_on_every_rank_without_hanging(bad_checkpoints) -> None:
    t0 = time.monotonic()
    path, text = bad_checkpoints["shape"]
    with pytest.raises(RankFailure, match=r"(?s)rank 0.*" + text.replace(".", r"\.")):
        run_local(_load_sharded, 2, str(path), timeout_s=90, group_timeout_s=20)
    assert time.monotonic() - t0 < 60


def test_prefetch_step_out_of_range_is_a_config_error(hf_checkpoints) -> None:
    from flashcomm.knobs import ConfigError
    from flashcomm.model_args import ModelArgs
    from flashcomm.models.loader import check_strategy

    args = ModelArgs.from_dir(hf_checkpoints["llama"])  # 3 layers: k in [0, 1]
    cfg = FlashCommConfig(tp=2, flashcomm2_otp=1, layer_sharding=("o_proj",), prefetch_step=2)
    with pytest.raises(ConfigError, match=r"prefetch_step=2.*\[0, 1\]"):
        check_strategy(args, cfg)
    check_strategy(args, FlashCommConfig(tp=2, flashcomm2_otp=1, layer_sharding=("o_proj",)))


def test_sharded_index_checkpoint_loads_like_single_file(hf_checkpoints, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = hf_checkpoints["qwen2"]
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    one = Engine.from_checkpoint(src, FlashCommConfig(), progress=False).generate(PROMPTS, 4)
    many = Engine.from_checkpoint(tmp_path, FlashCommConfig(), progress=False).generate(PROMPTS, 4)
    assert one.tokens == many.tokens
