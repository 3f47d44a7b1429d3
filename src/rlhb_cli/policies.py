"""Policies as the pipeline leaves them: where each one is, how it is prompted, and its responses.

Every aligner writes `policy.json` beside its weights (its prompt condition); the SFT policy has none
and is behaviour-conditioned, so it is asked for the most preferred behaviour too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhb_cli.errors import RlhbError


def policy_meta(policy_dir: Path) -> dict:
    path = Path(policy_dir) / "policy.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"condition": "most_preferred"}


def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, greedy: bool, seed: int,
                       temperature: float = 1.0, batch_size: int = 32) -> list[dict]:
    """Responses to `prompts` (greedy, or sampled from a seeded generator): text, token count, ended with EOS."""
    from rlhb_cli.rl.engine import HFGenerator

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
