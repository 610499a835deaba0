"""Procedural chat data that we generate ourselves (no downloads): SFT rows with a long-tailed length mix, and
preference pairs. `python -m nova_rt.data.synth OUT_DIR` rewrites the files shipped under data/.

Tasks are small and checkable (arithmetic with worked steps, sorting, counting, unit conversion, spelling,
enumerations, multi-turn follow-ups), so a 135M model's loss on them falls visibly within a few minutes.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ANIMALS = ["cat", "dog", "horse", "zebra", "otter", "eagle", "salmon", "lizard", "rabbit", "falcon", "whale", "moose"]
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "teal", "silver"]
UNITS = [("kilometers", "meters", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000),
         ("minutes", "seconds", 60), ("meters", "centimeters", 100)]


def _arith(r: random.Random):
    a, b, c = r.randint(2, 99), r.randint(2, 99), r.randint(2, 9)
    q = f"What is ({a} + {b}) * {c}?"
    ans = (f"First add: {a} + {b} = {a + b}.\nThen multiply: {a + b} * {c} = {(a + b) * c}.\n"
           f"The answer is {(a + b) * c}.")
    return [("user", q), ("assistant", ans)]


def _sort(r: random.Random):
    xs = [r.randint(0, 999) for _ in range(r.randint(3, 12))]
    return [("user", f"Sort these numbers in ascending order: {', '.join(map(str, xs))}"),
            ("assistant", f"Sorted: {', '.join(map(str, sorted(xs)))}.")]


def _count(r: random.Random):
    word = r.choice(ANIMALS + COLORS)
    letter = r.choice(sorted(set(word)))
    n = word.count(letter)
    return [("user", f"How many times does the letter '{letter}' appear in the word '{word}'?"),
            ("assistant", f"The word '{word}' is spelled {'-'.join(word)}. The letter '{letter}' appears {n} "
                          f"time{'s' if n != 1 else ''}.")]


def _convert(r: random.Random):
    big, small, f = r.choice(UNITS)
    x = r.randint(1, 50)
    return [("user", f"Convert {x} {big} to {small}."),
            ("assistant", f"There are {f} {small} in one of the {big}, so {x} {big} = {x} * {f} = {x * f} {small}.")]


def _enumerate(r: random.Random):
    # The long tail: sometimes very long enumerations.
    n = min(int(r.lognormvariate(2.0, 0.9)) + 2, 80)
    items = [f"{i + 1}. {r.choice(COLORS)} {r.choice(ANIMALS)}" for i in range(n)]
    return [("user", f"List {n} imaginary creatures, each a color and an animal, numbered."),
            ("assistant", "\n".join(items))]


def _spell(r: random.Random):
    word = r.choice(ANIMALS + COLORS)
    return [("user", f"Spell '{word}' backwards."), ("assistant", f"'{word}' backwards is '{word[::-1]}'.")]


def _multi_turn(r: random.Random):
    a, b = r.randint(10, 99), r.randint(10, 99)
    return [("user", f"What is {a} + {b}?"), ("assistant", f"{a} + {b} = {a + b}."),
            ("user", "And doubled?"), ("assistant", f"Doubling {a + b} gives {2 * (a + b)}.")]


TASKS = [_arith, _sort, _count, _convert, _enumerate, _spell, _multi_turn]


SLICES = {"math": [_arith, _convert, _multi_turn], "text": [_sort, _count, _spell, _enumerate]}


def sft_rows(n: int, seed: int = 0, tasks: list | None = None, exclude: list[dict] = ()) -> list[dict]:
    """n rows; with `exclude` (the rows of a training file) a held-out set: no first user prompt of theirs, and no
    prompt twice."""
    r = random.Random(seed)
    held_out = bool(exclude)
    seen = {first_prompt(row) for row in exclude}
    rows = []
    while len(rows) < n:
        turns = r.choice(tasks or TASKS)(r)
        if held_out:
            if turns[0][1] in seen:
                continue
            seen.add(turns[0][1])
        msgs = [{"role": role, "content": text} for role, text in turns]
        if len(rows) % 3 == 0 and len(msgs) == 2:  # a third in prompt/response form, to exercise both formats
            rows.append({"prompt": msgs[0]["content"], "response": msgs[1]["content"]})
        else:
            rows.append({"messages": msgs})
    return rows


def first_prompt(row: dict) -> str:
    return row["prompt"] if "prompt" in row else row["messages"][0]["content"]


def preference_rows(n: int, seed: int = 1) -> list[dict]:
    """Pairs whose chosen answer is correct and rejected answer is wrong (absolute scores on some rows)."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = r.randint(2, 99), r.randint(2, 99)
        op = r.choice(["+", "-", "*"])
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        wrong = val + r.choice([-10, -2, -1, 1, 2, 10])
        row = {"prompt": f"What is {a} {op} {b}?", "chosen": f"{a} {op} {b} = {val}.",
               "rejected": f"{a} {op} {b} = {wrong}."}
        if i % 2 == 0:
            row["chosen_score"], row["rejected_score"] = 1.0, 0.0
        rows.append(row)
    return rows


