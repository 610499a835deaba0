"""LoRA on the hf backend (lora.rank > 0): peft-equivalent adapters trained through nova_rt's packed attention and
fused log-prob op, the reference = the same module with its adapters disabled, adapter-only checkpoints with exact
resume, final/ as a PEFT adapter directory and final_merged/ equal to peft's merge_and_unload.

Runs are tiny-Llama SFT runs through the CLI (2 steps, checkpoints every step) on CPU."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.reliability_helpers import run_cli, tiny_config

LORA = {"rank": 4, "alpha": 8.0, "merge_final": True}
HIGH_LR = {"lr": 1e-2, "scheduler": "constant"}  # adapters start at B = 0: a visible change in two steps


class _NoCapture:
    """run_cli's capsys for a module fixture (pytest's capsys is function-scoped): stderr is not captured."""

    def readouterr(self):
        return type("Captured", (), {"err": ""})()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step LoRA SFT run with packed rows (several documents per row) and merge_final."""
    tmp = tmp_path_factory.mktemp("lora_sft")
    config = tiny_config(tmp, lora=LORA, optim=HIGH_LR, packing={"enabled": True, "max_tokens": 256})
    code, err = run_cli(_NoCapture(), "--config", str(config))
    assert code == 0, err[-3000:]
    return tmp


def _policy(tmp: Path, head: str = "lm"):
    """(cfg, HFPolicy, tokenizer) of the run's config, resumed from its newest checkpoint."""
    from nova_rt.backends.hf import HFPolicy
    from nova_rt.config import load_config
    from nova_rt.distributed import DistInfo

    cfg = load_config(tmp / "cfg.yaml")
    policy, tok = HFPolicy.build(cfg, DistInfo(), Path(cfg.run.dir), head=head)
    assert policy.resume() is not None
    return cfg, policy, tok


def _base(cfg, attn_impl: str = "sdpa"):
    from nova_rt.models.loading import load_causal_lm

    model, _ = load_causal_lm(cfg.model.path, tiny=cfg.model.tiny, seed=cfg.run.seed, attn_impl=attn_impl)
    return model.eval()


def _packed_batch(cfg, tok) -> dict:
    """One packed row of the training data with several documents (collated)."""
    from nova_rt.data.packing import collate
    from nova_rt.stages.sft import build_sft_rows

    rows, _, _ = build_sft_rows(cfg, tok)
    row = next(r for r in rows if len(r.cu_seqlens) > 2)
    return collate([row])


def _peft_logprobs(model, mb: dict) -> torch.Tensor:
    """(T,) log-probs of the targets from an ordinary HF forward of each document alone (0 where no target)."""
    out = torch.zeros(mb["targets"].shape)
    cu = mb["cu_seqlens"].tolist()
    with torch.no_grad():
        for start, end in zip(cu[:-1], cu[1:]):
            logits = model(input_ids=mb["input_ids"][:, start:end]).logits[0].float()
            targets = mb["targets"][start:end]
            keep = targets >= 0
            logp = torch.log_softmax(logits, -1)[keep].gather(1, targets[keep, None])[:, 0]
            out[start:end][keep] = logp
    return out


def _our_logprobs(policy, mb: dict) -> torch.Tensor:
    return policy.forward([mb], lambda out, _: out["logprobs"].detach().cpu())[0]


def test_peft_loads_final_with_the_logits_of_the_trained_model(trained):
    from peft import PeftModel

    cfg, policy, tok = _policy(trained)
    final = trained / "run" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in final.iterdir()}
    mb = _packed_batch(cfg, tok)
    ours = _our_logprobs(policy, mb)  # packed attention + fused log-prob op over the peft-wrapped model
    loaded = PeftModel.from_pretrained(_base(cfg), final).eval()
    theirs = _peft_logprobs(loaded, mb)
    keep = mb["targets"] >= 0
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=1e-5)
    base = _peft_logprobs(_base(cfg), mb)
    assert (ours[keep] - base[keep]).abs().max() > 1e-3, "the adapters did not change the model"


def test_reference_is_the_base_model_with_adapters_disabled(trained):
    from nova_rt.models.causal import CausalLMLogprobs

    cfg, policy, tok = _policy(trained)
    mb = _packed_batch(cfg, tok)
    ref = policy.reference(None, online=True)
    assert ref.module is policy.module  # no second copy of the model
    base = CausalLMLogprobs(_base(cfg, attn_impl="nova")).eval()
    with torch.no_grad():
        expected = base(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"], mb["targets"])
    assert torch.equal(_our_logprobs(ref, mb), expected["logprobs"])
    assert not torch.equal(_our_logprobs(policy, mb), expected["logprobs"])  # the adapters are back on after it


def _checkpoint(run: Path, step: int, what: str = "model.pt") -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:08d}" / what, weights_only=True)


