"""flashcomm's custom ops inside vLLM: the attention o_proj and the O-Shard prefetch, by name.

vLLM's compiled modes trace the model's Python once and never run it again (CPU:
DYNAMO_TRACE_ONCE, one fullgraph inductor graph without guards; GPU: VLLM_COMPILE, piecewise
graphs split at `splitting_ops`). Everything that depends on the step therefore lives inside
these two opaque ops: the path chosen from the step's token count T, the counters, the ring
slot. Eager runs call the very same ops.

- `torch.ops.flashcomm.o_proj(x [T, D/N], hidden, layer_name) -> [T, H]`: fresh output.
- `torch.ops.flashcomm.prefetch(x [T, H], layer_name)`: starts layer i's weight fetch. It is
  declared to mutate x, the QKV input (it does not touch it), so the compiler keeps it and
  orders it before the QKV matmul that reads x, hence before this layer's o_proj, and after the
  previous layer's o_proj, which x depends on. vLLM's own weight prefetcher
  (model_executor/offloader/prefetch_ops.py) orders its ops the same way.

The ops get a layer name, never a module or a ProcessGroup, and look the o_proj layer up in
vLLM's forward context (`no_compile_layers`, i.e. `compilation_config.static_forward_context`,
where every FlashComm o_proj registers itself under its prefix): vLLM's pattern for stateful
ops (LoRA, mamba). Collectives on vLLM's own groups go through its GroupCoordinator (SHM on
CPU, its device communicator on GPUs). The one process-wide object here is `LIB`, the
torch.library that owns the two op definitions for the life of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.library import Library
from vllm import _custom_ops as vllm_ops
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.utils.torch_utils import direct_register_custom_op

from flashcomm import comm
from flashcomm.gathered import ResidentForm
from flashcomm.groups import ParallelGroups

LIB = Library("flashcomm", "FRAGMENT")
"""Owns the op definitions; an op lives as long as its library object."""
_MKLDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) \
    if torch.backends.mkldnn.is_available() else None


# ---- the two o_proj paths ---------------------------------------------------------------------


ROW_COPY_MIN_TOKENS = 32
"""From this T on, the CPU row-parallel path multiplies a transient contiguous copy of its
columns with oneDNN (the copy costs less than MKL's slower GEMM); below, the strided view.
A transposed view (the gather source's resident slices) goes to oneDNN as it is, no copy."""


def dense(w: torch.Tensor) -> bool:
    """Whether oneDNN takes `w` [N, K] as it is: contiguous, or the transposed view of a
    contiguous [K, N] (same speed and bits on the dev machine); a column narrow is 100x+ slower."""
    return w.is_contiguous() or w.t().is_contiguous()


def _onednn(t: torch.Tensor) -> bool:
    """Whether oneDNN's linear can multiply with `t`'s device and dtype."""
    return (_MKLDNN_LINEAR is not None and t.device.type == "cpu"
            and t.dtype in (torch.float32, torch.bfloat16))


def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T -> [M, N]. On CPU with a dense() or prepacked weight: oneDNN
    through torch's mkldnn linear, the library vLLM's own CPU linears use (measured 2-2.4x
    faster than F.linear's MKL sgemm at prefill sizes on the AMD EPYC dev machine,
    BENCHMARKS.md); else F.linear (GPUs, strided views, other dtypes)."""
    if w.is_mkldnn or (_onednn(x) and x.dtype == w.dtype and dense(w)):
        return _MKLDNN_LINEAR(x.contiguous(), w, None, "none", [], "")
    return F.linear(x, w)


PACK_BATCH_HINT = 32
"""The token count oneDNN picks a packed layout for: stock vLLM's (`create_onednn_mm(w, 32)`);
measured as fast as a decode-sized hint at T = 4 and 7% faster at T = 2048 (the layout is valid
at any T)."""


def onednn_form(like: torch.Tensor) -> ResidentForm | None:
    """The gather source's resident slices kept as oneDNN's prepacked weight on CPU, as stock
    vLLM keeps its linears: a decode o_proj then costs what stock's does (a plain slice is
    reordered by oneDNN on every call, 2-3x the GEMM at T = 4); None elsewhere (GPUs)."""
    if not _onednn(like):
        return None
    return ResidentForm(
        pack=lambda w: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_BATCH_HINT),
        unpack=lambda p: p.to_dense())


def row_gemm(cols: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [T, D/N] -> x @ cols^T [T, H] for a row-parallel slice that never changes, resolved
    once: on CPU vLLM's own GEMM (`onednn_mm` on a handle holding a packed copy, exactly
    stock's kernel), a torch-prepacked slice as it is, elsewhere F.linear on the slice."""
    if cols.is_mkldnn:
        return lambda x: _MKLDNN_LINEAR(x.contiguous(), cols, None, "none", [], "")
    if _onednn(cols) and vllm_ops._supports_onednn:
        handler = vllm_ops.create_onednn_mm(cols.contiguous().t(), PACK_BATCH_HINT)  # [K, N]
        return lambda x: vllm_ops.onednn_mm(handler, x, None)
    return lambda x: F.linear(x, cols)


def row_parallel(x: torch.Tensor, cols: torch.Tensor, bias: torch.Tensor | None,
                 tp: Any) -> torch.Tensor:
    """Stock's path: x [T, D/N] @ this rank's columns [H, D/N]^T, then vLLM's TP all-reduce
    (`tp` is vLLM's GroupCoordinator: SHM all-reduce on CPU, custom all-reduce on GPUs)."""
    if (x.device.type == "cpu" and x.shape[0] >= ROW_COPY_MIN_TOKENS and not cols.is_mkldnn
            and not dense(cols)):
        cols = cols.contiguous()  # transient [H, D/N], freed after the GEMM
    y = gemm(x, cols)  # [T, H] partial sum over this rank's heads
    y = tp.all_reduce(y)  # [T, H]
    return y if bias is None else y + bias


def exchange_all_gather(x: torch.Tensor, tp: Any) -> torch.Tensor:
    """FlashComm2's all-to-all at otp = 1 through vLLM's TP all-gather: x [T_pad, D/N] ->
    [T_pad/N, D], this rank's token chunk with every rank's heads (columns in rank order)."""
    n, r = tp.world_size, tp.rank_in_group
    t_pad, dn = x.shape
    c = t_pad // n
    every = tp.all_gather(x, dim=0)  # [N * T_pad, D/N]: block p is rank p's x
    return every.view(n, n, c, dn)[:, r].transpose(0, 1).reshape(c, n * dn)  # [c, D]


def flashcomm2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               groups: ParallelGroups, tp: Any, *, comm_dtype: str, exchange: str,
               gather: str) -> torch.Tensor:
    """FlashComm2: all-to-all of x [T, D/N], weight [H, D/otp] on this rank's token chunk, otp
    reduce-scatter, then an all-gather restores [T, H]. `exchange` / `gather`: 'ours' (our
    groups, comm.py) or 'vllm' (vLLM's TP all-gather; for the exchange at otp = 1 only)."""
    num_tokens, n = x.shape[0], tp.world_size
    if exchange == "vllm":
        xp = comm.pad_tokens(x, n)  # [T_pad, D/N]
        chunk = gemm(exchange_all_gather(xp, tp), weight)  # [T_pad/N, H]
        if bias is not None:
            chunk = chunk + bias
    else:
        chunk = comm.flashcomm2_o_proj(x, weight, bias, groups, flashcomm1=True,
                                       comm_dtype=comm_dtype, linear=gemm)  # [T_pad/N, H]
    if gather == "vllm":
        return tp.all_gather(chunk.contiguous(), dim=0)[:num_tokens]  # [T, H]
    return comm.all_gather_tokens(chunk, num_tokens, groups.tp)  # [T, H]


