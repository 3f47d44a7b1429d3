"""PNG plots. Run in a child process (`python -m rlhb_cli.plots KIND DATA.json OUT.png`, or with `-` for
DATA.json: the path comes on stdin once known) by stages that should not wait for matplotlib to import
and draw: the plot is made from a small JSON of numbers while the stage goes on with its own work on the
other core.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from rlhb_cli.errors import RlhbError


def behavior_histograms(data: dict, out: Path) -> None:
    """One panel per behaviour metric (log(1 + count)) and one for the shaped reward."""
    # deferred: matplotlib loads only when a plot is drawn (a Figure of its own: no pyplot state to close)
    from matplotlib.figure import Figure

    panels = data["panels"]
    fig = Figure(figsize=(3.4 * len(panels), 3.2))
    for ax, panel in zip(fig.subplots(1, len(panels)), panels):
        # one filled step outline per panel, not a rectangle per bin: a third less drawing, the same picture
        ax.stairs(panel["counts"], panel["edges"], fill=True, color=panel.get("color", "#4477aa"))
        for line in panel.get("bin_edges", []):
            ax.axvline(line, color="#cc3311", lw=0.8)
        ax.set_title(panel["title"])
    # fixed margins that fit six-digit counts: tight_layout measured every label first, a third of the drawing
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.11, top=0.9, wspace=0.3)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    tmp.replace(out)


def label_iteration_axis(ax, title: str) -> None:
    """A training-curve panel's title and x axis, in the small type every report uses."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("iteration", fontsize=8)
    ax.tick_params(labelsize=7)


def save_figure(fig, out: Path) -> None:
    """Tight layout, PNG at 80 dpi, and the figure freed (reports draw many)."""
    # deferred: matplotlib loads only when a plot is drawn
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


KINDS = {"histograms": behavior_histograms}


class Drawing:
    """A plot drawn in a child process that starts now and imports matplotlib while the stage computes the
    numbers (`draw` hands them over); `wait_for` waits and turns its failure into one line. As a context
    manager it never leaves the child behind: undrawn, the child is told so and ends."""

    def __init__(self, kind: str, out: Path):
        self.out = out
        self.drawn = False
        self.process = subprocess.Popen([sys.executable, "-m", "rlhb_cli.plots", kind, "-", str(out)],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)

    def draw(self, data_json: Path) -> None:
        self.drawn = True
        with contextlib.suppress(BrokenPipeError):  # the child is gone already: `wait_for` says why, in one line
            self.process.stdin.write(f"{data_json}\n")
            self.process.stdin.close()

    def wait_for(self) -> None:
        if self.process.returncode is not None:  # waited for already
            return
        if not self.process.stdin.closed:  # nothing drawn: the child reads the end of its input and ends
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        stderr = self.process.stderr.read()  # its only pipe left: reading it to the end cannot deadlock
        self.process.stderr.close()
        self.process.wait()
        if self.drawn and self.process.returncode != 0:
            last = (stderr or "").strip().splitlines()[-1:] or ["no message"]
            raise RlhbError(f"{self.out}: plotting failed ({last[0]})")

    def __enter__(self) -> "Drawing":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:  # the stage failed: end the child, and let the stage's own error speak
            self.drawn = False
        self.wait_for()


if __name__ == "__main__":
    kind, data_path, out_path = sys.argv[1:4]
    if data_path == "-":  # started early: import while the parent computes, then read where the data is
        # deferred: matplotlib loads only when a plot is drawn
        import matplotlib.figure
        data_path = sys.stdin.readline().strip()
        if not data_path:
            sys.exit(0)
    KINDS[kind](json.loads(Path(data_path).read_text(encoding="utf-8")), Path(out_path))
