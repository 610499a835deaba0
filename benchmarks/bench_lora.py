"""Full-parameter training against LoRA on the quickstart SFT and GRPO tasks: what LoRA saves (issue 26 item 6).

Each (stage, method) is one subprocess `python -m nova_rt.train` on configs/quickstart_sft.yaml or
quickstart_grpo.yaml (SmolLM2-135M-Instruct) for --max-steps steps with a checkpoint at the last step; method
`full` trains every weight, `lora<r>` rank-r adapters on every linear of attention and MLP (lora.alpha = 2r, the lr
of --lora-lr). GRPO runs once per rollout engine in --engines: `hf` samples from the trained module itself (nothing
to sync), `vllm` runs in --vllm-python (.venv-vllm) and syncs the weights before every rollout: all of them for
`full`, the adapter alone for LoRA (the base once, at step 1). Reported per run: trained parameters and their share,
optimizer state bytes (the AdamW tensors of the checkpoint), checkpoint bytes (its directory) and final/ bytes,
peak RSS of the process (wait4's ru_maxrss), median step time over the steps after the first, and for vllm the
weight-sync MB and seconds per rollout (median over the rollouts after the first; the first, with the base, apart).
Held-out evals are off (grpo.eval.every / train.eval_every 0): quality is bench_algorithms' and docs/lora.md's job.

    .venv/bin/python benchmarks/bench_lora.py [--stages sft,grpo] [--ranks 1,8,32] [--engines hf,vllm] \
        [--max-steps 8] [--threads 2] [--vllm-python .venv-vllm/bin/python]

Writes benchmarks/results/bench_lora_<device>_<date>.json and prints the table. --tiny: configs/tiny_sft.yaml and
tiny_grpo.yaml (a head_dim-64 tiny Llama, as vLLM's CPU attention needs) for 2 steps: the CI check, in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, report  # noqa: E402

CONFIGS = {"sft": "quickstart_sft.yaml", "grpo": "quickstart_grpo.yaml"}
TINY_CONFIGS = {"sft": "tiny_sft.yaml", "grpo": "tiny_grpo.yaml"}
TINY_MODEL = "model.tiny={hidden: 128, layers: 2, heads: 2, kv_heads: 1, intermediate: 256}"  # head_dim 64 (vLLM)
COLUMNS = ["stage", "method", "engine", "trained_params", "trained_share", "optimizer_state_mb", "checkpoint_mb",
           "final_mb", "peak_rss_mb", "step_s", "sync_mb", "sync_s", "first_sync_mb", "first_sync_s"]


def tensor_bytes(value) -> int:
    """Bytes of every tensor inside a (nested) checkpoint object."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def vllm_importable(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
    except OSError:  # no such interpreter
        return False


def run_cli(python: str, config: str, overrides: list[str], log: Path, threads: int) -> int:
    """`python -m nova_rt.train --config config --set ...` with its output in `log`; returns its peak RSS in bytes.
    A failed run raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    argv = [python, "-m", "nova_rt.train", "--config", str(ROOT / "configs" / config),
            *[part for override in overrides for part in ("--set", override)]]
    with log.open("w") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {process.returncode}:\n{log.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024  # KiB on Linux


def measure(stage: str, run_dir: Path, log: Path, peak_rss: int) -> dict:
    """The row of one finished run from its run directory (metrics.jsonl, the last checkpoint, final/) and log."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "step_time_s" in row]
    (checkpoint,) = sorted((run_dir / "checkpoints").iterdir())[-1:]
    trained = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True)
    optimizer = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    trained_params = sum(tensor.numel() for tensor in trained.values() if tensor.is_floating_point())
    total = re.search(r"trainable parameters \([\d.]+% of (\d+)\)", log.read_text())  # LoRA runs log it
    out = {"trained_params": trained_params,
           "trained_share": trained_params / int(total[1]) if total else 1.0,
           "optimizer_state_mb": tensor_bytes(optimizer["state"]) / 2**20,
           "checkpoint_mb": directory_bytes(checkpoint) / 2**20, "final_mb": directory_bytes(run_dir / "final") / 2**20,
           "peak_rss_mb": peak_rss / 2**20, "steps": len(rows),
           "step_s": statistics.median(row["step_time_s"] for row in rows[1:] or rows)}
    synced = [row for row in rows if "rollout_sync_mb" in row]
    if synced:
        out.update(first_sync_mb=synced[0]["rollout_sync_mb"], first_sync_s=synced[0]["rollout_sync_s"],
                   sync_mb=statistics.median(row["rollout_sync_mb"] for row in synced[1:] or synced),
                   sync_s=statistics.median(row["rollout_sync_s"] for row in synced[1:] or synced),
                   logprob_abs_diff_max=max(row["rollout_logprob_abs_diff"] for row in synced))
    elif stage == "grpo":
        out.update(sync_mb=0.0, sync_s=0.0)  # the hf engine samples from the trained module: nothing to sync
    return out


