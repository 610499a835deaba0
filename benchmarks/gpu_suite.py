"""One command for the first lent GPU: every GPU check and benchmark, in order, inside 9 minutes, results as it goes.

    python benchmarks/gpu_suite.py --dry-run        # any machine: the plan, each step's estimate and command
    python benchmarks/gpu_suite.py                  # on an H100 / H200 (one CUDA device)

Steps, in this order (each a child process with its own timeout; a step that would not fit the remaining time is
skipped and recorded as such):
  1. env            CUDA device, torch / triton / flash-attn / liger-kernel versions (installs nothing: the install
                    lines are in docs/gpu.md; a missing extra only drops that baseline)
  2. gpu_tests      pytest -m "gpu and not multigpu": bf16/fp16/fp32 Triton ops against fp64 oracles with
                    flash-attention's rule (error <= 2x the eager PyTorch error in the same dtype)
  3. attention      bench_packed_attention.py: nova_rt vs flash-attn varlen vs torch, fwd / bwd, 16k tokens hd128
  4. logprobs       bench_fused_linear_logprobs.py: Triton vs torch path, eager, Liger (torch.compile left out:
                    its compile does not fit the budget); T=16k, D=4096, V=152k; TFLOP/s, peak memory (allocator)
  5. grpo_loss      bench_grpo_loss.py: bytes/s against HBM peak (0.5M and 16M tokens, bf16 / fp16 / fp32)
  6. merge          `nova-rt merge --device cuda` (linear, model_stock) on 3 x Qwen2-0.5B-shaped bf16 models vs
                    a plain copy of the same bytes (bench_merge's inputs, copy and child-process timing); nova_rt._C
                    (CUDA merge ops) is built in the background from step 2 on, off the critical path
  7. sft_mfu        bench_train.py: one packed SFT step on the ~1B Llama shape (2 x 8192 tokens), HF then
                    megatron backend, tokens/s and MFU
Each step's own JSON goes to benchmarks/results/gpu_<date>/<step>.json and its log beside it; after every step
benchmarks/results/gpu_<date>.json (all rows, status, seconds) and gpu_<date>.md (one table per step) are
rewritten, so a run cut off at any point keeps what finished. Read the numbers against benchmarks/roofline.py.
Estimates are guesses for an H100 host (16 cores) before any GPU run; replace them with the first run's seconds.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
BUDGET_S = 540  # 9 minutes: the whole suite, so one 10-minute command holds it with a minute to spare
EXTRAS = ("torch", "triton", "flash_attn", "liger_kernel", "transformers", "megatron.core")


@dataclass
class Step:
    name: str
    est_s: int  # estimated wall seconds (planning, dry run)
    timeout_s: int  # hard limit for the child process (further capped by the time left)
    what: str

    def command(self, out_dir: Path) -> list[str]:
        py, b = sys.executable, str(REPO / "benchmarks")
        out = str(out_dir / f"{self.name}.json")
        return {
            "env": [py, __file__, "--env-only"],
            "gpu_tests": [py, "-m", "pytest", "-m", "gpu and not multigpu", "-p", "no:cacheprovider", "-q", "-rfE",
                          "--continue-on-collection-errors",  # a module needing an absent package must not stop others
                          f"--junitxml={out_dir / 'gpu_tests.xml'}", "tests"],
            "attention": [py, f"{b}/bench_packed_attention.py", "--reps", "20", "--out", out],
            "logprobs": [py, f"{b}/bench_fused_linear_logprobs.py", "--reps", "10", "--providers",
                         "triton,torch,eager,liger", "--out", out],  # torch.compile's ~40 s compile: not in budget
            "grpo_loss": [py, f"{b}/bench_grpo_loss.py", "--out", out],
            "merge": [py, __file__, "--merge-step", out],
            "sft_mfu": [py, f"{b}/bench_train.py", "--size", "1b", "--backends", "hf,megatron", "--reps", "3",
                        "--out", out],
        }[self.name]


STEPS = [
    Step("env", 5, 60, "CUDA device and versions of the GPU extras"),
    Step("gpu_tests", 170, 240, "gpu-marked tests: every Triton op vs fp64 oracle, 2x eager-error rule"),
    Step("attention", 75, 120, "packed attention vs flash-attn varlen, fwd/bwd, T=16k N=32 K=8 H=128 bf16"),
    Step("logprobs", 75, 150, "fused log-probs (Triton, torch path) vs Liger and eager, T=16k D=4096 V=152k bf16"),
    Step("grpo_loss", 60, 120, "GRPO loss GB/s vs HBM peak, 0.5M and 16M tokens"),
    Step("merge", 45, 120, "nova-rt merge --device cuda vs plain copy, 3 x 0.5B bf16"),
    Step("sft_mfu", 90, 180, "SFT step on ~1B Llama, 2 x 8192 packed tokens: tokens/s, MFU"),
]


# ----------------------------------------------------------------------------------------------- environment
def env_report() -> dict:
    """Device and extras; never installs anything."""
    import importlib

    import torch

    rep = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if rep["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        rep.update(device=torch.cuda.get_device_name(0), sm=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30,
                   sms=p.multi_processor_count, device_count=torch.cuda.device_count())
    for mod in EXTRAS:
        try:
            rep[mod] = getattr(importlib.import_module(mod), "__version__", "present")
        except Exception as e:  # noqa: BLE001 - an absent or broken extra is a finding, not a crash
            rep[mod] = f"missing ({type(e).__name__})"
    problems = []
    if not rep["cuda_available"]:
        problems.append("no CUDA device")
    elif not any(k in rep["device"] for k in ("H100", "H200")):
        problems.append(f"{rep['device']} is not an H100/H200: roofline peaks and MFU use H100/H200 numbers")
    if rep["torch_cuda"] is None:
        problems.append("torch is a CPU build: install CUDA torch first (docs/gpu.md)")
    for mod in ("flash_attn", "liger_kernel"):
        if str(rep[mod]).startswith("missing"):
            problems.append(f"{mod} missing: its baseline rows are skipped (docs/gpu.md has the install line)")
    pins = dict(line.split("==") for line in (REPO / "requirements-cpu.txt").read_text().split()
                if "==" in line and not line.startswith("#"))
    for name, mod in (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"),
                      ("megatron-core", "megatron.core")):
        have = str(rep.get(mod, "")).split("+")[0]
        if name in pins and have != pins[name]:
            problems.append(f"{name} {rep.get(mod)} is not the pinned {pins[name]} (requirements-cpu.txt)")
    rep["problems"] = problems
    return rep


# ----------------------------------------------------------------------------------------------- merge step
def merge_step(out: str) -> None:
    """nova-rt merge --device cuda on bench_merge's 0.5B inputs, against a plain copy of the same bytes."""
    from benchmarks import bench_merge as bm
    from benchmarks.common import report

    cache = Path(os.environ.get("NOVA_RT_BENCH_CACHE", "/tmp/nova_rt_bench_merge"))
    dirs = bm.build_models("0.5b", cache)
    work = cache / "work_gpu"
    work.mkdir(parents=True, exist_ok=True)
    model_bytes = (dirs[0] / "model.safetensors").stat().st_size
    bm.plain_copy(dirs, model_bytes, work / "copy.bin", direct=False)  # warm the page cache
    copy_s = min(bm.plain_copy(dirs, model_bytes, work / "copy.bin", direct=False) for _ in range(2))
    (work / "copy.bin").unlink(missing_ok=True)
    rows = [{"method": "-", "tool": "copy buffered", "wall_s": copy_s, "gb_per_s": 4 * model_bytes / copy_s / 1e9}]
    for method in ("linear", "model_stock"):
        cfg = bm.write_yaml(method, dirs, work / f"{method}.yaml", "float32")
        out_dir = work / f"nova_{method}"
        walls = []
        for _ in range(2):
            cmd = [sys.executable, "-m", "nova_rt.merge.cli", str(cfg), str(out_dir), "--force", "--no-progress",
                   "--device", "cuda"]
            walls.append(bm.run_child(cmd)[0])
        in_bytes = sum((d / "model.safetensors").stat().st_size for d in dirs)
        out_bytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
        rows.append({"method": method, "tool": "nova_rt cuda", "wall_s": min(walls), "wall_all": walls,
                     "gb_per_s": (in_bytes + out_bytes) / min(walls) / 1e9, "vs_copy": copy_s / min(walls)})
    report("merge_gpu", rows, ["method", "tool", "wall_s", "wall_all", "gb_per_s", "vs_copy"], out=out)


