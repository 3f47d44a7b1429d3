"""log p(response | prompt) under a causal LM: evaluate's perplexity on logged answers and KL to the baseline.

Text in, so any tokenizer works. A forward pass holds rows x length x vocabulary floats of logits: 32 long
OpenAssistant replies under SmolLM2's 49k-token vocabulary would be some 12 GB and minutes per batch on a CPU, so
rows are batched by a budget of logits, longest first, and a long logged answer can be scored on a window:
its prompt's last and its own first `max_tokens` tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from trl.trainer.utils import selective_log_softmax

from rlhb_cli.prompts import PromptFormat

LOGITS_BUDGET = 2 ** 28  # float32 logits per forward pass: 1 GiB


def windowed_ids(tokenizer, prompt: PromptFormat, prompt_text: str, response: str, max_tokens: int = 0):
    """(token ids of prompt + response + EOS, how many of them are the prompt's), cut to the window."""
    ids = tokenizer(prompt_text + prompt.completion(response) + tokenizer.eos_token)["input_ids"]
    n = max(len(tokenizer(prompt_text)["input_ids"]), 1)  # the first token is never scored
    if max_tokens:
        start = max(n - max_tokens, 0)
        ids, n = ids[start:n + max_tokens], n - start
    return ids, n


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompt: PromptFormat, prompts: list[str], responses: list[str],
                      max_tokens: int = 0, logits_budget: int = LOGITS_BUDGET) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the sum of log p(response tokens and EOS | prompt), and how many tokens that sum covers."""
    rows = [windowed_ids(tokenizer, prompt, p, r, max_tokens) for p, r in zip(prompts, responses)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    vocabulary = model.config.vocab_size
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    device = next(model.parameters()).device
    start = 0
    while start < len(order):
        width = len(rows[order[start]][0])  # the longest row of the batch: the first, as they are sorted
        size = max(1, min(len(order) - start, logits_budget // max(width * vocabulary, 1)))
        batch = order[start:start + size]
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width - 1))
        for row, i in enumerate(batch):
            tokens, n = rows[i]
            ids[row, :len(tokens)] = torch.tensor(tokens)
            attention[row, :len(tokens)] = 1
            scored[row, n - 1:len(tokens) - 1] = 1  # position j predicts token j + 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
        token_logprobs = selective_log_softmax(logits.float(), ids[:, 1:].to(device)).cpu()
        sums[batch] = (token_logprobs * scored).sum(1).double().numpy()
        counts[batch] = scored.sum(1).long().numpy()
        start += size
    return sums, counts
