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
    data = row.data
    if isinstance(data, Exception):
        raise data
    if not isinstance(data, dict):
        raise DataError(f"{row.where()}: expected an object, got {type(data).__name__}")
    if "messages" in data:
        msgs = data["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(message, dict) and isinstance(message.get("content"), str)
                and message.get("role") in ("system", "user", "assistant", "tool")
                for message in msgs):
            raise DataError(f"{row.where('messages')}: must be a non-empty list of {{role, content}} objects")
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{row.where('messages')}: the last message is the assistant's; an RL prompt ends "
                            "before the reply (use 'prefill' to start the reply)")
        msgs = [{"role": message["role"], "content": message["content"]} for message in msgs]
    elif isinstance(data.get("prompt"), str):
        msgs = [{"role": "user", "content": data["prompt"]}]
    else:
        raise DataError(f"{row.where('prompt')}: missing; give 'prompt' (string) or 'messages' (list)")
    system = data.get("system", system_prompt)
    if not isinstance(system, str):
        raise DataError(f"{row.where('system')}: must be a string")
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    answer = data.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{row.where('answer')}: must be a string or a number, got {type(answer).__name__}")
    prefill = data.get("prefill", "")
    if not isinstance(prefill, str):
        raise DataError(f"{row.where('prefill')}: must be a string")
    category = data.get("category", Path(row.source).stem)
    if not isinstance(category, str) or not category:
        raise DataError(f"{row.where('category')}: must be a non-empty string")
    return {"id": f"{Path(row.source).name}:{row.index}", "category": category, "messages": msgs,
            "prefill": prefill, "answer": None if answer is None else str(answer), "gym": None}


def load_prompt_files(files: list[str], system_prompt: str = "", on_error: str = "error",
                      tokenizer=None) -> list[dict]:
    """Prompt records of every row; with a tokenizer, a prompt its chat template cannot render is a bad row here
    (named by file and row, skipped with on_error: skip) rather than an error mid-training."""
    out, skipped = [], 0
    for path in files:
        for row in read_rows(path):
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
        dataset = reasoning_gym.create_dataset(name, seed=seed, size=size, **spec.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"gym task '{name}': {exc}") from None
    category, template, prefill = spec.get("category", name), spec.get("template", "{question}"), spec.get(
        "prefill", "")
    out = []
    for i in range(size):
        entry = dataset[i]
        msgs = [{"role": "user", "content": template.format(**entry)}]
        if system_prompt:
            msgs.insert(0, {"role": "system", "content": system_prompt})
        out.append({"id": f"{name}:{split}:{seed}:{i}", "category": category, "messages": msgs,
                    "prefill": prefill.format(**entry) if prefill else "", "answer": str(entry["answer"]),
                    "gym": {"dataset": name, "entry": entry}})
    return out


def group_by_category(records: list[dict]) -> dict[str, list[dict]]:
    pools: dict[str, list[dict]] = {}
    for record in records:
        pools.setdefault(record["category"], []).append(record)
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
        users = [max(i for i, message in enumerate(record["messages"]) if message["role"] == "user")
                 for record in records]
        texts = self.augmenter.augment([record["messages"][user_index]["content"]
                                        for record, user_index in zip(records, users)])
        return [{**record, "messages": [({**message, "content": text} if i == user_index else message)
                                        for i, message in enumerate(record["messages"])]}
                for record, user_index, text in zip(records, users, texts)]

    def __call__(self, records: list[dict]) -> list[list[int]]:
        todo = [record for record in records if record["id"] not in self.cache]
        if todo and self.pas_model:
            todo = self._augment(todo)
        for record in todo:
            ids = encode_prompt(self.tok, record["messages"], f"prompt {record['id']}")
            if record["prefill"]:
                ids = ids + self.tok(record["prefill"], add_special_tokens=False)["input_ids"]
            self.cache[record["id"]] = ids
        return [self.cache[record["id"]] for record in records]


