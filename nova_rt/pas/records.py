"""Resumable jsonl artifacts for the PAS sub-steps.

Every sub-step writes one row per finished prompt and flushes it at once, so a crash (or a failed request) loses
only rows that were not finished. On a rerun, `done_ids` tells the step which ids to skip. A crash in the middle of a
write can leave a partial last line; `JsonlAppender` cuts the file back to its last newline before appending, so the
partial row is redone instead of corrupting the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def read_jsonl(path: str | os.PathLike, *, tolerate_partial_tail: bool = True) -> Iterator[dict]:
    """Rows of a jsonl file. A bad line raises ValueError naming file and line, except an unterminated last line
    (a crash mid-write), which is skipped when `tolerate_partial_tail`."""
    path = Path(path)
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        is_tail = lineno == len(lines)  # no newline after it: the writer never finished this row
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            if is_tail and tolerate_partial_tail:
                return
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield row


def done_ids(path: str | os.PathLike) -> set[str]:
    """Ids of the rows already written to `path` (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return set()
    return {str(row["id"]) for row in read_jsonl(path) if "id" in row}


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write all rows to a temporary file and rename it over `path`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


class JsonlAppender:
    """Append rows to a jsonl file, one flushed line per row (fsync optional)."""

    def __init__(self, path: str | os.PathLike, *, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._trim_partial_tail()
        self._f = self.path.open("a", encoding="utf-8")
        self._fsync = fsync
        self.count = 0

    def _trim_partial_tail(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            f.truncate(data.rfind(b"\n") + 1)  # rfind is -1 when there is no newline at all: truncate to 0

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
