"""Generation, in one place for RL rollouts and evaluation: prompts in, responses cut after their first EOS.

`HFGenerator` wraps transformers' `generate` behind one interface (a faster backend such as vLLM would
implement `generate` alike); `generate_responses` answers a list of prompts from a seeded generator.
Every policy stage writes `policy.json` beside its weights: its prompt condition and format (prompts.py,
`policy_meta`).
"""

from __future__ import annotations

import contextlib
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


def check_packing(model) -> None:
    """Refuse `--packed-generation` where it cannot run: oneDNN's CPU kernels on float32 weights only."""
    weight = next(model.parameters())
    if not torch.backends.mkldnn.is_available() or weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise RlhbError(f"--packed-generation runs on a CPU with oneDNN and float32 weights; here the weights are "
                        f"{weight.dtype} on {weight.device} (oneDNN available: {torch.backends.mkldnn.is_available()})")


@contextlib.contextmanager
def packed_linears(model, rows: int):
    """Every linear layer of `model` through oneDNN's matrix product on weights reordered once for `rows` rows,
    for as long as the block runs. Decoding multiplies a few rows by every weight matrix at every token, where
    the plain kernel reads the weights slowly (measured in benchmarks/bench_smollm2.py); the packed one gives
    the same products up to float rounding. The weights must not change inside the block."""
    patched = []
    try:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), batch_size=rows)
                bias = None if module.bias is None else module.bias.detach()

                def forward(x, packed=packed, bias=bias):
                    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
                patched.append((module, module.__dict__.get("forward")))
                module.forward = forward
        yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own


class HFGenerator:
    """Generation behind one interface (a faster backend such as vLLM would implement `generate` alike)."""

    def __init__(self, tokenizer, max_new_tokens: int, temperature: float, packed: bool = False):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.packed = packed

    @torch.no_grad()
    def generate(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=not greedy, temperature=None if greedy else self.temperature,
            top_k=None if greedy else 0, top_p=None if greedy else 1.0, use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if self.packed:
            check_packing(model)
        was_training = model.training
        model.eval()
        with packed_linears(model, len(prompt_ids)) if self.packed else contextlib.nullcontext():
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
                       temperature: float = 1.0, batch_size: int = 32, packed: bool = False) -> list[dict]:
    """Responses to `prompts` (greedy, or sampled from a seeded generator): text, token count, ended with EOS."""
    if tokenizer.eos_token_id is None:
        raise RlhbError("the policy's tokenizer has no EOS token")
    tokenizer.padding_side = "left"
    generator = HFGenerator(tokenizer, max_new_tokens, temperature, packed)
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
