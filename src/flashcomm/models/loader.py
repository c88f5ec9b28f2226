"""Hugging Face safetensors checkpoints -> this rank's slices of a Transformer.

Every file is opened with `safe_open` (memory-mapped, lazy `get_slice`), so a rank reads only the
rows/columns it holds, and a rank that does not own a layer-sharded o_proj never reads it (it
registers a meta placeholder with the series instead). Under pipeline parallelism a rank reads
only its stage's tensors (models/pipeline.py: layers, embeddings first, norm and lm_head last).
Everything that can be wrong with a
checkpoint (config field, missing tensor, wrong shape, truncated file) is checked from the
headers first, on every rank alike, before the first collective (the series' finalize).
Nothing is unpickled: only config.json, the safetensors index and safetensors files are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from flashcomm.comm import CommCounter
from flashcomm.config import FlashCommConfig
from flashcomm.gathered import GatheredSeries
from flashcomm.groups import ParallelGroups
from flashcomm.knobs import ConfigError
from flashcomm.model_args import CheckpointError, ModelArgs
from flashcomm.models.deepseek_moe import deepseek_moe_tensors
from flashcomm.models.mla import mla_tensors
from flashcomm.models.moe import MOE_TENSOR_NAMES
from flashcomm.models.parallel import TPContext, TPPlan
from flashcomm.models.pipeline import stage_of, stage_ranges
from flashcomm.models.transformer import Transformer
from flashcomm.sharding import ShardedSeries

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: where it goes and which part of it this rank reads."""

    name: str
    """Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight."""
    target: str
    """Our parameter name (state_dict key), or o_proj.<layer> for a layer-sharded o_proj."""
    shape: tuple[int, ...]
    """Full shape expected in the checkpoint."""
    dim: int = 0
    """Dimension that is sliced (when `part` is set)."""
    part: tuple[int, int] | None = None
    """[start, end) along `dim` read by this rank; None reads the whole tensor."""
    dtype: torch.dtype | None = None
    """Load in this dtype whatever the model's (DeepSeek's router stays fp32); None: the model's."""


@dataclass
class LoadReport:
    """What one rank read while loading."""

    names: list[str] = field(default_factory=list)
    """Checkpoint tensors this rank read (in part or fully)."""
    bytes_read: int = 0
    """Bytes of tensor data this rank read."""


