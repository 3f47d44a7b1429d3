"""prepare-behaviors speed and memory on 1,000,000 aggregated rows, against a plain pyarrow read.

Prints rows/s and peak memory of prepare-behaviors beside the time and memory of merely reading the
same file with pyarrow.json (the floor), and their ratio. Times are taken in this process, side by
side; each peak memory (max RSS) in a fresh child process, so one phase cannot inflate the other.
Goals (issue 31): >= 1,000,000 rows/s, within 2x of the plain read's time and 2x of its peak memory.

    python benchmarks/bench_prepare.py [--rows 1000000] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_logs(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    queries = rng.integers(0, max(rows // 10, 1), size=rows)
    pv = rng.zipf(1.6, size=rows).clip(max=10**6) + rng.integers(0, 50, size=rows)
    clicks = rng.binomial(pv, 0.3)
    likes = rng.binomial(pv, 0.2)
    dislikes = rng.binomial(pv - likes, 0.05)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(rows):
            out.write(f'{{"query": "How do I do thing number {queries[i]} well?", "response": "Answer {i}: do the '
                      f'first step, then the second step, and check the result.", "pv": {pv[i]}, "clicks": '
                      f'{clicks[i]}, "likes": {likes[i]}, "dislikes": {dislikes[i]}}}\n')


def read_floor(path: Path) -> int:
    import pyarrow.json as pj
    return pj.read_json(path).num_rows


def prepare(path: Path, run_dir: Path) -> dict:
    from rlhb_cli.behaviors.prepare import STAGE, PrepareConfig, run
    from rlhb_cli.rundir import open_stage
    config = PrepareConfig(logs=path, salt="bench")
    with open_stage(run_dir / STAGE, STAGE, config, config.seed) as stage:
        summary = run(config, stage)
        stage.set_summary(summary)
    return summary


def cpu_seconds() -> float:
    """User and system CPU time of this process (every thread) and of its waited-for children (the plot's)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child(phase: str, path: Path, run_dir: Path) -> None:
    """Run one phase and print its peak RSS in MB (a fresh process per phase)."""
    started = time.perf_counter()
    read_floor(path) if phase == "read" else prepare(path, run_dir)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated logs and run dir")
    parser.add_argument("--child", choices=["read", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.run_dir)
        return

    work = Path(tempfile.mkdtemp(prefix="rlhb-bench-"))
    path = work / "logs.jsonl"
    print(f"generating {args.rows:,} aggregated rows in {path} ...", flush=True)
    make_logs(path, args.rows)
    size_mb = path.stat().st_size / 2**20

    # Peak memory first, each phase in a fresh child started while this process is still small (Linux
    # carries a parent's max RSS into a child that it forks).
    peaks = {}
    for phase in ("read", "prepare"):
        out = subprocess.run([sys.executable, __file__, "--child", phase, "--path", str(path), "--run-dir",
                              str(work / f"run-{phase}")], capture_output=True, text=True, check=True)
        peaks[phase] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]

    # Times side by side in this process, both warm: the file is in the page cache and the libraries
    # (datasets, matplotlib's child aside) are imported by a 1,000-row run first, so the figures are
    # throughput, not import time.
    small = work / "small.jsonl"
    make_logs(small, 1000)
    prepare(small, work / "warm-up")
    read_floor(path)
    started, cpu = time.perf_counter(), cpu_seconds()
    read_floor(path)
    read_seconds, read_cpu = time.perf_counter() - started, cpu_seconds() - cpu
    started, cpu = time.perf_counter(), cpu_seconds()
    summary = prepare(path, work / "run")
    prepare_seconds, prepare_cpu = time.perf_counter() - started, cpu_seconds() - cpu
    assert summary["rows_kept"] == args.rows, summary

    rate = args.rows / prepare_seconds
    print(f"\nprepare-behaviors on {args.rows:,} rows ({size_mb:.0f} MB of JSONL)")
    print(f"{'':24}{'seconds':>10}{'rows/s':>14}{'peak MB':>10}{'CPU s':>8}")
    print(f"{'pyarrow read (floor)':24}{read_seconds:>10.2f}{args.rows / read_seconds:>14,.0f}{peaks['read']:>10.0f}"
          f"{read_cpu:>8.2f}")
    print(f"{'prepare-behaviors':24}{prepare_seconds:>10.2f}{rate:>14,.0f}{peaks['prepare']:>10.0f}{prepare_cpu:>8.2f}")
    print(f"ratio prepare / read: {prepare_seconds / read_seconds:.2f}x time, {peaks['prepare'] / peaks['read']:.2f}x "
          f"memory, {prepare_cpu / read_cpu:.2f}x CPU")
    # Wall time cannot fall below the CPU time spread over every core: what the time goal asks of the arithmetic.
    cores = len(os.sched_getaffinity(0))
    print(f"CPU bound: prepare's {prepare_cpu:.2f} CPU s on {cores} cores take >= {prepare_cpu / cores:.2f} s, "
          f"{prepare_cpu / cores / read_seconds:.2f}x the read, even run perfectly in parallel")
    print(f"goals: rows/s >= 1,000,000 [{'met' if rate >= 1_000_000 else 'MISSED'}], within 2x of the read's "
          f"time [{'met' if prepare_seconds <= 2 * read_seconds else 'MISSED'}] and of its peak memory "
          f"[{'met' if peaks['prepare'] <= 2 * peaks['read'] else 'MISSED'}]")
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
