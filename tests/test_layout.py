"""The package graph flows one way: behaviors -> models -> stages / rl -> evaluation -> the runners.

Every import of the project's own modules is read from the source (module level and inside functions)
and checked against the layers below: a module may import from its own unit and from lower layers only,
so no import reaches a later step and no two units import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rlhb_cli"

# unit (a subpackage, or a module of the top package) -> its layer; units of one layer do not import each other
LAYERS = {
    "errors": 0, "registry": 0, "stats": 0,
    "config": 1, "distributed": 1, "plots": 1, "prompts": 1, "trackers": 1,
    "storage": 2,
    "rundir": 3,
    "behaviors": 4,
    "simulator": 5,
    "models": 6,
    "stages": 7, "rl": 7,
    "evaluation": 8,
    "pipeline": 9,
    "experiments": 10,
    "cli": 11, "__main__": 12,
}
MAX_LINES = 450


def unit_of(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def project_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported unit, at module level) of every import of rlhb_cli in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    # imports guarded by `if TYPE_CHECKING:` are annotations only, never run
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level |= {id(n) for n in node.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlhb_cli":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("rlhb_cli.")]
        for name in names:
            found.append((node.lineno, name, id(node) in top_level))
    return found


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(p) for p in SOURCES} - {"__init__"}
    assert units <= set(LAYERS), f"give these a layer in tests/test_layout.py: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way_and_sit_at_the_top(path):
    unit = unit_of(path)
    if unit == "__init__":
        return
    for line, imported, at_top in project_imports(path):
        where = f"{path.relative_to(SRC)}:{line} imports {imported}"
        assert at_top, f"{where} inside a function: a project import sits at the top of its module"
        if imported == unit:
            continue
        assert LAYERS[imported] < LAYERS[unit], (
            f"{where}: layer {LAYERS[imported]} is not below {unit}'s layer {LAYERS[unit]} (data flows one way)")


def test_the_checker_sees_a_cycle(tmp_path):
    """The check itself: an import from a later step, or a function-local one, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from rlhb_cli.rl.ppo import PPOEngine\n\ndef f():\n    from rlhb_cli import cli\n")
    found = project_imports(bad)
    assert found == [(1, "rl", True), (4, "cli", False)]
    assert not LAYERS["rl"] < LAYERS["models"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_answers_two_questions(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines: split it by role (at most {MAX_LINES})"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_an_import_inside_a_function_says_why_it_waits(path):
    """A library imported inside a function (a heavy or optional one) carries a comment saying why, on its
    line or heading its block of imports; anything cheap sits at the top."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(lines))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top_level:
            continue
        if "rlhb_cli" in ast.unparse(node):  # the project's own: at the top, or under TYPE_CHECKING
            continue
        i = node.lineno - 1
        while "#" not in lines[i] and i > 0 and lines[i - 1].strip().startswith(("import ", "from ")):
            i -= 1  # the first import of its block
        said = "#" in lines[i] or (i > 0 and lines[i - 1].strip().startswith("#"))
        assert said, f"{path.relative_to(SRC)}:{node.lineno}: say in a comment why this import waits for its function"
