"""Row readers for jsonl / json / parquet files and `datasets` directories saved with save_to_disk.

Every row comes with its source and 1-based row number, so validation errors can say exactly where a bad row is.
A jsonl line that is not UTF-8 or not JSON becomes a row holding its DataError, so `data.on_error: skip` skips it
like any other bad row; a whole-file problem (missing, empty .json, unreadable parquet) is a DataError at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nova_rt.errors import UserError


class DataError(UserError):
    """A data row is invalid; the message names the file, the row and the field."""


@dataclass(frozen=True)
class Row:
    source: str
    index: int
    """1-based row number (line number for jsonl)."""
    data: Any

    def where(self, field: str | None = None) -> str:
        return f"{self.source}: row {self.index}" + (f": field '{field}'" if field else "")


def read_rows(path: str | Path) -> Iterator[Row]:
    path = Path(path)
    if path.is_dir():
        yield from _read_datasets_dir(path)
        return
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".jsonl.gz"):
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .json, .parquet or a datasets dir)")


def _read_jsonl(path: Path) -> Iterator[Row]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        yield from _jsonl_rows(path, opener)
    except (EOFError, gzip.BadGzipFile) as exc:  # a cut or damaged .gz: the rows read so far were yielded
        raise DataError(f"{path}: damaged gzip file ({exc})") from None


def _jsonl_rows(path: Path, opener) -> Iterator[Row]:
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Row(str(path), lineno, DataError(f"{path}: row {lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} "
                                                       f"at column {exc.start + 1})"))
                continue
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Row(str(path), lineno, DataError(f"{path}: row {lineno}: invalid JSON: {exc.msg}"))
                continue
            yield Row(str(path), lineno, data)


def _read_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows")
    for i, row in enumerate(data, 1):
        yield Row(str(path), i, row)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for a damaged file, without path
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield Row(str(path), i, row)


def _read_datasets_dir(path: Path) -> Iterator[Row]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds, 1):
        yield Row(str(path), i, row)


def write_jsonl(path: str | Path, rows, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
