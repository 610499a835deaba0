"""Generate complementary prompts by few-shot prompting, then critique them and apply the reject rules.

Both steps are resumable jsonl writers: they skip ids already in their output file and append each row as soon as
its request finishes (records.JsonlAppender flushes per row). A request that fails for good (clients.ChatClientError)
writes nothing, so the next run retries exactly the missing ids.

Critique (method-spec §2, "Filtering and regeneration"): the critic answers JSON {reason, is_correct, final}. When
is_correct is "no" the complement is replaced by `final`. The code rules (rules.py) then check the chosen text; if it
fails and the other candidate (the original, or the rewrite) passes, that one is kept, otherwise the row is
rejected. A critic reply that is not valid JSON leaves the original complement to the code rules alone.
The critic's reply is started with CRITIQUE_PREFIX (HF client: forced; see clients.py), and a reply that is not
one complete JSON object (a small critic stops mid-object, or adds a stray quote) is read field by field: the verdict
must be present; a `final` string that never closes is not used.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nova_rt.pas.records import JsonlAppender, done_ids
from nova_rt.pas.rules import DriftChecker, check_complement
from nova_rt.pas.template import GoldenExample, critique_messages, generation_messages

log = logging.getLogger(__name__)
_LABEL = re.compile(r"^\s*(?:<?complementary information>?|complement(?:ary instruction)?|instruction)\s*:\s*",
                    re.IGNORECASE)


@dataclass
class Critique:
    reason: str
    is_correct: bool
    final: str


CRITIQUE_PREFIX = '{"reason": "'
_FIELD_STR = r'"{key}"\s*:\s*"((?:[^"\\]|\\.)*)"'
_VERDICT = re.compile(r'"is_correct"\s*:\s*"?\s*(yes|no|true|false)\b', re.IGNORECASE)


def _json_str(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except json.JSONDecodeError:
        return raw


def _parse_fields(text: str) -> Critique | None:
    """Field-by-field reading of a reply that is not one complete JSON object."""
    verdict = _VERDICT.search(text)
    if verdict is None:
        return None
    reason = re.search(_FIELD_STR.format(key="reason"), text, re.IGNORECASE)
    final = re.search(_FIELD_STR.format(key="final(?:ape)?"), text, re.IGNORECASE)
    return Critique(_json_str(reason.group(1)) if reason else "", verdict.group(1).lower() in ("yes", "true"),
                    _json_str(final.group(1)).strip() if final else "")


def parse_critique(text: str) -> Critique | None:
    """The first JSON object in `text` with keys reason / is_correct / final (case-insensitive; the PAS scripts'
    Reason / Is_correct / FinalAPE spellings too); when no complete object carries a verdict, the fields read one
    by one (`final` may then be empty); None when no verdict is found."""
    dec = json.JSONDecoder()
    complete_verdict = False
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            obj, _ = dec.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        low = {str(k).lower(): v for k, v in obj.items()}
        verdict = low.get("is_correct")
        final = low.get("final", low.get("finalape"))
        complete_verdict |= verdict is not None
        if verdict is None or not isinstance(final, str):
            continue
        ok = verdict if isinstance(verdict, bool) else str(verdict).strip().lower() in ("yes", "true", "correct")
        return Critique(str(low.get("reason", "")), ok, final.strip())
    return None if complete_verdict else _parse_fields(text)  # a complete but invalid object stays invalid


def clean_complement(text: str) -> str:
    """Strip a leading label ("Complement:"), surrounding quotes, and keep the first paragraph: the complement is
    one short paragraph, and small generators often ramble on after it."""
    text = _LABEL.sub("", text.strip())
    text = text.split("\n\n", 1)[0].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    return text


def pick_shots(seeds: dict[str, list[GoldenExample]], category: str, k: int) -> list[GoldenExample]:
    """Up to k golden examples of `category`; a category without seeds borrows one from each other category."""
    own = seeds.get(category, [])
    if own:
        return own[:k]
    pool = [exs[0] for _, exs in sorted(seeds.items())]
    return pool[:k]


def _pending(rows: Sequence[dict], out_path: Path) -> list[dict]:
    done = done_ids(out_path)
    return [r for r in rows if r["id"] not in done]


def run_generation(rows: Sequence[dict], client, seeds: dict[str, list[GoldenExample]], out_path: str | Path, *,
                   num_shots: int = 4, max_new_tokens: int = 64, temperature: float = 0.0) -> Counter:
    """Write {id, prompt, category, complement, raw} for every row not yet in `out_path`; returns counts
    (done_before, generated, failed)."""
    out_path = Path(out_path)
    todo = _pending(rows, out_path)
    counts = Counter(done_before=len(rows) - len(todo), generated=0, failed=0)
    convs = [generation_messages(r["prompt"], pick_shots(seeds, r["category"], num_shots)) for r in todo]
    with JsonlAppender(out_path) as out:
        for i, res in client.stream(convs, max_new_tokens=max_new_tokens, temperature=temperature):
            if isinstance(res, BaseException):
                counts["failed"] += 1
                log.warning("generation failed for id %s: %s", todo[i]["id"], res)
                continue
            r = todo[i]
            out.write({"id": r["id"], "prompt": r["prompt"], "category": r["category"],
                       "complement": clean_complement(res), "raw": res})
            counts["generated"] += 1
    return counts


def review(row: dict, critic_reply: str | None, *, max_words: int, max_prompt_overlap: float,
           drift: DriftChecker | None) -> dict:
    """Apply the critique and the code rules to one generated row (see the module docstring)."""
    crit = parse_critique(critic_reply) if critic_reply is not None else None
    original = row["complement"]
    candidates = [("original", original)]
    if crit is not None and not crit.is_correct and crit.final:
        candidates.insert(0, ("rewrite", clean_complement(crit.final)))
    elif crit is not None and crit.final and clean_complement(crit.final) != original:
        candidates.append(("rewrite", clean_complement(crit.final)))
    first_reasons = None
    for source, text in candidates:
        reasons = check_complement(row["prompt"], text, max_words=max_words, max_prompt_overlap=max_prompt_overlap,
                                   category=row["category"], drift=drift)
        first_reasons = reasons if first_reasons is None else first_reasons
        if not reasons:
            return _reviewed(row, "kept", text, source, [], crit, critic_reply)
    return _reviewed(row, "rejected", candidates[0][1], candidates[0][0], first_reasons, crit, critic_reply)


def _reviewed(row, status, text, source, reasons, crit, reply) -> dict:
    critique = None if crit is None else {"reason": crit.reason, "is_correct": crit.is_correct, "final": crit.final}
    return {"id": row["id"], "prompt": row["prompt"], "category": row["category"], "status": status,
            "complement": text, "source": source, "reasons": reasons, "critique": critique,
            "critique_parsed": crit is not None if reply is not None else None, "critic_reply": reply}


def run_critique(rows: Sequence[dict], client, seeds: dict[str, list[GoldenExample]], out_path: str | Path, *,
                 max_words: int = 60, max_prompt_overlap: float = 0.8, drift: DriftChecker | None = None,
                 max_new_tokens: int = 128) -> Counter:
    """Review every generated row not yet in `out_path`; `client=None` applies the code rules only.
    Returns counts (done_before, kept, rejected, rewritten, unparsed, failed, reject:<rule>)."""
    out_path = Path(out_path)
    todo = _pending(rows, out_path)
    counts = Counter(done_before=len(rows) - len(todo), kept=0, rejected=0, failed=0)
    if client is None:
        replies = ((i, None) for i in range(len(todo)))
    else:
        convs = [critique_messages(r["prompt"], r["complement"], pick_shots(seeds, r["category"], 1)[0])
                 for r in todo]
        replies = client.stream(convs, max_new_tokens=max_new_tokens, temperature=0.0, reply_prefix=CRITIQUE_PREFIX,
                                 json_reply=True)
    with JsonlAppender(out_path) as out:
        for i, reply in replies:
            if isinstance(reply, BaseException):
                counts["failed"] += 1
                log.warning("critique failed for id %s: %s", todo[i]["id"], reply)
                continue
            res = review(todo[i], reply, max_words=max_words, max_prompt_overlap=max_prompt_overlap, drift=drift)
            out.write(res)
            counts[res["status"]] += 1
            counts["rewritten"] += res["source"] == "rewrite" and res["status"] == "kept"
            counts["unparsed"] += res["critique_parsed"] is False
            for reason in res["reasons"]:
                counts[f"reject:{reason}"] += 1
    return counts