# ----------------------------------------------------------------------------------------------- sampling
class CategorySampler:
    """Draw prompts: a category by weight, then the next prompt of that category's shuffled order (a fresh
    permutation each time a category is used up). All randomness comes from one numpy Generator, so the state
    (generator, permutations, cursors, weights) restores an identical stream after a resume."""

    def __init__(self, pools: dict[str, list[dict]], weights: dict[str, float] | None = None, seed: int = 0):
        self.pools = {category: pool for category, pool in pools.items() if pool}
        if not self.pools:
            raise UserError("no RL prompts: give grpo.data.prompt_files or grpo.data.gym_tasks")
        self.categories = sorted(self.pools)
        self.rng = np.random.default_rng([seed, 0x5EED])
        self.perms = {category: self.rng.permutation(len(self.pools[category])) for category in self.categories}
        self.cursors = {category: 0 for category in self.categories}
        self.weights = normalise_weights(weights or {}, self.categories)

    def draw(self, n: int) -> list[dict]:
        probabilities = np.array([self.weights[category] for category in self.categories])
        out = []
        for index in self.rng.choice(len(self.categories), size=n, p=probabilities / probabilities.sum()):
            category = self.categories[int(index)]
            if self.cursors[category] >= len(self.perms[category]):
                self.perms[category] = self.rng.permutation(len(self.pools[category]))
                self.cursors[category] = 0
            out.append(self.pools[category][int(self.perms[category][self.cursors[category]])])
            self.cursors[category] += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state,
                "perms": {category: perm.tolist() for category, perm in self.perms.items()},
                "cursors": dict(self.cursors), "weights": dict(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["perms"]) != self.categories:
            raise UserError(f"sampler state has categories {sorted(state['perms'])}, the data has "
                            f"{self.categories}: the prompt data changed since the checkpoint")
        self.rng.bit_generator.state = state["rng"]
        self.perms = {category: np.asarray(perm, dtype=np.int64) for category, perm in state["perms"].items()}
        self.cursors = dict(state["cursors"])
        self.weights = dict(state["weights"])


def normalise_weights(weights: dict[str, float], categories: list[str]) -> dict[str, float]:
    """Weights for every category (missing ones get 1.0), summing to 1; unknown or negative ones are errors."""
    unknown = set(weights) - set(categories)
    if unknown:
        raise UserError(f"category weights name unknown categories {sorted(unknown)} (known: {categories})")
    filled = {category: float(weights.get(category, 1.0)) for category in categories}
    if any(v < 0 for v in filled.values()) or sum(filled.values()) <= 0:
        raise UserError(f"category weights must be >= 0 with a positive sum, got {filled}")
    total = sum(filled.values())
    return {category: v / total for category, v in filled.items()}


def reweight(current: dict[str, float], base: dict[str, float], accuracy: dict[str, float], *,
             max_ratio: float = 4.0, rate: float = 0.5) -> dict[str, float]:
    """One re-weighting update (the rule in the module docstring). Categories without an accuracy keep theirs."""
    if max_ratio < 1 or not 0 < rate <= 1:
        raise UserError(f"need max_ratio >= 1 and 0 < rate <= 1, got {max_ratio}, {rate}")
    cats = [category for category in base if category in accuracy]
    if not cats:
        return dict(current)
    bsum = sum(base[category] for category in cats)
    a_bar = sum(base[category] * accuracy[category] for category in cats) / bsum if bsum > 0 else 0.0
    target = {category: base[category] * float(np.clip((1 - accuracy[category] + 0.05) / (1 - a_bar + 0.05),
                                                       1 / max_ratio, max_ratio))
              for category in cats}
    tsum = sum(target.values())
    share = sum(current[category] for category in cats)  # categories without an eval keep their share
    out = dict(current)
    for category in cats:
        out[category] = (1 - rate) * current[category] + rate * share * target[category] / tsum
    total = sum(out.values())
    return {category: v / total for category, v in out.items()}


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
            chunk_rewards, chunk_correct = score(generate_greedy(chunk), chunk)
            rewards += chunk_rewards
            correct += chunk_correct if chunk_correct is not None else chunk_rewards
        sums += [float(sum(correct)), float(sum(rewards)), float(len(samples))]
        full = [0.0] * len(pool)
        full[rank::world] = [float(x) for x in correct]
        items += full
    if reduce_sum is not None:
        n_totals = len(sums)
        both = reduce_sum(sums + items)
        sums, items = both[:n_totals], both[n_totals:]
    out, offset = {}, 0
    for i, cat in enumerate(cats):
        n_pool = len(eval_pools[cat])
        if sums[3 * i + 2] > 0:
            out[cat] = {"accuracy": sums[3 * i] / sums[3 * i + 2], "reward": sums[3 * i + 1] / sums[3 * i + 2],
                        "n": int(sums[3 * i + 2]), "correct": list(items[offset:offset + n_pool])}
        offset += n_pool
    return out
