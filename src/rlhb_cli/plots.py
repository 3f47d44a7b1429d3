"""PNG plots. Run in a child process (`python -m rlhb_cli.plots KIND DATA.json OUT.png`) by stages that
should not wait for matplotlib to import and draw: the plot is made from a small JSON of numbers
while the stage goes on with its own work on the other core.
"""

from __future__ import annotations

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
    fig.tight_layout()
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
    """A plot being drawn in a child process; `wait_for` waits and turns its failure into one line."""

    def __init__(self, kind: str, data_json: Path, out: Path):
        self.out = out
        self.process = subprocess.Popen([sys.executable, "-m", "rlhb_cli.plots", kind, str(data_json), str(out)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_for(self) -> None:
        _, stderr = self.process.communicate()
        if self.process.returncode != 0:
            last = (stderr or "").strip().splitlines()[-1:] or ["no message"]
            raise RlhbError(f"{self.out}: plotting failed ({last[0]})")


if __name__ == "__main__":
    kind, data_path, out_path = sys.argv[1:4]
    KINDS[kind](json.loads(Path(data_path).read_text(encoding="utf-8")), Path(out_path))