def run_one(stage: str, method: str, engine: str, args, work: Path) -> dict:
    run_dir = work / f"{stage}_{method}_{engine}"
    configs = TINY_CONFIGS if args.tiny else CONFIGS
    overrides = [f"run.dir={run_dir}", f"train.max_steps={args.max_steps}", f"checkpoint.every={args.max_steps}",
                 f"train.num_threads={args.threads}", "logging.tensorboard=false", "logging.plot=false"]
    if args.tiny:
        overrides.append(TINY_MODEL)
    if method != "full":
        rank = int(method.removeprefix("lora"))
        overrides += [f"lora.rank={rank}", f"lora.alpha={2 * rank}"]
        if args.lora_lr:
            overrides.append(f"optim.lr={args.lora_lr}")
    overrides.append("grpo.eval.every=0" if stage == "grpo" else "train.eval_every=0")  # not measured here
    if stage == "grpo":
        overrides.append(f"grpo.rollout.engine={engine}")
    python = args.vllm_python if engine == "vllm" else sys.executable
    t0 = time.perf_counter()
    log = work / f"{run_dir.name}.log"
    peak = run_cli(python, configs[stage], overrides, log, args.threads)
    row = {"stage": stage, "method": method, "engine": engine if stage == "grpo" else "-",
           **measure(stage, run_dir, log, peak), "wall_s": time.perf_counter() - t0}
    print(f"{stage} {method} {row['engine']}: {row['wall_s']:.1f} s", flush=True)
    return row


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny configs for 2 steps: checks the script in seconds")
    ap.add_argument("--stages", default="sft,grpo")
    ap.add_argument("--ranks", default="1,8,32", help="LoRA ranks; each is run next to full fine-tuning")
    ap.add_argument("--engines", default="hf,vllm", help="GRPO rollout engines (vllm: in --vllm-python)")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--max-steps", type=int, default=None, help="default 8, --tiny 2")
    ap.add_argument("--lora-lr", type=float, default=None, help="optim.lr of the LoRA runs (default: the config's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.max_steps = args.max_steps or (2 if args.tiny else 8)
    stages = args.stages.split(",")
    methods = ["full", *(f"lora{int(rank)}" for rank in args.ranks.split(","))]
    engines = args.engines.split(",")
    skipped = []
    if "grpo" in stages and "vllm" in engines and not vllm_importable(args.vllm_python):
        skipped.append(f"vllm: {args.vllm_python} cannot import vllm")
        engines.remove("vllm")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as work:
        for stage in stages:
            for engine in engines if stage == "grpo" else ["-"]:
                for method in methods:
                    rows.append(run_one(stage, method, engine, args, Path(work)))
    for row in rows:
        row.update(model="tiny" if args.tiny else "SmolLM2-135M-Instruct", max_steps=args.max_steps,
                   threads=args.threads, load=os.getloadavg()[0], skipped="; ".join(skipped))
    for note in skipped:
        print(f"skipped {note}")
    out = args.out or (str(RESULTS_DIR / "bench_lora_tiny.json") if args.tiny else None)
    return report("bench_lora", rows, COLUMNS, out)


if __name__ == "__main__":
    main()
