"""The models of a PPO run: actor, critic and frozen reference, with LoRA and DeepSpeed ZeRO set up.

Full weights: the reference is a frozen copy of the starting policy and the critic (separate) a copy of
its body with a value head, or (shared) a value head on the actor's body. LoRA: one frozen base; the
actor is it with adapters, the reference it with the adapters off, the critic a value head on it.
Under ZeRO-3 weights are sharded as they load, so every copy is read from disk again, born sharded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from trl.models.utils import prepare_deepspeed

from rlhb_cli.errors import RlhbError
from rlhb_cli.models.load import load_causal_lm
from rlhb_cli.models.lora import attach_lora
from rlhb_cli.rl.config import EngineConfig


class PolicyAndValue(nn.Module):
    """Actor and critic as one module, so one optimizer and one (DDP-)wrapped forward serve both.

    `critic_body` is None for a value head sharing the actor's body.
    """

    def __init__(self, actor, critic_body=None):
        super().__init__()
        self.actor = actor
        self.critic_body = critic_body
        hidden = (critic_body or actor).config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        # Zero at the start: a random critic would turn the first advantages into noise and the first
        # policy steps into random ones; with V = 0 the first advantages are the (whitened) returns.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, response_length: int):
        """(logits, values) at the positions that predict the last `response_length` tokens: the LM head
        runs on those only (on a short answer after a long prompt, most of its cost)."""
        shared = self.critic_body is None
        keep = response_length + 1
        out = self.actor(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         output_hidden_states=shared, use_cache=False, logits_to_keep=keep)
        if shared:
            hidden = out.hidden_states[-1]
        else:
            hidden = self.critic_body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
        return out.logits[:, :-1], self.value_head(hidden[:, -keep:-1]).squeeze(-1)

    def critic_parameters(self):
        body = [] if self.critic_body is None else list(self.critic_body.parameters())
        return body + list(self.value_head.parameters())


def reference_logits(reference, actor, input_ids, attention_mask, position_ids, keep: int = 0) -> torch.Tensor:
    """Logits of the frozen starting policy: its own copy, or (LoRA) the actor with its adapters off; at the
    last `keep` positions only (0: all)."""
    if reference is not None:
        return reference(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=keep).logits
    with actor.disable_adapter():
        return actor(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False, logits_to_keep=keep).logits


def starting_policy_copy(actor, policy_path: Path, zero3: bool):
    """Another copy of the starting policy (reference, critic body): a deep copy of the loaded actor, or under
    ZeRO-3, whose weights may be sharded from birth and cannot be copied, a second read from disk."""
    if not zero3:
        return copy.deepcopy(actor)
    return load_causal_lm(policy_path, [])[0]


def build_actor_critic(config: EngineConfig, policy_path: Path, accelerator: Accelerator, zero3: bool,
                       local_minibatch: int, notes: list[str]):
    """(model: PolicyAndValue prepared by accelerate, optimizer, reference or None under LoRA, tokenizer)."""
    actor, tokenizer = load_causal_lm(policy_path, notes)
    tokenizer.padding_side = "left"
    if tokenizer.eos_token_id is None:
        raise RlhbError(f"{policy_path}: the tokenizer has no EOS token; a response could never end")
    if config.lora.r:  # one frozen base: the actor is it with adapters, the reference it without
        actor = attach_lora(actor, config.lora)
        reference = None
    else:
        reference = starting_policy_copy(actor, policy_path, zero3)  # the starting policy, frozen
        reference.requires_grad_(False)
        reference.eval()
    # A separate critic starts from the starting policy's body (a copy: same weights, fitted to the tokenizer).
    critic_body = starting_policy_copy(actor, policy_path, zero3).base_model if config.ppo.critic == "separate" else None
    if config.gradient_checkpointing:
        for body in (actor, critic_body):
            if body is not None:
                body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PolicyAndValue(actor, critic_body)
    # Training mode (from_pretrained leaves eval mode, in which gradient checkpointing is off) without
    # dropout: PPO's ratios compare log-probabilities that dropout would make noisy.
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    optimizer = torch.optim.AdamW([
        {"params": [p for p in actor.parameters() if p.requires_grad], "lr": config.ppo.learning_rate},
        {"params": model.critic_parameters(), "lr": config.ppo.critic_learning_rate}], eps=1e-5, weight_decay=0.0)
    if accelerator.state.deepspeed_plugin is not None:
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # no data loader goes through prepare, so DeepSpeed learns the rows of a pass from its config
        deepspeed_config["train_micro_batch_size_per_gpu"] = local_minibatch
        notes.append(f"under DeepSpeed: gradients clipped by DeepSpeed at its gradient_clipping "
                     f"({deepspeed_config.get('gradient_clipping', 'none')}) over actor and critic together, "
                     f"not at --max-grad-norm each")
        if zero3:
            notes.append(f"under DeepSpeed ZeRO-3: actor, critic and reference sharded across "
                         f"{accelerator.num_processes} process(es); generation "
                         + ("gathers the actor's weights whole" if config.gather_for_generation
                            else "gathers each layer's weights at every token (--no-gather-for-generation)"))
    model, optimizer = accelerator.prepare(model, optimizer)
    if reference is not None and zero3:  # sharded as the actor is, forward passes gathering its layers
        reference = prepare_deepspeed(reference, accelerator)
    elif reference is not None:
        reference = reference.to(accelerator.device)
    return model, optimizer, reference, tokenizer
