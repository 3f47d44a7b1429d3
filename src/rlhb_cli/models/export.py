"""`rlhb export`: a policy as a self-contained Hugging Face model directory that serves without rlhb.

LoRA adapters are merged into their base, the tokenizer and a generation config (EOS, pad) go beside the
weights, and README.md is a model card (YAML metadata, then the stage, its base, the data and config it
saw, its headline figures) that says how the policy must be prompted: the format and the behaviour it was
trained to be asked for (also in rlhb_prompt.json, for code). `from_pretrained` needs nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhb_cli import rundir, storage
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.load import load_causal_lm
from rlhb_cli.prompts import PromptFormat, chat_messages, policy_meta


HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # a named model's own name on the Hub


def base_model(stage_dir: Path, hops: int = 8) -> str:
    """The model a policy grew from: its stage's --model, or through --init-from the earlier stage's."""
    manifest = rundir.read_json(stage_dir / rundir.MANIFEST) if (stage_dir / rundir.MANIFEST).exists() else {}
    config = manifest.get("config", {})
    if config.get("model"):
        return HUB_IDS.get(config["model"], config["model"])
    earlier = stage_dir.parent / str(config.get("init_from") or "")
    if config.get("init_from") and hops and (earlier / rundir.MANIFEST).exists():
        return base_model(earlier, hops - 1)
    return str(config.get("init_from") or "unknown")


def _card(stage: str, manifest: dict, summary: dict, meta: dict, prompt: PromptFormat, example: str,
          base: str) -> str:
    config = manifest.get("config", {})
    inputs = "\n".join(f"- {name}: `{entry.get('path')}` (sha256 {str(entry.get('sha256'))[:16]}...)"
                       for name, entry in manifest.get("inputs", {}).items() if isinstance(entry, dict))
    figures = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    condition = meta.get("behavior_text") if meta.get("condition") != "none" else None
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        f"base_model: {json.dumps(str(base))}", "tags:", "- rlhb", f"- {stage}", "---", "",
        f"# {stage}: a policy aligned by rlhb", "",
        f"Trained by `rlhb {stage}` (git {manifest.get('git_commit') or '?'}, finished "
        f"{manifest.get('finished_at', '?')}), grown from `{base}`; LoRA adapters, if any, are merged.", "",
        "## How to prompt it", "",
        f"Format: **{prompt.kind}**" + (" (the tokenizer's chat template: the behaviour as the system turn, the "
                                        "query as the user's)" if prompt.kind == "chat" else
                                        " (\"Question: ... / Users: ... / Answer:\", the answer after one space)")
        + (f"; asked for the behaviour: {condition!r}." if condition else "; asked with no behaviour condition."), "",
        "```", example, "```", "",
        "## What it saw", "", inputs or "- (no recorded inputs)", "",
        "## Its configuration", "", "```json", json.dumps(config, indent=2, default=str), "```", "",
        "## Its figures (the stage's summary)", "", "```json", json.dumps(figures, indent=2), "```", ""])


def export_policy(source: Path, out: Path) -> dict:
    """Write `source` (a policy folder) into `out` as a plain model directory; returns what was written."""
    if out.exists() and any(out.iterdir()):
        raise RlhbError(f"{out}: exists and is not empty; give a new folder")
    meta = policy_meta(source)
    model, tokenizer = load_causal_lm(source, [])
    prompt = PromptFormat.of_policy(meta, tokenizer, source)
    stage_dir = source.parent
    condition = None if meta.get("condition") == "none" else meta.get("behavior_text")
    behavior = stage_dir.parent / "prepare-behaviors" / "behavior.json"
    if meta.get("condition") == "most_preferred" and condition is None and behavior.exists():
        # an SFT policy made before its policy.json named the text it is asked for
        condition = rundir.read_json(behavior)["most_preferred_text"]
    meta = meta | {"behavior_text": condition}
    manifest = rundir.read_json(stage_dir / rundir.MANIFEST) if (stage_dir / rundir.MANIFEST).exists() else {}
    summary = rundir.read_json(stage_dir / rundir.SUMMARY) if (stage_dir / rundir.SUMMARY).exists() else {}
    stage = manifest.get("stage", stage_dir.name)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    example = prompt.prompt("What is the capital of France?", condition)
    with storage.atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        storage.atomic_write_json(tmp / "rlhb_prompt.json", {
            "format": prompt.kind, "condition": condition,
            "messages_example": chat_messages("What is the capital of France?", condition) if prompt.kind == "chat"
            else None, "prompt_example": example})
        storage.atomic_write_text(tmp / "README.md", _card(stage, manifest, summary, meta, prompt, example,
                                                           base_model(stage_dir)))
    return {"source": str(source), "out": str(out), "stage": stage, "prompt_format": prompt.kind,
            "condition": condition, "files": sorted(p.name for p in out.iterdir())}
