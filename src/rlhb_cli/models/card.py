"""Model cards: README.md in the Hugging Face format (YAML metadata, then prose) in every policy and judge folder.

A stage writes its folder's card when it ends (the stage, its base, the data it saw, its resolved config, its
own figures); `rlhb evaluate` rewrites the cards of the run's policies it evaluated with their evaluation
figures, and `rlhb export` writes the card of the exported model. A card describes a model and is not one of
the outputs a stage is held to (storage.CARD), so rewriting it leaves the stage done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhb_cli import rundir, storage
from rlhb_cli.behaviors.prepare import SEALED
from rlhb_cli.prompts import PromptFormat, policy_meta

HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0"}
MODEL_FOLDERS = {"policy": "policy", "model": "judge"}  # folder a stage writes -> what it holds
GOLD_JUDGES = ("gold", "annotators")  # the simulator's own users and annotators: figures of the simulated platform
EXAMPLE_QUERY = "What is the capital of France?"


def _manifest(stage_dir: Path) -> dict:
    path = stage_dir / rundir.MANIFEST
    return rundir.read_json(path) if path.exists() else {}


def base_model(stage_dir: Path, hops: int = 8) -> str:
    """The model a policy or judge grew from: its --model or --backbone, else through --init-from the earlier
    stage's; "built here" for a model trained from scratch (the tiny Llama or judge)."""
    config = _manifest(stage_dir).get("config", {})
    named = config.get("model") or config.get("backbone")
    if named:
        return "built here" if named == "tiny" else HUB_IDS.get(named, named)
    earlier = stage_dir.parent / str(config.get("init_from") or "")
    if config.get("init_from") and hops and (earlier / rundir.MANIFEST).exists():
        return base_model(earlier, hops - 1)
    return str(config.get("init_from") or "built here")


def data_seen(run_dir: Path) -> list[str]:
    """The behaviour logs every training stage of a run reads: the file and its hash, the rows kept and
    rejected, and the split by query (prepare-behaviors' record)."""
    stage_dir = run_dir / "prepare-behaviors"
    manifest, summary_path = _manifest(stage_dir), stage_dir / rundir.SUMMARY
    if not manifest or not summary_path.exists():
        return ["- (no prepare-behaviors record in this run dir)"]
    summary = rundir.read_json(summary_path)
    lines = [f"- logs: `{entry.get('path')}` (sha256 {entry.get('sha256')}, {entry.get('bytes')} bytes)"
             for name, entry in manifest.get("inputs", {}).items() if isinstance(entry, dict)]
    lines.append(f"- rows: {summary.get('rows_in')} read, {summary.get('rows_out')} kept, "
                 f"{summary.get('rows_rejected')} rejected (with their reasons in prepare-behaviors/rejected.jsonl)")
    for split, entry in summary.get("splits", {}).items():
        sealed = " (sealed: no training stage reads it; evaluation's gold-free ground)" if split == SEALED else ""
        lines.append(f"- {split}: {entry.get('rows')} rows over {entry.get('queries')} queries{sealed}")
    return lines


def evaluation_lines(entries: dict[str, dict]) -> list[str]:
    """evaluate's figures of one policy (judge -> mean, ci95, gain), gold-free judges apart from the gold ones."""
    lines = ["| judge | kind | mean [95% CI] | gain over the baseline [95% CI] |", "|---|---|---|---|"]
    for judge, entry in entries.items():
        kind = "simulator's gold" if judge in GOLD_JUDGES else "gold-free (trained on the logs)"
        gain = entry.get("gain_over_baseline")
        gain_text = f"{gain['mean']:+.4f} [{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}]" if gain else "(baseline)"
        lines.append(f"| {judge} | {kind} | {entry['mean']:+.4f} [{entry['ci95'][0]:+.4f}, {entry['ci95'][1]:+.4f}] "
                     f"| {gain_text} |")
    return lines


def asked_behavior(folder: Path) -> str | None:
    """The behaviour text a policy was trained to be asked for (None: no condition). An SFT policy made before
    its policy.json named the text is asked for its run's most preferred behaviour."""
    meta = policy_meta(folder)
    if meta.get("condition") == "none":
        return None
    behavior = Path(folder).parent.parent / "prepare-behaviors" / "behavior.json"
    if meta.get("behavior_text") is None and meta.get("condition") == "most_preferred" and behavior.exists():
        return rundir.read_json(behavior)["most_preferred_text"]
    return meta.get("behavior_text")


