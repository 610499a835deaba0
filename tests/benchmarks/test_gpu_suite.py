"""benchmarks/gpu_suite.py on CPU: result collection, the markdown report, the step timeout, and the no-GPU exit."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import gpu_suite  # noqa: E402

_STEP = {s.name: s for s in gpu_suite.STEPS}

_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="5"><testcase classname="tests.kernels.test_x" name="test_a"/>
<testcase classname="tests.kernels.test_x" name="test_b"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


def test_collect_junit_json_and_json_lines(tmp_path):
    (tmp_path / "gpu_tests.xml").write_text(_JUNIT)
    res = gpu_suite._collect(_STEP["gpu_tests"], tmp_path, "")
    assert res == {"tests": 5, "failures": 1, "errors": 0, "skipped": 2, "failed": ["tests.kernels.test_x::test_b"]}
    (tmp_path / "attention.json").write_text('{"benchmark": "x", "rows": [{"provider": "nova_rt", "ms": 1.5}]}')
    assert gpu_suite._collect(_STEP["attention"], tmp_path, "") == {"rows": [{"provider": "nova_rt", "ms": 1.5}]}
    # no JSON file (a step that died after printing some rows): the JSON lines it printed
    out = 'warming up\n{"backend": "hf", "mfu": 0.41}\nTraceback ...\n{not json}\n'
    assert gpu_suite._collect(_STEP["sft_mfu"], tmp_path, out) == {"rows": [{"backend": "hf", "mfu": 0.41}]}
    assert gpu_suite._collect(_STEP["env"], tmp_path, 'warn\n{"env": {"cuda_available": false}}') == {
        "env": {"cuda_available": False}}


def test_markdown_report():
    record = {"date": "20261202", "env": {"device": "NVIDIA H200"}, "budget_s": 540, "elapsed_s": 300.0, "steps": [
        {"name": "gpu_tests", "status": "ok", "seconds": 150.0, "est_s": 170,
         "result": {"tests": 5, "failures": 0, "errors": 0, "skipped": 0}},
        {"name": "attention", "status": "rc=1", "seconds": 20.0, "est_s": 75, "result": {"rows": [{}]},
         "tables": "| a |\n|---|\n| 1 |"},
        {"name": "merge", "status": "skipped: 10 s left < estimate 45 s", "est_s": 45}]}
    md = gpu_suite._markdown(record)
    assert "| gpu_tests | ok | 150 | 170 | 5 tests, 0 failed, 0 errors, 0 skipped |" in md
    assert "| attention | rc=1 | 20 | 75 | 1 rows |" in md and "## attention" in md
    assert "| merge | skipped: 10 s left < estimate 45 s | 0 | 45 | 0 rows |" in md


def test_step_timeout_kills_the_child(tmp_path):
    rc, out = gpu_suite._run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                             tmp_path / "x.log", timeout=3)
    assert rc != 0 and "started" in out and "killed after 3 s" in out
    assert "started" in (tmp_path / "x.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA this would run the whole suite")
def test_without_cuda_nothing_runs_and_nothing_is_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_suite, "RESULTS", tmp_path)
    assert gpu_suite.run_suite(540, None) == 2
    assert list(tmp_path.iterdir()) == []