def test_checkpoints_hold_only_the_adapters_and_their_optimizer_state(trained):
    cfg, policy, _ = _policy(trained)
    state = _checkpoint(trained / "run", 2)
    trainable = {name for name, param in policy.module.named_parameters() if param.requires_grad}
    assert set(state) == trainable and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert len(state) == 2 * 7 * cfg.model.tiny["layers"]  # A and B of 7 linear layers per decoder layer
    full = sum(v.numel() for v in _base(cfg).state_dict().values())
    assert sum(v.numel() for v in state.values()) < full / 10
    optimizer = _checkpoint(trained / "run", 2, "optimizer.pt")
    assert len(optimizer["state"]) == len(state)


def _assert_identical(again, before, where: str) -> None:
    if isinstance(before, torch.Tensor):
        assert torch.equal(again, before), where
    elif isinstance(before, dict):
        assert set(again) == set(before), where
        for k in before:
            _assert_identical(again[k], before[k], f"{where}[{k!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(again) == len(before), where
        for i, (a, b) in enumerate(zip(again, before)):
            _assert_identical(a, b, f"{where}[{i}]")
    else:
        assert again == before, where


def test_resume_from_an_adapter_checkpoint_is_exact(trained, tmp_path, capsys, caplog):
    """Step 2 redone from the step-1 checkpoint equals the uninterrupted run, bit for bit (adapters, AdamW states,
    final/ and final_merged/)."""
    caplog.set_level(logging.INFO, logger="nova_rt.trainer")
    first = trained / "run"
    resumed = tmp_path / "run"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000002")
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "final_merged")
    config = tiny_config(tmp_path, lora=LORA, optim=HIGH_LR, packing={"enabled": True, "max_tokens": 256})
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 0, err[-3000:]
    assert "(step 1)" in caplog.text and "resumed from" in caplog.text, caplog.text[-2000:]
    for what in ("model.pt", "optimizer.pt"):
        _assert_identical(_checkpoint(resumed, 2, what), _checkpoint(first, 2, what), what)
    for name in ("final/adapter_model.safetensors", "final_merged/model.safetensors"):
        again, before = load_file(resumed / name), load_file(first / name)
        assert set(again) == set(before)
        for k in before:
            assert torch.equal(again[k], before[k]), (name, k)


def test_merge_final_equals_peft_merge_and_unload(trained):
    from peft import PeftModel

    from nova_rt.config import load_config

    cfg = load_config(trained / "cfg.yaml")
    run = trained / "run"
    expected = PeftModel.from_pretrained(_base(cfg), run / "final").merge_and_unload().state_dict()
    merged = load_file(run / "final_merged" / "model.safetensors")
    assert set(merged) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6, msg=k)
    base = _base(cfg).state_dict()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {k for k in base if k.endswith("_proj.weight")}  # adapted layers only; norms, embeddings equal
    exported = _policy(trained)[1].export_hf_weights()  # what a rollout engine would be given: the merged weights
    assert set(exported) == set(merged) and all(torch.equal(exported[k], merged[k]) for k in merged)


