"""`rlhb train-dpo`: ALOE's training stage (arXiv 2410.03642): DPO on (preferred, rejected) replies at a turn
of a conversation, with trl's DPOTrainer, from a starting policy.

The pairs are simulate-conversations' preference tree, or any JSONL file whose rows hold `messages` (the
conversation so far, the user's message last), `chosen` and `rejected`. The prompt is the conversation
through the one prompt builder (prompts.PromptFormat.conversation_prompt, in the starting policy's format,
with no behaviour condition: ALOE's policy infers the user from the conversation alone). ALOE fine-tunes on
the preferred replies first and then runs DPO; `--sft-weight` adds that likelihood of the preferred reply
to the DPO loss instead (trl's `sft` loss beside `sigmoid`), one pass for both (0: DPO alone). A row that is
not a pair (no messages, a turn without a role, a last turn not the user's, a reply missing or the same
twice) is written to rejected.jsonl with its line and reason, and counted.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rlhb_cli import rundir, storage
from rlhb_cli.config import field
from rlhb_cli.distributed import param_count, seed_everything
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.load import load_causal_lm, policy_source
from rlhb_cli.prompts import PromptFormat, policy_meta
from rlhb_cli.rundir import MetricsLog
from rlhb_cli.stages.common import mean_train_loss, stop_if_unfinished, trainer_resume_point, trl_config
from rlhb_cli.stages.sft import trainer_callback

STAGE = "train-dpo"
ROLES = ("user", "assistant")


@dataclass
class DPOStageConfig:
    pairs: str = field("simulate-conversations", help="The pairs: the simulate-conversations stage of this run dir "
                                                      "(its preference_tree.jsonl), or a JSONL file of rows with "
                                                      "messages, chosen and rejected.")
    init_from: str = field("train-sft", help="Starting policy: a stage of this run dir, a model folder, a GGUF file "
                                             "or smollm2.")
    reference: str = field("", help="The reference policy of the DPO loss ('' : the starting policy, frozen).")
    beta: float = field(0.1, help="DPO's beta: how far the policy may move from the reference for a margin.")
    sft_weight: float = field(1.0, help="Weight of the preferred reply's likelihood added to the DPO loss "
                                        "(ALOE's SFT on preferred replies, in the same pass; 0: DPO alone, whose "
                                        "tiny policy collapsed here: docs/results.md).")
    dpo_weight: float = field(1.0, help="Weight of the DPO loss (0 with --sft-weight > 0: ALOE's first stage alone, "
                                        "SFT on the preferred replies of the tree).")
    told_persona: bool = field(False, help="Put the user's persona description in every prompt as the condition: "
                                           "the upper bound of a policy told the preferences outright (pairs of "
                                           "a simulate-conversations stage; evaluate-personalization tells it too).")
    learning_rate: float = field(5e-4, help="Peak learning rate (5e-4 suits the tiny model; ~5e-7 a real one).")
    epochs: float = field(1.0, help="Passes over the training pairs.")
    batch_size: int = field(16, help="Pairs per optimizer step.")
    max_length: int = field(256, help="Tokens kept per prompt + reply.")
    validation_share: float = field(0.1, help="Share of conversations whose pairs are held out for validation.")
    max_train_pairs: int = field(0, help="Use at most this many training pairs (0: all).")
    checkpoint_every: int = field(100, help="Optimizer steps between checkpoints.")
    seed: int = field(0, help="Seed of data order and the validation draw.")

    def __post_init__(self):
        if self.beta <= 0 or self.sft_weight < 0 or self.dpo_weight < 0 or self.epochs <= 0 or self.batch_size < 1:
            raise ValueError("beta must be > 0, sft_weight and dpo_weight >= 0, epochs > 0 and batch_size >= 1")
        if not self.sft_weight and not self.dpo_weight:
            raise ValueError("dpo_weight and sft_weight are both 0: no loss to train on")
        if not 0.0 < self.validation_share < 1.0:
            raise ValueError(f"validation_share must be in (0, 1), got {self.validation_share}")


def pair_problem(row) -> str | None:
    """Why a row is not a preference pair at a turn of a conversation (None when it is one)."""
    if not isinstance(row, dict):
        return "not a JSON object"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "field 'messages': missing or empty"
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"field 'messages': turn {number} has no role (user or assistant)"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"field 'messages': turn {number} has no text"
        if message["role"] != ROLES[(number - 1) % 2]:
            return f"field 'messages': turn {number} breaks the user / assistant alternation"
    if messages[-1]["role"] != "user":
        return "field 'messages': the last turn is not the user's"
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"field '{key}': missing or empty"
    if row["chosen"].strip() == row["rejected"].strip():
        return "fields 'chosen' and 'rejected': the same reply"
    return None


def read_pairs(path: Path) -> tuple[list[dict], list[dict]]:
    """(pairs, rejects with line and reason) of a JSONL file."""
    pairs, rejects = [], []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                rejects.append({"line": line_number, "reason": f"not JSON ({exc.msg})"})
                continue
            problem = pair_problem(row)
            if problem:
                rejects.append({"line": line_number, "reason": problem})
            else:
                pairs.append(row | {"line": line_number})
    return pairs, rejects


def held_out(pair: dict, share: float, seed: int) -> bool:
    """Whether a pair's conversation is in the validation share, by a hash of its id or, without one (oasst's
    pairs), of its opening message: a conversation's pairs stay on one side."""
    key = f"{seed}:{pair.get('conversation') or pair['messages'][0]['content']}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2 ** 64 < share


