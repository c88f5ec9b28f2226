"""Pipeline parallelism on real gloo ranks: every stage split, strategy and source against the
single-process model and transformers, per-stage o_proj memory, per-stage loading, and the
original's prefetch formula failing on a stage that does not start at layer 0.

L = 7 layers split as vLLM splits them: pp=2 -> [0..3] [4..6] (stage 1 starts at layer 4),
pp=4 -> [0,1] [2,3] [4,5] [6]. One spawned group of 4 ranks runs every configuration.
"""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch
from conftest import PROMPTS

from flashcomm import cli
from flashcomm.config import FlashCommConfig
from flashcomm.groups import ParallelGroups
from flashcomm.knobs import ConfigError
from flashcomm.layout import ParallelLayout, stage_layers
from flashcomm.model_args import ModelArgs
from flashcomm.models import pipeline
from flashcomm.models.engine import Engine
from flashcomm.models.loader import preflight
from flashcomm.plan.stages import layer_bytes, stage_memory
from flashcomm.plan.strategy import Strategy
from flashcomm.sharding import ShardedSeries

L, NEW_TOKENS, WORLD = 7, 12, 4
CKPTS = {  # untied lm_head with biases; tied embeddings (the last stage reads embed_tokens)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}
COMMON = dict(hidden_size=64, intermediate_size=96, vocab_size=300, initializer_range=0.2,
              num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
              eos_token_id=None, bos_token_id=None)


def configs() -> dict[str, FlashCommConfig]:
    """label -> knobs; every one on 4 ranks."""
    fc2 = Strategy("flashcomm2", 1)
    tp2 = [Strategy(), fc2, Strategy("flashcomm2", 1, flashcomm1=True),
           Strategy("flashcomm2", 1, oshard_k=0), Strategy("flashcomm2", 1, oshard_k=1),
           Strategy("flashcomm2", 1, oshard_k=1, shard_source="gather")]
    out = {f"tp2 pp2 {s.label}": s.to_config(2, pp=2) for s in tp2}
    out["tp2 pp2 fc2+fc1+oshard(k=1) partition 3,4"] = Strategy(  # stage 1 starts at 3
        "flashcomm2", 1, flashcomm1=True, oshard_k=1).to_config(2, pp=2, pp_layer_partition=(3, 4))
    for k in (None, 0, 1):  # TP=1: two replicas of a plain pipeline; O-Shard over the replicas
        out[f"tp1 pp2 dp2 oshard={k}"] = Strategy(oshard_k=k).to_config(1, pp=2, dp=2)
    out["tp1 pp4"] = Strategy().to_config(1, pp=4)
    return out


def _original_formula(i: int, start: int, num_layers: int, k: int) -> int:
    return (i + k) % num_layers + start  # the original's prefetch index


def _ring_passes(groups: ParallelGroups, stage: range, k: int) -> str:
    """Two passes of prefetch/wait over this stage's real shard group; 'ok' when every wait
    returned its own layer's weight, else the error."""
    series = ShardedSeries("o_proj", groups.shard["o_proj"], k, layers=stage)
    for i in stage:
        w = torch.full((4, 4), float(i))
        series.register(i, w if series.owns(i) else w.to("meta"))
    series.finalize()
    try:
        for _ in range(2):
            for i in stage:
                series.prefetch(i)
                assert torch.equal(series.wait(i), torch.full((4, 4), float(i))), i
        return "ok"
    except RuntimeError as e:  # same targets on every rank: the whole group fails alike
        return str(e)


def _worker(rank: int, world: int, ckpts: dict[str, str]) -> dict:
    out = {}
    for name, cfg in configs().items():
        groups = ParallelGroups.from_config(cfg, world)
        for ck, path in ckpts.items():
            engine = Engine.from_checkpoint(path, cfg, groups, progress=False)
            m = engine.model
            step = m.step([0] * len(PROMPTS), [len(p) for p in PROMPTS], last_only=False)
            with torch.no_grad():
                logits = pipeline.forward(m, torch.tensor([t for p in PROMPTS for t in p]), step,
                                          m.allocate_cache(len(PROMPTS), 16))
            res = engine.generate(PROMPTS, NEW_TOKENS)
            out[name, ck] = {"logits": logits, "tokens": res.tokens, "layers": res.layers,
                             "o_proj_bytes": res.o_proj_bytes, "read": engine.load_report.names,
                             "bytes_read": engine.load_report.bytes_read,
                             "kv_layers": len(m.allocate_cache(1, 1).k),
                             "shard": list(groups.shard["o_proj"].ranks)
                             if cfg.layer_sharding else None}
    cfg = configs()["tp2 pp2 fc2+oshard(k=1)"]
    groups = ParallelGroups.from_config(cfg, world)
    stage = stage_layers(L, 2)[groups.layout.coords(rank).pp]
    for k in (0, 1):
        out["ring", k, "ours"] = _ring_passes(groups, stage, k)
        with mock.patch("flashcomm.series.prefetch_target", _original_formula):
            out["ring", k, "original"] = _ring_passes(groups, stage, k)
    torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    import transformers

    root = tmp_path_factory.mktemp("pp")
    out = {}
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(CKPTS.items()):
        torch.manual_seed(10 + i)
        cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
        getattr(transformers, model_cls)(cfg).eval().save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def references(ckpts) -> dict[str, dict]:
    """Single-process logits and tokens, and transformers' own greedy tokens."""
    import transformers

    out = {}
    for ck, path in ckpts.items():
        engine = Engine.from_checkpoint(path, FlashCommConfig(), progress=False)
        m = engine.model
        step = m.step([0] * len(PROMPTS), [len(p) for p in PROMPTS], last_only=False)
        with torch.no_grad():
            logits = m(torch.tensor([t for p in PROMPTS for t in p]), step,
                       m.allocate_cache(len(PROMPTS), 16))
        hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        hf_tokens = []
        for p in PROMPTS:
            ids = list(p)
            with torch.no_grad():
                for _ in range(NEW_TOKENS):
                    ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            hf_tokens.append(ids[len(p):])
        out[ck] = {"logits": logits, "tokens": engine.generate(PROMPTS, NEW_TOKENS).tokens,
                   "hf": hf_tokens}
    return out


@pytest.fixture(scope="module")
def per_rank(ckpts) -> list[dict]:
    from flashcomm.launch import run_local

    return run_local(_worker, WORLD, ckpts, timeout_s=500, group_timeout_s=120)


def test_tokens_match_single_process_and_transformers(per_rank, references) -> None:
    for ck, ref in references.items():
        assert ref["tokens"] == ref["hf"], ck  # the reference is transformers' greedy output
        for name, cfg in configs().items():
            stages = stage_layers(L, cfg.pp, cfg.pp_layer_partition)
            for rank, out in enumerate(per_rank):
                got, where = out[name, ck], f"{name} {ck} rank {rank}"
                s = ParallelLayout.from_config(cfg).coords(rank).pp
                assert got["tokens"] == ref["tokens"], where  # every stage learns the tokens
                assert got["layers"] == (stages[s].start, stages[s].stop), where
                assert got["kv_layers"] == len(stages[s]), where  # only this stage's cache
                if s == cfg.pp - 1:
                    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4,
                                               atol=1e-4, msg=lambda m, w=where: f"{w}: {m}")
                else:
                    assert got["logits"] is None, where


