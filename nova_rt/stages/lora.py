"""The `lora` config section (not a stage): LoRA adapters for sft, dpo, rm and grpo on the hf backend.

It lives here because the config loader imports `nova_rt.stages.<section>` on demand. With `lora.rank` > 0 the
base model is frozen and only low-rank adapters (peft's LoRA on the chosen linear layers of every decoder layer)
train, plus the score head in full for rm; checkpoints hold the trained tensors alone and run.dir/final is a PEFT
adapter directory. The mechanics are in nova_rt.models.lora; where LoRA cannot run yet is refused at config load
(nova_rt.config_checks). docs/lora.md describes the whole feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nova_rt.config import register_section
from nova_rt.config_values import check_range


@register_section("lora")
@dataclass(kw_only=True)
class LoraConfig:
    rank: int = 0
    """Rank r of the adapters A (r x in) and B (out x r); 0: no LoRA, the whole model trains."""
    alpha: float = 16.0
    """Scale numerator: an adapter adds (alpha / rank) * B A x to its layer's output."""
    dropout: float = 0.0
    """Dropout on the adapters' input x while training (peft's lora_dropout); 0: none."""
    target_modules: list[str] = field(default_factory=list)
    """Names of the linear layers inside each decoder layer that get an adapter (q_proj, v_proj, ...); empty: every
    linear layer of attention and MLP. A name no decoder layer has is an error listing the ones it has."""
    merge_final: bool = False
    """Also write run.dir/final_merged: the base with the adapters merged in (peft's merge_and_unload), a full HF
    model directory."""

    def validate(self) -> None:
        check_range("lora.rank", self.rank, ge=0)
        check_range("lora.alpha", self.alpha, gt=0)
        check_range("lora.dropout", self.dropout, ge=0)
        if self.dropout >= 1:
            raise ValueError(f"lora.dropout: must be below 1 (1 drops every input), got {self.dropout}")
        if len(set(self.target_modules)) != len(self.target_modules) or any(not n for n in self.target_modules):
            raise ValueError(f"lora.target_modules: names must be non-empty and distinct, got {self.target_modules}")
