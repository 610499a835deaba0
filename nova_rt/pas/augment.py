"""Use a trained PAS model: append a complementary instruction to each prompt, never rewriting the prompt.

    PromptAugmenter("runs/pas/pas_model/final").augment(["Why is the sky blue?"])
    -> ["Why is the sky blue?\n\nExplain the physics in simple terms ..."]

The model sees `template.format_pas_input(prompt)` as a single user turn through its chat template, exactly as the
SFT stage formatted the training pairs, and decodes greedily. The output is `prompt + separator + complement`; an
empty complement leaves the prompt as it was. The GRPO and eval stages can call `augment` on their prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from nova_rt.pas.clients import HFChatClient
from nova_rt.pas.generate import clean_complement
from nova_rt.pas.template import format_pas_input


class PromptAugmenter:
    """Loads the PAS model once; `augment` and `complements` take a list of prompts (batched)."""

    def __init__(self, model_dir: str, *, max_new_tokens: int = 64, batch_size: int = 8, separator: str = "\n\n",
                 dtype: str = "float32", model=None, tokenizer=None):
        self.client = HFChatClient(model_dir, dtype=dtype, batch_size=batch_size, model=model, tokenizer=tokenizer)
        self.max_new_tokens, self.separator = max_new_tokens, separator

    def complements(self, prompts: Sequence[str]) -> list[str]:
        """The complement of each prompt (empty string when generation failed or produced nothing)."""
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        convs = [[{"role": "user", "content": format_pas_input(p)}] for p in prompts]
        out = self.client.chat(convs, max_new_tokens=self.max_new_tokens, temperature=0.0)
        return ["" if isinstance(c, BaseException) else clean_complement(c) for c in out]

    def augment(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt, unchanged, followed by `separator` and its complement."""
        if isinstance(prompts, str):
            raise TypeError("augment takes a list of prompts; wrap a single prompt as [prompt]")
        return [p + self.separator + c if c else p for p, c in zip(prompts, self.complements(prompts))]
