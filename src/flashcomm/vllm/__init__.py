"""flashcomm's vLLM general plugin: FlashComm2 and O-Shard for vLLM's own Llama-family models.

Registered as the entry point `vllm.general_plugins: flashcomm = flashcomm.vllm:register`, so
vLLM calls `register()` in every process, workers included, before building the model.

Enable it with the knobs' environment variables (validated with the engine's messages), e.g.
    FLASHCOMM2_PARALLEL_SIZE=1          FlashComm2, full o_proj per rank (otp; must divide TP)
    FLASHCOMM2_MIN_TOKENS=N | auto      per step: FlashComm2 at T >= N, else vLLM's all-reduce
    FLASHCOMM_PROFILE=fit | name | file where 'auto' gets its collective costs (fit: measure)
    FLASHCOMM_LAYER_SHARDING=o_proj     O-Shard the replicated o_proj over its shard group
    FLASHCOMM_SHARD_SOURCE=gather       its W_o from the resident D/N slices, FlashComm2 steps only
    FLASHCOMM_PREFETCH_STEP=k           prefetch distance, 0 <= k <= L-2
    FLASHCOMM_REPORT_DIR=dir            write rank<r>.json (bytes, threshold) after loading
With none of the FLASHCOMM* variables set, `register()` does nothing and vLLM runs stock. When
the threshold means FlashComm2 can never run (auto found no crossover, or it exceeds
max_num_batched_tokens) every layer is vLLM's own and the traced graph is stock's (context.py).
Otherwise any compilation mode works (the ops carry the per-step work, see ops.py); on GPUs use
cudagraph_mode=PIECEWISE. `worker_report` reads the facts back through
`LLM.collective_rpc(worker_report)`, including the op counters `o_proj_calls` and
`o_proj_fc2_calls` and the custom ops in the compiled code (`compiled_ops`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flashcomm.vllm.context import env_requests_flashcomm


def register() -> None:
    """vLLM plugin entry point; idempotent, hooks in only when a FLASHCOMM* variable is set.
    Bad knobs raise a ConfigError here, in the process that starts vLLM, before any engine."""
    if not env_requests_flashcomm():
        return
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    from flashcomm.config import FlashCommConfig
    from flashcomm.vllm.checks import check_env

    check_env(FlashCommConfig.from_env())
    from flashcomm.vllm.layers import FlashCommQKVParallelLinear, FlashCommRowParallelLinear

    for base, ours in ((RowParallelLinear, FlashCommRowParallelLinear),
                       (QKVParallelLinear, FlashCommQKVParallelLinear)):
        current = op_registry_oot.get(base.__name__)
        if current is ours:
            continue  # loaded before in this process
        if current is not None:
            raise RuntimeError(f"flashcomm: {base.__name__} is already replaced out of tree by "
                               f"{current.__module__}.{current.__qualname__}; cannot hook in")
        base.register_oot(ours)


def worker_report(worker: Any) -> dict[str, Any]:
    """Inside a vLLM worker (collective_rpc): layer classes, FlashComm's resident bytes, the
    threshold and the op counters (o_proj_calls, o_proj_fc2_calls)."""
    from flashcomm.vllm.context import O_PROJ_PATTERN, QKV_PATTERN, VllmFlashComm

    model = worker.model_runner.model
    classes, rerouted = {}, []
    ctx = None
    for name, module in model.named_modules():
        if O_PROJ_PATTERN.match(name) or QKV_PATTERN.match(name):
            classes[name] = type(module).__name__
            ctx = ctx or getattr(module, "ctx", None)
        if getattr(module, "flashcomm_layer", None) is not None:
            rerouted.append(name)  # layers whose forward differs from vLLM's
    report: dict[str, Any] = {"classes": classes, "flashcomm_layers": rerouted,
                              "compiled_ops": compiled_ops(worker)}
    if isinstance(ctx, VllmFlashComm):
        report.update(ctx.report())
    return report


COMPILED_OP = re.compile(r"torch\.ops\.(\w+)\.(\w+)")


def compiled_ops(worker: Any) -> dict[str, int] | None:
    """Op calls (`torch.ops.<lib>.<op>`) in the code Inductor generated for this worker's model,
    e.g. 'flashcomm.o_proj' or '_C.shm_allreduce' -> occurrences over the output-code files of
    its compile-cache directory; None when nothing was compiled (eager, no cache directory)."""
    cache = getattr(worker.vllm_config.compilation_config, "local_cache_dir", None)
    if not cache or not Path(cache).is_dir():
        return None
    found: dict[str, int] = {}
    files = 0
    for path in Path(cache).rglob("*.py"):
        files += 1
        for lib, op in COMPILED_OP.findall(path.read_text(errors="replace")):
            found[f"{lib}.{op}"] = found.get(f"{lib}.{op}", 0) + 1
    return found if files else None


@contextlib.contextmanager
def llm_with_env(env: dict[str, str], **llm_kwargs: Any) -> Iterator[Any]:
    """A vLLM `LLM(**llm_kwargs)` built with `env` set and no other FLASHCOMM* variable (the
    plugin reads them in every worker at start-up); the engine is shut down and the environment
    restored on exit, so instances may nest."""
    from vllm import LLM

    from flashcomm.vllm.context import plugin_env_names

    touched = {*env, *plugin_env_names()}
    saved = {k: os.environ.get(k) for k in touched}
    for k in plugin_env_names():
        os.environ.pop(k, None)
    os.environ.update(env)
    llm = None
    try:
        llm = LLM(**llm_kwargs)
        yield llm
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
