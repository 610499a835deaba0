"""Turn chat rows into token ids with a loss mask on assistant tokens only.

Accepted rows: {"messages": [{"role", "content"}, ...]} or {"prompt", "response"} (optionally "system"). An assistant
turn whose content is empty (or only whitespace) is a bad row (DataError, subject to data.on_error): it would
train only on the end-of-turn marker; so is a conversation the chat template cannot render (render_chat).
The chat template renders the conversation; the characters of each assistant turn are found by rendering the
prefix up to that turn (with the generation prompt) and the prefix including it, so the span is exactly what the
template adds for the assistant's reply (content and end-of-turn marker). Tokens whose characters start inside
such a span are supervised.

Each sample is stored already shifted: `targets[t]` is the token to predict at position t (the next token when it
is supervised, else -100), and the last position never has a target. Packing samples side by side therefore never
creates a target that crosses a document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nova_rt.data.io import DataError, Row

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    input_ids: np.ndarray  # (L,) int64
    targets: np.ndarray  # (L,) int64, IGNORE where unsupervised
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return int((self.targets != IGNORE).sum())

    def truncated(self, max_len: int) -> Sample:
        """The first max_len tokens; the last one loses its target (the first token past the cut)."""
        out = Sample(self.input_ids[:max_len], self.targets[:max_len].copy(), self.source)
        out.targets[-1] = IGNORE
        return out


def check_data_policy(on_error: str, overlong: str) -> None:
    """Validate data.on_error and data.overlong (shared by every loader; the config loader checks them first)."""
    if on_error not in ("error", "skip"):
        raise DataError(f"data.on_error must be 'error' or 'skip', got {on_error!r}")
    if overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong must be 'truncate' or 'drop', got {overlong!r}")


def row_to_messages(row: Row, system_prompt: str = "") -> list[dict]:
    """Validate a row and return its messages (a system prompt is prepended when configured and absent)."""
    data = row.data
    if isinstance(data, Exception):
        raise data
    if not isinstance(data, dict):
        raise DataError(f"{row.where()}: expected an object, got {type(data).__name__}")
    if "messages" in data:
        msgs = data["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{row.where('messages')}: must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise DataError(f"{row.where(f'messages[{i}]')}: must be an object with role and content")
            if m.get("role") not in ROLES:
                raise DataError(f"{row.where(f'messages[{i}].role')}: must be one of {ROLES}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{row.where(f'messages[{i}].content')}: must be a string")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{row.where('messages')}: no assistant message to learn from")
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(f"{row.where(f'messages[{i}].content')}: empty assistant message (it would train "
                                "only on the end-of-turn token)")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif "prompt" in data or "response" in data:
        for key in ("prompt", "response"):
            if not isinstance(data.get(key), str):
                raise DataError(f"{row.where(key)}: missing or not a string")
        if not data["response"].strip():
            raise DataError(f"{row.where('response')}: empty response (it would train only on the end-of-turn token)")
        msgs = [{"role": "user", "content": data["prompt"]}, {"role": "assistant", "content": data["response"]}]
        if isinstance(data.get("system"), str):
            msgs.insert(0, {"role": "system", "content": data["system"]})
    else:
        raise DataError(f"{row.where()}: expected a 'messages' list or 'prompt' and 'response' fields "
                        f"(got keys {sorted(data)})")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    """The chat template's text for `messages`; a conversation the template cannot render (empty, or one its
    template refuses, e.g. roles that do not alternate) is a DataError naming `where` (the file and row)."""
    if not messages:
        raise DataError(f"{where}: no message before the assistant's reply (the chat template renders no "
                        "conversation without one; start with a user or system message)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - templates are user code (jinja raise_exception, TypeError, ...)
        reason = " ".join(str(exc).split())[:200]
        raise DataError(f"{where}: the chat template cannot render this conversation "
                        f"({type(exc).__name__}: {reason})") from exc


def assistant_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the [start, end) character spans of every assistant turn."""
    if messages and messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with an assistant message; the chat template needs a "
                        "user (or system) message before it")
    text = render_chat(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], True, where)
        upto = render_chat(tokenizer, messages[: i + 1], False, where)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError(f"{where}: the chat template does not render turn prefixes consistently; "
                            "cannot locate assistant tokens")
        spans.append((len(before), len(upto)))
    return text, spans


def encode_chat(tokenizer, messages: list[dict], where: str) -> Sample:
    """Tokenize a conversation; supervise only tokens inside assistant spans."""
    text, spans = assistant_spans(tokenizer, messages, where)
    return tokenize_spans(tokenizer, text, spans, where)


def tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]], where: str) -> Sample:
    """Tokenize `text`; supervise tokens whose first character lies in one of the [start, end) `spans`."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    supervised = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        supervised |= (starts >= a) & (starts < b)
    targets = np.full(len(ids), IGNORE, dtype=np.int64)
    targets[:-1] = np.where(supervised[1:], ids[1:], IGNORE)
    return Sample(ids, targets, where)


def encode_prompt(tokenizer, messages: list[dict], where: str = "prompt") -> list[int]:
    """Token ids of a prompt with the assistant generation prefix (for rollouts and DPO/RM prompts)."""
    text = render_chat(tokenizer, messages, True, where)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
