"""FlashComm2 only in the graphs of large steps (VLLM_COMPILE, GPUs): compile ranges + a pass.

vLLM compiles one graph per compile range of the step's token count T
(`CompilationConfig.compile_ranges_endpoints`, ranges `(prev + 1, endpoint)`), and runs its
post-grad Inductor passes per range (`InductorPass.is_applicable_for_range`). In RANGES mode the
plugin:
- adds `threshold - 1` as an endpoint, so one range ends just below the threshold;
- traces stock's o_proj for every T: `x [T, D/N] @ (this rank's D/N columns of W_o)^T`, the
  columns a view of the resident full `W_o [H, D]`, then vLLM's `all_reduce` (ranges_o_proj);
- installs `FlashComm2RangePass` as Inductor's `post_grad_custom_post_pass`: in graphs whose
  range starts at or above the threshold it rewrites each `all_reduce(mm(x, cols^T))` into
  FlashComm2 at otp = 1 written in vLLM's own collectives (flashcomm2_graph): all-gather of
  the padded x, this rank's token chunk with every rank's heads, the GEMM on the full W_o, an
  all-gather of the chunks. No custom op and no Python per step: graphs below the threshold are
  stock's, CUDA graphs (full ones included) capture either kind, and vLLM's own decode fusions
  (all-reduce + RMSNorm, on small ranges) still see stock's all-reduce.

What needs the per-step op instead (context.py picks it): O-Shard's ring (Python state per
step), otp > 1 (our reduce-scatter groups), an int8 exchange, CPU (DYNAMO_TRACE_ONCE compiles
one graph for every T, so there are no ranges).
"""

from __future__ import annotations

from typing import Any

import torch
import torch._inductor.pattern_matcher as pm
import torch.nn.functional as F
from torch import fx
from vllm.compilation.passes.inductor_pass import InductorPass, enable_fake_mode
from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

from flashcomm.knobs import ConfigError

PASS_KEY = "post_grad_custom_post_pass"
"""Inductor's hook for one extra post-grad pass; vLLM's PassManager runs it per range."""


def ranges_o_proj(x: torch.Tensor, weight: torch.Tensor, offset: int, width: int,
                  group_name: str) -> torch.Tensor:
    """Stock's row-parallel o_proj as the graph sees it: x [T, D/N] @ weight[:, offset:+width]^T,
    then vLLM's TP all-reduce op (what vLLM emits on GPUs) -> [T, H]."""
    y = F.linear(x, weight.narrow(1, offset, width))
    return torch.ops.vllm.all_reduce(y, group_name=group_name)


def flashcomm2_graph(x: torch.Tensor, weight: torch.Tensor, n: int, rank: int,
                     group_name: str) -> torch.Tensor:
    """FlashComm2 at otp = 1 in vLLM's collectives (traceable, T may be symbolic): x [T, D/N],
    weight [H, D] -> [T, H]; the all-to-all is an all-gather of x, as ops.exchange_all_gather."""
    t, dn = x.shape
    pad = (-t) % n
    xp = F.pad(x, (0, 0, 0, pad))  # [T_pad, D/N]
    c = (t + pad) // n
    every = torch.ops.vllm.all_gather(xp, 0, n, group_name=group_name)  # [N * T_pad, D/N]
    mine = every.view(n, n, c, dn)[:, rank].transpose(0, 1).reshape(c, n * dn)  # [c, D]
    chunk = F.linear(mine, weight)  # [c, H]
    return torch.ops.vllm.all_gather(chunk, 0, n, group_name=group_name)[:t]  # [T, H]


class FlashComm2RangePass(VllmInductorPass):
    """Rewrites stock's o_proj + all-reduce into FlashComm2 in graphs of steps T >= threshold."""

    def __init__(self, config: Any, *, threshold: int, tp_size: int, tp_rank: int, width: int,
                 group_name: str) -> None:
        """`width` = D/N, this rank's columns start at tp_rank * width; `group_name`: vLLM's
        TP GroupCoordinator (its unique_name), the group of both collectives."""
        super().__init__(config)
        self.threshold, self.n, self.rank = threshold, tp_size, tp_rank
        self.width, self.group_name = width, group_name
        self.patterns = pm.PatternMatcherPass(pass_name="flashcomm2_range_pass")
        self._register()
        self.matched_count = 0
        self.total_matched = 0
        """Rewrites over every graph this pass ran on (the worker report shows it)."""

    @enable_fake_mode
    def _register(self) -> None:
        n, rank, width, group = self.n, self.rank, self.width, self.group_name

        def pattern(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return ranges_o_proj(x, weight, rank * width, width, group)

        def replacement(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return flashcomm2_graph(x, weight, n, rank, group)

        inputs = [torch.empty(5, width), torch.empty(16, n * width)]  # x [T, D/N], W [H, D]
        pm.register_replacement(pattern, replacement, inputs, pm.fwd_only, self.patterns)

    def is_applicable_for_range(self, compile_range: Any) -> bool:
        """Only graphs whose every step size takes FlashComm2."""
        return compile_range.start >= self.threshold

    @VllmInductorPass.time_and_log
    def __call__(self, graph: fx.Graph) -> None:
        """Rewrite every match in `graph` (one per FlashComm o_proj in it)."""
        self.matched_count = self.patterns.apply(graph)
        self.total_matched += self.matched_count

    def uuid(self) -> str:
        """Part of Inductor's cache key: the source and every constant baked into the graphs."""
        return InductorPass.hash_dict({
            "source": InductorPass.hash_source(self, ranges_o_proj, flashcomm2_graph),
            "threshold": self.threshold, "n": self.n, "rank": self.rank, "width": self.width,
            "group": self.group_name})


def range_endpoints(endpoints: list[int] | None, threshold: int, max_tokens: int) -> list[int]:
    """vLLM's endpoints plus `threshold - 1`, so a range ends just below the threshold (none
    needed when every step, or none, is that large)."""
    out = list(endpoints or [max_tokens])
    if 1 < threshold <= max_tokens and threshold - 1 not in out:
        out.append(threshold - 1)
    return sorted(out)


def configure_ranges(vllm_config: Any, range_pass: FlashComm2RangePass) -> None:
    """Put the threshold in as a compile-range endpoint and install the pass (in the worker,
    before vLLM compiles); full CUDA graphs stay allowed, no splitting op is added."""
    cc = vllm_config.compilation_config
    if PASS_KEY in cc.inductor_compile_config:
        raise ConfigError(
            f"compilation_config.inductor_compile_config[{PASS_KEY!r}] is already set; the "
            "flashcomm plugin needs that hook for its FlashComm2 range pass: remove it, or "
            "set FLASHCOMM_LAYER_SHARDING=o_proj (per-step op) to leave the hook alone")
    cc.compile_ranges_endpoints = range_endpoints(
        cc.compile_ranges_endpoints, range_pass.threshold,
        vllm_config.scheduler_config.max_num_batched_tokens)
    cc.inductor_compile_config[PASS_KEY] = range_pass
