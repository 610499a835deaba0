"""The LoRA pipeline (configs/tiny_pipeline_lora.yaml) end to end on a tiny random model: the SFT slices' final/
adapter directories feed the merge stage directly (task arithmetic, the merged tensors equal base + the sum of
each slice's scale * B A), the merged model is scored on held-out rows with its adapter inputs, the RM's
final_merged/ is GRPO's reward model, and report.md is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.merge.conftest import load_weights
from tests.pas.chat_server import ChatServer
from tests.stages.test_pipeline import _env, responder

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lora_pipeline_merges_the_slice_adapters(tmp_path):
    run = tmp_path / "pipe"
    with ChatServer(responder) as server:
        result = subprocess.run(
            [sys.executable, "-m", "nova_rt.train", "--config", str(ROOT / "configs" / "tiny_pipeline_lora.yaml"),
             "--set", f"run.dir={run}", "--set", f"pas.generator.base_url={server.base_url}",
             "--set", "train.num_threads=1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("pas", "sft", "merge", "rm", "grpo"):
        assert (run / stage / "STAGE_DONE.json").exists(), stage
    assert (run / "pas" / "pas_model" / "final" / "config.json").exists()  # the PAS model trains in full
    slices = json.loads((run / "sft" / "STAGE_DONE.json").read_text())["models"]
    merged = load_weights(Path(json.loads((run / "merge" / "STAGE_DONE.json").read_text())["merged"]))
    base = load_weights(run / "base_model")
    expected = base["model.layers.1.mlp.down_proj.weight"].clone()
    for adapter in slices.values():  # final/ is a PEFT adapter directory of rank 4, alpha 8, over the base
        config = json.loads((Path(adapter) / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (4, 8) and config["base_model_name_or_path"] == str(
            run / "base_model")
        tensors = load_file(Path(adapter) / "adapter_model.safetensors")
        prefix = "base_model.model.model.layers.1.mlp.down_proj"
        a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        assert b.abs().max() > 0  # trained
        expected += (b @ a) * (8 / 4)
    assert torch.allclose(merged["model.layers.1.mlp.down_proj.weight"], expected, rtol=0, atol=1e-6)
    heldout = json.loads((run / "merge" / "heldout.json").read_text())
    assert set(heldout["nll"]) == {"base", "sft/math", "sft/text", "merged"}
    assert heldout["nll"]["sft/math"] != heldout["nll"]["base"]  # scored with its adapter merged in
    rm = json.loads((run / "rm" / "STAGE_DONE.json").read_text())["rm"]
    assert rm == str(run / "rm" / "final_merged") and (Path(rm) / "config.json").exists()
    assert (run / "rm" / "final" / "adapter_config.json").exists()
    assert (run / "grpo" / "final" / "adapter_config.json").exists()
    assert "## Did the pipeline make the model better? (held-out)" in (run / "report.md").read_text()


def test_a_single_lora_slice_is_merged_into_the_base(tmp_path):
    """One SFT slice with LoRA: the merge stage still writes a full model (the adapter merged into the base), which
    the RM and GRPO stages load as model.path."""
    run = tmp_path / "one"
    result = subprocess.run(
        [sys.executable, "-m", "nova_rt.train", "--config", str(ROOT / "configs" / "tiny_pipeline_lora.yaml"),
         "--set", f"run.dir={run}", "--set", "pipeline.stages=[sft, merge]", "--set",
         "pipeline.sft_slices=[{name: math, train_files: [../data/sft/slice_math.jsonl]}]",
         "--set", "train.num_threads=1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    merged = Path(json.loads((run / "merge" / "STAGE_DONE.json").read_text())["merged"])
    assert merged == run / "merge" / "merged" and (merged / "config.json").exists()
    tensors = load_file(run / "sft" / "math" / "final" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    expected = load_weights(run / "base_model")["model.layers.0.self_attn.q_proj.weight"] + (
        tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]) * 2
    assert torch.allclose(load_weights(merged)["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
