"""Shared benchmark harness: timing, environment capture, a markdown table and a JSON file per run.

Every bench_<op>.py builds its cases and providers, calls `time_fn` for each, and hands the rows to `report`.
On CUDA, timing uses CUDA events around repeated calls after warmup; on CPU, time.perf_counter.
Rows report median and p20/p80 milliseconds, plus whatever throughput fields the script adds.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2, reps: int = 5,
            min_time_s: float = 0.0) -> dict:
    """Median / p20 / p80 wall time of fn() in ms, and peak extra memory in MB on CUDA."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    t_start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - t_start) < min_time_s:
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    out = {"ms": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8), "reps": len(times)}
    if device.startswith("cuda"):
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def environment() -> dict:
    """Device, library versions, date and git sha, recorded with every result file."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    for mod in ("triton", "transformers", "flash_attn", "liger_kernel", "trl", "mergekit"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional baseline
            pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    try:
        env["git_sha"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                 stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        env["git_sha"] = "unknown"
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, rows: list[dict], columns: list[str], out: str | None = None) -> Path:
    """Print the table and write results/<name>_<device>_<yyyymmdd>.json (or `out`)."""
    env = environment()
    print(markdown_table(rows, columns))
    dev = env["device"].replace(" ", "-").lower()
    path = Path(out) if out else RESULTS_DIR / f"{name}_{dev}_{_dt.date.today():%Y%m%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "env": env, "rows": rows}, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