# ---- the ops ----------------------------------------------------------------------------------


def _layer(layer_name: str) -> Any:
    """The FlashComm o_proj layer registered under `layer_name` in vLLM's forward context."""
    if not is_forward_context_available():
        raise RuntimeError(f"flashcomm op on layer {layer_name!r}: no vLLM forward context is "
                           "set; the model must run inside vLLM's model runner")
    layers = get_forward_context().no_compile_layers
    if layer_name not in layers:
        raise RuntimeError(f"flashcomm op: layer {layer_name!r} is not registered in vLLM's "
                           "static forward context")
    return layers[layer_name]


def _o_proj(x: torch.Tensor, hidden: int, layer_name: str) -> torch.Tensor:
    return _layer(layer_name).flashcomm_o_proj(x)


def _o_proj_fake(x: torch.Tensor, hidden: int, layer_name: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], hidden))


def _prefetch(x: torch.Tensor, layer_name: str) -> None:
    _layer(layer_name).flashcomm_prefetch(x.shape[0])


def _prefetch_fake(x: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op("o_proj", _o_proj, mutates_args=[], fake_impl=_o_proj_fake,
                          target_lib=LIB)
direct_register_custom_op("prefetch", _prefetch, mutates_args=["x"], fake_impl=_prefetch_fake,
                          target_lib=LIB)