def tensor_specs(args: ModelArgs, plan: TPPlan, layers: range | None = None) -> list[TensorSpec]:
    """Every tensor the model (or the pipeline stage holding `layers`) needs from the
    checkpoint, with this rank's slice of it: embeddings on the first stage, the final norm and
    lm_head on the last (a tied lm_head there reads the embeddings), stage-local targets."""
    h, hd, i_sz = args.dim, args.head_dim, args.intermediate_size
    q_rows = (plan.q_heads[0] * hd, plan.q_heads[1] * hd)
    kv_rows = (plan.kv_heads[0] * hd, plan.kv_heads[1] * hd)
    layers = range(args.n_layers) if layers is None else layers
    first, last = layers.start == 0, layers.stop == args.n_layers
    embed = "model.embed_tokens.weight"
    specs = [TensorSpec(embed, "tok_embeddings.weight", (args.vocab_size, h))] if first else []
    for i in layers:
        p, t = f"model.layers.{i}.", f"layers.{i - layers.start}."
        a, m = p + "self_attn.", p + "mlp."
        qkv = [
            TensorSpec(a + "q_proj.weight", t + "attention.wq.weight", (args.q_dim, h), 0, q_rows),
            TensorSpec(a + "k_proj.weight", t + "attention.wk.weight",
                       (args.n_kv_heads * hd, h), 0, kv_rows),
            TensorSpec(a + "v_proj.weight", t + "attention.wv.weight",
                       (args.n_kv_heads * hd, h), 0, kv_rows),
        ]
        if args.is_mla:  # latent attention: its own projections instead of q/k/v (mla.py)
            qkv = [TensorSpec(a + name, f"{t}attention.{ours}", *rest)
                   for name, ours, *rest in mla_tensors(args, plan)]
        specs += [
            TensorSpec(p + "input_layernorm.weight", t + "attention_norm.weight", (h,)),
            TensorSpec(p + "post_attention_layernorm.weight", t + "ffn_norm.weight", (h,)),
            *qkv,
            TensorSpec(a + "o_proj.weight", t + "attention.wo", (h, args.q_dim), 1, plan.o_cols),
        ]
        if i in args.moe_layers:
            specs += _moe_specs(args, plan, i, t)
            if args.model_type == "deepseek_v3":  # the router's bias, the shared experts
                specs += [TensorSpec(m + name, f"{t}feed_forward.{ours}", *rest)
                          for name, ours, *rest in deepseek_moe_tensors(args, plan)]
        else:
            specs += [
                TensorSpec(m + "gate_proj.weight", t + "feed_forward.w1.weight", (i_sz, h), 0,
                           plan.ffn),
                TensorSpec(m + "up_proj.weight", t + "feed_forward.w3.weight", (i_sz, h), 0,
                           plan.ffn),
                TensorSpec(m + "down_proj.weight", t + "feed_forward.w2.weight", (h, i_sz), 1,
                           plan.ffn),
            ]
        if args.qkv_bias and not args.is_mla:
            specs += [
                TensorSpec(a + "q_proj.bias", t + "attention.wq.bias", (args.q_dim,), 0, q_rows),
                TensorSpec(a + "k_proj.bias", t + "attention.wk.bias", (args.n_kv_heads * hd,), 0,
                           kv_rows),
                TensorSpec(a + "v_proj.bias", t + "attention.wv.bias", (args.n_kv_heads * hd,), 0,
                           kv_rows),
            ]
        if args.o_bias:
            specs.append(TensorSpec(a + "o_proj.bias", t + "attention.o_bias", (h,)))
        if args.qk_norm:
            specs += [TensorSpec(a + "q_norm.weight", t + "attention.q_norm.weight", (hd,)),
                      TensorSpec(a + "k_norm.weight", t + "attention.k_norm.weight", (hd,))]
        if args.mlp_bias and i not in args.moe_layers:
            specs += [
                TensorSpec(m + "gate_proj.bias", t + "feed_forward.w1.bias", (i_sz,), 0, plan.ffn),
                TensorSpec(m + "up_proj.bias", t + "feed_forward.w3.bias", (i_sz,), 0, plan.ffn),
                TensorSpec(m + "down_proj.bias", t + "feed_forward.w2_bias", (h,)),
            ]
    if last:
        specs.append(TensorSpec("model.norm.weight", "norm.weight", (h,)))
        if not args.tie_word_embeddings:
            specs.append(TensorSpec("lm_head.weight", "output.weight", (args.vocab_size, h)))
        elif not first:  # tied, and the embeddings live on another stage
            specs.append(TensorSpec(embed, "output.weight", (args.vocab_size, h)))
    return specs


def _moe_specs(args: ModelArgs, plan: TPPlan, i: int, target: str) -> list[TensorSpec]:
    """Layer i's router (replicated) and this rank's experts: a slice of every expert's inner
    columns (TP experts) or its whole experts (expert parallel: TPPlan.experts, floor(E/N) or
    one more); `target`: the layer's module prefix (layers.<stage-local index>.)."""
    block, gate, up, down = MOE_TENSOR_NAMES[args.model_type]
    p, t = f"model.layers.{i}.{block}.", f"{target}feed_forward."
    h, inner, cols = args.dim, args.moe_intermediate_size, plan.expert_ffn
    fp32 = torch.float32 if args.model_type == "deepseek_v3" else None  # as transformers keeps it
    specs = [TensorSpec(p + "gate.weight", t + "gate.weight", (args.n_experts, h), dtype=fp32)]
    for e in range(*plan.experts):
        src, dst = f"{p}experts.{e}.", f"{t}experts.{e - plan.experts[0]}."
        specs += [TensorSpec(f"{src}{gate}.weight", dst + "w1.weight", (inner, h), 0, cols),
                  TensorSpec(f"{src}{up}.weight", dst + "w3.weight", (inner, h), 0, cols),
                  TensorSpec(f"{src}{down}.weight", dst + "w2.weight", (h, inner), 1, cols)]
    return specs


