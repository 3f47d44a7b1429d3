"""`rlhb export`: a policy as a self-contained Hugging Face model directory that serves without rlhb.

LoRA adapters are merged into their base, the tokenizer and a generation config (EOS, pad) go beside the
weights, and README.md is the policy's model card (models/card.py) with its evaluation figures when the run
has them; it says how the policy must be prompted: the format and the behaviour it was trained to be asked
for (also in rlhb_prompt.json, for code). `from_pretrained` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path

from rlhb_cli import rundir, storage
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.card import EXAMPLE_QUERY, asked_behavior, evaluation_of, model_card
from rlhb_cli.models.load import load_causal_lm
from rlhb_cli.prompts import PromptFormat, chat_messages, policy_meta


def export_policy(source: Path, out: Path) -> dict:
    """Write `source` (a policy folder) into `out` as a plain model directory; returns what was written."""
    if out.exists() and any(out.iterdir()):
        raise RlhbError(f"{out}: exists and is not empty; give a new folder")
    model, tokenizer = load_causal_lm(source, [])
    prompt = PromptFormat.of_policy(policy_meta(source), tokenizer, source)
    stage_dir = source.parent
    condition = asked_behavior(source)
    manifest = rundir.read_json(stage_dir / rundir.MANIFEST) if (stage_dir / rundir.MANIFEST).exists() else {}
    stage = manifest.get("stage", stage_dir.name)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    example = prompt.prompt(EXAMPLE_QUERY, condition)
    with storage.atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        storage.atomic_write_json(tmp / "rlhb_prompt.json", {
            "format": prompt.kind, "condition": condition,
            "messages_example": chat_messages(EXAMPLE_QUERY, condition) if prompt.kind == "chat" else None,
            "prompt_example": example})
        storage.atomic_write_text(tmp / storage.CARD, model_card(
            stage_dir, "policy", tokenizer, evaluation_of(stage_dir.parent, stage), merged=True, policy_folder=source))
    return {"source": str(source), "out": str(out), "stage": stage, "prompt_format": prompt.kind,
            "condition": condition, "files": sorted(p.name for p in out.iterdir())}
