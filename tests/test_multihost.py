"""The engine across hosts: torchrun --nnodes 2 on an emulated cluster (flashcomm.bench.cluster).

Every strategy on 2 hosts x 1 rank and 2 hosts x 2 ranks gives the single-process tokens, and
the bytes that crossed the link (link counters less TCP/IP headers) match the cost model's count
within 5%. The README's multi-node recipe runs as written (`torchrun ... -m flashcomm.cli run`).
A link cut mid-prefill ends the run on every rank within the group timeout, with an error that
names the host, its peers and the link, and leaves no process. Needs root and iproute2 (the
emulated hosts); a peer lost on the engine's own launcher is named too (no root needed).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from flashcomm import comm
from flashcomm.bench import cluster
from flashcomm.bench.cluster import Cluster
from flashcomm.bench.hosts import torchrun_on_hosts
from flashcomm.bench.link_model import crossing_bytes, link_bytes
from flashcomm.config import FlashCommConfig
from flashcomm.launch import CPU_MALLOC_ENV
from flashcomm.model_args import ModelArgs
from flashcomm.models.engine import Engine
from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint
from flashcomm.plan.costmodel import Shape
from flashcomm.plan.strategy import Strategy

WHY = cluster.unavailable()
needs_cluster = pytest.mark.skipif(WHY is not None, reason=WHY or "")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
STRATEGIES = [dict(), dict(attn_out="flashcomm2", otp=1),
              dict(attn_out="flashcomm2", otp=1, oshard_k=1),
              dict(attn_out="flashcomm2", otp=1, oshard_k=1, shard_source="gather"),
              dict(attn_out="flashcomm2", otp=1, comm_dtype="int8")]
PROMPTS = [[5], [17, 230, 4], [100, 200, 250, 3, 3, 42, 7]]
# the counted prefill: 510 tokens, so each layer's collectives carry tens of KiB
BYTES_PROMPTS = [[(7 * i + 3) % 250 + 3 for i in range(300)], [5, 6, 7] * 70]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer random Llama (H = D = 64) with a byte-level tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), small_llama_config(**TINY), seed=3)


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with 8 heads and 8 KV heads: it splits over any TP size up to 8."""
    cfg = small_llama_config(**{**TINY, "num_attention_heads": 8, "num_key_value_heads": 8,
                                "head_dim": 8})
    return write_checkpoint(tmp_path_factory.mktemp("tiny8"), cfg, seed=4)


def _reference(model: Path, prompts: list[list[int]], new: int) -> list[list[int]]:
    ref = Engine.from_checkpoint(model, FlashCommConfig(), None, progress=False,
                                 dtype=torch.float32)
    return ref.generate(prompts, new).tokens


def _ok(results: list) -> None:
    for i, r in enumerate(results):
        assert r.returncode == 0, f"host {i}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


@needs_cluster
@pytest.mark.parametrize("per_host", [1, 2])
def test_every_strategy_across_hosts(tiny: Path, tmp_path: Path, per_host: int) -> None:
    spec = dict(model=str(tiny), strategies=STRATEGIES, prompts=PROMPTS, max_new_tokens=4,
                bytes_prompts=BYTES_PROMPTS, out=str(tmp_path / "out.json"), group_timeout_s=60)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with Cluster(2, rate_mbit=1000, cores=[[0], [1 % len(cluster.os.sched_getaffinity(0))]]) as c:
        _ok(torchrun_on_hosts(c, per_host, ["-m", "flashcomm.bench.hosts_rank", "--spec",
                                            str(tmp_path / "spec.json")], timeout_s=300))
    out = json.loads((tmp_path / "out.json").read_text())
    ref = _reference(tiny, PROMPTS, 4)
    args = ModelArgs.from_dir(tiny)
    shape = Shape(hidden=args.dim, q_dim=args.q_dim, tp=2 * per_host, elt_bytes=4,
                  layers=args.n_layers)
    tokens = sum(map(len, BYTES_PROMPTS))
    report = []
    for j, (label, s) in enumerate(zip(out["labels"], STRATEGIES, strict=True)):
        got_tokens = out["ranks"][0]["rows"][j]["tokens"]
        if s.get("comm_dtype") != "int8":  # int8 exchange is lossy: logits close, not exact
            assert got_tokens == ref, label
        expected = link_bytes(Strategy(**s), shape, tokens, per_host)
        crossed = sum(r["rows"][j]["link"]["payload"] for r in out["ranks"]
                      if r["rows"][j]["link"] is not None)
        report.append(f"{label}: link {crossed} B, cost model {expected:.0f} B, "
                      f"ratio {crossed / expected:.4f}")
        assert abs(crossed / expected - 1) < 0.05, "\n".join(report)
    print("\n".join(report))


