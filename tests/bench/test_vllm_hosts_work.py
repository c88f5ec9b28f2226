"""flashcomm.bench.vllm_hosts_work: the strategies' knobs and the workloads of vllm_hosts, with
--in-instance the threshold between a prompt of T and one of T - 1 exact token ids."""

from __future__ import annotations

import pytest

from flashcomm.bench.vllm_hosts_work import exact_prompts, strategy_env, workloads


class WordTokenizer:
    """The random Llama's tokenizer in miniature: one id per word, no BOS."""

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]


class Engine:
    def get_tokenizer(self) -> WordTokenizer:
        return WordTokenizer()


def test_in_instance_workloads_are_exactly_t_and_t_minus_1_tokens():
    work = workloads(64, gen_prompts=2, gen_tokens=4, in_instance=True)
    assert set(work) == {"prefill", "generate", "prefill_below"}
    full = exact_prompts(Engine(), work["prefill"])[0]["prompt_token_ids"]
    below = exact_prompts(Engine(), work["prefill_below"])[0]["prompt_token_ids"]
    assert (len(full), len(below)) == (64, 63) and below == full[:-1]
    assert exact_prompts(Engine(), work["generate"]) == work["generate"]["prompts"]
    assert "prefill_below" not in workloads(64, 2, 4)


def test_exact_prompts_refuses_a_text_too_short():
    with pytest.raises(ValueError, match="fewer than 9"):
        exact_prompts(Engine(), {"prompts": ["w1 w2"], "tokens": 9})


def test_threshold_at_t_only_for_flashcomm2_without_its_own():
    assert strategy_env("fc2", 2048, True)["FLASHCOMM2_MIN_TOKENS"] == "2048"
    assert strategy_env("fc2_int8", 2048, True)["FLASHCOMM_COMM_DTYPE"] == "int8"
    assert strategy_env("auto", 2048, True)["FLASHCOMM2_MIN_TOKENS"] == "auto"
    assert strategy_env("stock", 2048, True) == {}
    assert "FLASHCOMM2_MIN_TOKENS" not in strategy_env("fc2", 2048, False)
