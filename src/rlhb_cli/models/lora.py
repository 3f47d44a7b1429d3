"""LoRA adapters, one way for every stage that trains a causal LM (SFT and the PPO engine): the settings,
the adapters attached, and where a LoRA policy's base lives (policy.json's lora_base; loading merges)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhb_cli.config import field
from rlhb_cli.errors import RlhbError


@dataclass
class LoRASettings:
    """LoRA adapters instead of full weights (r = 0: full weights)."""

    r: int = field(0, flat="lora_r", help="Train LoRA adapters of this rank instead of every weight (0: full "
                                          "weights).")
    alpha: float = field(32.0, flat="lora_alpha",
                         help="LoRA scaling numerator (the adapter's update is scaled by alpha / r).")
    target_modules: str = field("all-linear", flat="lora_target_modules",
                                help="LoRA: the modules given adapters (peft's target_modules; comma-separated "
                                     "names, or all-linear: the attention and MLP projections).")

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"lora_r must be >= 0, got {self.r}")


def attach_lora(model, settings: LoRASettings):
    """`model` as a peft model: trainable LoRA adapters over its frozen weights."""
    # deferred: the ML libraries take seconds to import; `rlhb --help` and `status` load this module
    from peft import LoraConfig, get_peft_model
    targets = settings.target_modules
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise RlhbError(f"--lora-target-modules {targets!r}: {str(exc).splitlines()[0]}") from None


def base_reference(base: Path, policy_dir: Path) -> str:
    """Where a LoRA policy's base is: relative to the run dir when inside it (so the run dir can move)."""
    run_dir = Path(policy_dir).resolve().parent.parent
    try:
        return str(Path(base).resolve().relative_to(run_dir))
    except ValueError:
        return str(Path(base).resolve())
