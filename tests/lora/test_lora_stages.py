"""SFT, DPO, RM and GRPO each train a few steps with LoRA on the hf backend (tiny Llama, CPU): only the adapters (and
RM's score head) change, which final_merged/ shows against the base model; GRPO samples from the adapted model and
takes the adapter-disabled base as its reference; activation checkpointing and a bfloat16 base keep working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.reliability_helpers import ROOT, run_cli

LORA = {"rank": 4, "alpha": 8.0, "merge_final": True}
QUIET = {"tensorboard": False, "plot": False, "progress_bar": False}


def _config(tmp: Path, stage: str, **sections) -> Path:
    cfg = {"include": str(ROOT / "configs" / f"tiny_{stage}.yaml"), "run": {"dir": str(tmp / "run")},
           "lora": LORA, "optim": {"lr": 1e-2, "scheduler": "constant"}, "logging": QUIET,
           "train": {"max_steps": 2, "num_threads": 1, "eval_every": 0}, "checkpoint": {"every": 1}}
    if stage == "grpo":
        cfg["train"].pop("eval_every")
        cfg["grpo"] = {"eval": {"every": 0}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _base_state(config: Path) -> dict:
    from nova_rt.config import load_config
    from nova_rt.models.loading import load_causal_lm

    cfg = load_config(config)
    model, _ = load_causal_lm(cfg.model.path, tiny=cfg.model.tiny, seed=cfg.run.seed)
    return model.state_dict()


def _run(tmp: Path, capsys, stage: str, **sections) -> tuple[Path, Path]:
    config = _config(tmp, stage, **sections)
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 0, err[-3000:]
    return config, tmp / "run"


def _assert_only_adapted_layers_changed(config: Path, run: Path, decoder_prefix: str = "model.") -> None:
    """final/ holds adapters only; final_merged/ differs from the base exactly in the adapted linear layers."""
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k or ".score." in k for k in adapter)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0: it trained
    merged = load_file(run / "final_merged" / "model.safetensors")
    base = {k: v for k, v in _base_state(config).items() if k.startswith("model.")}
    changed = {k for k, v in base.items() if not torch.equal(merged[decoder_prefix + k[len("model."):]], v)}
    assert changed == {k for k in base if k.endswith("_proj.weight")}


@pytest.mark.parametrize("sections", [{}, {"dpo": {"reference_logprobs": "online"}}], ids=["precompute", "online"])
def test_dpo_trains_only_the_adapters(tmp_path, capsys, sections):
    config, run = _run(tmp_path, capsys, "dpo", data={"eval_files": []}, **sections)
    _assert_only_adapted_layers_changed(config, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["margin"] == 0.0  # step 1: the policy is the reference (B = 0), whichever way it is computed
    assert rows[-1]["margin"] != 0.0


def test_rm_trains_the_adapters_and_the_score_head(tmp_path, capsys):
    from nova_rt.models.reward import sequence_classifier_from_causal

    config, run = _run(tmp_path, capsys, "rm", data={"eval_files": []})
    _assert_only_adapted_layers_changed(config, run)
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert [k for k in adapter if ".score." in k] == ["base_model.model.score.weight"]
    merged = load_file(run / "final_merged" / "model.safetensors")
    from nova_rt.config import load_config
    from nova_rt.models.loading import load_causal_lm

    cfg = load_config(config)
    causal, tok = load_causal_lm(cfg.model.path, tiny=cfg.model.tiny, seed=cfg.run.seed)
    initial = sequence_classifier_from_causal(causal, tok.pad_token_id, seed=cfg.run.seed).score.weight
    assert torch.equal(merged["score.weight"], adapter["base_model.model.score.weight"])
    assert not torch.equal(merged["score.weight"], initial)
    _assert_peft_scores_as_trained(cfg, run, tmp_path / "base")


def _assert_peft_scores_as_trained(cfg, run: Path, base_dir: Path) -> None:
    """The trained reward model (resumed from its last checkpoint, packed forward) scores a sequence as peft's
    loaded final/ and transformers' final_merged/ do."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from nova_rt.backends.hf import HFPolicy
    from nova_rt.distributed import DistInfo
    from nova_rt.models.tiny import save_tiny_model

    policy, tok = HFPolicy.build(cfg, DistInfo(), run, head="score")
    assert policy.resume() is not None
    ids = torch.tensor([tok("question: 2 + 3 = ?\nanswer: 5")["input_ids"]])
    mb = {"input_ids": ids, "position_ids": torch.arange(ids.shape[1])[None], "max_seqlen": ids.shape[1],
          "cu_seqlens": torch.tensor([0, ids.shape[1]], dtype=torch.int32)}
    ours = policy.forward([mb], lambda out, _: out["scores"])[0]
    save_tiny_model(base_dir, seed=cfg.run.seed, **cfg.model.tiny)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    loaded = PeftModel.from_pretrained(base, run / "final").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run / "final_merged").eval()
    with torch.no_grad():
        for model in (loaded, merged):
            torch.testing.assert_close(model(input_ids=ids).logits[0], ours, rtol=0, atol=1e-5)


def test_sft_with_activation_checkpointing_and_a_bf16_base(tmp_path, capsys):
    """Checkpointed decoder layers give the same adapters as plain ones; a bfloat16 base keeps fp32 adapters."""
    plain_config, plain = _run(tmp_path / "plain", capsys, "sft")
    _, recomputed = _run(tmp_path / "recomputed", capsys, "sft", train={"activation_checkpointing": 1})
    _assert_only_adapted_layers_changed(plain_config, plain)
    first = torch.load(plain / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    again = torch.load(recomputed / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=1e-6, msg=k)
    _, bf16 = _run(tmp_path / "bf16", capsys, "sft", model={"dtype": "bfloat16"})
    state = torch.load(bf16 / "checkpoints" / "step_00000002" / "model.pt", weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float32}
    merged = load_file(bf16 / "final_merged" / "model.safetensors")
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}


def test_grpo_samples_from_the_adapted_model_and_references_the_base(tmp_path, capsys):
    from peft import PeftModel

    from nova_rt.config import load_config
    from nova_rt.stages.grpo import GRPORun

    config, run = _run(tmp_path / "cli", capsys, "grpo")
    _assert_only_adapted_layers_changed(config, run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kl"] > 0  # the adapted policy moved away from its adapter-disabled reference

    grpo = GRPORun(load_config(_config(tmp_path / "built", "grpo")))
    assert isinstance(grpo.generator.model, PeftModel) and grpo.generator.model is grpo.trainer.save_model
    assert grpo.ref.adapters_off and grpo.ref.module is grpo.trainer.module