def checkpoint_index(path: str | Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """Tensor name -> (file, shape, dtype) from the safetensors headers (no data read)."""
    root = Path(path)
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_file}: not a safetensors index ({e})") from None
        files = sorted({root / f for f in weight_map.values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors file (only safetensors is supported)")
    out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing")
        try:  # safe_open checks that the header's offsets cover the file exactly
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    s = handle.get_slice(name)
                    out[name] = (f, tuple(s.get_shape()), s.get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({e})") from None
    return out


def validate_checkpoint(index: dict[str, tuple[Path, tuple[int, ...], str]],
                        specs: list[TensorSpec]) -> None:
    """Raise CheckpointError naming the first missing or mis-shaped tensor."""
    for spec in specs:
        if spec.name not in index:
            raise CheckpointError(f"checkpoint: tensor {spec.name!r} is missing")
        f, shape, dtype = index[spec.name]
        if shape != spec.shape:
            raise CheckpointError(
                f"checkpoint: tensor {spec.name!r} in {f.name} has shape {list(shape)}, "
                f"expected {list(spec.shape)} from config.json"
            )
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"checkpoint: tensor {spec.name!r} has dtype {dtype}; allowed: {sorted(_DTYPES)}"
            )


def check_strategy(args: ModelArgs, cfg: FlashCommConfig) -> None:
    """ConfigError for knobs this model cannot use (pure, no groups needed): layer sharding,
    expert parallelism, the pipeline split and prefetch_step <= L_s - 2 on every stage."""
    other = [w for w in cfg.layer_sharding if w != "o_proj"]
    if other:
        raise ConfigError(f"layer_sharding={other}: Llama-family models only shard 'o_proj'")
    if cfg.expert_parallel and not args.is_moe:
        raise ConfigError(f"expert_parallel=True (--expert-parallel): model_type="
                          f"{args.model_type!r} has no experts")
    stage_ranges(args, cfg)


def _read(handle, spec: TensorSpec) -> Tensor:
    s = handle.get_slice(spec.name)
    if spec.part is None:
        return s[:]
    a, b = spec.part
    return s[a:b] if spec.dim == 0 else s[:, a:b]


def preflight(path: str | Path, cfg: FlashCommConfig) -> ModelArgs:
    """Everything that can be wrong before a rank starts: config.json, the split over cfg.tp
    ranks (ConfigError naming tp), the strategy knobs and the safetensors headers (no tensor
    data read, no process group needed)."""
    try:
        args = ModelArgs.from_dir(path)
    except CheckpointError as e:  # name the file the user passed, not just config.json
        f = str(Path(path) / "config.json")
        raise CheckpointError(str(e) if f in str(e) else
                              f"{f}: {str(e).removeprefix('config.json: ')}") from None
    plan = TPPlan.build(args, cfg.tp, 0, cfg.flashcomm2_otp, cfg.expert_parallel)
    check_strategy(args, cfg)
    validate_checkpoint(checkpoint_index(path), tensor_specs(args, plan))
    return args


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype the checkpoint stores its embeddings in (what dtype=None loads as)."""
    return _DTYPES[checkpoint_index(path)["model.embed_tokens.weight"][2]]


def build_model(
    args: ModelArgs,
    cfg: FlashCommConfig,
    groups: ParallelGroups | None = None,
    counter: CommCounter | None = None,
) -> Transformer:
    """This rank's Transformer on the meta device (no weights yet), with its TPContext and,
    when o_proj is layer-sharded, its empty series (ShardedSeries, or GatheredSeries under
    shard_source=gather: every rank then holds stock TP's D/N columns of W_o)."""
    tp = 1 if groups is None else groups.tp.size
    if groups is not None and tp != cfg.tp:
        raise ConfigError(f"tp={cfg.tp}: the TP group has {tp} ranks")
    if groups is not None:
        check_strategy(args, cfg)
    stage = stage_of(args, cfg, groups)  # a series covers only its stage's layers
    tp_rank = 0 if groups is None else groups.tp.rank
    plan = TPPlan.build(args, tp, tp_rank, cfg.flashcomm2_otp if groups is not None else 0,
                        groups is not None and cfg.expert_parallel)
    series = None
    if groups is not None and cfg.gather_source:  # each rank reads stock TP's D/N columns
        if groups.fetch is None:
            raise ConfigError("shard_source='gather': build ParallelGroups with 'o_proj' in "
                              "shard_weights (ParallelGroups.from_config does) for its group")
        hd = args.head_dim
        plan = replace(plan, o_cols=(plan.q_heads[0] * hd, plan.q_heads[1] * hd))
        series = GatheredSeries("o_proj", groups.fetch, cfg.prefetch_step, layers=stage.layers)
    elif groups is not None and "o_proj" in cfg.layer_sharding:
        series = ShardedSeries("o_proj", groups.shard["o_proj"], cfg.prefetch_step,
                               layers=stage.layers)
    ctx = TPContext(cfg, groups, counter, series)
    with torch.device("meta"):
        return Transformer(args, plan, ctx, stage.layers)


def load_weights(
    model: Transformer,
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> LoadReport:
    """Read this rank's slices of the checkpoint at `path` into `model` (built by build_model),
    then distribute a layer-sharded o_proj (collective: the series' finalize)."""
    device = torch.device(device)
    args, plan, series = model.args, model.plan, model.ctx.o_series
    groups = model.ctx.groups
    index = checkpoint_index(path)
    specs = tensor_specs(args, plan, model.layer_range)  # this stage's tensors only
    validate_checkpoint(index, tensor_specs(args, TPPlan.build(args, 1, 0)))  # alike on all ranks
    if dtype is None:
        dtype = _DTYPES[index["model.embed_tokens.weight"][2]]

    report = LoadReport()
    state: dict[str, Tensor] = {}
    o_weights: dict[int, Tensor] = {}
    by_file: dict[Path, list[TensorSpec]] = {}
    for spec in specs:
        by_file.setdefault(index[spec.name][0], []).append(spec)
    rank0 = groups is None or groups.rank == 0
    bar = tqdm(total=len(specs), desc="loading", unit="tensor", disable=not (progress and rank0))
    for f, file_specs in by_file.items():
        with safe_open(f, framework="pt") as handle:
            for spec in file_specs:
                bar.update(1)
                layer = _o_proj_layer(spec)
                if series is not None and layer is not None and not series.owns(layer):
                    width = plan.o_cols[1] - plan.o_cols[0]
                    o_weights[layer] = torch.empty(args.dim, width, dtype=dtype, device="meta")
                    continue  # a non-owner never reads this layer
                t = _read(handle, spec).to(device=device, dtype=spec.dtype or dtype).contiguous()
                report.names.append(spec.name)
                report.bytes_read += t.nbytes
                if series is not None and layer is not None:
                    o_weights[layer] = t
                else:
                    state[spec.target] = t
    bar.close()
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers(device)
    if series is not None:
        for layer in sorted(o_weights):
            series.register(layer, o_weights[layer])
        series.finalize()  # the first collective: every check above has passed on every rank
    return report


def load_model(
    path: str | Path,
    cfg: FlashCommConfig,
    groups: ParallelGroups | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    counter: CommCounter | None = None,
    progress: bool = True,
) -> tuple[Transformer, LoadReport]:
    """build_model + load_weights: this rank's loaded Transformer (collective when sharded)."""
    model = build_model(ModelArgs.from_dir(path), cfg, groups, counter)
    return model, load_weights(model, path, device=device, dtype=dtype, progress=progress)


def _o_proj_layer(spec: TensorSpec) -> int | None:
    if not spec.name.endswith("self_attn.o_proj.weight"):
        return None
    return int(spec.name.split(".")[2])
