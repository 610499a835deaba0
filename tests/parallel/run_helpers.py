"""Shared by the torchrun tests in tests/parallel: a clean subprocess environment and readers for a run directory."""

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("NOVA_RT_TEST_SEED") or int.from_bytes(os.urandom(2), "little"))
"""Seed of the tiny models of one pytest session (printed by each test); NOVA_RT_TEST_SEED replays one."""


def clean_env(threads: int | None = 1) -> dict:
    """os.environ without the torchrun variables of any parent launch; OMP_NUM_THREADS=threads unless None."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_weights(model_dir: Path) -> dict:
    """Every tensor of the safetensors files in an HF directory, by name."""
    from safetensors.torch import load_file

    out = {}
    for f in Path(model_dir).glob("*.safetensors"):
        out.update(load_file(f))
    return out