def evaluation_of(run_dir: Path, policy: str) -> dict[str, dict] | None:
    """The run's evaluation figures of one policy (judge -> figures, sampled answers, else greedy), if any."""
    detail = run_dir / "evaluate" / "summary_detail.json"
    if not detail.exists():
        return None
    scores = rundir.read_json(detail).get("scores", {}).get(policy, {})
    return scores.get("sampled") or scores.get("greedy") or None


def prompt_lines(folder: Path, tokenizer) -> list[str]:
    """How a policy must be asked: its format and the behaviour it was trained to be asked for, with an example."""
    prompt = PromptFormat.of_policy(policy_meta(folder), tokenizer, folder)
    condition = asked_behavior(folder)
    how = (" (the tokenizer's chat template: the behaviour as the system turn, the query as the user's)"
           if prompt.kind == "chat" else " (\"Question: ... / Users: ... / Answer:\", the answer after one space)")
    asked = f"; asked for the behaviour: {condition!r}." if condition else "; asked with no behaviour condition."
    return [f"Format: **{prompt.kind}**{how}{asked}", "", "```", prompt.prompt(EXAMPLE_QUERY, condition), "```"]


def model_card(stage_dir: Path, kind: str, tokenizer=None, evaluation: dict[str, dict] | None = None,
               merged: bool = False, policy_folder: Path | None = None) -> str:
    """The card of the `kind` ("policy" or "judge") a stage wrote; with a tokenizer, a policy's card says how
    to prompt it (from `policy_folder`, default the stage's policy/); with `evaluation` (judge -> figures), it
    carries evaluate's figures; `merged`: the card of an export, its adapters merged into the base."""
    manifest = _manifest(stage_dir)
    stage = manifest.get("stage", stage_dir.name)
    config = manifest.get("config", {})
    summary_path = stage_dir / rundir.SUMMARY
    summary = rundir.read_json(summary_path) if summary_path.exists() else {}
    figures = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    base = base_model(stage_dir)
    lora = bool(config.get("lora_r")) and not merged
    meta = ["---", "library_name: transformers" if kind == "policy" else "library_name: rlhb-cli",
            "pipeline_tag: text-generation" if kind == "policy" else "pipeline_tag: text-classification",
            f"license: {LICENSES.get(base, 'other')}"]
    if base != "built here" and "/" in base and not Path(base).exists():
        meta.append(f"base_model: {json.dumps(base)}")
    meta += ["tags:", "- rlhb", f"- {kind}", f"- {manifest.get('made_by', stage)}"] + (["- lora"] if lora else [])
    lines = meta + ["---", "", f"# {stage}: a {kind} trained by rlhb", "",
                    f"Trained by `rlhb {manifest.get('made_by', stage)}` (rlhb {manifest.get('versions', {}).get('rlhb-cli', '?')}, "
                    f"git {manifest.get('git_commit') or '?'}, finished {manifest.get('finished_at') or 'now'}) from "
                    f"`{base}`" + ("; LoRA adapters over that base (rlhb merges them on load; `rlhb export` writes "
                                   "a merged copy)." if lora else "; LoRA adapters, if any, are merged." if merged else "."),
                    "", f"License: {LICENSES.get(base, 'that of its base model and of the logs it learned from')}.", ""]
    if kind == "policy" and tokenizer is not None:
        lines += ["## How to prompt it", ""] + prompt_lines(policy_folder or stage_dir / "policy", tokenizer) + [""]
    lines += ["## The data it saw", ""] + data_seen(stage_dir.parent) + [""]
    if evaluation:
        lines += ["## Evaluation (`rlhb evaluate`, sampled answers to held-out queries)", "",
                  "Gold judges exist only on the simulated platform; the gold-free judges are the run's own, trained on "
                  "the logs, and each is as good as its agreement in the evaluation's summary.", ""]
        lines += evaluation_lines(evaluation) + [""]
    lines += ["## Its configuration", "", "```json", json.dumps(config, indent=2, default=str), "```", "",
              "## Its figures (the stage's summary)", "", "```json", json.dumps(figures, indent=2), "```", ""]
    return "\n".join(lines)


def write_stage_cards(stage_dir: Path, tokenizer_of=None, evaluation: dict[str, dict] | None = None) -> list[Path]:
    """Write the card of every policy or judge folder of a stage; `tokenizer_of(folder)` gives a policy's
    tokenizer for its prompt example. Returns the cards written."""
    written = []
    for folder, kind in MODEL_FOLDERS.items():
        target = stage_dir / folder
        if not (target / "config.json").exists() and not (target / "adapter_config.json").exists():
            continue
        tokenizer = tokenizer_of(target) if kind == "policy" and tokenizer_of else None
        storage.atomic_write_text(target / storage.CARD, model_card(stage_dir, kind, tokenizer, evaluation))
        written.append(target / storage.CARD)
    return written