def _readme_argv(model: Path, extra: list[str]) -> list[str]:
    """The README's multi-node recipe after the torchrun flags (see bench.hosts.torchrun_argv)."""
    return ["-m", "flashcomm.cli", "run", "--model", str(model), "--otp", "1",
            "--layer-sharding", "o_proj", *extra]


@needs_cluster
def test_readme_multinode_recipe(tiny8: Path) -> None:
    """The two-node line of docs/multi-node.md, word for word, one copy per host."""
    from doc_commands import doc_argv, doc_command  # tests/doc_commands.py

    shown = doc_command("docs/multi-node.md", "torchrun --nnodes 2")
    with Cluster(2, rate_mbit=1000, cores=[[0], [1 % len(cluster.os.sched_getaffinity(0))]]) as c:
        lines = [doc_argv(shown, DIR=str(tiny8), R=str(i), HOST=c.addr(0)) for i in range(2)]
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        procs = [c.popen(i, [torchrun, *argv[1:]], env={**env, **CPU_MALLOC_ENV},
                         stdout=cluster.subprocess.PIPE, stderr=cluster.subprocess.PIPE,
                         text=True) for i, (env, argv) in enumerate(lines)]
        res = [p.communicate(timeout=300) for p in procs]
    for i, (p, (_, err)) in enumerate(zip(procs, res, strict=True)):
        assert p.returncode == 0, f"host {i}:\n{err[-4000:]}"
    ref = Engine.from_checkpoint(tiny8, FlashCommConfig(), None, progress=False)
    prompt = re.search(r'--prompt "([^"]*)"', shown).group(1)
    new = int(re.search(r"--max-new-tokens (\d+)", shown).group(1)) if "--max-new" in shown \
        else 32  # flashcomm run's default
    text = ref.generate(ref.encode([prompt]), new).text[0]
    assert f"[0] {text!r}" in res[0][0], res[0][0]  # global rank 0 prints the result
    assert res[1][0].strip() == ""  # host 1's ranks print nothing


@needs_cluster
@pytest.mark.parametrize("fault", ["down", "drop"])
def test_link_cut_mid_prefill_is_named(tiny: Path, fault: str) -> None:
    timeout = 5
    prompt = "x" * 1500  # a long prefill: ~0.5 s of traffic through the 20 Mbit/s link
    with Cluster(2, rate_mbit=20, cores=[[0], [1 % len(cluster.os.sched_getaffinity(0))]]) as c:
        t_start = time.monotonic()
        procs = [c.popen(i, a, stdout=cluster.subprocess.PIPE, stderr=cluster.subprocess.PIPE,
                         text=True, env={"FLASHCOMM_GROUP_TIMEOUT": str(timeout)})
                 for i, a in enumerate(_hosts_argv(c, tiny, prompt))]
        base = c.counters(0).tx_bytes
        cut_at = None
        while time.monotonic() - t_start < 240 and cut_at is None:
            if c.counters(0).tx_bytes - base > 150_000:  # the prefill's collectives started
                c.set_link(1, fault)
                cut_at = time.monotonic()
            elif any(p.poll() is not None for p in procs):
                break
            time.sleep(0.005)
        if cut_at is None:
            for p in procs:
                p.kill()
            errs = "\n".join(p.communicate()[1][-2000:] for p in procs)
            pytest.fail(f"no prefill traffic within {time.monotonic() - t_start:.0f} s:\n{errs}")
        outs, ended = [], []
        for p in procs:
            outs.append(p.communicate(timeout=timeout + 60))
            ended.append(time.monotonic() - cut_at)
        left = [pid for i in range(2) for pid in c.pids(i)]
    print(f"{fault}: hosts ended {ended[0]:.1f} s and {ended[1]:.1f} s after the cut")
    assert max(ended) < timeout + 30, f"the hosts ended {ended} s after the cut"
    assert len(left) == 2, f"processes left on the hosts besides the two holders: {left}"
    for i, (_, err) in enumerate(outs):
        named = re.findall(r"flashcomm run: error: rank (\d) on host (host\d) \(10\.213\.0\.\d"
                           r".*?lost the link over eth0 to host (host\d) \((10\.213\.0\.\d): "
                           r"ranks? ", err)
        # torchrun stops a host's other ranks once one has failed: at least the first names it
        ranks = {int(m[0]) for m in named}
        assert ranks and ranks <= {2 * i, 2 * i + 1}, f"host {i} ({fault}):\n{err[-3000:]}"
        assert all(m[1] == f"host{i}" and m[2] == f"host{1 - i}" for m in named), named
        assert "group timeout of 5 s" in err


