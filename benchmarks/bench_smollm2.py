"""SmolLM2-135M-Instruct against this machine's own limits, in one run: the fp32 matmul ceiling on the model's
shapes, a plain training step, and RLHB iterations on it (full weights with either critic, LoRA, LoRA with
--micro-batch-size) with the PPO update's achieved FLOP/s, the discriminator's share of the iteration (a MiniLM
discriminator, as the pretrained recipe uses) and generation tokens/s against plain `generate` and its floors;
then, with --scaling, how an iteration grows with prompts and new tokens. Skipped, with the reason, when `make
smollm2` has not installed the model.

FLOPs are counted, not measured: a token through a weight matrix of N entries costs 2N forward; a backward
costs 2x the forward with full weights (input and weight gradients) and 1x through frozen weights (LoRA: input
gradients only; the adapters' own arithmetic, under 4% of it, is left out); attention adds 4 x width x hidden
a token a layer forward. The LM head runs on the response positions only (the engine's `logits_to_keep`).

    python benchmarks/bench_smollm2.py [--run-dir DIR] [--scaling] | [--packing-ab N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import rlhb

from rlhb_cli.errors import RlhbError
from rlhb_cli.models.pretrained import local_model_dir

GOALS = {"update": 0.60, "generation": 4.0, "disc": 0.15}


def matmul_shapes(model) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(the decoder layers' weight shapes, the LM head's shape): every matrix a token goes through."""
    layers = [tuple(m.weight.shape) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    return layers, tuple(model.lm_head.weight.shape)


def ceiling(shapes: list[tuple[int, int]], tokens: int, backward: bool, repeats: int = 6) -> float:
    """FLOP/s of fp32 matrix products at the model's shapes on `tokens` rows (forward, or forward and backward
    with weight gradients), each distinct shape weighted by how often the model uses it; the best of `repeats`."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    flops = seconds = 0.0
    for (out, inp), count in counts.items():
        x = torch.randn(tokens, inp, requires_grad=backward)
        w = torch.randn(out, inp, requires_grad=backward)
        grad = torch.randn(tokens, out)
        best = float("inf")
        for _ in range(repeats + 1):
            started = time.perf_counter()
            y = F.linear(x, w)
            if backward:
                y.backward(grad)
            best = min(best, time.perf_counter() - started)
        flops += count * (6 if backward else 2) * tokens * out * inp
        seconds += count * best
    return flops / seconds


def read_bandwidth() -> float:
    """Bytes/s of a sum over 512 MB (larger than any cache): the rate at which decoding can read the weights."""
    data = torch.ones(128 * 1024 * 1024)
    data.sum()
    started = time.perf_counter()
    for _ in range(3):
        data.sum()
    return 3 * data.numel() * 4 / (time.perf_counter() - started)


def forward_flops(body: int, head: int, config, width: int, head_positions: int) -> float:
    """FLOPs of one sequence's forward: body matrices on every position, the LM head on `head_positions`."""
    attention = 4 * config.num_hidden_layers * config.hidden_size * width * width
    return 2 * body * width + 2 * head * head_positions + attention


def plain_step(model, ceiling_train: float, body: int, head: int) -> None:
    """One full-weight training step on 8 x 128 tokens: the model's own best case."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = torch.randint(100, 40000, (8, 128))
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    flops = 8 * 3 * forward_flops(body, head, model.config, 128, 128)
    achieved = flops / min(seconds)
    print(f"plain training step, 8 x 128 tokens, full weights: {min(seconds):.2f} s, {achieved / 1e9:.0f} GFLOP/s, "
          f"{achieved / ceiling_train:.0%} of the ceiling")


def build_run(run_dir: Path) -> None:
    """A small simulated run with a MiniLM discriminator (few rows: its speed, not its skill, is measured)."""
    print(f"building a benchmark run in {run_dir} (about a minute) ...", flush=True)
    rlhb("simulate-logs", "--run-dir", run_dir, "--queries", 60, "--eval-queries", 10, "--impressions", 60_000)
    rlhb("prepare-behaviors", "--run-dir", run_dir)
    rlhb("warmup-discriminator", "--run-dir", run_dir, "--backbone", "minilm", "--train-top-layers", 2,
         "--epochs", 1, "--max-train-rows", 128, "--max-length", 128)


def engine_for(run_dir: Path, name: str, prompts: int = 8, new_tokens: int = 32, **options):
    from rlhb_cli import rundir
    from rlhb_cli.config import build_config
    from rlhb_cli.rl.aligners import RLHBConfig, build_engine, rlhb_source_factory

    config = build_config(RLHBConfig, None, dict(
        init_from="smollm2", prompts_per_iteration=prompts, rollouts=1, max_new_tokens=new_tokens, ppo_epochs=2,
        minibatch_size=8, learning_rate=1e-5, iterations=10_000, sample_every=0, disc_steps=2) | options)
    with rundir.open_stage(run_dir / name, name, config, config.seed) as stage:
        engine, _, _ = build_engine(config, stage, rlhb_source_factory(config, stage), "RLHB")
        stage.set_summary({})
    return engine


def update_flops(engine, body: int, head: int) -> tuple[float, float]:
    """(FLOPs of the old-policy pass, FLOPs of the PPO update) of the engine's last iteration."""
    rollout, config = engine.last_rollout, engine.unwrapped.actor.config
    n, width, response = len(rollout.texts), rollout.prompt_ids.shape[1] + rollout.responses.shape[1], \
        rollout.responses.shape[1]
    actor = forward_flops(body, head, config, width, response + 1)
    critic_body = forward_flops(body, 0, config, width, 0) if engine.unwrapped.critic_body is not None else 0
    lora = engine.config.lora.r > 0
    old = n * (2 * actor + critic_body)  # actor (with the shared value head), reference, separate critic
    update = engine.config.ppo.epochs * n * ((2 if lora else 3) * actor + 3 * critic_body)
    return old, update


def time_engine(engine, iterations: int) -> list[dict]:
    engine.step()  # warm-up
    rows = []
    for _ in range(iterations):
        started = time.perf_counter()
        rows.append(engine.step() | {"time/iteration": time.perf_counter() - started})
    return rows


def engine_rows(run_dir: Path, ceiling_train: float, body: int, head: int, iterations: int) -> object:
    """RLHB on SmolLM2 in four settings: seconds, phases, the update's FLOP/s, the discriminator's share."""
    print(f"\nRLHB on SmolLM2 (8 prompts x 1 x <= 32 tokens, 2 PPO epochs of one mini-batch, MiniLM discriminator, "
          f"2 discriminator steps; median of {iterations} after one warm-up)")
    print(f"  {'':38s} {'iteration':>9s} {'generate':>8s} {'score':>6s} {'old':>6s} {'update':>7s} {'disc':>6s} "
          f"{'GFLOP/s':>8s} {'of ceiling':>10s} {'disc adds':>9s}")
    settings = (("full weights, separate critic (default)", {}),
                ("full weights, --critic shared", {"critic": "shared"}),
                ("LoRA r16 (the recipe's)", {"lora_r": 16}),
                ("LoRA r16, --micro-batch-size 2", {"lora_r": 16, "micro_batch_size": 2}),
                ("LoRA r16, --packed-generation", {"lora_r": 16, "packed_generation": True}))
    engine = None
    for number, (label, options) in enumerate(settings):
        del engine  # the previous engine's memory back before the next is built
        engine = engine_for(run_dir, f"bench-smollm2-{number}", **options)
        rows = time_engine(engine, iterations)
        median = {k: statistics.median(r.get(f"time/{k}", 0.0) for r in rows)
                  for k in ("iteration", "rollout", "score", "old_pass", "update", "disc")}
        _, flops = update_flops(engine, body, head)
        update = median["update"] - median["old_pass"]
        achieved = flops / update
        print(f"  {label:38s} {median['iteration']:9.1f} {median['rollout']:8.1f} {median['score']:6.2f} "
              f"{median['old_pass']:6.1f} {update:7.1f} {median['disc']:6.2f} {achieved / 1e9:8.0f} "
              f"{achieved / ceiling_train:10.0%} {median['disc'] / (median['iteration'] - median['disc']):9.1%}",
              flush=True)
    print(f"  goals: the update at >= {GOALS['update']:.0%} of the ceiling; the discriminator update adds "
          f"< {GOALS['disc']:.0%}")
    return engine


def generation(engine, ceiling_forward: float, bandwidth: float, body: int, head: int) -> None:
    """The engine's rollout against plain `generate` on the same prompts and what pays (a static KV cache,
    packed weights, a larger batch), each beside its arithmetic floor (every FLOP at the forward ceiling, the
    prompt's prefill included) and its bandwidth floor (every weight read once a decoding step)."""
    from transformers import GenerationConfig

    from rlhb_cli.models.generation import packed_linears
    rollout, model, tokenizer = engine.last_rollout, engine.unwrapped.actor, engine.tokenizer
    steps, rows, width = engine.config.max_new_tokens, len(rollout.texts), rollout.prompt_ids.shape[1]
    model.eval()
    print(f"\ngeneration: {rows} prompts ({width} tokens) x {steps} new tokens, sampled (every sequence to the "
          f"last step)")
    print(f"  {'':44s} {'seconds':>7s} {'tokens/s':>8s} {'x arithmetic floor':>18s} {'x bandwidth floor':>17s}")

    def show(label: str, seconds: float, batch: int) -> float:
        arithmetic = batch * (2 * body * (width + steps) + 2 * head * steps) / ceiling_forward
        weights = steps * (body + head) * 4 / bandwidth  # fp32; the LM head's matrix is the tied embedding
        print(f"  {label:44s} {seconds:7.2f} {batch * steps / seconds:8.1f} {seconds / arithmetic:18.1f} "
              f"{seconds / weights:17.1f}", flush=True)
        return seconds / arithmetic

    def plain(times: int = 1, packed: bool = False, **extra) -> float:
        ids, mask = rollout.prompt_ids.repeat(times, 1), rollout.prompt_mask.repeat(times, 1)
        config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=True, top_k=0, top_p=1.0,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
        best = float("inf")
        with torch.no_grad():
            for _ in range(2):  # a warm-up, then the timed one
                started = time.perf_counter()
                with packed_linears(model, len(ids)) if packed else contextlib.nullcontext():
                    model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                best = time.perf_counter() - started
        return best

    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        engine.rollout(rollout.queries, 1)
        seconds.append(time.perf_counter() - started)
    kind = "packed" if engine.config.packed_generation else "plain"
    print(f"  the engine's rollout ({kind}; stops when every answer has ended): {min(seconds):.2f} s, "
          f"{engine.last_rollout.responses.shape[1]} steps")
    show(f"plain generate, {rows} x {steps}", plain(), rows)
    show("  with a static KV cache", plain(cache_implementation="static"), rows)
    packed = show("  with packed weights (--packed-generation)", plain(packed=True), rows)
    show(f"plain generate, 4x the batch ({4 * rows} x {steps})", plain(4), 4 * rows)
    larger = show("  with packed weights", plain(4, packed=True), 4 * rows)
    print(f"  goal: generation within {GOALS['generation']:.0f}x its arithmetic floor (packed: {packed:.1f}x; "
          f"packed at 4x the batch: {larger:.1f}x)")


def packing_ab(folder: Path, repeats: int) -> None:
    """Plain against packed decoding of the same 8 chat prompts x 32 tokens, interleaved `repeats` times (the
    machine's drift hits both alike): the median of each and of the per-pair ratios."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhb_cli.models.generation import packed_linears
    from rlhb_cli.prompts import PromptFormat
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = PromptFormat("chat", tokenizer)
    queries = ["What is the capital of France?", "How do I peel garlic?", "Tell me a joke.", "Who wrote Walden?"] * 2
    encoded = tokenizer([prompt.prompt(q, "liked by many") for q in queries], return_tensors="pt", padding=True)
    options = dict(max_new_tokens=32, min_new_tokens=32, do_sample=True, top_k=0, top_p=1.0,
                   pad_token_id=tokenizer.pad_token_id)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        for round_ in range(repeats + 1):
            for packed in (False, True):
                started = time.perf_counter()
                with packed_linears(model, len(queries)) if packed else contextlib.nullcontext():
                    model.generate(**encoded, **options)
                if round_:  # the first round warms both up
                    seconds[packed].append(time.perf_counter() - started)
    ratios = sorted(a / b for a, b in zip(seconds[False], seconds[True]))
    print(f"\npacked decoding, 8 x 32 tokens, {repeats} interleaved pairs: plain {statistics.median(seconds[False]):.2f} s, "
          f"packed {statistics.median(seconds[True]):.2f} s; plain / packed per pair: median "
          f"{statistics.median(ratios):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}")


def scaling(run_dir: Path) -> None:
    """Seconds per LoRA iteration at 1x, 2x, 4x prompts and 32, 64, 128 new tokens (one after a warm-up)."""
    print("\nhow a LoRA r16 iteration grows (one iteration after a warm-up; the discriminator update included)")
    print(f"  {'prompts':>7s} {'new tokens':>10s} {'seconds':>8s} {'x base':>7s} {'mean length':>12s} "
          f"{'generate':>9s} {'update':>7s}")
    base = None
    for number, (prompts, new_tokens) in enumerate(((4, 32), (8, 32), (16, 32), (4, 64), (4, 128))):
        engine = engine_for(run_dir, f"bench-smollm2-scaling-{number}", prompts, new_tokens, lora_r=16,
                            minibatch_size=4)
        row = time_engine(engine, 1)[0]
        del engine
        base = base or row["time/iteration"]
        print(f"  {prompts:7d} {new_tokens:10d} {row['time/iteration']:8.1f} {row['time/iteration'] / base:7.2f} "
              f"{row['gen/length']:12.1f} {row['time/rollout']:9.1f} {row['time/update']:7.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="A run dir with a MiniLM warmup-discriminator (built there "
                        "if the directory does not exist; kept for the next run).")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--scaling", action="store_true", help="Also time iterations at more prompts and tokens.")
    parser.add_argument("--packing-ab", type=int, default=0, metavar="N",
                        help="Only plain against packed decoding, N interleaved pairs.")
    options = parser.parse_args()
    try:
        folder = local_model_dir("smollm2")
    except RlhbError as exc:
        print(f"bench_smollm2: skipped: {exc}")
        return
    if options.packing_ab:
        packing_ab(folder, options.packing_ab)
        return
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    layers, head_shape = matmul_shapes(model)
    body, head = sum(o * i for o, i in layers), head_shape[0] * head_shape[1]
    ceiling_train = ceiling(layers + [head_shape], 8 * 128, backward=True)
    ceiling_forward = ceiling(layers + [head_shape], 8 * 128, backward=False)
    bandwidth = read_bandwidth()
    print(f"SmolLM2-135M-Instruct, fp32, {torch.get_num_threads()} threads: {body / 1e6:.1f}M weights in the "
          f"decoder's matrices, {head / 1e6:.1f}M in the LM head")
    print(f"ceiling (matrix products at the model's shapes, 1024 rows): forward and backward "
          f"{ceiling_train / 1e9:.0f} GFLOP/s, forward {ceiling_forward / 1e9:.0f} GFLOP/s; "
          f"memory read {bandwidth / 1e9:.0f} GB/s")
    plain_step(model, ceiling_train, body, head)
    del model
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = options.run_dir or Path(tmp) / "run"
        if not run_dir.exists():
            build_run(run_dir)
        engine = engine_rows(run_dir, ceiling_train, body, head, options.iterations)
        generation(engine, ceiling_forward, bandwidth, body, head)
        del engine
        if options.scaling:
            scaling(run_dir)


if __name__ == "__main__":
    sys.exit(main())