def test_merge_final_of_a_model_with_tied_embeddings(tmp_path, capsys):
    from peft import PeftModel

    from nova_rt.config import load_config

    tiny = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "tie": True}
    config = tiny_config(tmp_path, lora=LORA, optim=HIGH_LR, model={"tiny": tiny})
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 0, err[-3000:]
    cfg = load_config(config)
    expected = PeftModel.from_pretrained(_base(cfg), tmp_path / "run" / "final").merge_and_unload()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_merged")
    assert merged.config.tie_word_embeddings
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("sections, message", [
    ({"lora": {"rank": -1}}, "lora.rank: must be a finite number >= 0, got -1"),
    ({"lora": {"rank": 4, "dropout": 1.0}}, "lora.dropout: must be below 1"),
    ({"lora": {"rank": 4}, "parallel": {"backend": "megatron"}, "run": {"stage": "grpo"}},
     "lora.rank: 4 is not supported with parallel.backend=megatron and run.stage=grpo yet (SFT, DPO and RM are); use "
     "parallel.backend=hf or lora.rank: 0"),
    ({"lora": {"rank": 4, "dropout": 0.1}, "parallel": {"backend": "megatron"}},
     "lora.dropout: 0.1 is not supported with parallel.backend=megatron yet; use lora.dropout: 0"),
    ({"lora": {"rank": 4, "merge_final": True}, "parallel": {"backend": "megatron"}},
     "lora.merge_final: true is not supported with parallel.backend=megatron yet"),
    ({"lora": {"rank": 4}, "parallel": {"backend": "megatron", "context_parallel": 2}},
     "lora.rank: 4 is not supported with parallel.context_parallel=2 yet; use parallel.context_parallel: 1"),
    ({"lora": {"rank": 4}, "parallel": {"data_parallel": "fsdp2"}},
     "lora.rank: 4 is not supported with parallel.data_parallel=fsdp2 yet"),
])
def test_bad_lora_config_exits_2_at_load(tmp_path, capsys, sections, message):
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, **sections)))
    assert code == 2, err[-2000:]
    assert message in err.splitlines()[0], err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_target_modules_that_match_nothing_exit_2_listing_the_linear_layers(tmp_path, capsys):
    config = tiny_config(tmp_path, lora={"rank": 4, "target_modules": ["q_proj", "qkv_proj"]})
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 2, err[-2000:]
    assert err.splitlines()[0] == (
        f"nova_rt: config error: {config}: lora.target_modules: 'qkv_proj' is no linear layer of this model's decoder "
        "layers; they have: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")


def test_train_refuses_a_model_path_in_its_own_final_merged(tmp_path, capsys):
    """final_merged/ is replaced by the run (lora.merge_final), so it cannot be the model the run starts from."""
    from nova_rt.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "run" / "final_merged", hidden=64, layers=2, heads=4, kv_heads=2,
                            intermediate=128)
    config = tiny_config(tmp_path, lora=LORA, model={"path": str(model)})
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 2, err[-2000:]
    assert f"model.path {model} is inside run.dir {tmp_path / 'run'}, whose final_merged this command replaces" in err


def test_lora_where_it_cannot_run_yet_exits_2_naming_both_keys(tmp_path, capsys):
    from types import SimpleNamespace as Section

    from nova_rt.config_checks import check_lora
    from nova_rt.errors import ConfigError

    # (grpo.rollout.engine=vllm is refused before this check where vllm is not installed, as in .venv)
    cfg = Section(source="cfg.yaml", run=Section(stage="grpo"), lora=Section(rank=4),
                  parallel=Section(backend="hf", data_parallel="ddp"),
                  grpo=Section(rollout=Section(engine="vllm", tensor_parallel=2), env=Section(type="")))
    with pytest.raises(ConfigError) as refused:
        check_lora(cfg)
    assert str(refused.value) == (
        "cfg.yaml: lora.rank: 4 is not supported with grpo.rollout.engine=vllm and grpo.rollout.tensor_parallel=2 "
        "yet; use grpo.rollout.tensor_parallel: 1 or lora.rank: 0")
    cfg.grpo.rollout.tensor_parallel = 1
    check_lora(cfg)  # adapter-only sync to vLLM (tests/lora/test_lora_vllm.py)
    cfg.grpo.env.type = "guess_number"
    with pytest.raises(ConfigError, match="lora.rank: 4 is not supported with grpo.rollout.engine=vllm and "
                                          "grpo.env.type=guess_number yet; use grpo.rollout.engine: hf or lora"):
        check_lora(cfg)
    config = tiny_config(tmp_path, lora=LORA, run={"stage": "pas"})
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 2 and "lora.rank: 4 applies to run.stage sft, rm, dpo, grpo, pipeline, not run.stage=pas" in err, err


def test_resuming_with_another_lora_setting_exits_2(tmp_path, capsys):
    """A checkpoint of a full fine-tuning run is not resumed as LoRA (nor one of another alpha): provenance."""
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, train={"max_steps": 1})))
    assert code == 0, err[-2000:]
    config = tiny_config(tmp_path, lora=LORA, train={"max_steps": 2})
    code, err = run_cli(capsys, "--config", str(config))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert code == 2 and err.splitlines()[0].startswith(
        f"nova_rt: checkpoint error: {checkpoint}: written by a model of another shape or architecture: tensor "
        "'lm.base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight' is missing from the checkpoint"), err
    other = {"dir": str(tmp_path / "lora_run")}
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, lora=LORA, train={"max_steps": 1}, run=other)))
    assert code == 0, err[-2000:]
    config = tiny_config(tmp_path, lora={**LORA, "alpha": 16.0}, train={"max_steps": 2}, run=other)
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 2 and "cannot be resumed by this run: lora.alpha: 8.0 there, 16.0 here" in err, err
