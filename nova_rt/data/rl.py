"""RL prompts: files with reference answers and categories, procedural reasoning-gym tasks, a category-weighted
sampler with checkpointable state, per-category eval sets, and the report's prompt re-weighting.

A prompt record is a dict:
    {"id": str, "category": str, "messages": [{"role", "content"}, ...] (no assistant reply),
     "prefill": str (text the assistant turn starts with; the response continues it), "answer": str | None,
     "gym": {"dataset": name, "entry": reasoning-gym entry} | None}
Files: rows with "prompt" or "messages", optional "answer", "category" (default: the file's stem), "prefill",
"system". reasoning-gym entries take train and eval items from different seeds, so the eval set is held out.

Re-weighting, with base shares b_c, accuracies a_c, their base-weighted mean a_bar, a bound R >= 1, a rate eta:
    target_c = b_c * clip((1 - a_c + 0.05) / (1 - a_bar + 0.05), 1/R, R),  normalised to sum 1
    w_c     <- (1 - eta) * w_c + eta * target_c
so no category ever drops out. Row and task fields, and why: docs/stages.md#grpo-prompts-and-re-weighting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nova_rt.data.chat import encode_prompt, render_chat
from nova_rt.data.io import DataError, Row, read_rows
from nova_rt.errors import UserError

log = logging.getLogger(__name__)
_EVAL_SEED_OFFSET = 7919


# ----------------------------------------------------------------------------------------------- loading
def row_to_prompt(row: Row, system_prompt: str = "") -> dict:
    """Validate one prompt row and return a prompt record."""
    d = row.data
    if isinstance(d, Exception):
        raise d
    if not isinstance(d, dict):
        raise DataError(f"{row.where()}: expected an object, got {type(d).__name__}")
    if "messages" in d:
        msgs = d["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user",
                                                                                              "assistant", "tool")
                for m in msgs):
            raise DataError(f"{row.where('messages')}: must be a non-empty list of {{role, content}} objects")
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{row.where('messages')}: the last message is the assistant's; an RL prompt ends "
                            "before the reply (use 'prefill' to start the reply)")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif isinstance(d.get("prompt"), str):
        msgs = [{"role": "user", "content": d["prompt"]}]
    else:
        raise DataError(f"{row.where('prompt')}: missing; give 'prompt' (string) or 'messages' (list)")
    system = d.get("system", system_prompt)
    if not isinstance(system, str):
        raise DataError(f"{row.where('system')}: must be a string")
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    answer = d.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{row.where('answer')}: must be a string or a number, got {type(answer).__name__}")
    prefill = d.get("prefill", "")
    if not isinstance(prefill, str):
        raise DataError(f"{row.where('prefill')}: must be a string")
    category = d.get("category", Path(row.source).stem)
    if not isinstance(category, str) or not category:
        raise DataError(f"{row.where('category')}: must be a non-empty string")
    return {"id": f"{Path(row.source).name}:{row.index}", "category": category, "messages": msgs,
            "prefill": prefill, "answer": None if answer is None else str(answer), "gym": None}


def load_prompt_files(files: list[str], system_prompt: str = "", on_error: str = "error",
                      tokenizer=None) -> list[dict]:
    """Prompt records of every row; with a tokenizer, a prompt its chat template cannot render is a bad row here
    (named by file and row, skipped with on_error: skip) rather than an error mid-training."""
    out, skipped = [], 0
    for f in files:
        for row in read_rows(f):
            try:
                record = row_to_prompt(row, system_prompt)
                if tokenizer is not None:
                    render_chat(tokenizer, record["messages"], True, row.where())
                out.append(record)
            except DataError:
                if on_error != "skip":
                    raise
                skipped += 1
    if skipped:
        log.warning("skipped %d bad prompt rows", skipped)
    return out


def gym_prompts(spec: dict, split: str, system_prompt: str = "") -> list[dict]:
    """Prompt records from a reasoning-gym task spec (see the module docstring); split is "train" or "eval"."""
    import reasoning_gym

    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise UserError(f"gym task {spec}: missing 'name' (e.g. basic_arithmetic)")
    known = {"size", "seed", "config", "category", "eval_size", "prefill", "template", "weight"}
    unknown = set(spec) - known
    if unknown:
        raise UserError(f"gym task '{name}': unknown keys {sorted(unknown)} (known: {sorted(known)})")
    seed = int(spec.get("seed", 0)) + (_EVAL_SEED_OFFSET if split == "eval" else 0)
    size = int(spec.get("eval_size", 50) if split == "eval" else spec.get("size", 1000))
    if size <= 0:
        return []
    try:
        ds = reasoning_gym.create_dataset(name, seed=seed, size=size, **spec.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"gym task '{name}': {exc}") from None
    category, template, prefill = spec.get("category", name), spec.get("template", "{question}"), spec.get(
        "prefill", "")
    out = []
    for i in range(size):
        entry = ds[i]
        msgs = [{"role": "user", "content": template.format(**entry)}]
        if system_prompt:
            msgs.insert(0, {"role": "system", "content": system_prompt})
        out.append({"id": f"{name}:{split}:{seed}:{i}", "category": category, "messages": msgs,
                    "prefill": prefill.format(**entry) if prefill else "", "answer": str(entry["answer"]),
                    "gym": {"dataset": name, "entry": entry}})
    return out


def group_by_category(records: list[dict]) -> dict[str, list[dict]]:
    pools: dict[str, list[dict]] = {}
    for r in records:
        pools.setdefault(r["category"], []).append(r)
    return dict(sorted(pools.items()))


def build_prompt_sets(prompt_files: list[str], eval_files: list[str], gym_tasks: list[dict],
                      system_prompt: str = "", on_error: str = "error", tokenizer=None):
    """(train pools, eval pools, base weights named by gym tasks' `weight`), pools keyed by category; with a
    tokenizer, file prompts are rendered once to check them (see load_prompt_files)."""
    records = load_prompt_files(prompt_files, system_prompt, on_error, tokenizer)
    evals = load_prompt_files(eval_files, system_prompt, on_error, tokenizer)
    base = {}
    for spec in gym_tasks:
        records += gym_prompts(spec, "train", system_prompt)
        evals += gym_prompts(spec, "eval", system_prompt)
        if "weight" in spec:
            base[spec.get("category", spec.get("name"))] = float(spec["weight"])
    return group_by_category(records), group_by_category(evals), base


class PromptEncoder:
    """Token ids of prompt records: chat template + generation prefix + prefill, cached by record id.

    With a PAS model directory, the last user turn first goes through
    `nova_rt.pas.augment.PromptAugmenter(dir).augment(...)` (prompt + complement; imported only when used)."""

    def __init__(self, tokenizer, pas_model: str = ""):
        self.tok, self.pas_model, self.augmenter = tokenizer, pas_model, None
        self.cache: dict[str, list[int]] = {}

    def _augment(self, records: list[dict]) -> list[dict]:
        if self.augmenter is None:
            from nova_rt.pas.augment import PromptAugmenter

            self.augmenter = PromptAugmenter(self.pas_model)
        users = [max(i for i, m in enumerate(r["messages"]) if m["role"] == "user") for r in records]
        texts = self.augmenter.augment([r["messages"][u]["content"] for r, u in zip(records, users)])
        return [{**r, "messages": [({**m, "content": t} if i == u else m) for i, m in enumerate(r["messages"])]}
                for r, u, t in zip(records, users, texts)]

    def __call__(self, records: list[dict]) -> list[list[int]]:
        todo = [r for r in records if r["id"] not in self.cache]
        if todo and self.pas_model:
            todo = self._augment(todo)
        for r in todo:
            ids = encode_prompt(self.tok, r["messages"], f"prompt {r['id']}")
            if r["prefill"]:
                ids = ids + self.tok(r["prefill"], add_special_tokens=False)["input_ids"]
            self.cache[r["id"]] = ids
        return [self.cache[r["id"]] for r in records]


# ----------------------------------------------------------------------------------------------- sampling
class CategorySampler:
    """Draw prompts: a category by weight, then the next prompt of that category's shuffled order (a fresh
    permutation each time a category is used up). All randomness comes from one numpy Generator, so the state
    (generator, permutations, cursors, weights) restores an identical stream after a resume."""

    def __init__(self, pools: dict[str, list[dict]], weights: dict[str, float] | None = None, seed: int = 0):
        self.pools = {c: p for c, p in pools.items() if p}
        if not self.pools:
            raise UserError("no RL prompts: give grpo.data.prompt_files or grpo.data.gym_tasks")
        self.categories = sorted(self.pools)
        self.rng = np.random.default_rng([seed, 0x5EED])
        self.perms = {c: self.rng.permutation(len(self.pools[c])) for c in self.categories}
        self.cursors = {c: 0 for c in self.categories}
        self.weights = normalise_weights(weights or {}, self.categories)

    def draw(self, n: int) -> list[dict]:
        p = np.array([self.weights[c] for c in self.categories])
        out = []
        for k in self.rng.choice(len(self.categories), size=n, p=p / p.sum()):
            c = self.categories[int(k)]
            if self.cursors[c] >= len(self.perms[c]):
                self.perms[c] = self.rng.permutation(len(self.pools[c]))
                self.cursors[c] = 0
            out.append(self.pools[c][int(self.perms[c][self.cursors[c]])])
            self.cursors[c] += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "perms": {c: p.tolist() for c, p in self.perms.items()},
                "cursors": dict(self.cursors), "weights": dict(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["perms"]) != self.categories:
            raise UserError(f"sampler state has categories {sorted(state['perms'])}, the data has "
                            f"{self.categories}: the prompt data changed since the checkpoint")
        self.rng.bit_generator.state = state["rng"]
        self.perms = {c: np.asarray(p, dtype=np.int64) for c, p in state["perms"].items()}
        self.cursors = dict(state["cursors"])
        self.weights = dict(state["weights"])


def normalise_weights(weights: dict[str, float], categories: list[str]) -> dict[str, float]:
    """Weights for every category (missing ones get 1.0), summing to 1; unknown or negative ones are errors."""
    unknown = set(weights) - set(categories)
    if unknown:
        raise UserError(f"category weights name unknown categories {sorted(unknown)} (known: {categories})")
    w = {c: float(weights.get(c, 1.0)) for c in categories}
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise UserError(f"category weights must be >= 0 with a positive sum, got {w}")
    total = sum(w.values())
    return {c: v / total for c, v in w.items()}


def reweight(current: dict[str, float], base: dict[str, float], accuracy: dict[str, float], *,
             max_ratio: float = 4.0, rate: float = 0.5) -> dict[str, float]:
    """One re-weighting update (the rule in the module docstring). Categories without an accuracy keep theirs."""
    if max_ratio < 1 or not 0 < rate <= 1:
        raise UserError(f"need max_ratio >= 1 and 0 < rate <= 1, got {max_ratio}, {rate}")
    cats = [c for c in base if c in accuracy]
    if not cats:
        return dict(current)
    bsum = sum(base[c] for c in cats)
    a_bar = sum(base[c] * accuracy[c] for c in cats) / bsum if bsum > 0 else 0.0
    target = {c: base[c] * float(np.clip((1 - accuracy[c] + 0.05) / (1 - a_bar + 0.05), 1 / max_ratio, max_ratio))
              for c in cats}
    tsum = sum(target.values())
    share = sum(current[c] for c in cats)  # categories without an eval keep their share
    out = dict(current)
    for c in cats:
        out[c] = (1 - rate) * current[c] + rate * share * target[c] / tsum
    total = sum(out.values())
    return {c: v / total for c, v in out.items()}


def evaluate_categories(eval_pools: dict[str, list[dict]], generate_greedy: Callable[[list[dict]], list[str]],
                        score: Callable[[list[str], list[dict]], tuple[list[float], list[float] | None]],
                        batch: int = 32, rank: int = 0, world: int = 1,
                        reduce_sum: Callable[[list[float]], list[float]] | None = None) -> dict[str, dict[str, float]]:
    """{category: {"accuracy", "reward", "n", "correct"}} from greedy responses to each category's eval prompts;
    "correct" is the per-prompt correctness in pool order (so two evals of the same pool compare item by item).

    `score(texts, samples)` returns (rewards, correctness or None); without a verifier, accuracy is the reward.
    Data-parallel: each rank takes every world-th prompt and `reduce_sum` sums the per-category totals over ranks
    (and the per-prompt vectors, where each rank filled only its own positions)."""
    cats = sorted(eval_pools)
    sums, items = [], []
    for cat in cats:
        pool = eval_pools[cat]
        samples, rewards, correct = pool[rank::world], [], []
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            r, c = score(generate_greedy(chunk), chunk)
            rewards += r
            correct += c if c is not None else r
        sums += [float(sum(correct)), float(sum(rewards)), float(len(samples))]
        full = [0.0] * len(pool)
        full[rank::world] = [float(x) for x in correct]
        items += full
    if reduce_sum is not None:
        n_totals = len(sums)
        both = reduce_sum(sums + items)
        sums, items = both[:n_totals], both[n_totals:]
    out, lo = {}, 0
    for i, cat in enumerate(cats):
        n_pool = len(eval_pools[cat])
        if sums[3 * i + 2] > 0:
            out[cat] = {"accuracy": sums[3 * i] / sums[3 * i + 2], "reward": sums[3 * i + 1] / sums[3 * i + 2],
                        "n": int(sums[3 * i + 2]), "correct": list(items[lo:lo + n_pool])}
        lo += n_pool
    return out
