"""Peak memory of train-rlhb iterations for a ~30M-parameter policy: full weights against LoRA, side by side.

Each variant runs in a fresh child process (peak resident memory is a per-process figure): it loads the
data, notes its resident memory, builds the engine (actor, critic, reference, discriminator) and runs two
default train-rlhb iterations (8 prompts x 4 rollouts, 48 new tokens); the figure is the peak resident
memory above that starting point. The printed ratio is issue 7's target: LoRA <= 0.6 x full weights.
Four settings:
- default: glibc's malloc as it comes. Its mmap threshold rises as large blocks are freed, so a model's
  tensors soon come from the heap, where freed activations leave holes: resident memory then measures
  the heap's fragmentation as much as the live tensors (LoRA's extra temporaries suffer most);
- --micro-batch-size 4: each mini-batch's forward and backward in four passes whose gradients add up, so
  a quarter of the activations are alive at once (the same update up to float rounding);
- --gradient-checkpointing, which recomputes activations so the weights and optimizer states show;
- MALLOC_MMAP_THRESHOLD_=2 MiB: every tensor of 2 MiB or more gets pages of its own, given back when
  freed, so the peak is close to the live tensors' (at a cost in time: pages are zeroed each time).

    python benchmarks/bench_memory.py [--run-dir DIR] [--lora-r 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import rlhb  # noqa: E402  (also sets the offline environment)

# setting -> (engine options, environment of the child process)
SETTINGS = {
    "default (glibc malloc as it comes)": ({}, {}),
    "with --micro-batch-size 4 (each mini-batch of 16 in four passes)": ({"micro_batch_size": 4}, {}),
    "with --gradient-checkpointing": ({"gradient_checkpointing": True}, {}),
    "with MALLOC_MMAP_THRESHOLD_=2097152 (tensors of 2 MiB or more on pages of their own)": (
        {}, {"MALLOC_MMAP_THRESHOLD_": "2097152"}),
}
POLICY = ["--tiny-hidden-size", 512, "--tiny-layers", 11, "--tiny-heads", 8, "--tiny-vocab-size", 1000]


def build_run(run_dir: Path) -> None:
    print(f"building a benchmark run with a ~30M-parameter policy in {run_dir} (a few minutes) ...", flush=True)
    rlhb("simulate-logs", "--run-dir", run_dir, "--queries", 120, "--eval-queries", 20, "--impressions", 300_000)
    rlhb("prepare-behaviors", "--run-dir", run_dir)
    rlhb("train-sft", "--run-dir", run_dir, "--epochs", 1, "--max-train-rows", 64, *POLICY)
    rlhb("warmup-discriminator", "--run-dir", run_dir, "--backbone", "tiny", "--epochs", 1, "--max-train-rows", 500)


def kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(run_dir: Path, lora_r: int, options: dict) -> None:
    """Two iterations of one variant; prints a JSON line with the peak above the starting point."""
    from rlhb_cli import rundir
    from rlhb_cli.config import build_config
    from rlhb_cli.rl.aligners import RLHBConfig, build_engine, rlhb_source_factory

    config = build_config(RLHBConfig, None, dict(iterations=10_000, sample_every=0, lora_r=lora_r, **options))
    name = "-".join(["bench-memory", "lora" if lora_r else "full", *(f"{k}={v}" for k, v in options.items())])
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start, started = kib("VmRSS"), time.perf_counter()
    with rundir.open_stage(run_dir / name, name, config, config.seed) as stage:
        engine, _, _ = build_engine(config, stage, rlhb_source_factory(config, stage), "RLHB")
        built = kib("VmRSS")
        for _ in range(2):
            engine.step()
        stage.set_summary({})
    peak = kib("VmHWM")
    print(json.dumps({"start_mib": start / 1024, "built_mib": built / 1024, "peak_mib": peak / 1024,
                      "peak_above_start_mib": (peak - start) / 1024,
                      "seconds": time.perf_counter() - started,
                      "policy_parameters": sum(p.numel() for p in engine.unwrapped.actor.parameters()),
                      "trainable_parameters": sum(p.numel() for p in engine.unwrapped.parameters() if p.requires_grad)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="Where the benchmark run is built, or reused when it is there already.")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child is not None:
        child(options.run_dir, options.child, json.loads(options.options))
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = options.run_dir or Path(tmp) / "run"
        if not (run_dir / "warmup-discriminator" / "summary.json").exists():
            build_run(run_dir)
        figures = {}
        for setting, (engine_options, environment) in SETTINGS.items():
            for label, r in (("full weights", 0), (f"LoRA r={options.lora_r}", options.lora_r)):
                out = subprocess.run([sys.executable, __file__, "--run-dir", str(run_dir), "--child", str(r),
                                      "--options", json.dumps(engine_options)], capture_output=True, text=True,
                                     check=False, env=dict(os.environ, **environment))
                if out.returncode:
                    sys.exit(f"{label}, {setting} failed:\n{out.stderr[-2000:]}")
                figures[(setting, label)] = json.loads(out.stdout.strip().splitlines()[-1])
    first = next(iter(figures.values()))
    print(f"\npeak resident memory of two default train-rlhb iterations (8 prompts x 4 rollouts, 48 tokens, "
          f"mini-batches of 16) above the loaded data, MiB; policy {first['policy_parameters'] / 1e6:.1f}M parameters")
    for setting in SETTINGS:
        print(f"  {setting}")
        for (s, label), f in figures.items():
            if s == setting:
                print(f"    {label:<14} peak +{f['peak_above_start_mib']:6.0f}   (models built "
                      f"+{f['built_mib'] - f['start_mib']:5.0f}; trainable {f['trainable_parameters'] / 1e6:6.2f}M; "
                      f"{f['seconds']:5.0f} s)")
        full, lora = (f["peak_above_start_mib"] for (s, _), f in figures.items() if s == setting)
        print(f"    ratio LoRA / full weights   {lora / full:5.2f}   (goal <= 0.60)")


if __name__ == "__main__":
    main()
