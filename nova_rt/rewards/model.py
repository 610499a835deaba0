"""Reward from a trained reward-model directory (an HF AutoModelForSequenceClassification with one output, e.g.
what the `rm` stage saves).

Each response is scored in its conversation: the prompt messages plus an assistant turn holding the pre-filled
prefix and the response, rendered with the RM's own chat template (the format the RM stage trains on). Sequences are
scored one at a time, unpadded: sequence-classification heads pool at the last non-pad token, and chat models often
use the end-of-turn token as pad, so padding a batch could move the pooled position. Scores are the raw head output
times `scale` plus `shift`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nova_rt.rewards import register_reward


class RewardModelScorer:
    def __init__(self, path: str, *, dtype: str = "float32", device: str = "cpu", max_length: int = 4096):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from nova_rt.models.loading import to_dtype

        if not Path(path).is_dir():
            raise ValueError(f"reward model directory not found: {path}")
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=to_dtype(dtype)).to(device)
        self.model.eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has num_labels={self.model.config.num_labels}; expected 1")
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id or self.tok.eos_token_id
        self.device, self.max_length = device, max_length

    def render(self, sample: dict, completion: str) -> list[int]:
        msgs = list(sample["messages"]) + [{"role": "assistant", "content": sample.get("prefill", "") + completion}]
        if self.tok.chat_template:
            text = self.tok.apply_chat_template(msgs, tokenize=False)
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in msgs)
        return self.tok(text, add_special_tokens=False)["input_ids"][-self.max_length:]

    @torch.no_grad()
    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        out = []
        for text, sample in zip(completions, samples):
            ids = torch.tensor([self.render(sample, text)], device=self.device)
            out.append(float(self.model(input_ids=ids).logits.reshape(-1)[0]))
        return out


@register_reward("reward_model")
def reward_model_reward(path: str, scale: float = 1.0, shift: float = 0.0, dtype: str = "float32",
                        device: str = "cpu", max_length: int = 4096, base_dir: str | None = None):
    p = Path(path)
    if not p.is_absolute() and not p.exists() and base_dir is not None:
        p = Path(base_dir) / p
    scorer = RewardModelScorer(str(p), dtype=dtype, device=device, max_length=max_length)

    def score(completions: list[str], samples: list[dict]) -> list[float]:
        return [scale * s + shift for s in scorer(completions, samples)]

    return score
