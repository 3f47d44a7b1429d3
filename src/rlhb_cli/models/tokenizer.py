"""A byte-level BPE tokenizer trained on the run's own texts, for the embedded tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Plain role-prefixed turns; enough for chat-style use of a tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path | None = None):
    """Train byte-level BPE on `texts`; returns a PreTrainedTokenizerFast with pad/bos/eos/unk set."""
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                        unk_token=UNK, padding_side="right")
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def ensure_pad_token(tokenizer, notes: list[str]) -> None:
    """Batching needs a pad token; a tokenizer without one gets its EOS (or a new <pad>), and we say so."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        notes.append(f"the tokenizer had no pad token; using its EOS token {tokenizer.eos_token!r} for padding")
    else:
        tokenizer.add_special_tokens({"pad_token": PAD})
        notes.append("the tokenizer had no pad or EOS token; added <pad> (the model's embeddings were resized)")
