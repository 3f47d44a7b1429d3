"""`rlhb import stackexchange` on a large dump: peak memory against the dump's size and a bare XML read.

Builds a dump of about --size-mb (default 1024) by replicating ../shared/data/stackexchange-cardano with fresh
post ids (every copy's questions, answers, votes and comments renumbered, so nothing is a duplicate), then,
each in a fresh child process, (a) streams every row of its three XML files and does nothing else (the
floor), (b) imports it. Prints seconds and peak RSS side by side and their ratios. Goal (issue 26): the
import's memory bounded, i.e. far below the dump's size and near the bare read's.

    python benchmarks/bench_import.py [--size-mb 1024] [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "stackexchange-cardano"
FILES = ("Posts.xml", "Votes.xml", "Comments.xml")
ID_FIELDS = re.compile(r'\b(Id|PostId|ParentId|AcceptedAnswerId)="(\d+)"')


def replicate(target: Path, size_mb: float) -> int:
    """Write FILES into `target` holding as many renumbered copies of the source dump as reach size_mb."""
    target.mkdir(parents=True)
    bodies = {name: [line for line in (SOURCE / name).read_text(encoding="utf-8").splitlines()
                     if line.lstrip().startswith("<row ")] for name in FILES}
    one_copy = sum(len(line) + 1 for lines in bodies.values() for line in lines)
    copies = max(1, int(size_mb * 2**20 / one_copy))
    stride = 10 ** len(str(max(int(m.group(2)) for lines in bodies.values() for line in lines
                               for m in ID_FIELDS.finditer(line))))
    for name in FILES:
        tag = name[:-4].lower()
        with open(target / name, "w", encoding="utf-8") as out:
            out.write(f'<?xml version="1.0" encoding="utf-8"?>\n<{tag}>\n')
            for copy in range(copies):
                shift = copy * stride
                for line in bodies[name]:
                    out.write(ID_FIELDS.sub(lambda m: f'{m.group(1)}="{int(m.group(2)) + shift}"', line) + "\n")
            out.write(f"</{tag}>\n")
    return copies


def child(phase: str, dump: Path, out: Path) -> None:
    started = time.perf_counter()
    if phase == "read":
        import xml.etree.ElementTree as ET
        for name in FILES:  # the import's own streaming, doing nothing with the rows
            root = None
            for event, element in ET.iterparse(dump / name, events=("start", "end")):
                if root is None:
                    root = element
                elif event == "end" and element.tag == "row":
                    root.clear()
        result = {}
    else:
        from rlhb_cli.behaviors.importers import import_logs
        counts, _, _ = import_logs("stackexchange", [dump], out, None)
        result = {"answers": counts["answers"], "rejected": counts["rejected"], "duplicate": counts["duplicate"]}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": peak_mb, **result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--keep", action="store_true", help="keep the built dump and the log")
    parser.add_argument("--child", choices=["read", "import"], help=argparse.SUPPRESS)
    parser.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dump, args.out)
        return
    work = Path(tempfile.mkdtemp(prefix="rlhb-bench-import-"))
    dump = work / "stackexchange-big"
    copies = replicate(dump, args.size_mb)
    size_mb = sum((dump / name).stat().st_size for name in FILES) / 2**20
    print(f"dump: {copies} renumbered copies of {SOURCE.name}, {size_mb:.0f} MB in {dump}", flush=True)
    figures = {}
    for phase in ("read", "import"):
        done = subprocess.run([sys.executable, __file__, "--child", phase, "--dump", str(dump), "--out",
                               str(work / "logs.jsonl")], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{phase} failed:\n{done.stderr[-3000:]}")
        figures[phase] = json.loads(done.stdout.strip().splitlines()[-1])
    read, imported = figures["read"], figures["import"]
    assert imported["answers"] == copies * 1496 and imported["duplicate"] == 0, imported
    print(f"\n{'':26}{'seconds':>10}{'MB/s':>8}{'peak MB':>10}")
    for label, entry in (("bare XML read (floor)", read), ("rlhb import stackexchange", imported)):
        print(f"{label:26}{entry['seconds']:>10.1f}{size_mb / entry['seconds']:>8.1f}{entry['peak_mb']:>10.0f}")
    print(f"import: {imported['answers']:,} answers; peak memory {imported['peak_mb'] / size_mb:.2f}x the dump's "
          f"size, {imported['peak_mb'] / read['peak_mb']:.2f}x the bare read's; time "
          f"{imported['seconds'] / read['seconds']:.2f}x the bare read's")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
