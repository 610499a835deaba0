"""SFT data: read rows, render and tokenize them, apply the over-length policy, and count what happened."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from nova_rt.data.chat import Sample, check_data_policy, encode_chat, row_to_messages
from nova_rt.data.io import DataError, read_rows

log = logging.getLogger(__name__)


def load_sft_samples(files: list[str], tokenizer, *, max_seq_len: int, overlong: str = "truncate",
                     on_error: str = "error", system_prompt: str = "") -> tuple[list[Sample], Counter]:
    """Tokenized samples from every file, in file order, plus counts: rows, skipped, truncated, dropped."""
    check_data_policy(on_error, overlong)
    if not files:
        raise DataError("data.train_files is empty: give at least one jsonl/json/parquet file or datasets dir")
    samples: list[Sample] = []
    counts: Counter = Counter()
    for path in files:
        for row in read_rows(Path(path)):
            counts["rows"] += 1
            try:
                msgs = row_to_messages(row, system_prompt)
                sample = encode_chat(tokenizer, msgs, row.where())
            except DataError as exc:
                if on_error == "error":
                    raise
                counts["skipped_bad_rows"] += 1
                log.warning("skipping bad row: %s", exc)
                continue
            if len(sample) > max_seq_len:
                if overlong == "drop":
                    counts["dropped_overlong"] += 1
                    continue
                counts["truncated"] += 1
                sample = sample.truncated(max_seq_len)
            if sample.n_supervised == 0:
                counts["dropped_no_target"] += 1
                continue
            samples.append(sample)
    counts["samples"] = len(samples)
    counts["tokens"] = sum(len(s) for s in samples)
    if not samples:
        raise DataError(f"no usable samples in {files} (counts: {dict(counts)})")
    return samples, counts
