"""Experiment recipes (reading and checking): the paper's claims as YAML, run as a grid of stages and seeds, judged claim by claim.

A recipe (experiments/NAME.yaml) names a base (the shared stages: simulated logs, SFT policy, judges),
its arms (an RL stage with the options that make it that arm), the seeds, the evaluation, and the
claims with the rule that decides each. `run_recipe` runs the base once per scale into
RUNS/base (RUNS/base-NAME for a recipe whose scales change a base stage), links its stages into
RUNS/NAME, runs every arm for every seed as `ARM-sSEED`, evaluates them all, and writes results.md,
results.json and plots. Stages already done with the same config
are skipped: the run directory's manifests decide, so an interrupted experiment continues where it
stopped. Seeds vary the RL stages; `bases` (default [0]) trains the base once per base seed, each with its
stages' seeds moved on by it (`base_stages`), base 0 being the base as configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhb_cli import pipeline, registry
from rlhb_cli.errors import RlhbError
from rlhb_cli.experiments.verdicts import CHECK_KINDS, GOLD_METRICS, METRICS, PERSONALIZATION_METRICS

TINY_SEEDS = 2  # seeds a recipe runs at scale tiny
TINY_BASES = 1  # and bases: the suite smoke-tests every recipe on one, the nesting on a recipe of its own
RECIPE_KEYS = {"title", "base", "bases", "seeds", "arms", "arm_defaults", "evaluate", "claims", "scales", "notes",
               "expected_seconds"}
BASE_KEYS = {"stages", "scales", "expected_seconds", "notes"}
# evaluate's `suite`: the stage that judges the arms (answers to held-out queries, or ALOE's conversations)
SUITES = {"behaviour": "evaluate", "personalization": "evaluate-personalization"}


# ---------------------------------------------------------------------------------------------- reading
def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Path of every key and item in a YAML document -> its 1-based line, for errors that point at it."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            out[path + (key_node.value,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key_node.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), out)
    return out


@dataclass
class YamlFile:
    """A parsed YAML mapping that can say where any of its keys is."""

    path: Path
    data: dict
    lines: dict[tuple, int]

    @classmethod
    def read(cls, path: Path) -> "YamlFile":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RlhbError(f"{path}: no such recipe file") from None
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise RlhbError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                            f"({getattr(exc, 'problem', exc)})") from None
        if not isinstance(data, dict):
            raise RlhbError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
        return cls(Path(path), data, _line_map(node) if node is not None else {})

    def error(self, where: tuple, message: str) -> RlhbError:
        """'FILE:LINE: a.b.c: message', with the line of the deepest key of `where` that is known."""
        line = next((self.lines[where[:n]] for n in range(len(where), 0, -1) if where[:n] in self.lines), None)
        dotted = ".".join(str(p) for p in where)
        return RlhbError(f"{self.path}{f':{line}' if line else ''}: {dotted}: {message}")

    def mapping(self, where: tuple, value: Any) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(where, f"must be a mapping, got {value!r}")
        return value


# ---------------------------------------------------------------------------------------------- recipe
@dataclass
class Arm:
    name: str
    command: str  # the stage command that runs it, e.g. train-rlhb
    options: dict[str, Any]  # the options that make it this arm, over the defaults and the scale


@dataclass
class Claim:
    claim: str
    paper: str
    check: dict[str, Any]



@dataclass
class Recipe:
    name: str
    path: Path
    title: str
    scale: str
    seeds: list[int]
    bases: list[int]  # base seeds: each a draw of the logs, SFT policy and judges (0: the base as configured)
    arms: list[Arm]
    base_path: Path
    base_stages: dict[str, dict]  # command -> options, scale applied
    base_name: str  # folder of the trained base beside the recipes' runs: shared unless the recipe changes it
    arm_defaults: dict[str, dict]  # command -> options every arm of that command starts from, scale applied
    evaluate: dict[str, Any] | None  # options of the evaluation, scale applied; None: no evaluation
    evaluation: str  # the command that evaluates: evaluate, or evaluate-personalization (suite: personalization)
    claims: list[Claim]
    expected_seconds: dict[str, float]
    notes: str = ""


def _merge(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        out.update(layer or {})
    return out


def _format_seed(options: dict, seed: int) -> dict:
    return {k: v.format(seed=seed) if isinstance(v, str) else v for k, v in options.items()}


def load_recipe(path: Path, scale: str = "small") -> Recipe:
    """Read and check a recipe and its base at a scale: every error names the file, line and key."""
    recipe_file = YamlFile.read(path)
    data = recipe_file.data
    for key in data:
        if key not in RECIPE_KEYS:
            raise recipe_file.error((key,), f"unknown key; known: {', '.join(sorted(RECIPE_KEYS))}")
    for key in ("base", "arms"):
        if key not in data:
            raise recipe_file.error((), f"a recipe needs '{key}'")
    base_path = (Path(path).parent / str(data["base"])).resolve()
    base_file = YamlFile.read(base_path)
    for key in base_file.data:
        if key not in BASE_KEYS:
            raise base_file.error((key,), f"unknown key; known: {', '.join(sorted(BASE_KEYS))}")
    scales = set(base_file.mapping(("scales",), base_file.data.get("scales")))
    if scale not in scales:
        raise RlhbError(f"{base_path}: no scale {scale!r}; scales: {', '.join(sorted(scales)) or 'none'}")
    for name in recipe_file.mapping(("scales",), data.get("scales")):
        if name not in scales:
            raise recipe_file.error(("scales", name), f"unknown scale; the base has {', '.join(sorted(scales))}")
    scale_options = {}
    base_commands = set(base_file.mapping(("stages",), base_file.data.get("stages")))
    changes_base = False
    for source, where in ((base_file, ("scales", scale)), (recipe_file, ("scales", scale))):
        layer = source.mapping(where, (source.data.get("scales") or {}).get(scale))
        changes_base |= source is recipe_file and bool(base_commands & set(layer))
        for command, options in layer.items():
            scale_options[command] = _merge(scale_options.get(command, {}),
                                            source.mapping(where + (command,), options))
    base_stages = {}
    for command, options in base_file.mapping(("stages",), base_file.data.get("stages")).items():
        base_stages[command] = _merge(base_file.mapping(("stages", command), options), scale_options.get(command))
        try:
            pipeline.build_step(command, base_stages[command])
        except RlhbError as exc:
            raise base_file.error(("stages", command), str(exc)) from None
    if "train-sft" not in base_stages:
        raise base_file.error(("stages",), "the base must train the starting policy (train-sft)")

    seeds, bases = data.get("seeds", [0]), data.get("bases", [0])
    for key, value in (("seeds", seeds), ("bases", bases)):
        if not isinstance(value, list) or not value or not all(isinstance(s, int) and s >= 0 for s in value) \
                or len(set(value)) != len(value):
            raise recipe_file.error((key,), f"must be a list of distinct non-negative integers, got {value!r}")
    if scale == "tiny":  # a smoke test of the machinery: two seeds make every interval and rule run
        seeds, bases = seeds[:TINY_SEEDS], bases[:TINY_BASES]
    arm_defaults = {}
    for command, options in recipe_file.mapping(("arm_defaults",), data.get("arm_defaults")).items():
        arm_defaults[command] = recipe_file.mapping(("arm_defaults", command), options)
    arms: list[Arm] = []
    for name, spec in recipe_file.mapping(("arms",), data["arms"]).items():
        spec = dict(recipe_file.mapping(("arms", name), spec))
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise recipe_file.error(("arms", name), "an arm's name is letters, digits, '-', '_' and '.'")
        command = spec.pop("stage", None)
        if command not in registry.ARM_COMMANDS:
            raise recipe_file.error(("arms", name), f"'stage' must be one of {', '.join(registry.ARM_COMMANDS)}, got {command!r}")
        arms.append(Arm(name, command, spec))
    if not arms:
        raise recipe_file.error(("arms",), "a recipe needs at least one arm")
    evaluate, suite = data.get("evaluate", {}), "behaviour"
    if evaluate is not None:
        evaluate = dict(recipe_file.mapping(("evaluate",), evaluate))
        suite = evaluate.pop("suite", "behaviour")
        if suite not in SUITES:
            raise recipe_file.error(("evaluate", "suite"), f"must be one of {', '.join(SUITES)}, got {suite!r}")
        evaluate = _merge(evaluate, scale_options.get(SUITES[suite]))  # a scale sets the suite's stage's options
        for key in ("policies",):
            if key in evaluate:
                raise recipe_file.error(("evaluate", key), "the runner sets the evaluated policies (every arm); "
                                                           "other models go in references")
        references = evaluate.get("references", [])
        if not isinstance(references, list) or not all(isinstance(r, str) and r for r in references):
            raise recipe_file.error(("evaluate", "references"), f"must be a list of models (a folder, a GGUF file or "
                                                                f"smollm2), got {references!r}")
        try:
            pipeline.build_step(SUITES[suite], {k: v for k, v in evaluate.items() if k not in ("references", "baseline")})
        except RlhbError as exc:
            raise recipe_file.error(("evaluate",), str(exc)) from None
    recipe = Recipe(
        name=Path(path).stem, path=Path(path), title=str(data.get("title", Path(path).stem)), scale=scale,
        seeds=seeds, bases=bases, arms=arms, base_path=base_path, base_stages=base_stages,
        # A recipe that changes a base stage trains a base of its own: sharing the folder would make
        # each recipe retrain the other's base in turn.
        base_name=base_path.stem + (f"-{Path(path).stem}" if changes_base else ""),
        arm_defaults={c: _merge(arm_defaults.get(c), scale_options.get(c)) for c in registry.ARM_COMMANDS},
        evaluate=evaluate, evaluation=SUITES[suite], claims=[], notes=str(data.get("notes", "")).strip(),
        # the base's rates, or the recipe's own where its models differ (a pretrained policy's)
        expected_seconds={str(k): float(v) for k, v in {
            **base_file.mapping(("expected_seconds", scale), (base_file.data.get("expected_seconds") or {}).get(scale)),
            **recipe_file.mapping(("expected_seconds", scale), (data.get("expected_seconds") or {}).get(scale)),
        }.items()})
    recipe.claims = _read_claims(recipe_file, recipe)
    _check_arm_options(recipe_file, recipe)
    return recipe


def _read_claims(source: YamlFile, recipe: Recipe) -> list[Claim]:
    claims = []
    arm_names = {a.name for a in recipe.arms}
    for i, item in enumerate(source.data.get("claims") or []):
        where = ("claims", i)
        item = source.mapping(where, item)
        unknown = set(item) - {"claim", "paper", "check"}
        if unknown or "claim" not in item or "check" not in item:
            raise source.error(where, "a claim has 'claim', 'paper' and 'check'"
                               + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
        check = source.mapping(where + ("check",), item["check"])
        kind = check.get("kind")
        if kind not in CHECK_KINDS:
            raise source.error(where + ("check",), f"kind must be one of {', '.join(CHECK_KINDS)}, got {kind!r}")
        metric = check.get("metric")
        if metric not in METRICS:
            raise source.error(where + ("check", "metric"), f"unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
        if metric in GOLD_METRICS and (recipe.evaluate is None or recipe.evaluation != "evaluate"):
            raise source.error(where + ("check", "metric"), f"{metric} needs the evaluation of answers to held-out "
                                                            f"queries (evaluate: with suite behaviour)")
        if metric in PERSONALIZATION_METRICS and (recipe.evaluate is None or recipe.evaluation == "evaluate"):
            raise source.error(where + ("check", "metric"), f"{metric} needs the personalisation suite "
                                                            f"(evaluate: {{suite: personalization}})")
        named = [check[k] for k in ("arm", "than", "to") if k in check] + list(check.get("arms", []))
        for arm in named:
            if arm not in arm_names:
                raise source.error(where + ("check",), f"no arm {arm!r}; arms: {', '.join(sorted(arm_names))}")
        required = {"close_to": ("arm", "to", "share"), "better": ("arm", "than"), "decreasing": ("arms",),
                    "similar": ("arm", "to", "within"), "reaches": ("arm", "at_least"), "positive": ("arm",)}[kind]
        missing = [k for k in required if k not in check]
        if missing:
            raise source.error(where + ("check",), f"{kind} needs {', '.join(missing)}")
        claims.append(Claim(str(item["claim"]).strip(), str(item.get("paper", "")).strip(), check))
    return claims


def _check_arm_options(source: YamlFile, recipe: Recipe) -> None:
    """Build every arm's config for every seed now, so a bad option fails before hours of running."""
    earlier: set[str] = set(recipe.base_stages)
    for arm in recipe.arms:
        for seed in recipe.seeds:
            options = arm_options(recipe, arm, seed)
            try:
                pipeline.build_step(arm.command, options)
            except RlhbError as exc:
                raise source.error(("arms", arm.name), str(exc)) from None
            start = options.get("init_from", "train-sft")
            if start not in earlier and "/" not in start:
                raise source.error(("arms", arm.name, "init_from"), f"{start!r} is neither a base stage nor an "
                                   f"earlier arm's run ({', '.join(sorted(earlier))})")
        earlier |= {stage_name(arm.name, s) for s in recipe.seeds}


def base_stages(recipe: Recipe, base: int) -> dict[str, dict]:
    """Options of every base stage for base seed `base`: each seeded stage's seed moved on by `base` (the log
    draw, the query split, SFT, each judge), so base 0 is the base as configured and shares its folder."""
    out = {}
    for command, options in recipe.base_stages.items():
        config, _ = pipeline.build_step(command, options)
        out[command] = options | {"seed": config.seed + base} if base and hasattr(config, "seed") else options
    return out


def base_folder(recipe: Recipe, base: int) -> str:
    return recipe.base_name + (f"-b{base}" if base else "")


def arm_options(recipe: Recipe, arm: Arm, seed: int) -> dict:
    """Options of one arm's run: the recipe's arm defaults < the scale < the arm's own < its seed."""
    return _format_seed(_merge(recipe.arm_defaults.get(arm.command), arm.options, {"seed": seed}), seed)


def stage_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


