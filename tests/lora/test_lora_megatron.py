"""LoRA on parallel.backend=megatron (nova_rt.parallel.megatron_lora): its A is peft's draw, and SFT under TP=2 and
PP=2 (torchrun, gloo, CPU shims) gives the HF backend's LoRA run step for step: losses, final adapters, a final/
that peft loads with the same logits, an adapter-only checkpoint that resumes bit-exactly."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.parallel.run_helpers import ROOT, SEED, clean_env, read_metrics, read_weights

LORA = ["--set", "lora.rank=4", "--set", "lora.alpha=8", "--set", "optim.lr=0.01", "--set", "optim.eps=1e-4"]
"""optim.eps 1e-4: Adam's step of an element whose gradient is near 0 amplifies rounding by up to lr / eps (with
1e-8, one element of a B in 256 differed by 7e-3 relative between the backends, all others by <= 4e-5)."""


def _common(run_dir, model_dir, steps: int = 3):
    return ["--config", str(ROOT / "configs" / "tiny_sft.yaml"), "--set", f"run.dir={run_dir}",
            "--set", f"model.path={model_dir}", "--set", f"train.max_steps={steps}", "--set", "train.global_batch=2",
            "--set", "train.micro_batch=1", "--set", "packing.max_tokens=256", "--set", "data.max_seq_len=256",
            "--set", "logging.tensorboard=false", "--set", "logging.plot=false", "--set", "checkpoint.every=1",
            "--set", "checkpoint.keep_last=5", "--set", "optim.grad_clip=1.0", "--set", "train.num_threads=1",
            *LORA]


def _torchrun(args: list[str]):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(ROOT / "tests" / "parallel" / "sft_megatron_worker.py"), *args, "--set",
                        "parallel.backend=megatron"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def test_initial_a_is_peft_draw():
    """megatron_lora.initial_a draws every A exactly as peft's get_peft_model does for the same seed (all targets
    and a subset), so an HF LoRA run and a megatron one start from the same adapters."""
    from types import SimpleNamespace

    from nova_rt.models.lora import add_adapters
    from nova_rt.models.tiny import build_tiny_model
    from nova_rt.parallel.megatron_lora import initial_a, peft_key, targets_of
    from nova_rt.parallel.megatron_model import hf_arch

    for target_modules in ([], ["v_proj", "gate_proj", "q_proj", "down_proj"]):
        model = build_tiny_model("llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96)
        lora = SimpleNamespace(rank=3, alpha=6.0, dropout=0.0, target_modules=target_modules)
        peft_model = add_adapters(model, lora, source="cfg", seed=11)
        state = peft_model.state_dict()
        drawn = initial_a(hf_arch(model.config), 3, targets_of(lora, "cfg"), seed=11)
        assert len(drawn) == 2 * (len(target_modules) or 7)
        for (layer, name), a_matrix in drawn.items():
            key = peft_key(layer, name, "A").replace(".lora_A.weight", ".lora_A.default.weight")
            assert torch.equal(state[key], a_matrix), key


@pytest.mark.distributed
@pytest.mark.slow
def test_megatron_lora_sft_matches_hf_lora_and_resumes_exactly(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nova_rt.models.tiny import save_tiny_model

    print("seed", SEED)
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    runs = {name: tmp_path / name for name in ("hf", "tp2", "pp2", "tp2sp", "cut")}
    subprocess.run([sys.executable, "-m", "nova_rt.train", *_common(runs["hf"], model_dir)], check=True, cwd=ROOT,
                   env=clean_env(), capture_output=True, timeout=600)
    _torchrun([*_common(runs["tp2"], model_dir), "--set", "parallel.tensor_parallel=2"])
    _torchrun([*_common(runs["pp2"], model_dir), "--set", "parallel.pipeline_parallel=2"])
    _torchrun([*_common(runs["tp2sp"], model_dir), "--set", "parallel.tensor_parallel=2", "--set",
               "parallel.sequence_parallel=true", "--set", "checkpoint.every=0"])
    reference = read_metrics(runs["hf"])
    assert len(reference) == 3
    for name in ("tp2", "pp2", "tp2sp"):
        metrics = read_metrics(runs[name])
        for key in ("loss", "grad_norm", "lr"):
            want, got = [m[key] for m in reference], [m[key] for m in metrics]
            assert got == pytest.approx(want, rel=1e-4), (name, key, want, got)
    assert reference[0]["loss"] != reference[2]["loss"]  # the adapters trained
    adapters = {name: read_weights(runs[name] / "final") for name in ("hf", "tp2", "pp2", "tp2sp")}
    assert len(adapters["hf"]) == 2 * 2 * 7
    config = json.loads((runs["hf"] / "final" / "adapter_config.json").read_text())
    for name in ("tp2", "pp2", "tp2sp"):
        assert adapters[name].keys() == adapters["hf"].keys(), name
        for key, want in adapters["hf"].items():
            rel = ((adapters[name][key] - want).norm() / want.norm().clamp_min(1e-12)).item()
            assert rel <= 1e-4, (name, key, rel)
        mine = json.loads((runs[name] / "final" / "adapter_config.json").read_text())
        for key in ("r", "lora_alpha", "lora_dropout", "task_type", "peft_type", "bias"):
            assert mine[key] == config[key], key
        assert sorted(mine["target_modules"]) == sorted(config["target_modules"])
        assert (runs[name] / "final" / "tokenizer.json").exists()
    assert adapters["hf"][next(k for k in adapters["hf"] if "lora_B" in k)].abs().max() > 0

    tokens = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("hf", "tp2"):
        base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        with torch.no_grad():
            logits[name] = PeftModel.from_pretrained(base, runs[name] / "final").eval()(tokens).logits
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)(tokens).logits
    assert (logits["hf"] - plain).abs().max() > 1e-3  # the adapters change the model
    torch.testing.assert_close(logits["tp2"], logits["hf"], rtol=0, atol=1e-4)

    # resume: the TP=2 run cut back to its step-1 checkpoint (adapters and their optimizer state only), rerun
    step1 = torch.load(runs["tp2"] / "checkpoints" / "step_00000001" / "rank_00000.pt", weights_only=False)
    assert step1["model"][0] and all(".lora." in key for key in step1["model"][0])
    shutil.copytree(runs["tp2"], runs["cut"])
    shutil.rmtree(runs["cut"] / "final")
    for step in (2, 3):
        shutil.rmtree(runs["cut"] / "checkpoints" / f"step_0000000{step}")
    _torchrun([*_common(runs["cut"], model_dir), "--set", "parallel.tensor_parallel=2"])
    full, cut = read_metrics(runs["tp2"]), read_metrics(runs["cut"])
    assert [m["step"] for m in cut] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in full] == [m[key] for m in cut], key
    resumed = read_weights(runs["cut"] / "final")
    for key, tensor in adapters["tp2"].items():
        assert torch.equal(resumed[key], tensor), key


def _dpo(run_dir, model_dir) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny_dpo.yaml"), "--set", f"run.dir={run_dir}",
            "--set", f"model.path={model_dir}", "--set", "train.max_steps=3", "--set", "train.global_batch=2",
            "--set", "train.micro_batch=1", "--set", "logging.tensorboard=false", "--set", "logging.plot=false",
            "--set", "checkpoint.every=0", "--set", "optim.grad_clip=1.0", "--set", "train.num_threads=1",
            "--set", "dpo.beta=0.5", "--set", "dpo.reference_logprobs=online", "--set", "data.eval_files=[]",
            "--set", "train.eval_every=0", *LORA]


@pytest.mark.distributed
@pytest.mark.slow
def test_megatron_lora_dpo_matches_hf_lora(tmp_path):
    """DPO with an online reference under TP=2: the reference is the policy's own shards with the adapters disabled
    (peft's disable_adapter on the HF backend), so losses, DPO statistics and final adapters equal the HF run's."""
    from nova_rt.models.tiny import save_tiny_model

    print("seed", SEED)
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    subprocess.run([sys.executable, "-m", "nova_rt.train", *_dpo(tmp_path / "hf", model_dir)], check=True,
                   cwd=ROOT, env=clean_env(), capture_output=True, timeout=600)
    _torchrun([*_dpo(tmp_path / "tp2", model_dir), "--set", "parallel.tensor_parallel=2"])
    reference, metrics = read_metrics(tmp_path / "hf"), read_metrics(tmp_path / "tp2")
    assert [m["step"] for m in reference] == [m["step"] for m in metrics] == [1, 2, 3]
    # the margin is beta x a difference of sequence log-prob sums: its float noise scales with those sums
    floor = 2e-7 * 0.5 * (abs(reference[0]["logps_chosen"]) + abs(reference[0]["logps_rejected"]))
    for want, got in zip(reference, metrics):
        for key in ("loss", "reward_chosen", "reward_rejected", "margin", "logps_chosen", "logps_rejected",
                    "grad_norm", "lr"):
            assert abs(want[key] - got[key]) <= 1e-4 * abs(want[key]) + floor, (want["step"], key, want, got)
    # the reference stayed the base: at step 1 (B = 0) the policy is the base, later the rewards move off 0
    assert reference[0]["reward_chosen"] == pytest.approx(0, abs=1e-6)
    assert abs(reference[2]["margin"]) > 1e-3
    adapters = {name: read_weights(tmp_path / name / "final") for name in ("hf", "tp2")}
    assert adapters["tp2"].keys() == adapters["hf"].keys() and len(adapters["hf"]) == 2 * 2 * 7
    for key, want in adapters["hf"].items():
        rel = ((adapters["tp2"][key] - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (key, rel)
    assert adapters["hf"][next(k for k in adapters["hf"] if "lora_B" in k)].abs().max() > 0


def _rm(run_dir, model_dir) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny_rm.yaml"), "--set", f"run.dir={run_dir}",
            "--set", f"model.path={model_dir}", "--set", "train.max_steps=3", "--set", "train.global_batch=2",
            "--set", "train.micro_batch=1", "--set", "logging.tensorboard=false", "--set", "logging.plot=false",
            "--set", "checkpoint.every=0", "--set", "optim.grad_clip=1.0", "--set", "train.num_threads=1",
            "--set", "rm.alpha=0.1", "--set", "data.eval_files=[]", "--set", "train.eval_every=0", *LORA]


@pytest.mark.distributed
@pytest.mark.slow
def test_megatron_lora_rm_matches_hf_lora(tmp_path):
    """The reward model under TP=2: adapters plus the score head in full (peft's modules_to_save), so losses, grad
    norms, final adapters and head equal the HF run's, and final/ is the HF backend's SEQ_CLS adapter directory."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from nova_rt.models.tiny import save_tiny_model

    print("seed", SEED)
    model_dir = save_tiny_model(tmp_path / "tiny", "llama", seed=SEED, hidden=64, layers=2, heads=4, kv_heads=2,
                                intermediate=128)
    subprocess.run([sys.executable, "-m", "nova_rt.train", *_rm(tmp_path / "hf", model_dir)], check=True,
                   cwd=ROOT, env=clean_env(), capture_output=True, timeout=600)
    _torchrun([*_rm(tmp_path / "tp2", model_dir), "--set", "parallel.tensor_parallel=2"])
    reference, metrics = read_metrics(tmp_path / "hf"), read_metrics(tmp_path / "tp2")
    assert [m["step"] for m in reference] == [m["step"] for m in metrics] == [1, 2, 3]
    for want, got in zip(reference, metrics):
        for key in ("loss", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (want["step"], key, want, got)
    adapters = {name: read_weights(tmp_path / name / "final") for name in ("hf", "tp2")}
    assert adapters["tp2"].keys() == adapters["hf"].keys() and len(adapters["hf"]) == 2 * 2 * 7 + 1
    for key, want in adapters["hf"].items():
        rel = ((adapters["tp2"][key] - want).norm() / want.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (key, rel)
    configs = [json.loads((tmp_path / name / "final" / "adapter_config.json").read_text()) for name in ("hf", "tp2")]
    for key in ("task_type", "r", "lora_alpha"):
        assert configs[1][key] == configs[0][key], key
    assert "score" in configs[0]["modules_to_save"] and "score" in configs[1]["modules_to_save"]
    tokens = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    scores = {}
    for name in ("hf", "tp2"):  # final/ loads with peft over the base and scores as the HF run's
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, torch_dtype=torch.float32)
        with torch.no_grad():
            scores[name] = PeftModel.from_pretrained(base, tmp_path / name / "final").eval()(tokens).logits
    torch.testing.assert_close(scores["tp2"], scores["hf"], rtol=0, atol=1e-4)