def test_o_proj_bytes_follow_the_per_stage_formula(per_rank, ckpts) -> None:
    for name, cfg in configs().items():
        layout = ParallelLayout.from_config(cfg)
        stages = stage_layers(L, cfg.pp, cfg.pp_layer_partition)
        predicted = {r: u for st in stage_memory(cfg, L) for r, u in st.o_proj_layers.items()}
        for ck in ckpts:
            w = layer_bytes(cfg, 64, 64, 4)  # |W| as one rank holds it, fp32
            for rank, out in enumerate(per_rank):
                got, where = out[name, ck], f"{name} {ck} rank {rank}"
                ls = len(stages[layout.coords(rank).pp])
                if not cfg.layer_sharding:
                    want = ls * w
                elif cfg.gather_source:  # resident D/N slices of the stage + the ring
                    want = ls * w // cfg.odp + (cfg.prefetch_step + 1) * w
                else:  # owned layers of the stage + the ring; the shard group spans no stage
                    group = layout.group_of(rank, layout.shard_groups("o_proj"))
                    assert got["shard"] == group, where
                    assert {layout.coords(r).pp for r in group} == {layout.coords(rank).pp}
                    owned = sum(1 for i in stages[layout.coords(rank).pp]
                                if i % len(group) == group.index(rank))
                    assert owned <= math.ceil(ls / len(group))
                    want = (owned + cfg.prefetch_step + 1) * w
                assert got["o_proj_bytes"] == want, where
                assert got["o_proj_bytes"] == predicted[rank] * w, where  # flashcomm layout's


def test_pp2_dp2_shard_group_spans_replicas_not_stages(per_rank) -> None:
    for k in (0, 1):
        shard = [out[f"tp1 pp2 dp2 oshard={k}", "llama"]["shard"] for out in per_rank]
        assert shard == [[0, 2], [1, 3], [0, 2], [1, 3]]  # rank = dp * 2 + stage


