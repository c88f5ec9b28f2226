"""vLLM layer classes registered out of tree: o_proj calls flashcomm's o_proj op, QKV its prefetch.

vLLM instantiates these in place of every RowParallelLinear / QKVParallelLinear. Only the
attention o_proj and qkv_proj of the main model's layers (see VllmFlashComm) change; every other
instance runs vLLM's own constructor and forward untouched. The forwards below are what vLLM's
compiler traces once: they only call the custom ops (ops.py), which do the per-step work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import Parameter
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.linear import (
    LinearBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from flashcomm.vllm import ops
from flashcomm.vllm.context import RANGES, VllmFlashComm
from flashcomm.vllm.ranges import ranges_o_proj


class KeepWeightMethod(UnquantizedLinearMethod):
    """Leaves the weight a plain tensor after loading (vLLM's CPU method would move it into a
    oneDNN handle and empty `layer.weight`) and hands the layer to the FlashComm post-load hook."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Run the FlashComm post-load step of this o_proj (the last one distributes)."""
        layer.flashcomm_after_loading()


class FlashCommRowParallelLinear(RowParallelLinear):
    """RowParallelLinear; as a main-model attention o_proj: all-to-all, then full/otp matmul."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
        quant_config=None,
        prefix: str = "",
        *,
        return_bias: bool = True,
        disable_tp: bool = False,
    ):
        ctx = VllmFlashComm.of(get_current_vllm_config())
        # the first main-model o_proj (MLA has no QKVParallelLinear) decides, before any weight
        ctx.decide(prefix, output_size, input_size, params_dtype or torch.get_default_dtype())
        idx = ctx.o_proj_index(prefix)
        # Only the shape vLLM's Llama family uses: parallel input, reduced output, real TP.
        if idx is None or not input_is_parallel or not reduce_results or disable_tp:
            # vLLM's own constructor, weight, quant method and forward: stock's traced graph
            super().__init__(input_size, output_size, bias, input_is_parallel, skip_bias_add,
                             params_dtype, reduce_results, quant_config, prefix,
                             return_bias=return_bias, disable_tp=disable_tp)
            self.ctx, self.flashcomm_layer = ctx, None
            return
        # Skip RowParallelLinear.__init__: it would allocate the TP slice we do not want.
        LinearBase.__init__(self, input_size, output_size, bias, skip_bias_add, params_dtype,
                            quant_config, prefix, return_bias=return_bias, disable_tp=disable_tp)
        self.ctx, self.flashcomm_layer = ctx, idx
        self.input_is_parallel, self.reduce_results = input_is_parallel, reduce_results
        groups, gather = ctx.groups, ctx.cfg.gather_source
        otp, odp = ctx.cfg.flashcomm2_otp, ctx.cfg.odp
        # gather: stock TP's own D/N columns (block tp.rank); else odp group j's D/otp (block j)
        self.input_size_per_partition = input_size // (ctx.cfg.tp if gather else otp)
        self.output_size_per_partition = output_size
        self.output_partition_sizes = [output_size]
        self.col_block = groups.tp.rank if gather else groups.tp.rank // odp
        self.quant_method = KeepWeightMethod()
        shape = (output_size, self.input_size_per_partition)  # [H, D/N] or [H, D/otp]
        # Non-owners of a sharded layer never allocate it: the loader skips a meta weight.
        device = None if ctx.allocates(idx) else "meta"
        if gather:  # stored [D/N, H] as GatheredSeries keeps slices: it keeps this storage
            data = torch.empty(shape[::-1], dtype=self.params_dtype).t()  # [H, D/N] view
        else:
            data = torch.empty(shape, dtype=self.params_dtype, device=device)
        self.layer_name = prefix  # the ops find this layer under it in vLLM's forward context
        self.weight = Parameter(data, requires_grad=False)
        self.weight.weight_loader = self._load_weight
        if bias:
            self.bias = Parameter(torch.empty(output_size, dtype=self.params_dtype),
                                  requires_grad=False)
            self.bias.weight_loader = self._load_bias
        else:
            self.register_parameter("bias", None)
        ctx.register(idx, self.weight.data, prefix, self)

    def _load_weight(self, param: Parameter, loaded: torch.Tensor) -> None:
        """Copy this rank's column block of the checkpoint's full [H, D] weight (skip if meta):
        its odp group's D/otp columns, or under gather its own D/N."""
        if param.device.type == "meta":
            return
        cols = self.input_size_per_partition
        param.data.copy_(loaded.narrow(1, self.col_block * cols, cols))

    def _load_bias(self, param: Parameter, loaded: torch.Tensor) -> None:
        """The bias [H] is not split."""
        param.data.copy_(loaded)

    def flashcomm_after_loading(self) -> None:
        """Called by KeepWeightMethod once this layer's weight is loaded."""
        self.ctx.after_loading(self.flashcomm_layer)

    def forward(self, input_):
        """Same return value as RowParallelLinear.forward with reduce_results=True."""
        if self.flashcomm_layer is None:
            return super().forward(input_)
        x = input_.reshape(-1, input_.shape[-1])  # [T, D/N]
        if self.ctx.mode == RANGES:  # stock's graph; ranges.py rewrites the large-T ones
            ctx, cols = self.ctx, x.shape[-1]  # D/N: this rank's own heads' columns of W_o
            out = ranges_o_proj(x, self.weight, ctx.groups.tp.rank % ctx.cfg.odp * cols, cols,
                                ctx.tp_coordinator().unique_name)
            if not self.skip_bias_add and self.bias is not None:
                out = out + self.bias
        else:
            out = torch.ops.flashcomm.o_proj(x, self.output_size, self.layer_name)  # [T, H]
        out = out.reshape(*input_.shape[:-1], self.output_size)
        if not self.return_bias:
            return out
        return out, (self.bias if self.skip_bias_add else None)

    def flashcomm_bind(self, row_gemm: Any) -> None:
        """After loading (ctx.after_loading): what a row-parallel step calls, resolved once, so
        the op's decode path is the GEMM and the all-reduce and little else: `row_gemm` (this
        rank's columns as vLLM's own CPU GEMM, or None: ask the source every step), vLLM's TP
        group, the bias."""
        self.row_gemm, self.tp = row_gemm, self.ctx.tp_coordinator()
        self.out_bias = None if self.skip_bias_add else self.bias
        self.row_below = self.ctx.min_tokens if row_gemm is not None else 0

    def flashcomm_o_proj(self, x: torch.Tensor) -> torch.Tensor:
        """Inside the o_proj op: x [T, D/N] -> [T, H] by FlashComm2 or, below the threshold,
        by the row-parallel product on this rank's columns plus vLLM's all-reduce."""
        if x.shape[0] < self.row_below:  # decode: stock's GEMM and all-reduce, nothing else
            self.ctx.o_proj_calls += 1
            y = self.tp.all_reduce(self.row_gemm(x))
            return y if self.out_bias is None else y + self.out_bias
        ctx, idx = self.ctx, self.flashcomm_layer
        full = ctx.step_takes_flashcomm2(x.shape[0], idx)
        if idx not in ctx.qkv_prefetch:  # no QKVParallelLinear starts it (MLA): fetch here,
            ctx.weights.prefetch(idx, full)  # behind the k layers already in flight
        weight = ctx.weights.wait(idx, full)  # [H, D/otp] if full else [H, D/N]
        if not full:
            return ops.row_parallel(x, weight, self.out_bias, self.tp)
        return ops.flashcomm2(x, weight, self.out_bias, ctx.groups, self.tp,
                              comm_dtype=ctx.cfg.comm_dtype, exchange=ctx.impl["all_to_all"],
                              gather=ctx.impl["all_gather"])

    def flashcomm_prefetch(self, num_tokens: int) -> None:
        """Inside the prefetch op: start fetching this layer's weight for a T-token step."""
        full = self.ctx.takes_flashcomm2(num_tokens)
        self.ctx.weights.prefetch(self.flashcomm_layer, full)

    def extra_repr(self) -> str:
        """vLLM's repr plus the FlashComm facts."""
        s = super().extra_repr()
        if self.flashcomm_layer is not None:
            s += f", flashcomm2_otp={self.ctx.cfg.flashcomm2_otp}"
            s += f", source={type(self.ctx.weights).__name__}"
        return s


class FlashCommQKVParallelLinear(QKVParallelLinear):
    """QKVParallelLinear that starts the o_proj prefetch of its layer before projecting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ctx = VllmFlashComm.of(get_current_vllm_config())
        # the first main-model QKV decides the mode for the whole model, before any weight
        ctx.decide(self.prefix, self.input_size, self.total_num_heads * self.v_head_size,
                   self.params_dtype)
        self.ctx, self.flashcomm_layer = ctx, ctx.qkv_index(self.prefix)
        if self.flashcomm_layer is not None:
            ctx.qkv_prefetch.add(self.flashcomm_layer)
        # the o_proj of the same attention block, as it registers itself (see ctx.register)
        self.o_proj_name = self.prefix.rsplit(".", 1)[0] + ".o_proj"

    def forward(self, input_):
        """Prefetch op for this layer's o_proj weight, then vLLM's own forward."""
        # no prefetch op in the graph when the source never moves weights (ResidentWeights);
        # decided when the model is traced, after loading
        if self.flashcomm_layer is not None and self.ctx.weights.fetches:
            torch.ops.flashcomm.prefetch(input_, self.o_proj_name)
        return super().forward(input_)