REFUSALS = ["I'm sorry, but I can't help with that.", "As an AI, I cannot answer this question.",
            "I don't know.", "Please ask someone else."]


def _damage(r: random.Random, turns: list, other: list) -> tuple[str, str]:
    """(kind, rejected reply) for a chosen single-turn task: a failure mode a reward model should rank lower."""
    answer = turns[-1][1]
    kind = r.choice(["refusal", "off_topic", "truncated", "wrong"])
    if kind == "refusal":
        return kind, r.choice(REFUSALS)
    if kind == "off_topic":
        return kind, other[-1][1]
    if kind == "truncated":
        words = answer.split()
        return kind, " ".join(words[:max(1, len(words) // 3)])
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    if not digits:  # spelling / sorting without numbers: a scrambled reply
        chars = list(answer)
        while "".join(chars) == answer:
            r.shuffle(chars)
        return kind, "".join(chars)
    i = digits[-1]
    return kind, answer[:i] + str((int(answer[i]) + r.randint(1, 9)) % 10) + answer[i + 1:]


def helpful_rows(n: int, seed: int = 3) -> list[dict]:
    """Helpfulness pairs for reward modelling: the chosen reply solves one of the SFT tasks; the rejected reply is a
    refusal, an answer to another question, a reply cut off after a third of its words, or the answer with a wrong
    last digit (a scrambled reply where it has none). The first three are learnable by a 135M model in a few dozen
    steps, the last is hard; absolute scores (1.0 / 0.0) on every other row."""
    r = random.Random(seed)
    tasks = [_arith, _sort, _count, _convert, _spell]
    rows = []
    for i in range(n):
        task = r.choice(tasks)
        turns = task(r)
        other = r.choice([t for t in tasks if t is not task])(r)
        kind, rejected = _damage(r, turns, other)
        row = {"prompt": turns[0][1], "chosen": turns[-1][1], "rejected": rejected, "kind": kind}
        if i % 2 == 0:
            row["chosen_score"], row["rejected_score"] = 1.0, 0.0
        rows.append(row)
    return rows


def main(out_dir: str) -> None:
    out = Path(out_dir)
    (out / "sft").mkdir(parents=True, exist_ok=True)
    (out / "preference").mkdir(parents=True, exist_ok=True)
    for path, rows in [(out / "sft" / "chat_mix.jsonl", sft_rows(400, seed=0)),
                       (out / "sft" / "chat_mix_eval.jsonl", sft_rows(40, seed=99)),
                       (out / "sft" / "slice_math.jsonl", sft_rows(160, seed=11, tasks=SLICES["math"])),
                       (out / "sft" / "slice_text.jsonl", sft_rows(160, seed=12, tasks=SLICES["text"])),
                       # held out: no prompt of the slice files (so of quick_*, their first 24 rows) nor a repeat
                       (out / "sft" / "slice_math_eval.jsonl",
                        sft_rows(32, seed=21, tasks=SLICES["math"], exclude=sft_rows(160, 11, SLICES["math"]))),
                       (out / "sft" / "slice_text_eval.jsonl",
                        sft_rows(32, seed=22, tasks=SLICES["text"], exclude=sft_rows(160, 12, SLICES["text"]))),
                       (out / "preference" / "arith_pairs.jsonl", preference_rows(240, seed=1)),
                       (out / "preference" / "arith_pairs_eval.jsonl", preference_rows(40, seed=7)),
                       (out / "preference" / "helpful_pairs.jsonl", helpful_rows(240, seed=3)),
                       (out / "preference" / "helpful_pairs_eval.jsonl", helpful_rows(60, seed=8))]:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data")
