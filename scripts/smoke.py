"""CI's front-door check: the real `make run` path, cut down (configs/smoke.yaml), from an empty model cache.

1. `make run` with QUICKSTART=configs/smoke.yaml and NOVA_RT_CACHE pointing at an empty directory: the bundled GGUF
   is converted, and every stage of configs/quickstart.yaml loads the real SmolLM2-135M-Instruct and trains a step
   or two. The run is SIGKILLed (its whole process group) as soon as GRPO has logged step 2, i.e. after it
   checkpointed step 1 and possibly while it writes the next checkpoint.
2. The same `make run` again: finished stages are skipped, GRPO resumes from its newest complete checkpoint, the
   run exits 0 and writes report.md with its held-out table.
A missing package, a broken config, a stage that cannot load the model or a resume that fails makes it exit 1.

    python scripts/smoke.py [--keep]      (make smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILL_AFTER_STEP = 2
MAX_S = 1800  # each of the two runs (~4 min on 2 idle cores): a hung run fails the check, not CI's clock


def fail(msg: str, log: Path | None = None) -> None:
    if log is not None and log.exists():
        sys.stderr.write(f"--- last lines of {log} ---\n" + "".join(log.read_text().splitlines(True)[-40:]))
    sys.stderr.write(f"smoke: FAILED: {msg}\n")
    sys.exit(1)


def grpo_steps(run_dir: Path) -> list[int]:
    path = run_dir / "grpo" / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line).get("step", -1)))
        except (ValueError, json.JSONDecodeError):  # a line being written when we looked
            pass
    return steps


def make_run(run_dir: Path, env: dict, log: Path) -> subprocess.Popen:
    cmd = ["make", "--no-print-directory", "run", "QUICKSTART=configs/smoke.yaml",
           f"RUN_ARGS=--set run.dir={run_dir}"]
    out = log.open("w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache and run directory")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nova-smoke."))
    env = {**os.environ, "NOVA_RT_CACHE": str(work / "cache"), "PYTHONUNBUFFERED": "1"}  # as `make run` has it
    run_dir = work / "run"
    t0 = time.time()
    try:
        log1 = work / "run1.log"
        proc = make_run(run_dir, env, log1)
        deadline = time.time() + MAX_S
        while max(grpo_steps(run_dir), default=0) < KILL_AFTER_STEP:
            if proc.poll() is not None:
                fail(f"the first run exited with {proc.returncode} before GRPO logged step {KILL_AFTER_STEP}", log1)
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                fail(f"the first run did not reach GRPO step {KILL_AFTER_STEP} in {MAX_S} s", log1)
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        t1 = time.time()
        print(f"smoke: run 1 killed at GRPO step {max(grpo_steps(run_dir))} after {t1 - t0:.0f} s "
              f"(GGUF converted into an empty cache, pas/sft/merge/rm done)", flush=True)

        log2 = work / "run2.log"
        proc = make_run(run_dir, env, log2)
        try:
            rc = proc.wait(timeout=MAX_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            fail(f"the rerun did not finish in {MAX_S} s", log2)
        if rc != 0:
            fail(f"the rerun exited with {rc}", log2)
        text = log2.read_text()
        for stage in ("pas", "sft", "merge", "rm"):
            if f"pipeline: {stage} already done, skipping" not in text:
                fail(f"the rerun did not skip the finished stage {stage}", log2)
        if "resumed from" not in text:
            fail("the rerun did not resume GRPO from a checkpoint", log2)
        steps = [s for s in grpo_steps(run_dir) if s > 0]
        if steps != sorted(set(steps)) or steps[-1] != 3:
            fail(f"GRPO metrics steps after the resume are {steps}, expected 1..3 once each", log2)
        report = run_dir / "report.md"
        if not report.exists() or "## Did the pipeline make the model better? (held-out)" not in report.read_text():
            fail("report.md with its held-out table was not written", log2)
        print(f"smoke: rerun skipped finished stages, resumed GRPO, finished in {time.time() - t1:.0f} s; "
              f"report {report}", flush=True)
        print(f"smoke: OK in {time.time() - t0:.0f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"smoke: kept {work}")


if __name__ == "__main__":
    main()
