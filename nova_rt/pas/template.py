"""Prompt texts of PAS: the training template, the few-shot generation prompt, the critique and the judge prompt.

The PAS model is trained on `format_pas_input(prompt)` -> complement (method-spec §2, "Training"): a fixed
background paragraph, then the user prompt and an open "complementary information" slot. `PromptAugmenter` must
format its input with the same function, so the wording lives in one place.

Golden examples are the hand-written (category, prompt, complement) seed pairs in data/pas/seeds.jsonl, 4-5 per
category; `load_golden_examples` validates them and `generation_messages` turns them into few-shot chat turns.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PAS_BACKGROUND = (
    "Background: you are an expert who improves prompts for an AI assistant. Read the user's prompt and write a "
    "short complementary instruction of about 30 words that helps the assistant answer it better: what to cover, "
    "which format and tone to use. Do not answer the prompt and do not repeat or rewrite it."
)

GENERATION_SYSTEM = (
    "You write complementary instructions for user prompts. Given a prompt, reply with one or two sentences that "
    "tell an assistant how to give an excellent answer: what to include, the format and the tone. Never answer the "
    "prompt yourself, never repeat it, stay on its topic, use the prompt's language, and stay under 40 words."
)

CRITIQUE_SYSTEM = (
    "You review complementary instructions written for user prompts. A good complement stays on the prompt's intent, "
    "adds guidance on content, format or tone, does not answer the prompt, makes no excessive demands, is short, and "
    "uses the prompt's language. Reply with JSON only, with the keys \"reason\" (one sentence), \"is_correct\" "
    "(\"yes\" or \"no\") and \"final\" (the complement, rewritten if it was not correct)."
)

JUDGE_SYSTEM = (
    "You rate user prompts for a training set. Score the prompt from 1 to 10 for clarity, practicality and "
    "difficulty taken together (1: meaningless or empty, 10: clear, useful and substantial). "
    "Reply with the number only."
)


@dataclass(frozen=True)
class GoldenExample:
    category: str
    prompt: str
    complement: str


def format_pas_input(prompt: str) -> str:
    """The PAS model's input for `prompt` (training and inference)."""
    return f"{PAS_BACKGROUND}\n\n<User prompt>: {prompt}\n\n<Complementary information>:"


def load_golden_examples(path: str | Path) -> dict[str, list[GoldenExample]]:
    """Seed pairs grouped by category; each jsonl row needs non-empty `category`, `prompt`, `complement`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pas.seeds_file: {path} does not exist")
    out: dict[str, list[GoldenExample]] = defaultdict(list)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        for key in ("category", "prompt", "complement"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}:{lineno}: field '{key}' must be a non-empty string")
        out[row["category"]].append(GoldenExample(row["category"], row["prompt"].strip(), row["complement"].strip()))
    if not out:
        raise ValueError(f"{path}: no golden examples")
    return dict(out)


def generation_messages(prompt: str, shots: list[GoldenExample]) -> list[dict]:
    """Chat messages asking for the complement of `prompt`, with the golden examples as earlier turns."""
    msgs = [{"role": "system", "content": GENERATION_SYSTEM}]
    for ex in shots:
        msgs.append({"role": "user", "content": f"Prompt: {ex.prompt}"})
        msgs.append({"role": "assistant", "content": ex.complement})
    msgs.append({"role": "user", "content": f"Prompt: {prompt}"})
    return msgs


def critique_messages(prompt: str, complement: str, shot: GoldenExample | None = None) -> list[dict]:
    """Chat messages asking the critic for {reason, is_correct, final} about one complement."""
    msgs = [{"role": "system", "content": CRITIQUE_SYSTEM}]
    if shot is not None:  # one worked verdict keeps small critics on the JSON format
        msgs.append({"role": "user", "content": f"Prompt: {shot.prompt}\nComplement: {shot.complement}"})
        msgs.append({"role": "assistant", "content": json.dumps(
            {"reason": "It adds useful guidance without answering.", "is_correct": "yes", "final": shot.complement})})
    msgs.append({"role": "user", "content": f"Prompt: {prompt}\nComplement: {complement}"})
    return msgs


def judge_messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": f"Prompt: {prompt}"}]
