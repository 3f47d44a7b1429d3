"""Generation, in one place for RL rollouts and evaluation: prompts in, responses cut after their first EOS.

`HFGenerator` wraps transformers' `generate` behind one interface (a faster backend such as vLLM would
implement `generate` alike); `generate_responses` answers a list of prompts from a seeded generator.
Every policy stage writes `policy.json` beside its weights: its prompt condition and format (prompts.py,
`policy_meta`).
"""

from __future__ import annotations

import warnings

import torch
from transformers import GenerationConfig

from rlhb_cli.errors import RlhbError

with warnings.catch_warnings():  # trl marks these helpers experimental; they are what we want
    warnings.simplefilter("ignore")
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from trl.experimental.utils import first_true_indices, truncate_right


def response_mask(responses: torch.Tensor, eos_token_id: int, pad_token_id: int):
    """(responses with padding after the first EOS, mask incl. the EOS, lengths, ended with EOS)."""
    truncated, mask = truncate_right(responses, [eos_token_id], pad_token_id)
    first_eos = first_true_indices(responses == eos_token_id)
    ended = first_eos < responses.shape[1]
    lengths = torch.where(ended, first_eos + 1, torch.full_like(first_eos, responses.shape[1]))
    return truncated, mask, lengths, ended


class HFGenerator:
    """Generation behind one interface (a faster backend such as vLLM would implement `generate` alike)."""

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    @torch.no_grad()
    def generate(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=not greedy, temperature=None if greedy else self.temperature,
            top_k=None if greedy else 0, top_p=None if greedy else 1.0, use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        was_training = model.training
        model.eval()
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        model.train(was_training)
        return out[:, prompt_ids.shape[1]:]

    def decode(self, raw: torch.Tensor):
        """(responses padded after EOS, mask incl. EOS, lengths, ended with EOS, texts) of generated ids."""
        pad = self.tokenizer.pad_token_id
        responses, mask, lengths, ended = response_mask(raw, self.tokenizer.eos_token_id, pad)
        texts = self.tokenizer.batch_decode(responses * mask + pad * (1 - mask), skip_special_tokens=True)
        return responses, mask, lengths, ended, [t.strip() for t in texts]


def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, greedy: bool, seed: int,
                       temperature: float = 1.0, batch_size: int = 32) -> list[dict]:
    """Responses to `prompts` (greedy, or sampled from a seeded generator): text, token count, ended with EOS."""
    if tokenizer.eos_token_id is None:
        raise RlhbError("the policy's tokenizer has no EOS token")
    tokenizer.padding_side = "left"
    generator = HFGenerator(tokenizer, max_new_tokens, temperature)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], padding=True, return_tensors="pt")
            raw = generator.generate(model, encoded["input_ids"], encoded["attention_mask"], greedy)
            _, _, lengths, ended, texts = generator.decode(raw)
            out += [{"response": t, "tokens": int(n), "ended": bool(e)}
                    for t, n, e in zip(texts, lengths.tolist(), ended.tolist())]
    finally:
        torch.set_rng_state(state)
    return out
