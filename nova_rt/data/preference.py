"""Preference pairs for the reward model and DPO: validation, chat-template tokenization, and packing of pairs.

Rows: {"prompt": str (optional "system": str) | "messages": [...], "chosen", "rejected", optional "chosen_score",
"rejected_score"}; chosen/rejected are one assistant reply (str) or a list of messages. A pair whose chosen equals
its rejected carries no preference: it is dropped, counted (`dropped_identical`) and warned about. A `messages`
ending with an assistant message is a partial solution that chosen/rejected continue (SuperCorrect's step-level DPO;
only the continuation is supervised).

Each side is one `Sample` (targets shifted, loss only on completion tokens). Pairs are packed best-fit-decreasing on
len(chosen) + len(rejected), both sides of a pair in the same row, so one forward yields both sequence sums: a row
holds sequences [c_a, r_a, c_b, r_b, ...] and `pair_ids` says which pairs, in order. Row rules in full:
docs/stages.md#preference-data.

Legend: P pairs, S sequences (2P), T packed tokens.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nova_rt.data.chat import ROLES, Sample, assistant_spans, check_data_policy, tokenize_spans
from nova_rt.data.io import DataError, Row, read_rows
from nova_rt.data.packing import PackedRow, best_fit_decreasing, collate, make_row
from nova_rt.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample
    chosen_score: float | None = None
    rejected_score: float | None = None

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass
class PairRow:
    row: PackedRow
    """Sequences [chosen, rejected] of each pair in `pair_ids` order."""
    pair_ids: np.ndarray  # (P,) int64 indices into the pair list


# ----------------------------------------------------------------------------------------------- validation
def _check_messages(msgs, row: Row, field: str, roles=ROLES) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{row.where(field)}: must be a non-empty list of messages")
    out = []
    for i, message in enumerate(msgs):
        if not isinstance(message, dict):
            raise DataError(f"{row.where(f'{field}[{i}]')}: must be an object with role and content")
        if message.get("role") not in roles:
            raise DataError(f"{row.where(f'{field}[{i}].role')}: must be one of {roles}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{row.where(f'{field}[{i}].content')}: must be a string")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _prompt_messages(data: dict, row: Row, system_prompt: str) -> list[dict]:
    if ("prompt" in data) == ("messages" in data):
        raise DataError(f"{row.where()}: give exactly one of 'prompt' (a string) or 'messages' (a list) "
                        f"(got keys {sorted(data)})")
    if "prompt" in data:
        if not isinstance(data["prompt"], str):
            raise DataError(f"{row.where('prompt')}: must be a string")
        msgs = [{"role": "user", "content": data["prompt"]}]
        if "system" in data:
            if not isinstance(data["system"], str):
                raise DataError(f"{row.where('system')}: must be a string")
            msgs.insert(0, {"role": "system", "content": data["system"]})
    else:
        msgs = _check_messages(data["messages"], row, "messages")
        if not any(message["role"] == "user" for message in msgs):
            raise DataError(f"{row.where('messages')}: needs at least one user message")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _completion(data: dict, row: Row, key: str, partial: bool):
    if key not in data:
        raise DataError(f"{row.where(key)}: missing")
    value = data[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{row.where(key)}: empty completion (it would train only on the end-of-turn token)")
        return value
    if partial:
        raise DataError(f"{row.where(key)}: must be a string when 'messages' ends with a partial assistant turn")
    if isinstance(value, list):
        msgs = _check_messages(value, row, key, roles=("assistant", "tool"))
        if msgs[0]["role"] != "assistant":
            raise DataError(f"{row.where(f'{key}[0].role')}: the completion must start with an assistant message")
        for i, message in enumerate(msgs):
            if message["role"] == "assistant" and not message["content"].strip():
                raise DataError(f"{row.where(f'{key}[{i}].content')}: empty assistant message")
        return msgs
    raise DataError(f"{row.where(key)}: must be a string or a list of assistant messages, got {type(value).__name__}")


def _scores(data: dict, row: Row) -> tuple[float | None, float | None]:
    present = [key for key in ("chosen_score", "rejected_score") if data.get(key) is not None]
    if not present:
        return None, None
    if len(present) == 1:
        other = "rejected_score" if present[0] == "chosen_score" else "chosen_score"
        raise DataError(f"{row.where(other)}: missing while '{present[0]}' is given (give both or neither)")
    out = []
    for key in ("chosen_score", "rejected_score"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{row.where(key)}: must be a finite number, got {value!r}")
        out.append(float(value))
    return out[0], out[1]


def parse_preference_row(row: Row, system_prompt: str = "") -> dict:
    """Validate a row: {"prompt_messages", "partial", "chosen", "rejected", "chosen_score", "rejected_score"}."""
    data = row.data
    if isinstance(data, Exception):
        raise data
    if not isinstance(data, dict):
        raise DataError(f"{row.where()}: expected an object, got {type(data).__name__}")
    msgs = _prompt_messages(data, row, system_prompt)
    partial = msgs[-1]["role"] == "assistant"
    chosen_score, rejected_score = _scores(data, row)
    return {"prompt_messages": msgs, "partial": partial, "chosen": _completion(data, row, "chosen", partial),
            "rejected": _completion(data, row, "rejected", partial), "chosen_score": chosen_score,
            "rejected_score": rejected_score}


# ----------------------------------------------------------------------------------------------- tokenization
def encode_completion(tokenizer, prompt_messages: list[dict], partial: bool, completion, where: str) -> Sample:
    """Prompt + completion as one Sample, supervised only on the completion's characters (the template's
    end-of-turn marker included). With `partial`, the last prompt message is the start of the assistant turn."""
    if partial:
        prefix = prompt_messages[-1]["content"]
        full = prompt_messages[:-1] + [{"role": "assistant", "content": prefix + completion}]
    else:
        prefix = ""
        extra = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        full = prompt_messages + extra
    text, spans = assistant_spans(tokenizer, full, where)
    n_prompt_turns = sum(message["role"] == "assistant" for message in prompt_messages) - int(partial)
    spans = spans[n_prompt_turns:]
    if prefix:
        start, end = spans[0]
        if text[start:start + len(prefix)] != prefix:
            raise DataError(f"{where}: the chat template changes the partial assistant text; cannot locate the "
                            "continuation")
        spans[0] = (start + len(prefix), end)
    return tokenize_spans(tokenizer, text, spans, where)


def load_preference_pairs(files: list[str], tokenizer, *, max_seq_len: int, overlong: str = "truncate",
                          on_error: str = "error", system_prompt: str = "") -> tuple[list[PreferencePair], Counter]:
    """Tokenized pairs from every file, in file order, plus counts (rows, skipped, truncated, dropped, scored)."""
    check_data_policy(on_error, overlong)
    if not files:
        raise UserError("no preference data files given (data.train_files / data.eval_files)")
    pairs: list[PreferencePair] = []
    counts: Counter = Counter()
    first_identical = None
    for path in files:
        for row in read_rows(Path(path)):
            counts["rows"] += 1
            try:
                parsed = parse_preference_row(row, system_prompt)
                if parsed["chosen"] == parsed["rejected"]:
                    counts["dropped_identical"] += 1
                    first_identical = first_identical or row.where()
                    continue
                sides = [encode_completion(tokenizer, parsed["prompt_messages"], parsed["partial"], parsed[side],
                                           row.where(side))
                         for side in ("chosen", "rejected")]
            except DataError as exc:
                if on_error == "error":
                    raise
                counts["skipped_bad_rows"] += 1
                log.warning("skipping bad row: %s", exc)
                continue
            if any(len(sample) > max_seq_len for sample in sides):
                if overlong == "drop":
                    counts["dropped_overlong"] += 1
                    continue
                counts["truncated"] += 1
                sides = [sample.truncated(max_seq_len) if len(sample) > max_seq_len else sample for sample in sides]
            if any(sample.n_supervised == 0 for sample in sides):
                counts["dropped_no_target"] += 1
                continue
            pairs.append(PreferencePair(sides[0], sides[1], parsed["chosen_score"], parsed["rejected_score"]))
            counts["scored"] += parsed["chosen_score"] is not None
    if first_identical:
        log.warning("dropped %d preference pair(s) whose chosen equals rejected (no preference to learn; first: %s)",
                    counts["dropped_identical"], first_identical)
    counts["pairs"] = len(pairs)
    counts["tokens"] = sum(len(pair) for pair in pairs)
    if not pairs:
        raise DataError(f"no usable preference pairs in {files} (counts: {dict(counts)})")
    return pairs, counts


def pairs_digest(pairs: list[PreferencePair]) -> str:
    """sha256 of every pair's token ids and targets (keys caches of per-pair reference log-probs)."""
    digest = hashlib.sha256()
    for pair in pairs:
        for sample in (pair.chosen, pair.rejected):
            digest.update(np.int64(len(sample)).tobytes())
            digest.update(sample.input_ids.astype(np.int64).tobytes())
            digest.update(sample.targets.astype(np.int64).tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- packing
def pack_pairs(pairs: list[PreferencePair], max_tokens: int, enabled: bool = True) -> tuple[list[PairRow], float]:
    """Pack pairs (both sides together) best-fit-decreasing; returns rows and token utilization."""
    lens = [len(pair) for pair in pairs]
    if enabled:
        too_long = [i for i, n in enumerate(lens) if n > max_tokens]
        if too_long:
            i = too_long[0]
            raise UserError(f"pair {i} ({pairs[i].chosen.source}) has {lens[i]} tokens (chosen + rejected), more "
                            f"than packing.max_tokens={max_tokens}; set packing.max_tokens >= 2 * data.max_seq_len")
        bins = [sorted(group) for group in best_fit_decreasing(lens, max_tokens)]
        slots = len(bins) * max_tokens
    else:
        bins = [[i] for i in range(len(pairs))]
        slots = len(bins) * max(lens)
    rows = [PairRow(make_row([sample for i in group for sample in (pairs[i].chosen, pairs[i].rejected)]),
                    np.asarray(group, dtype=np.int64)) for group in bins]
    return rows, sum(lens) / slots


def collate_pairs(rows: list[PairRow], pairs: list[PreferencePair], pair_weight: float) -> dict:
    """One flat micro-batch (see packing.collate) plus pair_ids (P,), scores (P, 2) (NaN where absent),
    has_score (P,) and pair_weight = 1 / (pairs in the global batch)."""
    batch = collate([pair_row.row for pair_row in rows])
    ids = np.concatenate([pair_row.pair_ids for pair_row in rows])
    scores = np.full((len(ids), 2), np.nan, dtype=np.float32)
    for j, i in enumerate(ids):
        if pairs[i].chosen_score is not None:
            scores[j] = (pairs[i].chosen_score, pairs[i].rejected_score)
    batch["pair_ids"] = torch.from_numpy(ids)
    batch["scores"] = torch.from_numpy(scores)
    batch["has_score"] = ~torch.isnan(batch["scores"][:, 0])
    batch["pair_weight"] = float(pair_weight)
    return batch


def step_micro_batches(rows: list[PairRow], pairs: list[PreferencePair], global_rows: np.ndarray, micro_batch: int,
                       rank: int, world_size: int) -> list[dict]:
    """This rank's micro-batches of one global batch (row indices `global_rows`), weighted by 1 / global pairs."""
    chosen = [rows[i] for i in global_rows]
    weight = 1.0 / sum(len(pair_row.pair_ids) for pair_row in chosen)
    per_rank = len(chosen) // world_size
    mine = chosen[rank * per_rank:(rank + 1) * per_rank]
    return [collate_pairs(mine[i:i + micro_batch], pairs, weight) for i in range(0, per_rank, micro_batch)]


def eval_micro_batches(rows: list[PairRow], pairs: list[PreferencePair], micro_batch: int, rank: int,
                       world_size: int) -> list[dict]:
    """Every row once, rows dealt round-robin to ranks; weights 1 / (all pairs), so summed stats are means."""
    weight = 1.0 / sum(len(pair_row.pair_ids) for pair_row in rows)
    mine = rows[rank::world_size]
    return [collate_pairs(mine[i:i + micro_batch], pairs, weight) for i in range(0, len(mine), micro_batch)]
