"""`nova-rt plan` end to end, in process: the shipped model configs plan for every stage, --json and --write, and
the user mistakes (nothing fits, an unknown GPU, a forced layout that divides nothing) are exit 2 with one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nova_rt.cli import main
from nova_rt.config import load_config

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"


def write_config(tmp_path: Path, model: str, stage: str = "sft", **sections) -> Path:
    raw = {"run": {"stage": stage}, "model": {"path": str(MODELS / model), "dtype": "bfloat16"},
           "data": {"max_seq_len": 4096}, "packing": {"max_tokens": 4096}, "train": {"global_batch": 64}}
    if stage == "grpo":
        raw["grpo"] = {"data": {"prompt_files": ["prompts.jsonl"]}, "loss": {"beta": 0.04},
                       "sampling": {"group_size": 8, "prompts_per_step": 32, "max_new_tokens": 1024}}
        raw["train"] = {"max_steps": 4}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / f"{model}_{stage}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def plan(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b", "qwen2.5-32b", "llama-3.1-70b", "qwen2.5-72b"])
def test_shipped_configs_plan_and_fit(tmp_path, capsys, model):
    gpus = "8" if model.endswith(("7b", "8b")) else "32"
    code, out, err = plan(capsys, "--config", str(write_config(tmp_path, model)), "--gpus", gpus, "--json")
    assert code == 0, err
    result = json.loads(out)
    best = result["plans"][0]
    assert best["memory"]["total"] <= result["gpu"]["memory_bytes"]
    parts = sum(v for k, v in best["memory"].items() if k != "total")
    assert parts == best["memory"]["total"]  # the breakdown adds up (reserve included)
    assert 0 < best["timing"]["mfu"] < 0.8 and best["timing"]["tokens_per_s_per_gpu"] > 0
    assert result["model"]["layers"] in (28, 32, 64, 80)


def test_table_names_layout_memory_and_assumptions(tmp_path, capsys):
    code, out, _ = plan(capsys, "--config", str(write_config(tmp_path, "llama-3.1-8b")), "--gpus", "8", "--top", "2")
    assert code == 0
    lines = out.splitlines()
    assert "8.03B parameters" in lines[0] and "layout" in lines[1] and "optimi" in lines[1]
    assert len(lines) == 5 and "TFLOP/s achievable" in lines[-1] and "allocator reserve" in lines[-1]


def test_stages_add_reference_and_rollout(tmp_path, capsys):
    dpo = write_config(tmp_path, "qwen2.5-7b", "dpo", dpo={"reference_logprobs": "online"})
    code, out, _ = plan(capsys, "--config", str(dpo), "--gpus", "8", "--json")
    assert code == 0 and json.loads(out)["plans"][0]["memory"]["reference"] > 0
    grpo = write_config(tmp_path, "qwen2.5-7b", "grpo", grpo={"rollout": {"engine": "vllm"}})
    code, out, err = plan(capsys, "--config", str(grpo), "--gpus", "8", "--json")
    assert code == 0, err  # planned without vllm installed
    result = json.loads(out)
    assert result["workload"]["rollout_engine"] == "vllm"
    assert result["plans"][0]["memory"]["rollout"] >= 0.3 * result["gpu"]["memory_bytes"]  # its reserved budget
    rm = write_config(tmp_path, "qwen2.5-7b", "rm")
    code, out, _ = plan(capsys, "--config", str(rm), "--gpus", "8", "--json")
    assert code == 0 and json.loads(out)["plans"][0]["memory"]["logits"] == 0


def test_write_sets_the_parallel_section_and_keeps_other_keys(tmp_path, capsys):
    path = write_config(tmp_path, "llama-3.1-70b", optim={"lr": 2.0e-5})
    code, out, err = plan(capsys, "--config", str(path), "--gpus", "32", "--write", "--json")
    assert code == 0, err
    best = json.loads(out)["plans"][0]["layout"]
    cfg = load_config(path)  # still a valid nova_rt config
    assert cfg.optim.lr == 2.0e-5 and cfg.model.path.endswith("llama-3.1-70b")
    assert cfg.parallel.backend == best["backend"] and cfg.train.micro_batch == best["micro_batch"]
    if best["backend"] == "megatron":
        assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel) == (best["tp"], best["pp"])
        assert cfg.parallel.distributed_optimizer == best["dist_opt"]
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_nothing_fits_names_smallest_memory_and_the_way_out(tmp_path, capsys):
    path = write_config(tmp_path, "llama-3.1-70b", data={"max_seq_len": 8192}, packing={"max_tokens": 8192})
    before = path.read_text()
    code, _, err = plan(capsys, "--config", str(path), "--gpus", "8", "--write")
    assert code == 2
    assert "nothing fits 8 x h100-80gb" in err and "GiB per GPU" in err and "--gpus 16" in err and "LoRA" in err
    assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert path.read_text() == before  # --write touched nothing


def test_unknown_gpu_lists_known_ones(tmp_path, capsys):
    code, _, err = plan(capsys, "--config", str(write_config(tmp_path, "qwen2.5-7b")), "--gpus", "8", "--gpu", "b300")
    assert code == 2 and "--gpu b300: unknown GPU; known: h100-80gb, h200-141gb, a100-80gb" in err


def test_forced_layout_that_divides_nothing_is_named(tmp_path, capsys):
    path = str(write_config(tmp_path, "qwen2.5-7b"))
    code, _, err = plan(capsys, "--config", path, "--gpus", "8", "--tp", "8")
    assert code == 2 and "tensor_parallel=8 does not divide num_attention_heads=28" in err
    assert "num_key_value_heads=4" in err
    code, _, err = plan(capsys, "--config", path, "--gpus", "8", "--pp", "3")
    assert code == 2 and "num_hidden_layers=28" in err and "does not divide --gpus 8" in err
    code, out, _ = plan(capsys, "--config", path, "--gpus", "8", "--tp", "2", "--json")
    assert code == 0 and all(p["layout"]["tp"] == 2 for p in json.loads(out)["plans"])


def test_stage_without_layouts_is_refused(tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"run": {"stage": "pas"}}), encoding="utf-8")
    code, _, err = plan(capsys, "--config", str(path), "--gpus", "8")
    assert code == 2 and "run.stage=pas" in err and "sft, rm, dpo, grpo" in err
