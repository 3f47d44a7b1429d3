"""A judge: a sequence-classification model with its own tokenizer that scores plain text.

Discriminator (1 logit: real or fake), behaviour classifier (one block of logits per behaviour metric)
and reward model (1 logit) are all judges. They take text built by `prompts.judge_text`, never the
policy's token ids, so a judge may tokenize differently from the policy it scores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhb_cli.errors import RlhbError
from rlhb_cli.rundir import atomic_dir

JUDGE_FILE = "judge.json"


@dataclass
class JudgeMeta:
    kind: str  # discriminator | classifier | reward
    max_length: int
    with_behavior: bool
    heads: dict[str, int] = field(default_factory=dict)  # classifier: metric -> number of bins, in logit order
    extra: dict = field(default_factory=dict)  # e.g. the classifier's per-bin decoding table


class Judge:
    def __init__(self, model, tokenizer, meta: JudgeMeta):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.meta.max_length,
                              return_tensors="pt")

    def forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Logits for each text, in eval mode, batch by batch (restores the previous mode)."""
        was_training = self.model.training
        self.model.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            out.append(self.forward_logits(self.encode(texts[start:start + batch_size])).float())
        self.model.train(was_training)
        if not out:
            return torch.zeros(0, self.model.config.num_labels)
        return torch.cat(out)

    def save(self, path: Path) -> None:
        with atomic_dir(Path(path)) as tmp:
            self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            (tmp / JUDGE_FILE).write_text(json.dumps(asdict(self.meta), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Judge":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        path = Path(path)
        if not (path / JUDGE_FILE).exists():
            raise RlhbError(f"{path}: not a saved rlhb judge (no {JUDGE_FILE})")
        meta = JudgeMeta(**json.loads((path / JUDGE_FILE).read_text(encoding="utf-8")))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path))
        model.eval()
        return cls(model, tokenizer, meta)
