"""Shared by tests/test_checkpoint_safety.py and tests/test_reliability.py: a tiny SFT config on a small chat file,
and an in-process CLI call that returns (exit status, stderr)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chat_rows(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}: what is {i} + {i}?"},
                          {"role": "assistant", "content": f"the answer is {2 * i}."}]} for i in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tiny_config(tmp: Path, data_file: Path | None = None, **sections) -> Path:
    """A tiny-Llama SFT config (no packing: one sample per row, 1 thread, no TensorBoard/plot) in tmp/cfg.yaml."""
    data = data_file or write_jsonl(tmp / "chat.jsonl", chat_rows())
    cfg = {"include": str(ROOT / "configs" / "tiny_sft.yaml"),
           "run": {"dir": str(tmp / "run")},
           "data": {"train_files": [str(data)], "max_seq_len": 256},
           "packing": {"enabled": False, "max_tokens": 256},
           "train": {"max_steps": 2, "global_batch": 2, "micro_batch": 1, "num_threads": 1},
           "checkpoint": {"every": 1, "keep_last": 5},
           "logging": {"tensorboard": False, "plot": False, "progress_bar": False}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp / "cfg.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """nova_rt.train.main(argv) in this process: (exit status, what it printed on stderr)."""
    from nova_rt.train import main

    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err
