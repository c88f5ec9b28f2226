"""vLLM's OpenAI-compatible server with the plugin: TP=2, default (compiled) mode, tiny Llama.

The README's serving command (tests/doc_commands.py): stock (no FLASHCOMM variable) and with the
plugin (the shown knobs plus O-Shard k=1 and a per-step threshold of 8) run in turn on
127.0.0.1, in one compile-cache root, each queried with the `openai` client: /v1/completions with
the 4 prompts greedy, then a concurrent burst. Completions must be equal; each server must shut
down on SIGINT with no process of its session left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# "vllm" alone would resolve to this tests/vllm directory when vLLM is not installed
pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from doc_commands import doc_argv, doc_command  # noqa: E402

SHOWN = doc_command("README.md", "FLASHCOMM2_PARALLEL_SIZE=1")
"""The README's serving line; docs/vllm-plugin.md shows the same one."""
SHOWN_ENV = doc_argv(SHOWN, DIR="DIR")[0]
# on top of the shown knobs: O-Shard k=1 and a threshold of 8, so both per-step paths run
PLUGIN_ENV = {**SHOWN_ENV, "FLASHCOMM_LAYER_SHARDING": "o_proj", "FLASHCOMM_PREFETCH_STEP": "1",
              "FLASHCOMM2_MIN_TOKENS": "8"}
START_TIMEOUT_S = 420
BURST = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(model: Path, port: int) -> list[str]:
    """The serving command of README.md, on the tiny model, on a free port, small limits."""
    assert doc_command("docs/vllm-plugin.md", "FLASHCOMM2_PARALLEL_SIZE=1") == SHOWN
    argv = doc_argv(SHOWN, DIR=str(model))[1]
    assert argv[0] == "python" and "--port" in argv
    return [sys.executable, *argv[1:], "--port", str(port),
            "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "128",
            "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0",
            "--distributed-executor-backend", "mp"]


def _wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n"
                                 f"{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"server not ready in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (the server and every worker it spawned)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return out


def serve_and_query(model: Path, env: dict[str, str], tmp: Path, name: str) -> dict:
    """Start a server with `env`, query it, stop it; completions, log, leftover processes."""
    from openai import OpenAI
    from tiny_llama import prompts

    port, log = _free_port(), tmp / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCOMM")}
    full_env.update(env, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
                    VLLM_CACHE_ROOT=str(tmp / "cache"))
    with open(log, "w") as f:
        proc = subprocess.Popen(_server_command(model, port), env=full_env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    try:
        _wait_ready(proc, port, log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
        batch = client.completions.create(model="tiny", prompt=prompts(), max_tokens=8,
                                          temperature=0.0, seed=0)
        texts = [c.text for c in sorted(batch.choices, key=lambda c: c.index)]
        burst_prompts = [prompts()[i % 4] for i in range(BURST)]

        def one(p: str) -> str:
            r = client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0.0)
            return r.choices[0].text

        with ThreadPoolExecutor(BURST) as pool:
            burst = list(pool.map(one, burst_prompts))
    finally:
        proc.send_signal(signal.SIGINT)  # graceful shutdown, as Ctrl-C
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 30
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(1)
    left = _session_pids(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    return {"texts": texts, "burst": burst, "burst_prompts": burst_prompts, "left": left,
            "returncode": proc.returncode, "log": log.read_text()}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """The tiny model served stock, then with the plugin, in one cache root."""
    sys.path.insert(0, str(HERE))
    from tiny_llama import build_tiny_llama

    tmp = tmp_path_factory.mktemp("server")
    model = build_tiny_llama(tmp / "tiny", num_layers=5)
    return {name: serve_and_query(model, env, tmp, name)
            for name, env in (("stock", {}), ("plugin", PLUGIN_ENV))}


@pytest.mark.timeout(1500)
def test_server_completions_equal_stock(served):
    stock, plugin = served["stock"], served["plugin"]
    assert len(set(stock["texts"])) == 4 and all(stock["texts"])
    assert plugin["texts"] == stock["texts"]
    by_prompt = dict(zip(stock["burst_prompts"], stock["burst"], strict=True))
    assert plugin["burst"] == [by_prompt[p] for p in plugin["burst_prompts"]]
    assert stock["burst"][:4] == stock["texts"]  # the burst's prompts are the batch's again
    for rank in (0, 1):  # after compilation, the ops ran on both paths of the per-step choice
        for path in ("FlashComm2", "row-parallel"):
            assert f"flashcomm: rank {rank} first {path} o_proj step" in plugin["log"], path
    assert "flashcomm: rank" not in stock["log"]


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", ["stock", "plugin"])
def test_server_shuts_down_clean(served, name):
    res = served[name]
    assert res["left"] == [], f"processes left after shutdown: {res['left']}"
    assert res["returncode"] in (0, -signal.SIGINT), res["log"][-3000:]