def _hosts_argv(c: Cluster, model: Path, prompt: str) -> list[list[str]]:
    from flashcomm.bench.hosts import torchrun_argv

    program = _readme_argv(model, ["--otp", "1", "--prompt", prompt, "--max-new-tokens", "200"])
    program = [a for a in program if a not in ("--layer-sharding", "o_proj")]
    return [torchrun_argv(2, 2, i, c.addr(0), 29500, program) for i in range(2)]


def _sleepy_peer(rank: int, world: int) -> None:
    from flashcomm.groups import ParallelGroups

    groups = ParallelGroups.from_config(FlashCommConfig(tp=world, group_timeout_s=2), world)
    with groups.naming_link_errors():
        if rank == 1:
            time.sleep(60)  # alive but silent: what a peer behind a dead link looks like
        torch.distributed.all_reduce(torch.ones(4), group=groups.tp.group)


def test_lost_peer_is_named_on_the_engines_launcher() -> None:
    from flashcomm.launch import RankFailure, run_local

    t0 = time.monotonic()
    with pytest.raises(RankFailure) as e:
        run_local(_sleepy_peer, 2, timeout_s=60, grace_s=1)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert re.search(r"rank 0 \(pid \d+\) raised flashcomm\.groups\.LinkFailure: rank 0 on host "
                     r"\S+ \(.*\) lost a peer on its own host: rank 1 \(pid \d+\): .*group "
                     r"timeout of 2 s", msg), msg
    assert sys.modules.get("flashcomm.groups") is not None


GATHER_PROGRAM = '''
import json, sys
import torch, torch.distributed as dist
from flashcomm import comm
from flashcomm.bench.hosts_rank import _Link
from flashcomm.groups import ParallelGroups
from flashcomm.layout import ParallelLayout
dist.init_process_group("gloo")
tp = ParallelGroups.build(ParallelLayout(tp=dist.get_world_size()), shard_weights=()).tp
rows, hidden = (int(a) for a in sys.argv[1:3])
chunk = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(tp.rank))
with _Link("eth0") as link:
    got = comm.all_gather_tokens(chunk, rows * tp.size, tp)
want = torch.empty_like(got)
dist.all_gather_into_tensor(want, chunk)
out = {"equal": bool(torch.equal(got, want)), "hosts": list(tp.member_hosts), "link": link.sent}
print("RESULT" + json.dumps(out), flush=True)
dist.barrier()  # nobody closes its sockets while a peer still reads: gloo aborts on that
dist.destroy_process_group()
'''


@needs_cluster
def test_all_gather_crosses_to_each_host_once(tmp_path: Path) -> None:
    """2 hosts x 2 ranks, chunks of several pieces (a ragged last one): the all-gather is exact,
    the groups know each member's host, and each chunk crosses the link once (link_model), not
    the 3 chunks per direction a ring over 4 ranks would send."""
    rows, hidden = 300, 512  # 600 KiB a chunk: 2 pieces of 256 KiB and a ragged one
    script = tmp_path / "gather.py"
    script.write_text(GATHER_PROGRAM)
    with Cluster(2, rate_mbit=1000, cores=[[0], [1 % len(cluster.os.sched_getaffinity(0))]]) as c:
        res = torchrun_on_hosts(c, 2, [str(script), str(rows), str(hidden)], timeout_s=120)
    _ok(res)
    outs = [json.loads(line[len("RESULT"):]) for r in res for line in r.stdout.splitlines()
            if line.startswith("RESULT")]
    assert len(outs) == 4 and all(o["equal"] for o in outs), outs
    assert all(o["hosts"] == [0, 0, 1, 1] for o in outs), outs
    crossed = sum(o["link"]["payload"] for o in outs if o["link"] is not None)
    chunk = rows * hidden * 4
    assert chunk > comm.PIECE_BYTES
    expected = crossing_bytes("all_gather", 3 * chunk, group=4, per_host=2)
    assert expected == 4 * chunk  # each of the 4 chunks crosses to the other host once
    assert abs(crossed / expected - 1) < 0.05, (crossed, expected)
