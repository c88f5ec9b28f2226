"""The plugin's configuration decisions, without starting vLLM (no GPU needed): refusals name the
knob, CUDA graph modes, splitting ops, the compile-cache key, op registration; plus one real
`LLM(...)` that must fail on a bad knob before any engine or worker starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashcomm.config import FlashCommConfig
from flashcomm.knobs import ConfigError

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

HERE = Path(__file__).parent


def _clear_env(monkeypatch) -> None:
    for var in FlashCommConfig.env_names():
        monkeypatch.delenv(var, raising=False)


def test_bad_config_same_messages_as_engine(monkeypatch):
    from vllm.config import ParallelConfig, VllmConfig

    from flashcomm.vllm.context import VllmFlashComm

    cases = [
        ({"FLASHCOMM2_PARALLEL_SIZE": "2"}, "flashcomm2_otp=2: must be smaller than tp=2"),
        ({"FLASHCOMM2_PARALLEL_SIZE": "x"}, "FLASHCOMM2_PARALLEL_SIZE"),
        ({"FLASHCOMM_LAYER_SHARDING": "o_proj"}, "nothing to shard"),
        ({"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM_LAYER_SHARDING": "q_b_proj"},
         "shards only 'o_proj'"),
        ({"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM2_MIN_TOKENS": "-1"},
         "FLASHCOMM2_MIN_TOKENS (knob flashcomm2_min_tokens=-1: must be >= 0"),
        ({"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM1": "1"}, "FLASHCOMM1=1 (knob flashcomm1)"),
        ({"FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM_SHARD_SOURCE": "gather"},
         "shard_source='gather': applies to the layer-sharded o_proj"),
    ]
    for env, message in cases:
        _clear_env(monkeypatch)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        cfg = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=2))
        with pytest.raises(ConfigError, match=re.escape(message)):
            VllmFlashComm.of(cfg)


def test_register_refuses_bad_knobs_and_is_idempotent(monkeypatch):
    from vllm.model_executor.custom_op import op_registry_oot

    from flashcomm.vllm import register
    from flashcomm.vllm.layers import FlashCommQKVParallelLinear, FlashCommRowParallelLinear

    _clear_env(monkeypatch)
    before = dict(op_registry_oot)
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "3,2")  # vLLM's variable: not ours
    register()  # not enabled: nothing registered
    assert op_registry_oot == before
    for env, knob in ((("FLASHCOMM2_MIN_TOKENS", "-1"), "FLASHCOMM2_MIN_TOKENS"),
                      (("FLASHCOMM1", "1"), "FLASHCOMM1=1 (knob flashcomm1)"),
                      (("FLASHCOMM_SHARD_SOURCE", "gather"), "FLASHCOMM_SHARD_SOURCE=gather")):
        _clear_env(monkeypatch)
        monkeypatch.setenv(*env)
        with pytest.raises(ConfigError, match=re.escape(knob)):
            register()
        assert op_registry_oot == before  # refused before hooking anything in
    _clear_env(monkeypatch)
    monkeypatch.setenv("FLASHCOMM2_PARALLEL_SIZE", "1")
    try:
        register()
        register()  # vLLM may load plugins more than once per process
        assert op_registry_oot["RowParallelLinear"] is FlashCommRowParallelLinear
        assert op_registry_oot["QKVParallelLinear"] is FlashCommQKVParallelLinear
    finally:
        op_registry_oot.clear()
        op_registry_oot.update(before)


def test_cuda_graph_modes_and_splitting_ops():
    """What the plugin decides for a CUDA deployment, on CompilationConfig objects."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from flashcomm.vllm.checks import SPLITTING_OPS, configure_compilation

    for mode in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY,
                 CUDAGraphMode.FULL_AND_PIECEWISE):
        cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode)
        with pytest.raises(ConfigError, match=rf"cudagraph_mode={mode.name}: .*"
                                              r"use cudagraph_mode=PIECEWISE"):
            configure_compilation(cc, cuda=True)
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                           cudagraph_mode=CUDAGraphMode.PIECEWISE,
                           splitting_ops=["vllm::unified_attention"])
    configure_compilation(cc, cuda=True)
    configure_compilation(cc, cuda=True)  # idempotent
    assert cc.splitting_ops == ["vllm::unified_attention", *SPLITTING_OPS]
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                           cudagraph_mode=CUDAGraphMode.PIECEWISE)  # splitting_ops None
    configure_compilation(cc, cuda=True)
    assert cc.splitting_ops == list(SPLITTING_OPS)
    eager = CompilationConfig(mode=CompilationMode.NONE, cudagraph_mode=CUDAGraphMode.NONE)
    configure_compilation(eager, cuda=True)
    assert not eager.splitting_ops  # nothing to split without VLLM_COMPILE
    cpu = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                            cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    configure_compilation(cpu, cuda=False)  # CPU: no CUDA graphs, one fullgraph
    assert cpu.splitting_ops is None


def test_knobs_enter_the_compile_cache_key():
    from vllm.config import ParallelConfig, VllmConfig

    from flashcomm.vllm.checks import configure_vllm

    stock = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=2))
    cfgs = [FlashCommConfig(tp=2, flashcomm2_otp=1),
            FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm2_min_tokens=64)]
    hashes = {stock.compute_hash()}
    for cfg in cfgs:
        plugin = VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=2))
        configure_vllm(cfg, plugin)
        assert plugin.additional_config["flashcomm"] == cfg.to_dict()
        hashes.add(plugin.compute_hash())
    assert len(hashes) == 3  # stock and each plugin configuration compile apart


def test_ops_registered_with_shapes():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import flashcomm.vllm.ops  # noqa: F401  (registers the ops)
    from flashcomm.vllm.checks import SPLITTING_OPS

    for name in SPLITTING_OPS:
        ns, op = name.split("::")
        assert hasattr(getattr(torch.ops, ns), op), name
    with FakeTensorMode():
        x = torch.empty(37, 64)  # [T, D/N]
        assert tuple(torch.ops.flashcomm.o_proj(x, 128, "model.layers.0.self_attn.o_proj").shape
                     ) == (37, 128)
    with pytest.raises(RuntimeError, match="no vLLM forward context"):
        torch.ops.flashcomm.o_proj(torch.zeros(3, 4), 8, "model.layers.0.self_attn.o_proj")


@pytest.mark.timeout(300)
def test_bad_knob_stops_llm_before_the_engine(tmp_path):
    """A real LLM(...) with FLASHCOMM2_MIN_TOKENS=-1 fails in the caller's process with the
    knob's ConfigError, before any worker or weight load."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny", num_layers=2)
    env = {**os.environ, "FLASHCOMM2_PARALLEL_SIZE": "1", "FLASHCOMM2_MIN_TOKENS": "-1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    code = ("from vllm import LLM\n"
            f"LLM(model={str(model)!r}, tensor_parallel_size=2, dtype='float32')\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("flashcomm.knobs.ConfigError: FLASHCOMM2_MIN_TOKENS (knob flashcomm2_min_tokens=-1:"
            " must be >= 0") in out, out[-3000:]
    assert "Worker" not in out and "Loading weights" not in out, out[-3000:]
    assert time.perf_counter() - t0 < 240
