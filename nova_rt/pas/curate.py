"""Curate raw prompts for PAS: load, deduplicate, score quality, assign categories, select per-category quotas.

Follows the PAS data selection (method-spec §2): dedup, a quality filter with a threshold, a category label, then
a per-category selection. Quality scorers and categorizers are small classes behind one call each, so a trained
scorer or classifier can replace them:
  - `heuristic_quality`: 0.4 * min(words, 6) / 6 + 0.3 * distinct-word ratio + 0.3 * [has a function word or a
    task verb, or is in a non-Latin script]. Greetings and one-word tests score about 0.37, key-mashing about 0.43,
    a real four-word question 0.87; the default threshold is 0.5.
  - `JudgeScorer`: asks the generator client for a 1-10 rating (template.JUDGE_SYSTEM), mapped to (s - 1) / 9.
  - `EmbeddingCategorizer`: nearest golden seed prompt by cosine (the seeds are the category anchors);
    `KeywordCategorizer`: most keyword hits; `given`: the row's own `category` field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from nova_rt.pas.dedup import normalize_text
from nova_rt.pas.records import read_jsonl
from nova_rt.pas.rules import STOPWORDS, dominant_script, words

_TEXT_KEYS = ("prompt", "text", "instruction", "question", "query")
_TASK_WORDS = set("what why how who when where which write explain describe draft create compose give list solve "
                  "find compute prove summarize translate design implement convert help".split())
_FUNCTION_WORDS = set().union(*map(set, STOPWORDS.values())) | _TASK_WORDS


# ----------------------------------------------------------------------------------------------- loading
def _prompt_of(row: dict, where: str) -> str | None:
    """The single-turn prompt of a row; None for multi-turn conversations (PAS uses single-turn prompts only)."""
    for key in _TEXT_KEYS:
        if isinstance(row.get(key), str):
            return row[key]
    msgs = row.get("messages") or row.get("conversation") or row.get("conversations")
    if isinstance(msgs, list):
        users = [message.get("content") for message in msgs
                 if isinstance(message, dict) and message.get("role") in ("user", "human")]
        if len(users) != 1:
            return None
        if isinstance(users[0], str):
            return users[0]
    raise ValueError(f"{where}: no prompt field (expected one of {', '.join(_TEXT_KEYS)} or messages)")


def _iter_file(path: Path) -> Iterable[tuple[str, dict]]:
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: use its "train" split, or its only split
            dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset.keys()))]
        for i, row in enumerate(dataset):
            yield f"{path}[{i}]", dict(row)
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row
    elif path.exists():
        for i, row in enumerate(read_jsonl(path, tolerate_partial_tail=False)):
            yield f"{path}:{i + 1}", row
    else:
        raise FileNotFoundError(f"pas.input_files: {path} does not exist")


def load_prompts(paths: Sequence[str | Path]) -> tuple[list[dict], Counter]:
    """Rows {id, prompt, category?} from jsonl/json files or `datasets` directories, and skip counts.

    Rows without an `id` get `p-<sha1 of the normalised text>`, which is stable across reruns; two rows with the
    same explicit id but different text are an error."""
    rows, skipped, seen = [], Counter(), {}
    for path in paths:
        for where, row in _iter_file(Path(path)):
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            text = _prompt_of(row, where)
            if text is None:
                skipped["multi_turn"] += 1
                continue
            if not text.strip():
                skipped["empty"] += 1
                continue
            rid = str(row["id"]) if row.get("id") is not None else \
                "p-" + hashlib.sha1(normalize_text(text).encode()).hexdigest()[:12]
            if rid in seen and seen[rid] != text and row.get("id") is not None:
                raise ValueError(f"{where}: id {rid!r} is used by two different prompts")
            seen[rid] = text
            out = {"id": rid, "prompt": text.strip()}
            if isinstance(row.get("category"), str):
                out["category"] = row["category"]
            rows.append(out)
    return rows, skipped


# ----------------------------------------------------------------------------------------------- quality
def heuristic_quality(text: str) -> float:
    """Cheap prompt quality in [0, 1]; see the module docstring for the formula."""
    tokens = words(text)
    if not tokens:
        return 0.0
    length = min(len(tokens), 6) / 6
    distinct = len(set(tokens)) / len(tokens)
    script = dominant_script(text)
    meaningful = script not in (None, "LATIN") or any(word in _FUNCTION_WORDS for word in tokens)
    return round(0.4 * length + 0.3 * distinct + 0.3 * float(meaningful), 4)


class JudgeScorer:
    """Quality from an LLM judge through a chat client: a 1-10 rating mapped to [0, 1].

    An unparseable reply falls back to `heuristic_quality` (recorded as source "heuristic")."""

    _NUM = re.compile(r"\b(10|[1-9])(?:\.\d+)?\b")

    def __init__(self, client, max_new_tokens: int = 8):
        self.client, self.max_new_tokens = client, max_new_tokens

    def parse(self, reply: str) -> float | None:
        match = self._NUM.search(reply)
        return None if match is None else (float(match.group(1)) - 1.0) / 9.0

    def stream(self, texts: Sequence[str]):
        """Yield (index, score, source) as the client finishes each prompt."""
        from nova_rt.pas.template import judge_messages

        convs = [judge_messages(text) for text in texts]
        for i, reply in self.client.stream(convs, max_new_tokens=self.max_new_tokens, temperature=0.0):
            score = None if isinstance(reply, BaseException) else self.parse(reply)
            if score is None:
                yield i, heuristic_quality(texts[i]), "heuristic"
            else:
                yield i, round(score, 4), "judge"


# ----------------------------------------------------------------------------------------------- categories
class KeywordCategorizer:
    """Category with the most keyword hits (whole words or phrases, case-insensitive); `fallback` on no hit."""

    def __init__(self, keywords: dict[str, list[str]], fallback: str = "other"):
        if not keywords:
            raise ValueError("pas.curate.keywords: the keyword categorizer needs {category: [keywords]}")
        self.patterns = {category: [re.compile(rf"\b{re.escape(keyword.lower())}\b") for keyword in listed]
                         for category, listed in keywords.items()}
        self.fallback = fallback

    def __call__(self, texts: Sequence[str]) -> list[str]:
        out = []
        for text in texts:
            low = text.lower()
            hits = {category: sum(bool(pattern.search(low)) for pattern in patterns)
                    for category, patterns in self.patterns.items()}
            best = max(hits, key=lambda category: hits[category])
            out.append(best if hits[best] > 0 else self.fallback)
        return out


class EmbeddingCategorizer:
    """Nearest anchor by cosine: anchors are example prompts per category (the golden seeds by default).

    A category scores the mean of its `top_k` most similar anchors, which is steadier than the single nearest."""

    def __init__(self, embedder, anchors: dict[str, list[str]], top_k: int = 2):
        if not anchors:
            raise ValueError("pas: the embedding categorizer needs anchor prompts per category (seeds_file)")
        self.embedder, self.top_k = embedder, top_k
        self.names = sorted(anchors)
        texts = [text for category in self.names for text in anchors[category]]
        self.owner = np.array([i for i, category in enumerate(self.names) for _ in anchors[category]])
        self.anchors_AD = embedder.encode(texts)

    def __call__(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        sims_NA = self.embedder.encode(list(texts)) @ self.anchors_AD.T
        scores_NC = np.full((len(texts), len(self.names)), -np.inf)
        for category_index in range(len(self.names)):
            top_sims = np.sort(sims_NA[:, self.owner == category_index], axis=1)[:, ::-1][:, : self.top_k]
            scores_NC[:, category_index] = top_sims.mean(axis=1)
        return [self.names[j] for j in scores_NC.argmax(axis=1)]


# ----------------------------------------------------------------------------------------------- quotas
def select_with_quotas(rows: Sequence[dict], quotas: dict[str, int], default_quota: int = -1) -> list[dict]:
    """Per category keep the `quota` rows of highest `quality` (ties: input order); the result is in input order.

    quotas: category -> max rows; categories not listed get `default_quota` (-1: no limit, 0: drop them)."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_cat[row["category"]].append(i)
    keep: set[int] = set()
    for cat, idx in by_cat.items():
        quota = quotas.get(cat, default_quota)
        if quota < 0:
            keep.update(idx)
            continue
        ranked = sorted(idx, key=lambda i: (-rows[i]["quality"], i))
        keep.update(ranked[:quota])
    return [rows[i] for i in sorted(keep)]
