"""SmolLM2-135M-Instruct on this machine: seconds per full-weight training step, per evaluation forward and per
sampled generation, the figures that set a pretrained recipe's budget (docs/results.md). Skipped, with the
reason, when `make smollm2` has not installed the model."""

from __future__ import annotations

import json
import sys
import time

import torch

from rlhb_cli.errors import RlhbError
from rlhb_cli.models.pretrained import local_model_dir


def main() -> None:
    try:
        folder = local_model_dir("smollm2")
    except RlhbError as exc:
        print(f"bench_smollm2: skipped: {exc}")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = torch.randint(100, 40000, (8, 128))
    steps = []
    for _ in range(3):
        started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(round(time.perf_counter() - started, 1))
    model.eval()
    with torch.no_grad():
        started = time.perf_counter()
        model(input_ids=torch.randint(100, 40000, (64, 128)))
        forward = round(time.perf_counter() - started, 1)
        prompt = tokenizer(["What is the capital of France?"] * 8, return_tensors="pt")
        started = time.perf_counter()
        model.generate(**prompt, max_new_tokens=48, min_new_tokens=48, do_sample=True,
                       pad_token_id=tokenizer.pad_token_id)
        generate = round(time.perf_counter() - started, 1)
    print(json.dumps({"threads": torch.get_num_threads(), "train_step_8x128_s": steps,
                      "eval_forward_64x128_s": forward, "generate_8x48_s": generate}))


if __name__ == "__main__":
    sys.exit(main())
