"""PAS, the prompt augmentation system (method-spec §2): curate prompts, generate complementary instructions with
few-shot prompting, critique them, train a small model that writes them, and use it (`PromptAugmenter`).

Modules: records (resumable jsonl), embed (MiniLM or hashed n-gram embeddings), dedup (exact, MinHash, HNSW),
curate (loading, quality, categories, quotas), template (prompt texts), clients (HF and OpenAI-compatible),
rules (code reject rules), generate (generation and critique steps), pipeline (the steps on files), augment and cli.
Imports are lazy so that `import nova_rt.pas` stays cheap.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "PromptAugmenter":
        from nova_rt.pas.augment import PromptAugmenter

        return PromptAugmenter
    raise AttributeError(f"module 'nova_rt.pas' has no attribute {name!r}")


__all__ = ["PromptAugmenter"]
