"""One RLHB iteration against one trl GRPOTrainer cycle, side by side in one process, on the same tiny model and
the same prompts; then how an iteration's cost grows with prompts, new tokens and processes.

RLHB: 16 prompts x 1 response of up to 32 new tokens, 4 PPO epochs (4 optimizer steps), critic, reward from
the discriminator, and its update. GRPO: 16 completions (4 prompts x 4) of up to 32 tokens, num_iterations=4
(one generation reused for 4 optimizer steps), beta=0.05 (a reference model too), on the prompts the RLHB
engine writes (its behaviour condition included). Both are timed as the median over `--repeats` cycles after
one warm-up cycle, interleaved (after each GRPO cycle, one iteration of each RLHB variant), with the median of
the per-round ratios beside each ratio of medians, and split into phases (generation; scoring and the
old-policy pass; the update). Work, counting a forward pass as one unit and a backward as two: GRPO's cycle
14 (old and reference log-probabilities, then 4 x forward and backward), RLHB's with a separate critic 27,
with `--critic shared` 14 (the equal-work comparison), each RLHB iteration plus the discriminator's scoring.

    python benchmarks/bench_rl.py [--run-dir DIR] [--repeats 7] [--no-scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from common import rlhb  # noqa: E402

NEW_TOKENS = 32
# (name, critic, discriminator steps): each RLHB variant timed; the two critics share one engine each
VARIANTS = (("separate", "separate", 2), ("separate_no_disc", "separate", 0),
            ("shared", "shared", 2), ("shared_no_disc", "shared", 0))
WORK = {"separate": 27, "shared": 14, "grpo": 14}


def build_run(run_dir: Path) -> None:
    """A small simulated run with the demo's policy size and a discriminator on the SFT body."""
    print(f"building a benchmark run in {run_dir} (about a minute) ...", flush=True)
    rlhb("simulate-logs", "--run-dir", run_dir, "--queries", 120, "--eval-queries", 20, "--impressions", 300_000)
    rlhb("prepare-behaviors", "--run-dir", run_dir)
    rlhb("train-sft", "--run-dir", run_dir, "--epochs", 1, "--max-train-rows", 2000)
    rlhb("warmup-discriminator", "--run-dir", run_dir, "--epochs", 1, "--max-train-rows", 1000)


def build_engine(run_dir: Path, critic: str, prompts: int = 16, new_tokens: int = NEW_TOKENS):
    """An RLHB engine as train-rlhb builds it (in a stage of its own), after one warm-up iteration."""
    from rlhb_cli import rundir
    from rlhb_cli.config import build_config
    from rlhb_cli.rl.aligners import RLHBConfig, build_engine as build, rlhb_source_factory

    config = build_config(RLHBConfig, None, dict(
        prompts_per_iteration=prompts, rollouts=1, max_new_tokens=new_tokens, ppo_epochs=4, minibatch_size=16,
        iterations=10_000, sample_every=0, disc_steps=2, critic=critic))
    name = f"bench-rlhb-{critic}-{prompts}x{new_tokens}"
    with rundir.open_stage(run_dir / name, name, config, config.seed) as stage:
        engine, _, _ = build(config, stage, rlhb_source_factory(config, stage), "RLHB")
        stage.set_summary({})
    engine.step()
    return engine


def rlhb_round(engines: dict, rows: dict[str, list[dict]]) -> None:
    """One iteration of each RLHB variant: its wall time and the engine's own phase times."""
    for name, critic, disc_steps in VARIANTS:
        engine = engines[critic]
        engine.source.settings.steps = disc_steps
        started = time.perf_counter()
        row = engine.step()
        rows.setdefault(name, []).append(row | {"time/iteration": time.perf_counter() - started})


def timed(owner, method: str, into: list[float]) -> None:
    """Wrap `owner.method` so each call's seconds are appended to `into`."""
    original = getattr(owner, method)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - started)
    setattr(owner, method, wrapper)