# ----------------------------------------------------------------------------------------------- runner
def _run(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, str]:
    """Run cmd in its own process group, tee its output to the console and log_path; kill the group at timeout."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: list[str] = []

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                lines.append(line)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            lines.append(f"\n[gpu_suite] killed after {timeout:.0f} s\n")
        t.join(timeout=5)
    return rc, "".join(lines)


def _collect(step: Step, out_dir: Path, output: str) -> dict:
    """The step's results: its JSON rows, else JSON lines from its output; pytest: the junit counts; env: the
    report the child printed."""
    if step.name == "env":
        try:
            return json.loads(output[output.index("{"):])
        except ValueError:
            return {}
    if step.name == "gpu_tests":
        xml = out_dir / "gpu_tests.xml"
        if not xml.exists():
            return {}
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        return {"tests": int(suite.get("tests", 0)), "failures": int(suite.get("failures", 0)),
                "errors": int(suite.get("errors", 0)), "skipped": int(suite.get("skipped", 0)), "failed": failed}
    path = out_dir / f"{step.name}.json"
    if path.exists():
        return {"rows": json.loads(path.read_text()).get("rows", [])}
    rows = []
    for line in output.splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return {"rows": rows} if rows else {}


def _markdown(record: dict) -> str:
    parts = [f"# GPU suite {record['date']}", "", f"device: {record['env'].get('device', '?')}; budget "
             f"{record['budget_s']} s; elapsed {record['elapsed_s']:.0f} s", "",
             "| step | status | seconds | estimate | result |", "|---|---|---|---|---|"]
    for s in record["steps"]:
        res = s.get("result", {})
        summary = (f"{res['tests']} tests, {res['failures']} failed, {res['errors']} errors, {res['skipped']} skipped"
                   if "tests" in res else f"{len(res.get('rows', []))} rows")
        parts.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} | {s['est_s']} | {summary} |")
    for s in record["steps"]:
        tables = s.get("tables")
        if tables:
            parts += ["", f"## {s['name']}", "", tables]
    return "\n".join(parts) + "\n"


def _write(record: dict, json_path: Path, md_path: Path) -> None:
    for path, text in ((json_path, json.dumps(record, indent=1, default=str)), (md_path, _markdown(record))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _start_ext_build(out_dir: Path) -> subprocess.Popen:
    """Build nova_rt._C (CPU + CUDA merge ops) in the background while the GPU tests run: a source checkout JIT-builds
    it on first use (nova_rt/_C_loader.py), a minute or more of nvcc that the merge step would otherwise wait for."""
    log = open(out_dir / "ext_build.log", "w")  # noqa: SIM115 - closed with the process, by the OS
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "8")}
    return subprocess.Popen([sys.executable, "-c", "from nova_rt._C_loader import load_extension; load_extension()"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _run_step(step: Step, entry: dict, out_dir: Path, left: float, ext: subprocess.Popen | None) -> int:
    """Run one step (the merge step first waits for the background extension build); fill entry; return rc."""
    print(f"\n[gpu_suite] {step.name}: {step.what} (estimate {step.est_s} s, {left:.0f} s left)", flush=True)
    ts = time.perf_counter()
    if step.name == "merge" and ext is not None:
        try:
            entry["ext_build_rc"] = ext.wait(timeout=max(1.0, left - step.est_s))
        except subprocess.TimeoutExpired:
            entry["ext_build_rc"] = "still building"
    left -= time.perf_counter() - ts
    rc, output = _run(step.command(out_dir), out_dir / f"{step.name}.log", min(step.timeout_s, left))
    entry.update(seconds=time.perf_counter() - ts, returncode=rc, status="ok" if rc == 0 else f"rc={rc}",
                 result=_collect(step, out_dir, output),
                 tables="\n".join(ln for ln in output.splitlines() if ln.startswith("|")))
    return rc


def run_suite(budget_s: float, only: list[str] | None) -> int:
    """Run the steps in order within budget_s; this process never touches CUDA (no context of its own on the GPU)."""
    date = f"{_dt.date.today():%Y%m%d}"
    out_dir = RESULTS / f"gpu_{date}"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"gpu_{date}.json", RESULTS / f"gpu_{date}.md"
    record = {"suite": "gpu", "date": date, "budget_s": budget_s, "elapsed_s": 0.0, "env": {}, "steps": []}
    t0, bad, ext = time.perf_counter(), 0, None
    for step in STEPS:
        if only and step.name not in only and step.name != "env":
            continue
        left = budget_s - (time.perf_counter() - t0)
        entry = {"name": step.name, "est_s": step.est_s, "what": step.what}
        record["steps"].append(entry)
        if left < step.est_s:
            entry["status"] = f"skipped: {left:.0f} s left < estimate {step.est_s} s"
            bad += 1
        else:
            bad += _run_step(step, entry, out_dir, left, ext) != 0
        record["elapsed_s"] = time.perf_counter() - t0
        if step.name == "env":
            record.update(entry.pop("result", {}))
            if not record["env"].get("cuda_available"):
                print("no CUDA device: nothing run, nothing kept (--dry-run shows the plan)", file=sys.stderr)
                shutil.rmtree(out_dir, ignore_errors=True)
                return 2
            if not only or "merge" in only:
                ext = _start_ext_build(out_dir)
        _write(record, json_path, md_path)
    print(f"\n[gpu_suite] done in {record['elapsed_s']:.0f} s: {json_path} and {md_path}")
    return 1 if bad else 0


def dry_run(budget_s: float, only: list[str] | None) -> int:
    out_dir = RESULTS / f"gpu_{_dt.date.today():%Y%m%d}"
    steps = [s for s in STEPS if not only or s.name in only]
    total = sum(s.est_s for s in steps)
    print("| # | step | estimate s | timeout s | what | command |\n|---|---|---|---|---|---|")
    for i, s in enumerate(steps, 1):
        cmd = shlex.join(str(c).replace(str(REPO) + "/", "") for c in s.command(out_dir))
        print(f"| {i} | {s.name} | {s.est_s} | {s.timeout_s} | {s.what} | `{cmd}` |")
    fits = total <= budget_s
    print(f"\ntotal estimate {total} s = {total / 60:.1f} min; budget {budget_s:.0f} s = {budget_s / 60:.1f} min: "
          f"{'fits' if fits else 'DOES NOT FIT'}")
    return 0 if fits else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan with estimates; run nothing")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite (default 540)")
    ap.add_argument("--steps", default=None, help="comma-separated subset of: " + ",".join(s.name for s in STEPS))
    ap.add_argument("--env-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--merge-step", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    only = args.steps.split(",") if args.steps else None
    if args.env_only:
        from benchmarks.common import environment

        rep = env_report()
        print(json.dumps({"env": rep, "versions": environment()}, indent=1))
        return 0 if rep["cuda_available"] else 2
    if args.merge_step:
        merge_step(args.merge_step)
        return 0
    if args.dry_run:
        return dry_run(args.budget, only)
    return run_suite(args.budget, only)


if __name__ == "__main__":
    sys.exit(main())
