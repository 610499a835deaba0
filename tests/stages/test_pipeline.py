"""The whole pipeline (PAS -> SFT slices -> Model Stock merge -> RM -> GRPO) end to end on a tiny random model,
killed with SIGKILL in the middle of the RM stage and rerun: finished stages are not redone, the killed stage
resumes from its checkpoint, and report.md's numbers match the stages' metrics.jsonl."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nova_rt.pas.template import CRITIQUE_SYSTEM, GENERATION_SYSTEM
from nova_rt.telemetry import read_metrics
from tests.pas.chat_server import ChatServer

ROOT = Path(__file__).resolve().parents[2]


def responder(messages, max_tokens):
    if messages[0]["content"] == GENERATION_SYSTEM:
        return "Complement: Show each step of the work and state the final result clearly."
    if messages[0]["content"] == CRITIQUE_SYSTEM:
        comp = messages[-1]["content"].split("\nComplement: ", 1)[1]
        return json.dumps({"reason": "fine", "is_correct": "yes", "final": comp})
    raise AssertionError(messages[0]["content"][:80])


def _cmd(run_dir, url):
    return [sys.executable, "-m", "nova_rt.train", "--config", str(ROOT / "configs" / "tiny_pipeline.yaml"),
            "--set", f"run.dir={run_dir}", "--set", f"pas.generator.base_url={url}", "--set", "train.num_threads=1"]


def _env():
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _fmt(v):
    return f"{v:.4g}"


@pytest.mark.slow
def test_pipeline_kill_rerun_and_report(tmp_path):
    run = tmp_path / "pipe"
    with ChatServer(responder) as srv:
        proc = subprocess.Popen(_cmd(run, srv.base_url), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 900
        while not (run / "rm" / "checkpoints" / "step_00000001").exists():
            assert proc.poll() is None, f"pipeline exited early: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (run / "rm" / "STAGE_DONE.json").exists() and not (run / "report.md").exists()
        done_before = {s: (run / s / "STAGE_DONE.json").stat().st_mtime_ns for s in ("pas", "sft", "merge")}
        sft_metrics = (run / "sft" / "math" / "metrics.jsonl").read_text()
        served = len(srv.requests)
        r = subprocess.run(_cmd(run, srv.base_url), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        assert len(srv.requests) == served, "the PAS stage was redone"
    assert {s: (run / s / "STAGE_DONE.json").stat().st_mtime_ns for s in done_before} == done_before
    assert (run / "sft" / "math" / "metrics.jsonl").read_text() == sft_metrics
    rm_steps = [r["step"] for r in read_metrics(run / "rm" / "metrics.jsonl") if "loss" in r]
    assert rm_steps == sorted(set(rm_steps)) and rm_steps[-1] == 2
    for stage in ("pas", "sft", "merge", "rm", "grpo"):
        assert (run / stage / "STAGE_DONE.json").exists(), stage
    merged = json.loads((run / "merge" / "STAGE_DONE.json").read_text())["merged"]
    assert (Path(merged) / "config.json").exists()
    assert (run / "grpo" / "final" / "config.json").exists()
    # report.md: every table cell equals metrics.jsonl's first / last / mean
    report = (run / "report.md").read_text()
    for label, d in [("sft/math", run / "sft" / "math"), ("sft/text", run / "sft" / "text"), ("rm", run / "rm"),
                     ("grpo", run / "grpo")]:
        section = report.split(f"### {label}\n", 1)[1].split("###", 1)[0]
        rows = read_metrics(d / "metrics.jsonl")
        for key, name in [("loss", "loss"), ("reward_mean", "reward")]:
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if not vals:
                continue
            m = re.search(rf"^\| {name} \| (\S+) \| (\S+) \| (\S+) \|$", section, re.M)
            assert m, (label, name, section)
            assert m.groups() == (_fmt(vals[0]), _fmt(vals[-1]), _fmt(sum(vals) / len(vals))), (label, key)
    for png in ("loss.png", "reward_mean.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert "## Per-category eval" in report and "add_sub" in report
    _check_heldout(run, report)
    for stage in ("pas", "sft", "rm", "grpo"):  # finished stages drop their checkpoints (pipeline.prune_checkpoints)
        assert not list((run / stage).rglob("checkpoints")), stage


def _check_heldout(run: Path, report: str):
    """The held-out table: merge/heldout.json scores every model on the same documents (the SFT runs skip their own
    eval of them), and every row of the report's table is recomputed from heldout.json / metrics.jsonl."""
    import numpy as np

    held = json.loads((run / "merge" / "heldout.json").read_text())
    assert set(held["nll"]) == {"base", "sft/math", "sft/text", "merged"}
    nll = {m: {k: np.asarray(v) for k, v in per.items()} for m, per in held["nll"].items()}
    mean = lambda a: a[:, 0].sum() / a[:, 1].sum()  # noqa: E731
    for name in ("math", "text"):
        docs = nll["base"][name]
        assert len(docs) == 32 and (docs[:, 1] > 0).all()
        for m in nll:
            assert np.array_equal(nll[m][name][:, 1], docs[:, 1])  # same documents, same tokens
        assert not [r for r in read_metrics(run / "sft" / name / "metrics.jsonl") if "eval_loss" in r]
    section = report.split("## Did the pipeline make the model better? (held-out)\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("sft/math", "sft/text", "merge", "rm", "grpo"):
            rows.setdefault(cells[0], []).append(cells)
    assert len(rows["merge"]) == 3 and len(rows["rm"]) == 1 and len(rows["grpo"]) == 1
    for name in ("math", "text"):
        (cells,) = rows[f"sft/{name}"]
        assert cells[2] == "32"
        assert float(cells[3]) == pytest.approx(mean(nll["base"][name]), abs=1e-4)
        assert float(cells[4]) == pytest.approx(mean(nll[f"sft/{name}"][name]), abs=1e-4)
    rm = [r for r in read_metrics(run / "rm" / "metrics.jsonl") if "eval_accuracy" in r]
    (cells,) = rows["rm"]
    assert cells[2] == "40" and float(cells[3]) == pytest.approx(rm[0]["eval_accuracy"], abs=1e-4)
    assert float(cells[4]) == pytest.approx(rm[-1]["eval_accuracy"], abs=1e-4)
    (cells,) = rows["grpo"]
    final = json.loads((run / "grpo" / "eval_final.json").read_text())
    initial = json.loads((run / "grpo" / "eval_initial.json").read_text())
    assert initial["step"] == 0 and len(initial["correct"]["add_sub"]) == 3 == len(final["correct"]["add_sub"])
    assert sum(final["correct"]["add_sub"]) / 3 == pytest.approx(final["eval_accuracy"])
    assert cells[2] == "3" and float(cells[3]) == pytest.approx(initial["eval_accuracy"], abs=1e-4)
    assert float(cells[4]) == pytest.approx(final["eval_accuracy"], abs=1e-4)
    assert re.search(r"^\d+ of 7 held-out measures improved beyond noise\.", section, re.M)