def test_each_rank_reads_only_its_stage_and_its_slices(per_rank, ckpts) -> None:
    for name, cfg in configs().items():
        stages = stage_layers(L, cfg.pp, cfg.pp_layer_partition)
        layout = ParallelLayout.from_config(cfg)
        for ck in ckpts:
            for rank, out in enumerate(per_rank):
                got, where = out[name, ck], f"{name} {ck} rank {rank}"
                s = layout.coords(rank).pp
                layers = {int(n.split(".")[2]) for n in got["read"] if n.startswith("model.lay")}
                assert layers == set(stages[s]), where
                others = {n for n in got["read"] if not n.startswith("model.layers.")}
                want = {"model.embed_tokens.weight"} if s == 0 else set()
                if s == cfg.pp - 1:
                    want.add("model.norm.weight")
                    want.add("model.embed_tokens.weight" if ck == "qwen2" else "lm_head.weight")
                assert others == want, where
    # TP=2 reads half of every split tensor: the two TP ranks of a stage read the same names
    # and together one stage's worth of bytes more than a TP=1 stage's shared tensors
    tp2, tp1 = per_rank[2]["tp2 pp2 allreduce", "llama"], per_rank[1]["tp1 pp2 dp2 oshard=None",
                                                                    "llama"]
    assert tp2["read"] == per_rank[3]["tp2 pp2 allreduce", "llama"]["read"]
    assert tp1["bytes_read"] / 2 < tp2["bytes_read"] < tp1["bytes_read"]


def test_original_prefetch_formula_fails_on_a_stage_not_starting_at_0(per_rank) -> None:
    for rank, out in enumerate(per_rank):
        stage = ParallelLayout(tp=2, pp=2, otp=1).coords(rank).pp
        for k in (0, 1):
            assert out["ring", k, "ours"] == "ok", (rank, k)
            if stage == 0:  # start = 0: both formulas agree
                assert out["ring", k, "original"] == "ok", (rank, k)
            else:  # start = 4: the slot holds another layer
                assert "ring slot" in out["ring", k, "original"], (rank, k)


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "8", "--pp", "8"], "pp=8: larger than num_hidden_layers=7"),
    (["--nproc", "4", "--pp", "2", "--attn-out", "flashcomm2", "--layer-sharding", "o_proj",
      "--prefetch-step", "2"], "prefetch_step=2: must satisfy 0 <= k <= L_s-2 = 1 for stage 1 "
     "(layers 4..6, L_s=3)"),
    (["--nproc", "2", "--pp", "2", "--pp-layer-partition", "3,3"],
     "pp_layer_partition=3,3 (VLLM_PP_LAYER_PARTITION): adds up to 6 layers, the model has 7"),
    (["--nproc", "3", "--pp", "2"], "nproc=3: must be a multiple of pp*dp = 2*1"),
])
def test_bad_input_fails_before_any_rank_starts(ckpts, capsys, argv, message) -> None:
    assert cli.main(["run", "--model", ckpts["llama"], "--token-ids", "1,2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err
    assert "loading" not in err  # no rank started
    cfg = FlashCommConfig(tp=2, pp=2, flashcomm2_otp=1, layer_sharding=("o_proj",),
                          prefetch_step=1, pp_layer_partition=(6, 1))
    with pytest.raises(ConfigError, match=r"stage 1 \(layers 6\.\.6, L_s=1\)"):
        preflight(ckpts["llama"], cfg)  # pure: no process group exists here


def test_cli_runs_a_plain_tp1_pipeline_and_layout_and_plan_show_its_stages(
        ckpts, references, capsys) -> None:
    ids = [",".join(map(str, p)) for p in PROMPTS]
    assert cli.main(["run", "--model", ckpts["qwen2"], "--nproc", "2", "--config-json",
                     '{"pp": 2}', "--token-ids", *ids, "--max-new-tokens", str(NEW_TOKENS),
                     "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tokens"] == references["qwen2"]["tokens"]
    assert [r["layers"] for r in d["ranks"]] == [[0, 4], [4, 7]]
    assert cli.main(["layout", "--model", ckpts["qwen2"], "--tp", "2", "--pp", "2", "--otp", "1",
                     "--layer-sharding", "o_proj", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    w = 64 * 64 * 4
    assert [(s["layers"], s["o_proj_bytes"]) for s in stages] == [
        ([0, 4], {"0": 4 * w, "1": 4 * w}), ([4, 7], {"2": 4 * w, "3": 3 * w})]
    assert cli.main(["layout", "--num-layers", "7", "--pp", "4"]) == 0
    text = capsys.readouterr().out
    assert "stage 3: layers 6..6 (L_s=1)" in text and "stage 0: layers 0..1 (L_s=2)" in text
    assert cli.main(["plan", "--model", ckpts["qwen2"], "--tp", "2", "--pp", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["stages"]
    w = 64 * 64 * 2  # bf16 |W| of the full W_o, per stage the fullest rank
    assert plan["layers"] == [[0, 4], [4, 7]]
    assert plan["o_proj_bytes"]["allreduce"] == [4 * w // 2, 3 * w // 2]
    assert plan["o_proj_bytes"]["fc2+oshard(k=1)"] == [4 * w, 4 * w]
    assert plan["o_proj_bytes"]["fc2+gather(k=1)"] == [4 * w // 2 + 2 * w, 3 * w // 2 + 2 * w]
    assert plan["o_proj_bytes"]["fc2+oshard(k=2)"] == [None, None]  # k > L_s - 2 on stage 1
    assert ModelArgs.from_dir(ckpts["qwen2"]).tie_word_embeddings
