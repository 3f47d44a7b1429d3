"""One RLHB iteration against one trl GRPOTrainer cycle, side by side in one process, on the same tiny model.

RLHB: 16 prompts x 1 response of up to 32 new tokens, 4 PPO epochs (4 optimizer steps), critic, reward from
the discriminator, and its update. GRPO: 16 completions (4 prompts x 4) of up to 32 tokens, num_iterations=4
(one generation reused for 4 optimizer steps), beta=0.05 (a reference model too). Both are timed as the
median over `--repeats` cycles after one warm-up cycle, interleaved (after each GRPO cycle, one iteration of
each RLHB variant), with the median of the per-round ratios beside each ratio of medians. The ratios are
the targets of issue 4: RLHB / GRPO <= 1.0, and RLHB with / without the discriminator update < 1.15.

    python benchmarks/bench_rl.py [--run-dir DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from common import rlhb  # noqa: E402

NEW_TOKENS = 32


def build_run(run_dir: Path) -> None:
    """A small simulated run with the demo's policy size and a discriminator on the SFT body."""
    print(f"building a benchmark run in {run_dir} (about a minute) ...", flush=True)
    rlhb("simulate-logs", "--run-dir", run_dir, "--queries", 120, "--eval-queries", 20, "--impressions", 300_000)
    rlhb("prepare-behaviors", "--run-dir", run_dir)
    rlhb("train-sft", "--run-dir", run_dir, "--epochs", 1, "--max-train-rows", 2000)
    rlhb("warmup-discriminator", "--run-dir", run_dir, "--epochs", 1, "--max-train-rows", 1000)


def build_rlhb_engines(run_dir: Path) -> dict:
    """The RLHB engines timed: a separate critic (with and without the discriminator update) and a critic head
    sharing the actor's body, each after one warm-up iteration."""
    from rlhb_cli import rundir
    from rlhb_cli.config import build_config
    from rlhb_cli.rl.aligners import RLHBConfig, build_engine, rlhb_source_factory

    engines = {}
    for critic in ("separate", "shared"):
        config = build_config(RLHBConfig, None, dict(
            prompts_per_iteration=16, rollouts=1, max_new_tokens=NEW_TOKENS, ppo_epochs=4, minibatch_size=16,
            iterations=10_000, sample_every=0, disc_steps=2, critic=critic))
        name = f"bench-rlhb-{critic}"
        with rundir.open_stage(run_dir / name, name, config, config.seed) as stage:
            engines[critic], _, _ = build_engine(config, stage, rlhb_source_factory(config, stage), "RLHB")
            stage.set_summary({})
    for engine in engines.values():
        engine.step()  # warm-up
    return engines


def time_rlhb_round(engines: dict, times: dict[str, list[float]]) -> None:
    """One iteration of each RLHB variant, appended to `times`."""
    for key, engine, disc_steps in (("separate", engines["separate"], 2),
                                    ("separate_no_disc", engines["separate"], 0),
                                    ("shared", engines["shared"], 2)):
        engine.source.settings.steps = disc_steps
        started = time.perf_counter()
        engine.step()
        times.setdefault(key, []).append(time.perf_counter() - started)


def time_side_by_side(run_dir: Path, repeats: int) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per RLHB iteration (each variant) and per GRPO cycle, interleaved: after each GRPO cycle of
    4 optimizer steps, one iteration of each RLHB variant runs, so drift of the machine hits all alike."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhb_cli.prompts import generator_prompt
    from rlhb_cli.stages.common import trl_config

    engines = build_rlhb_engines(run_dir)
    policy = run_dir / "train-sft" / "policy"
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    queries = sorted(set(datasets.load_from_disk(str(run_dir / "prepare-behaviors" / "dataset"))["train"]["query"]))
    prompts = datasets.Dataset.from_dict({"prompt": [generator_prompt(q, "liked by many") for q in queries]})

    def length_reward(completions, **kwargs):
        return [float(len(c)) / 100 for c in completions]

    cycle = 4  # optimizer steps per generation: num_iterations=4, one batch per generation
    rlhb_times: dict[str, list[float]] = {}
    grpo_times: list[float] = []

    class Interleave(TrainerCallback):
        cycle_started: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % cycle:
                return
            if self.cycle_started is not None:  # the first cycle is GRPO's warm-up
                grpo_times.append(time.perf_counter() - self.cycle_started)
                time_rlhb_round(engines, rlhb_times)
            self.cycle_started = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = trl_config(GRPOConfig, output_dir=out, per_device_train_batch_size=16, num_generations=4,
                          max_completion_length=NEW_TOKENS, num_iterations=4, beta=0.05, learning_rate=1e-5,
                          max_steps=cycle * (repeats + 1), logging_steps=10_000, save_strategy="no", seed=0)
        trainer = GRPOTrainer(model=str(policy), reward_funcs=length_reward, args=args, train_dataset=prompts,
                              processing_class=tokenizer, callbacks=[Interleave()])
        trainer.train()
    return rlhb_times, grpo_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="A run dir with train-sft and warmup-discriminator done "
                        "(built there if the directory does not exist; kept for the next run).")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = options.run_dir or Path(tmp) / "run"
        if not run_dir.exists():
            build_run(run_dir)
        times, grpo = time_side_by_side(run_dir, options.repeats)
    separate, bare, shared, grpo_s = (statistics.median(x) for x in (times["separate"], times["separate_no_disc"],
                                                                     times["shared"], grpo))

    def paired(key: str, reference: list[float]) -> str:
        """The median of the per-round ratios: each pair ran back to back, so it is the steadier figure."""
        ratios = sorted(a / b for a, b in zip(times[key], reference))
        return f"per round {statistics.median(ratios):4.2f}, range {ratios[0]:4.2f}-{ratios[-1]:4.2f}"

    print(f"\nseconds per cycle (median of {options.repeats}; 16 responses x <= {NEW_TOKENS} tokens, 4 optimizer steps)")
    print(f"  RLHB iteration, separate critic + discriminator update   {separate:7.3f}")
    print(f"  the same without the discriminator update                {bare:7.3f}")
    print(f"  RLHB iteration, critic head on the actor (--critic shared) {shared:5.3f}")
    print(f"  trl GRPOTrainer (num_iterations=4, beta=0.05)            {grpo_s:7.3f}")
    print(f"ratio RLHB / GRPO                 {separate / grpo_s:5.2f}   ({paired('separate', grpo)}; goal <= 1.00)")
    print(f"  with --critic shared            {shared / grpo_s:5.2f}   ({paired('shared', grpo)})")
    print(f"ratio RLHB with / without update  {separate / bare:5.2f}   "
          f"({paired('separate', times['separate_no_disc'])}; goal <  1.15)")


if __name__ == "__main__":
    main()
