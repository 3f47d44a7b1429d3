"""What the benchmarks share: running rlhb stages in this process to build a benchmark run."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def rlhb(*args) -> None:
    """One rlhb command through the real CLI; a failure ends the benchmark with its output."""
    from typer.testing import CliRunner

    from rlhb_cli.cli import app
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if result.exit_code:
        sys.exit(f"rlhb {' '.join(map(str, args))} failed:\n{result.output}")
