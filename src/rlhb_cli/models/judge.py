"""A judge: a sequence-classification model with its own tokenizer that scores plain text.

Discriminator (1 logit: real or fake), behaviour classifier (one block of logits per behaviour metric)
and reward model (1 logit) are all judges. They take text built by `prompts.judge_text`, never the
policy's token ids, so a judge may tokenize differently from the policy it scores.

A judge on a frozen body (`meta.extra["frozen_body"]`, a BERT-style encoder) learns only its head
(pooler and classifier); the body's features of a text never change, so training reads each text
through the body once and learns from the cached features. A judge with `meta.extra["trained_top_layers"]`
learns only its top layers and head: its embeddings and lower layers stay as loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from rlhb_cli.errors import RlhbError
from rlhb_cli.storage import atomic_dir

JUDGE_FILE = "judge.json"
TOKEN_STORE_SIZE = 50_000  # texts whose token ids a judge keeps (see Judge.tokenize; ~0.5 kB each)


def padded_batch(rows, pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Token id rows (lists or arrays) as one batch of `input_ids` and `attention_mask`, padded with
    `pad_id` on the right (or the left): what a tokenizer call with padding makes of the same ids."""
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, span] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass
class JudgeMeta:
    kind: str  # discriminator | classifier | reward
    max_length: int
    with_behavior: bool
    heads: dict[str, int] = field(default_factory=dict)  # classifier: metric -> number of bins, in logit order
    extra: dict = field(default_factory=dict)  # e.g. the classifier's per-bin decoding table


def head_of(model) -> torch.nn.Module | None:
    """The part of a BERT-style sequence classifier after its encoder (pooler, dropout, classifier) as one
    module over the first token's hidden state; None for a model without that shape."""
    pooler = getattr(model.base_model, "pooler", None)
    classifier, dropout = getattr(model, "classifier", None), getattr(model, "dropout", None)
    if pooler is None or not isinstance(classifier, torch.nn.Linear) or not isinstance(dropout, torch.nn.Dropout):
        return None
    return _PooledHead(pooler, dropout, classifier)


BODY_LEARNING_KEYS = ("frozen_body", "trained_top_layers")  # the keys of `extra` that `body_learning` writes


def body_learning(freeze_backbone: bool, train_top_layers: int) -> dict:
    """What of a judge's body learns, as its meta records it (`extra`): all of it, none, or the top layers."""
    if train_top_layers < 0:
        raise ValueError(f"train_top_layers must be >= 0, got {train_top_layers}")
    if train_top_layers and freeze_backbone:
        raise ValueError("train_top_layers and freeze_backbone exclude each other (a frozen backbone trains none)")
    if freeze_backbone:
        return {"frozen_body": True}
    return {"trained_top_layers": train_top_layers} if train_top_layers else {}


def freeze_below_top_layers(model, top: int) -> None:
    """Freeze a judge's embeddings and every layer of its body but the top `top` (the rest learns)."""
    body = model.base_model
    layers = next((m for m in body.modules() if isinstance(m, torch.nn.ModuleList)
                   and len(m) == model.config.num_hidden_layers), None)
    if layers is None or top > len(layers):
        raise RlhbError(f"cannot train the top {top} layers of {type(model).__name__}: it has "
                        f"{'no layer list' if layers is None else f'{len(layers)} layers'}")
    embeddings = body.get_input_embeddings()
    for module in [embeddings, getattr(body, "embeddings", embeddings), *layers[:len(layers) - top]]:
        for p in module.parameters():
            p.requires_grad_(False)


def learning_weights(model) -> dict[str, torch.Tensor]:
    """The model's state, or only the weights that learn when some are frozen (the rest are on disk)."""
    weights = model.state_dict()
    if any(not p.requires_grad for p in model.parameters()):
        learning = {name for name, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in learning}
    return weights