def pairs_file(value: str, run_dir: Path, stage: rundir.StageRun) -> Path:
    path = Path(value)
    if path.suffix == ".jsonl" or path.is_file():
        if not path.is_file():
            raise RlhbError(f"--pairs {value}: no such file")
        stage.add_input("pairs", path)
        return path
    folder = rundir.require_stage(run_dir, value)
    stage.add_input("pairs", folder / "preference_tree.jsonl")
    return folder / "preference_tree.jsonl"


def told_descriptions(pairs_path: Path, stage: rundir.StageRun) -> dict[str, str]:
    """Persona id -> description, from the personas.jsonl beside the tree (--told-persona)."""
    personas = pairs_path.parent / "personas.jsonl"
    if not personas.is_file():
        raise RlhbError(f"--told-persona: no {personas} beside the pairs; give a simulate-conversations stage")
    stage.add_input("personas", personas)
    return {p["id"]: p["description"] for p in map(json.loads, personas.read_text(encoding="utf-8").splitlines())}


def run(config: DPOStageConfig, stage: rundir.StageRun) -> dict:
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    import datasets
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    seed_everything(config.seed)
    run_dir = stage.dir.parent
    path = pairs_file(config.pairs, run_dir, stage)
    pairs, rejects = read_pairs(path)
    descriptions = told_descriptions(path, stage) if config.told_persona else {}
    if config.told_persona:  # a pair whose persona is unknown cannot be told it
        unknown = [p for p in pairs if p.get("persona") not in descriptions]
        rejects += [{"line": p["line"], "reason": f"field 'persona': {p.get('persona')!r} is not in "
                                                  f"{path.parent / 'personas.jsonl'}"} for p in unknown]
        pairs = [p for p in pairs if p.get("persona") in descriptions]
    storage.atomic_write_jsonl(stage.dir / "rejected.jsonl", rejects)
    notes: list[str] = []
    start = policy_source(config.init_from, run_dir, stage, "starting policy")
    model, tokenizer = load_causal_lm(start, notes)
    prompt = PromptFormat.of_policy(policy_meta(start), tokenizer, start)
    reference = None
    if config.reference:
        reference = load_causal_lm(policy_source(config.reference, run_dir, stage, "reference policy"), notes)[0]

    def row(pair: dict) -> dict:
        return {"prompt": prompt.conversation_prompt(pair["messages"], descriptions.get(pair.get("persona"))), "chosen": prompt.completion(pair["chosen"]),
                "rejected": prompt.completion(pair["rejected"])}
    train = [row(p) for p in pairs if not held_out(p, config.validation_share, config.seed)]
    validation = [row(p) for p in pairs if held_out(p, config.validation_share, config.seed)]
    if config.max_train_pairs:
        train = train[:config.max_train_pairs]
    if len(train) < config.batch_size or not validation:
        raise RlhbError(f"{path}: {len(train)} training and {len(validation)} validation pairs ({len(rejects)} "
                        f"rejected: {stage.dir / 'rejected.jsonl'}); need at least --batch-size {config.batch_size} "
                        f"and one")
    terms = [(loss, weight) for loss, weight in (("sigmoid", config.dpo_weight), ("sft", config.sft_weight)) if weight]
    losses, weights = [t[0] for t in terms], [t[1] for t in terms]
    args = trl_config(
        DPOConfig, output_dir=str(stage.dir / "checkpoints"), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=64,
        learning_rate=config.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1,
        eval_strategy="epoch", save_strategy="steps", save_steps=config.checkpoint_every, save_total_limit=1,
        seed=config.seed, data_seed=config.seed, max_length=config.max_length, beta=config.beta,
        loss_type=losses, loss_weights=weights, dataset_num_proc=None)
    metrics = MetricsLog(stage.dir / "metrics.jsonl", stage.trackers)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(train),
                         eval_dataset=datasets.Dataset.from_list(validation),
                         callbacks=[trainer_callback(stage, metrics, STAGE)])
    trainer.remove_callback(PrinterCallback)
    resume_from = trainer_resume_point(stage, metrics)
    before = rundir.read_json(stage.dir / "untrained.json") if resume_from else None
    if before is None:
        before = trainer.evaluate()
        storage.atomic_write_json(stage.dir / "untrained.json", before)
    trainer.train(resume_from_checkpoint=resume_from)
    stop_if_unfinished(trainer)
    after = trainer.evaluate()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    meta = {"stage": STAGE, "aligner": "DPO" if config.dpo_weight else "SFT on preferred replies",
            "condition": "persona" if config.told_persona else "none", "behavior_text": None,
            "prompt_format": prompt.kind, "init_from": config.init_from, "conversation": True}
    with storage.atomic_dir(stage.dir / "policy") as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        storage.atomic_write_json(tmp / "policy.json", meta)

    def figures(evaluation: dict) -> dict:
        return {k.removeprefix("eval_"): round(v, 4) for k, v in evaluation.items()
                if k in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies")}
    return {
        "pairs_read": len(pairs) + len(rejects), "pairs_rejected": len(rejects),
        "train_pairs": len(train), "validation_pairs": len(validation),
        "train_loss": mean_train_loss(trainer), "loss_first": round(rows[0]["loss"], 4) if rows else None,
        "validation_before": figures(before), "validation_after": figures(after),
        "steps": trainer.state.global_step, "prompt_format": prompt.kind,
        "parameters": param_count(model), "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }
