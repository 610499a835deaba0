"""Per-step metrics: <run dir>/metrics.jsonl, TensorBoard scalars, a progress bar, GPU stats through NVML,
NVTX ranges for Nsight, and a PNG of the loss curve at the end.

Only rank 0 writes. metrics.jsonl is strict JSON: a NaN or infinite value is written as null (Python's json would
write the non-JSON tokens NaN/Infinity), and the step's `nonfinite` field lists the keys that were. On resume, lines
for steps after the checkpoint are dropped so metrics.jsonl has exactly one line per optimizer step. NVML is
optional: a missing library (any CPU machine) just omits the GPU fields.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s by device name substring, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def nvtx_range(name: str):
    """An NVTX range on CUDA (visible in Nsight Systems); a no-op elsewhere."""
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range(name)
    return contextlib.nullcontext()


class GPUStats:
    def __init__(self, local_rank: int = 0):
        self.handle = None
        self.peak_tflops = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(local_rank)
            name = pynvml.nvmlDeviceGetName(self.handle)
            name = name.decode() if isinstance(name, bytes) else name
            self.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound on CPU machines, and friends
            log.debug("NVML unavailable: %s", exc)

    def read(self) -> dict:
        if self.handle is None:
            return {}
        nvml = self._nvml
        out = {}
        with contextlib.suppress(Exception):
            out["gpu_mem_gb"] = nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 1e9
            out["gpu_power_w"] = nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3
            out["gpu_util"] = nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        if torch.cuda.is_available():
            out["torch_max_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return out


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token: 6N for the matmuls plus causal attention's 6·L·h·s (fwd+bwd, half the square)."""
    return 6.0 * n_params + 6.0 * n_layers * hidden * seq_len


class Telemetry:
    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = True, progress_bar: bool = True,
                 total_steps: int = 0, start_step: int = 0, local_rank: int = 0):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.gpu = GPUStats(local_rank) if enabled and torch.cuda.is_available() else None
        self.tensorboard = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
            except Exception as exc:  # noqa: BLE001 - tensorboard missing or broken: metrics.jsonl still works
                log.warning("TensorBoard disabled: %s", exc)
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self._t_last = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _py(v) for k, v in metrics.items()}}
        if self.gpu is not None:
            record.update(self.gpu.read())
        with open(self.path, "a") as f:
            f.write(strict_json(record) + "\n")
        if self.tensorboard is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tensorboard.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            show = {k: record[k] for k in ("loss", "reward_mean", "lr", "tokens_per_s") if k in record}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in show.items()})

    def close(self, plot: bool = True, keys: tuple[str, ...] = ("loss",)) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if plot:
            plot_metrics(self.path, self.run_dir / "loss.png", keys)


def strict_json(rec: dict) -> str:
    """json.dumps with NaN/inf values as null (their keys listed under "nonfinite"); never writes NaN tokens."""
    bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        rec = {**{k: (None if k in bad else v) for k, v in rec.items()}, "nonfinite": bad}
    return json.dumps(rec, allow_nan=False)


def _py(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, out_png: str | Path, keys: tuple[str, ...] = ("loss",)) -> Path | None:
    rows = read_metrics(metrics_path)
    keys = tuple(key for key in keys if any(key in row for row in rows))
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]  # null: non-finite
        ax.plot([point[0] for point in points], [point[1] for point in points],
                marker="." if len(points) < 60 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
