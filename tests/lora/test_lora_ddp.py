"""LoRA under DDP (2 gloo ranks on CPU): the adapters after 2 steps equal a single process's with the same global
batch (gradient accumulation), and rank 0 writes the adapter-only checkpoint and final/."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.lora.test_lora_stages import _config
from tests.reliability_helpers import ROOT, run_cli


@pytest.mark.distributed
def test_ddp_lora_equals_one_process(tmp_path, capsys):
    single = _config(tmp_path / "single", "sft", train={"global_batch": 2, "micro_batch": 1})
    code, err = run_cli(capsys, "--config", str(single))
    assert code == 0, err[-3000:]
    ddp = _config(tmp_path / "ddp", "sft", train={"global_batch": 2, "micro_batch": 1})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
                           "nova_rt.train", "--config", str(ddp)], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = "checkpoints/step_00000002/model.pt"
    first = torch.load(tmp_path / "single" / "run" / step, weights_only=True)
    again = torch.load(tmp_path / "ddp" / "run" / step, weights_only=True)
    assert set(again) == set(first) and all(".lora_" in k for k in first)
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (tmp_path / "ddp" / "run" / "final" / "adapter_model.safetensors").is_file()
