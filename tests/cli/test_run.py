"""`flashcomm run` and `flashcomm demo` as a user runs them: outputs, prompts, and bad inputs
(exit code 2, one line naming the knob or file, no traceback, before any rank starts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROMPTS

from flashcomm import cli
from flashcomm.config import FlashCommConfig
from flashcomm.models.engine import Engine
from flashcomm.models.random_checkpoint import small_llama_config, write_checkpoint
from flashcomm.plan.auto import auto_min_tokens, load_profile

NEW_TOKENS = 32
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            head_dim=16, max_position_embeddings=64)


def _flashcomm(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flashcomm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 layers, byte-level tokenizer, max_position_embeddings = 64."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), small_llama_config(**TINY))


@pytest.fixture(scope="module")
def qwen2_reference(hf_checkpoints) -> list[list[int]]:
    """Greedy tokens of the single-process model (itself checked against transformers)."""
    engine = Engine.from_checkpoint(hf_checkpoints["qwen2"], FlashCommConfig(), progress=False)
    return engine.generate(PROMPTS, NEW_TOKENS).tokens


def test_run_cli_json(hf_checkpoints, qwen2_reference) -> None:
    ids = [",".join(map(str, p)) for p in PROMPTS]
    out = _flashcomm("run", "--model", str(hf_checkpoints["qwen2"]), "--nproc", "2",
                     "--attn-out", "flashcomm2", "--layer-sharding", "o_proj", "--prefetch-step",
                     "1", "--flashcomm1", "--token-ids", *ids, "--max-new-tokens",
                     str(NEW_TOKENS), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["tokens"] == qwen2_reference
    assert d["text"] is None  # transformers' save_pretrained wrote no tokenizer.json
    assert d["prefill_ms"] > 0 and d["decode_ms_per_token"] > 0
    w = 64 * 64 * 4  # qwen2 test model: H = D = 64, fp32; 5 layers over a shard group of 2
    for rank, r in enumerate(d["ranks"]):
        assert r["o_proj_bytes"] == ((3, 2)[rank] + 1 + 1) * w  # owned layers + k + 1
        assert r["weight_bytes"] > r["o_proj_bytes"] and r["comm_bytes"] > 0
        assert r["blocked_wait_ms"] >= 0


def test_run_cli_attn_out_auto(hf_checkpoints, qwen2_reference) -> None:
    ids = [",".join(map(str, p)) for p in PROMPTS]
    out = _flashcomm("run", "--model", str(hf_checkpoints["qwen2"]), "--nproc", "2",
                     "--attn-out", "auto", "--profile", "pcie-gen4", "--token-ids", *ids,
                     "--max-new-tokens", str(NEW_TOKENS), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["tokens"] == qwen2_reference
    cfg = FlashCommConfig(tp=2, flashcomm2_otp=1, flashcomm2_min_tokens="auto")
    want = auto_min_tokens(64, 64, cfg, load_profile("pcie-gen4"), 4)
    assert d["auto"]["flashcomm2_min_tokens"] == want and d["auto"]["profile"]["name"] == \
        "pcie-gen4"
    for r in d["ranks"]:  # both paths share FlashComm2's one resident W_o
        assert r["o_proj_bytes"] == 5 * 64 * 64 * 4


def test_demo_prints_identical_rows(tiny: Path) -> None:
    out = _flashcomm("demo", "--model", str(tiny), "--nproc", "4", "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    labels = ("allreduce", "fc2", "fc2+fc1", "fc2+oshard(k=1)", "fc2+gather(k=1)",
              "auto+gather(k=1)", "fc2(otp=2)")
    rows = [line for line in out.stdout.splitlines() if line.split(" ")[0] in labels]
    assert len(rows) == 7 and all("identical" in r for r in rows), out.stdout


def test_every_prompt_is_kept(tiny: Path, tmp_path: Path, capsys) -> None:
    lines = tmp_path / "prompts.txt"
    lines.write_text("from a file\n\nsecond line\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "json one"}\n{"prompt": "naïve café", "id": 7}\n')
    rc = cli.main(["run", "--model", str(tiny), "--prompt", "a", "bc", "--prompt", "d",
                   "--prompt-file", str(lines), "--prompt-file", str(jsonl),
                   "--max-new-tokens", "3", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    texts = ["a", "bc", "d", "from a file", "second line", "json one", "naïve café"]
    engine = Engine.from_checkpoint(tiny, FlashCommConfig(), progress=False)
    ids = engine.encode(texts)
    assert ids[6] == list("naïve café".encode())
    ref = engine.generate(ids, 3)
    assert d["tokens"] == ref.tokens and d["text"] == ref.text and len(d["tokens"]) == 7


def _bad_prompt_file(tmp_path: Path) -> str:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    return str(f)


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "/nonexistent", "--tp", "2"], "/nonexistent/config.json"),
    (["run", "--max-new-tokens", "-1", "--prompt", "hi"], "max_new_tokens=-1: must be >= 1"),
    (["run", "--prompt", "hi", "--prompt", ""], "prompt 1 is empty"),
    (["run", "--nproc", "3", "--attn-out", "flashcomm2", "--prompt", "hi"],
     "tp=3 (--nproc): this model splits over tp in [1, 2, 4]"),
    (["run", "--nproc", "2", "--prompt", "0123456789", "--max-new-tokens", "55"],
     "prompt 0: 10 tokens + max_new_tokens=55 = 65 is longer than the model's "
     "max_position_embeddings=64"),
    (["run", "--nproc", "2", "--attn-out", "auto", "--flashcomm2-min-tokens", "5",
      "--token-ids", "1,2"], "flashcomm2_min_tokens=5 (--flashcomm2-min-tokens"),
    (["run", "--nproc", "2", "--attn-out", "auto", "--profile", "nope", "--prompt", "hi"],
     "profile='nope'"),
    (["run", "--prompt-file", "BAD", "--prompt", "hi"], "bad.jsonl:2: expected"),
    (["run", "--prompt", "hi", "--token-ids", "1,2"], "token_ids: pass either"),
    (["run", "--nproc", "2"], "prompt: none given"),
])
def test_bad_input_exits_2_with_one_line(tiny: Path, tmp_path: Path, capsys, argv: list[str],
                                         message: str) -> None:
    argv = [a.replace("BAD", _bad_prompt_file(tmp_path)) for a in argv]
    if argv[0] == "run":
        argv[1:1] = ["--model", str(tiny)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err
    assert "loading" not in err  # no rank started (rank 0 would show its loading bar)


def test_bad_input_has_no_traceback(tiny: Path) -> None:
    out = _flashcomm("run", "--model", str(tiny), "--nproc", "2", "--prompt", "")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "flashcomm run: error: prompt 0 is empty: every prompt needs at least " \
        "one token\n"


def test_bad_checkpoint_reported_before_spawning(hf_checkpoints, tmp_path: Path) -> None:
    import shutil

    ck = tmp_path / "unknown"
    shutil.copytree(hf_checkpoints["llama"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    out = _flashcomm("run", "--model", str(ck), "--nproc", "2", "--attn-out", "flashcomm2",
                     "--token-ids", "1,2,3", "--max-new-tokens", "2")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert f"{ck / 'config.json'}: model_type='falcon' is not supported" in out.stderr