def load_learning_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Put back what `learning_weights` kept: every weight, or only the learning ones when some are frozen."""
    model.load_state_dict(weights, strict=all(p.requires_grad for p in model.parameters()))


def attach_judge_lora(model, rank: int, alpha: float):
    """A judge (sequence classifier) as a peft model: LoRA adapters on its body, its head trained in full."""
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="SEQ_CLS",
                                            target_modules="all-linear"))


class _PooledHead(torch.nn.Module):
    def __init__(self, pooler, dropout, classifier):
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(first_token[:, None, :])))


class Judge:
    def __init__(self, model, tokenizer, meta: JudgeMeta):
        self.model = model
        self.tokenizer = tokenizer
        self.meta = meta
        self.head = None
        self.feature_cache: dict[str, torch.Tensor] | None = None  # text -> frozen body features, when on
        self._token_ids: dict[str, np.ndarray] = {}  # text -> token ids (see `tokenize`)
        if meta.extra.get("trained_top_layers"):
            freeze_below_top_layers(model, int(meta.extra["trained_top_layers"]))
        if meta.extra.get("frozen_body"):
            self.head = head_of(model)
            if self.head is None:
                raise RlhbError(f"a frozen body needs a BERT-style encoder (pooler and classifier), not "
                                f"{type(model).__name__}; use the minilm backbone or train the whole judge")
            for p in model.base_model.parameters():
                p.requires_grad_(False)
            for p in self.head.parameters():
                p.requires_grad_(True)

    @property
    def frozen_body(self) -> bool:
        return self.head is not None

    def cache_features(self, on: bool = True) -> None:
        """Keep the body's features of every text read (a frozen body only: they never change)."""
        self.feature_cache = {} if on and self.frozen_body else None

    @torch.no_grad()
    def body_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen body's first-token hidden state, always in eval mode (no dropout: a fixed feature)."""
        body = self.model.base_model
        was_training = body.training
        body.eval()
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        body.train(was_training)
        return hidden[:, 0].float()

    def features(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Body features of each text from the cache (`cache_features` first): each distinct text goes
        through the body once."""
        if self.feature_cache is None:
            raise RuntimeError("features() reads the cache of a frozen body: call cache_features() first")
        missing = [t for t in dict.fromkeys(texts) if t not in self.feature_cache]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            self.feature_cache.update(zip(chunk, self.body_features(self.encode(chunk))))
        return torch.stack([self.feature_cache[t] for t in texts])

    def tokenize(self, texts: list[str]) -> None:
        """Token ids of the texts not yet known, in one tokenizer call, kept for `encode`: RL reads the same
        texts again (a generated response scored, then learned from; logged rows drawn again) and a call
        costs about as much in Python as in tokenizing. When the store is full, the oldest half of the texts
        this call does not read goes."""
        wanted = dict.fromkeys(texts)
        missing = [t for t in wanted if t not in self._token_ids]
        if not missing:
            return
        if len(self._token_ids) + len(missing) > TOKEN_STORE_SIZE:
            for text in [t for t in self._token_ids if t not in wanted][:len(self._token_ids) // 2]:
                del self._token_ids[text]
        ids = self.tokenizer(missing, truncation=True, max_length=self.meta.max_length)["input_ids"]
        self._token_ids.update(zip(missing, (np.asarray(i, dtype=np.int32) for i in ids)))

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The padded batch the tokenizer itself would make (its padding side and pad id), from `tokenize`."""
        self.tokenize(texts)
        return padded_batch([self._token_ids[t] for t in texts], self.tokenizer.pad_token_id,
                            left=self.tokenizer.padding_side == "left")

    def forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.frozen_body:
            return self.head(self.body_features(batch))
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Logits for each text, in eval mode, batch by batch (restores the previous mode)."""
        if not texts:
            return torch.zeros(0, self.model.config.num_labels)
        was_training = self.model.training
        self.model.eval()
        if self.feature_cache is not None:
            out = [self.head(self.features(texts, batch_size)).float()]
        else:
            out = [self.forward_logits(self.encode(texts[start:start + batch_size])).float()
                   for start in range(0, len(texts), batch_size)]
        self.model.train(was_training)
        return torch.cat(out)

    def save(self, path: Path) -> None:
        with atomic_dir(Path(path)) as tmp:
            self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            (tmp / JUDGE_FILE).write_text(json.dumps(asdict(self.meta), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Judge":
        # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        path = Path(path)
        if not (path / JUDGE_FILE).exists():
            raise RlhbError(f"{path}: not a saved rlhb judge (no {JUDGE_FILE})")
        meta = JudgeMeta(**json.loads((path / JUDGE_FILE).read_text(encoding="utf-8")))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path))
        model.eval()
        return cls(model, tokenizer, meta)
