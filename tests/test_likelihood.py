"""log p(response | prompt): batched by a logits budget, windowed for long logged answers, equal to the plain sum."""

import numpy as np
import pytest
import torch

from rlhb_cli.models.likelihood import sequence_logprobs, windowed_ids
from rlhb_cli.models.load import TinyModelSpec, tiny_llama_config
from rlhb_cli.models.tokenizer import train_tokenizer
from rlhb_cli.prompts import PromptFormat

WORDS = "how do i stake ada the wallet shows a pending reward after two epochs why is my node out of sync".split()


@pytest.fixture(scope="module")
def policy():
    from transformers import LlamaForCausalLM
    tokenizer = train_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(TinyModelSpec(hidden_size=32, layers=1, heads=2,
                                                             intermediate_size=64), tokenizer)).eval()
    return model, tokenizer


def one_by_one(model, ids: list[int], n: int) -> float:
    """The plain sum, one unpadded row: log p(ids[n:] | ids[:n])."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
    return float(sum(logprobs[j - 1, ids[j]] for j in range(n, len(ids))))


def texts(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(WORDS, rng.integers(1, 12))) + "?" for _ in range(count)]
    responses = [" ".join(rng.choice(WORDS, rng.integers(1, 30))) for _ in range(count)]
    return prompts, responses


def test_batched_sums_equal_the_plain_sums_whatever_the_budget(policy):
    model, tokenizer = policy
    fmt = PromptFormat("plain", tokenizer)
    prompts, responses = texts(9)
    expected = [one_by_one(model, *windowed_ids(tokenizer, fmt, p, r)) for p, r in zip(prompts, responses)]
    counts = [len(tokenizer(fmt.completion(r))["input_ids"]) + 1 for r in responses]  # the response and its EOS
    for budget in (1, 40 * model.config.vocab_size, 2 ** 28):  # one row a pass, a few, all at once
        sums, scored = sequence_logprobs(model, tokenizer, fmt, prompts, responses, logits_budget=budget)
        np.testing.assert_allclose(sums, expected, rtol=1e-4, atol=1e-4)
        assert scored.tolist() == counts


def test_a_long_answer_is_scored_on_its_window(policy):
    model, tokenizer = policy
    fmt = PromptFormat("plain", tokenizer)
    prompt, response = " ".join(WORDS * 2) + "?", " ".join(WORDS * 3)
    ids, n = windowed_ids(tokenizer, fmt, prompt, response)
    assert n > 8 and len(ids) - n > 8
    window, kept = windowed_ids(tokenizer, fmt, prompt, response, max_tokens=8)
    assert kept == 8 and window == ids[n - 8:n + 8]  # the prompt's last 8 tokens, the answer's first 8
    sums, scored = sequence_logprobs(model, tokenizer, fmt, [prompt, "why?"], [response, "ada"], max_tokens=8)
    short, short_prompt = windowed_ids(tokenizer, fmt, "why?", "ada")
    assert scored.tolist() == [8, len(short) - short_prompt]  # a short pair is scored whole
    assert sums[0] == pytest.approx(one_by_one(model, window, kept), abs=1e-4)
    whole, _ = sequence_logprobs(model, tokenizer, fmt, [prompt], [response])
    assert whole[0] < sums[0]  # the whole answer is more tokens, each of negative log-probability


def test_nothing_to_score(policy):
    model, tokenizer = policy
    sums, scored = sequence_logprobs(model, tokenizer, PromptFormat("plain", tokenizer), [], [])
    assert sums.shape == scored.shape == (0,)