def side_by_side(run_dir: Path, repeats: int) -> tuple[dict[str, list[dict]], dict[str, list[float]]]:
    """RLHB rows per variant and GRPO's phase times, interleaved: after each GRPO cycle of 4 optimizer steps one
    iteration of each RLHB variant runs, so drift of the machine hits all alike."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhb_cli.stages.common import trl_config

    engines = {critic: build_engine(run_dir, critic) for critic in ("separate", "shared")}
    engine = engines["shared"]
    prompts = datasets.Dataset.from_dict(
        {"prompt": [engine.prompt_format.prompt(q, engine.behavior_of(q)) for q in engine.train_queries]})

    def length_reward(completions, **kwargs):
        return [float(len(c)) / 100 for c in completions]

    cycle = 4  # optimizer steps per generation: num_iterations=4, one batch per generation
    rows: dict[str, list[dict]] = {}
    grpo: dict[str, list[float]] = {"cycle": [], "generation": [], "before_update": []}

    class Interleave(TrainerCallback):
        cycle_started: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % cycle:
                return
            if self.cycle_started is not None:  # the first cycle is GRPO's warm-up
                grpo["cycle"].append(time.perf_counter() - self.cycle_started)
                rlhb_round(engines, rows)
            self.cycle_started = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = trl_config(GRPOConfig, output_dir=out, per_device_train_batch_size=16, num_generations=4,
                          max_completion_length=NEW_TOKENS, num_iterations=4, beta=0.05, learning_rate=1e-5,
                          max_steps=cycle * (repeats + 1), logging_steps=10_000, save_strategy="no", seed=0)
        trainer = GRPOTrainer(model=str(run_dir / "train-sft" / "policy"), reward_funcs=length_reward, args=args,
                              train_dataset=prompts, processing_class=engine.tokenizer, callbacks=[Interleave()])
        timed(trainer, "_generate", grpo["generation"])
        timed(trainer, "_generate_and_score_completions", grpo["before_update"])
        trainer.train()
    for key in ("generation", "before_update"):
        grpo[key] = grpo[key][1:]  # the warm-up cycle's
    return rows, grpo


def report_side_by_side(rows: dict[str, list[dict]], grpo: dict[str, list[float]], repeats: int) -> None:
    median = statistics.median
    iteration = {name: [r["time/iteration"] for r in rows[name]] for name, _, _ in VARIANTS}

    def ratio(key: str, reference: list[float]) -> str:
        """Ratio of medians, and the median of the per-round ratios (each pair ran back to back)."""
        pairs = sorted(a / b for a, b in zip(iteration[key], reference))
        return (f"{median(iteration[key]) / median(reference):5.2f}   (per round {median(pairs):4.2f}, "
                f"range {pairs[0]:4.2f}-{pairs[-1]:4.2f})")

    print(f"\nseconds per cycle (median of {repeats}; 16 responses x <= {NEW_TOKENS} tokens, 4 optimizer steps; "
          f"same prompts)")
    print(f"  {'':44s} {'cycle':>7s} {'generate':>9s} {'score+old':>10s} {'update':>7s} {'disc':>6s}")
    for name, critic, steps in VARIANTS:
        phase = {k: median([r.get(f"time/{k}", 0.0) for r in rows[name]])
                 for k in ("rollout", "score", "old_pass", "update", "disc")}
        label = f"RLHB, {critic} critic" + ("" if steps else ", no discriminator update")
        print(f"  {label:44s} {median(iteration[name]):7.3f} {phase['rollout']:9.3f} "
              f"{phase['score'] + phase['old_pass']:10.3f} {phase['update'] - phase['old_pass']:7.3f} "
              f"{phase['disc']:6.3f}")
    generation, before = median(grpo["generation"]), median(grpo["before_update"])
    print(f"  {'trl GRPOTrainer (num_iterations=4, beta=0.05)':44s} {median(grpo['cycle']):7.3f} {generation:9.3f} "
          f"{before - generation:10.3f} {median(grpo['cycle']) - before:7.3f}")
    lengths = median([r["gen/length"] for r in rows["shared_no_disc"]])
    print(f"  RLHB responses {lengths:.1f} tokens on average")
    print(f"equal work: RLHB --critic shared, no discriminator update / GRPO "
          f"{ratio('shared_no_disc', grpo['cycle'])}   goal <= 1.00")
    print(f"RLHB separate critic, no discriminator update / GRPO  {ratio('separate_no_disc', grpo['cycle'])}   "
          f"goal < {WORK['separate'] / WORK['grpo']:.2f} (its work ratio 27/14)")
    print(f"RLHB separate critic + discriminator update / GRPO    {ratio('separate', grpo['cycle'])}")
    print(f"RLHB shared critic + discriminator update / GRPO      {ratio('shared', grpo['cycle'])}")
    print(f"discriminator update, with / without, separate critic {ratio('separate', iteration['separate_no_disc'])}"
          f"   goal < 1.15")
    print(f"discriminator update, with / without, shared critic   {ratio('shared', iteration['shared_no_disc'])}"
          f"   goal < 1.15")


def scaling(run_dir: Path, repeats: int) -> None:
    """Seconds per default RLHB iteration (separate critic, discriminator update) at 1x, 2x and 4x prompts and at
    32, 64 and 128 new tokens: each from a fresh engine, median of `repeats` after one warm-up."""
    print(f"\nhow an iteration grows (separate critic + discriminator update; median of {repeats})")
    print(f"  {'prompts':>7s} {'new tokens':>10s} {'seconds':>8s} {'x base':>7s} {'mean length':>12s} "
          f"{'generate':>9s} {'update':>7s} {'disc':>6s}")
    base = None
    for prompts, new_tokens in ((16, 32), (32, 32), (64, 32), (16, 64), (16, 128)):
        engine = build_engine(run_dir, "separate", prompts, new_tokens)
        seconds, rows = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            rows.append(engine.step())
            seconds.append(time.perf_counter() - started)
        value = statistics.median(seconds)
        base = base or value
        phase = {k: statistics.median([r.get(f"time/{k}", 0.0) for r in rows]) for k in ("rollout", "update", "disc")}
        print(f"  {prompts:7d} {new_tokens:10d} {value:8.3f} {value / base:7.2f} "
              f"{statistics.median([r['gen/length'] for r in rows]):12.1f} {phase['rollout']:9.3f} "
              f"{phase['update']:7.3f} {phase['disc']:6.3f}", flush=True)


def processes(run_dir: Path, iterations: int = 8) -> None:
    """train-rlhb (32 prompts, default critic and discriminator update) as one process with two threads against
    two processes with one thread each under torchrun (gloo): seconds per iteration from metrics.jsonl."""
    print(f"\none process against two (torchrun, gloo; 32 prompts x <= {NEW_TOKENS} tokens; median over "
          f"iterations 2-{iterations})")
    figures = {}
    for count, threads in ((1, 2), (2, 1)):
        name = f"bench-processes-{count}"
        shutil.rmtree(run_dir / name, ignore_errors=True)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count)]
        command = [*launcher, "-m", "rlhb_cli", "train-rlhb", "--run-dir", str(run_dir), "--stage-name", name,
                   "--iterations", str(iterations), "--prompts-per-iteration", "32", "--rollouts", "1",
                   "--max-new-tokens", str(NEW_TOKENS), "--minibatch-size", "16", "--ppo-epochs", "4",
                   "--disc-steps", "2", "--sample-every", "0", "--probe-every", "0"]
        done = subprocess.run(command, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if done.returncode:
            sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        rows = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
        figures[count] = statistics.median(sum(r.get(f"time/{k}", 0.0) for k in ("rollout", "score", "update", "disc"))
                                           for r in rows[1:] if "time/rollout" in r)
        print(f"  {count} process(es) x {threads} thread(s): {figures[count]:6.3f} s an iteration", flush=True)
    print(f"  two processes / one: {figures[2] / figures[1]:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="A run dir with train-sft and warmup-discriminator done "
                        "(built there if the directory does not exist; kept for the next run).")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-scaling", action="store_true", help="Only the side-by-side comparison.")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = options.run_dir or Path(tmp) / "run"
        if not run_dir.exists():
            build_run(run_dir)
        rows, grpo = side_by_side(run_dir, options.repeats)
        report_side_by_side(rows, grpo, options.repeats)
        if not options.no_scaling:
            scaling(run_dir, max(3, options.repeats // 2))
            processes(run_dir)


if __name__ == "__main__":
    main()
