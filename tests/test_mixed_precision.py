"""model.dtype bfloat16/float16 trains with fp32 master weights and fp32 AdamW states under 16-bit autocast; pure
16-bit weights only with model.master_weights=model_dtype; final/ is written in model.dtype; contradictory
model.dtype / train.precision combinations stop at config load (exit 2, naming both keys).

Runs are tiny-Llama SFT runs through the CLI (2 steps at lr 1e-5, checkpoints every step) on CPU."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.reliability_helpers import run_cli, tiny_config

LOW_LR = {"lr": 1e-5, "scheduler": "constant", "grad_clip": 0.0}


def _train(tmp_path: Path, capsys, name: str, **sections) -> Path:
    tmp = tmp_path / name
    tmp.mkdir()
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp, optim=LOW_LR, **sections)))
    assert code == 0, err[-3000:]
    return tmp / "run"


def _checkpoint(run: Path, step: int, what: str = "model.pt") -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:08d}" / what, weights_only=True)


def _initial(dtype: str = "float32") -> dict:
    """The tiny model a run starts from (configs/tiny_sft.yaml's shape, run.seed 0) under `lm.`: fp32 for fp32
    master weights, bfloat16 for pure bf16 weights (a tiny model is drawn in its dtype)."""
    from nova_rt.config import load_config
    from nova_rt.models.loading import load_causal_lm

    m = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_sft.yaml").model
    model, _ = load_causal_lm(m.path, tiny=m.tiny, seed=0, dtype=dtype)
    return {f"lm.{k}": v for k, v in model.state_dict().items()}


def _moved(initial: dict, trained: dict) -> float:
    """Fraction of the weights whose value changed."""
    changed = sum(int((trained[k].float() != initial[k].float()).sum()) for k in initial)
    return changed / sum(v.numel() for v in initial.values())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp32 weights + bf16 autocast (the reference recipe), model.dtype=bfloat16, and pure bf16 weights."""
    tmp = tmp_path_factory.mktemp("precision")
    capsys = _NoCapture()
    out = {"fp32_autocast": _train(tmp, capsys, "fp32_autocast", train={"precision": "bf16"}),
           "bf16": _train(tmp, capsys, "bf16", model={"dtype": "bfloat16"}),
           "bf16_pure": _train(tmp, capsys, "bf16_pure", model={"dtype": "bfloat16", "master_weights": "model_dtype"})}
    return out


class _NoCapture:
    """run_cli's capsys for a module fixture (pytest's capsys is function-scoped): stderr is not captured."""

    def readouterr(self):
        return type("Captured", (), {"err": ""})()


def test_bf16_trains_fp32_master_weights_like_fp32_with_autocast(runs):
    initial = _initial()
    reference, trained = _checkpoint(runs["fp32_autocast"], 2), _checkpoint(runs["bf16"], 2)
    assert {v.dtype for v in trained.values() if v.is_floating_point()} == {torch.float32}
    for k in reference:  # the same recipe: fp32 masters, bf16 compute, the same data and initial weights
        torch.testing.assert_close(trained[k], reference[k], rtol=0, atol=0, msg=k)
    moved = _moved(initial, trained)
    assert moved > 0.5, f"only {moved:.0%} of the weights moved at lr 1e-5 (fp32 masters move most of them)"
    optimizer = _checkpoint(runs["bf16"], 2, "optimizer.pt")
    moments = [v for state in optimizer["state"].values() for key, v in state.items() if key in ("exp_avg",
                                                                                                   "exp_avg_sq")]
    assert moments and {v.dtype for v in moments} == {torch.float32}


def test_pure_bf16_keeps_bf16_weights_and_loses_small_updates(runs):
    initial = _initial()
    pure = _checkpoint(runs["bf16_pure"], 2)
    assert {v.dtype for v in pure.values() if v.is_floating_point()} == {torch.bfloat16}
    masters = _moved(initial, _checkpoint(runs["bf16"], 2))
    rounded = _moved(_initial("bfloat16"), pure)
    assert rounded < masters / 2, f"pure bf16 moved {rounded:.0%} of the weights, fp32 masters {masters:.0%}"


def test_final_model_is_written_in_model_dtype(runs):
    final = runs["bf16"] / "final"
    weights = {}
    for f in final.glob("*.safetensors"):
        weights.update(load_file(f))
    assert weights and {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    masters = _checkpoint(runs["bf16"], 2)
    for k, v in weights.items():  # the masters rounded once to bf16
        assert torch.equal(v, masters[f"lm.{k}"].to(torch.bfloat16)), k
    fp32_final = load_file(next((runs["fp32_autocast"] / "final").glob("*.safetensors")))
    assert {v.dtype for v in fp32_final.values()} == {torch.float32}


def test_resume_with_fp32_masters_is_exact(runs, tmp_path, capsys, caplog):
    """Step 2 redone from the step-1 checkpoint (fp32 masters, fp32 AdamW states) equals the uninterrupted run."""
    caplog.set_level(logging.INFO, logger="nova_rt.trainer")
    run = tmp_path / "resumed" / "run"
    shutil.copytree(runs["bf16"], run)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    shutil.rmtree(run / "final")
    config = tiny_config(tmp_path / "resumed", optim=LOW_LR, model={"dtype": "bfloat16"})
    code, err = run_cli(capsys, "--config", str(config))
    assert code == 0, err[-3000:]
    assert "(step 1)" in caplog.text and "resumed from" in caplog.text, caplog.text[-2000:]
    again, first = _checkpoint(run, 2), _checkpoint(runs["bf16"], 2)
    for k in first:
        assert torch.equal(again[k], first[k]), k


def test_fp16_trains_fp32_masters_with_loss_scaling(tmp_path, capsys):
    run = _train(tmp_path, capsys, "fp16", model={"dtype": "float16"})
    trained = _checkpoint(run, 2)
    assert {v.dtype for v in trained.values() if v.is_floating_point()} == {torch.float32}
    assert _moved(_initial(), trained) > 0.5
    scaler = _checkpoint(run, 2, "state.pt")["grad_scaler"]
    assert scaler["scale"] > 1.0
    assert {v.dtype for v in load_file(next((run / "final").glob("*.safetensors"))).values()} == {torch.float16}


def test_trainer_autocasts_to_model_dtype_over_fp32_parameters(tmp_path):
    from nova_rt.config import build_config
    from nova_rt.distributed import DistInfo
    from nova_rt.trainer import Trainer

    cfg = build_config({"model": {"dtype": "bf16"}})
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    trainer = Trainer(cfg, DistInfo(), module, run_dir=tmp_path)
    assert module.weight.dtype == torch.float32 and trainer.scaler is None
    with trainer.autocast():
        assert module(torch.ones(1, 3)).dtype == torch.bfloat16


@pytest.mark.parametrize("sections, words", [
    ({"model": {"dtype": "bfloat16"}, "train": {"precision": "fp32"}},
     ["model.dtype=bfloat16", "train.precision=fp32", "contradict"]),
    ({"model": {"dtype": "float16"}, "train": {"precision": "bf16"}},
     ["model.dtype=float16", "train.precision=bf16", "contradict"]),
    ({"model": {"dtype": "float16", "master_weights": "model_dtype"}},
     ["model.master_weights=model_dtype", "model.dtype=float16"]),
    ({"parallel": {"backend": "megatron"}, "train": {"precision": "bf16"}},
     ["model.dtype=float32", "train.precision=bf16", "parallel.backend=megatron"]),
    ({"parallel": {"backend": "megatron"}, "model": {"dtype": "bfloat16", "master_weights": "model_dtype"}},
     ["model.master_weights=model_dtype", "parallel.backend=megatron"]),
])
def test_contradictory_precision_is_refused_at_config_load(tmp_path, capsys, sections, words):
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, **sections)))
    assert code == 2, err[-2000:]
    assert all(w in err for w in words), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_megatron_keeps_fp32_main_params_for_bf16(monkeypatch):
    """model.dtype bfloat16 on the megatron backend: megatron's mixed-precision optimizer (bf16 parameters, fp32 main
    parameters, fp32 Adam states), checked on the OptimizerConfig the backend builds (megatron's bf16 optimizer needs
    CUDA tensors, so it cannot be built on this CPU; a verification: the backend already did this)."""
    import megatron.core.optimizer as megatron_optimizer

    from nova_rt.config import ParallelConfig
    from nova_rt.parallel.megatron_trainer import MegatronTrainer

    built = {}
    monkeypatch.setattr(megatron_optimizer, "get_megatron_optimizer",
                        lambda config, model, **kwargs: built.setdefault("config", config))
    backend = MegatronTrainer.__new__(MegatronTrainer)  # only what _build_optimizer reads
    backend.dtype, backend.pcfg, backend.model = torch.bfloat16, ParallelConfig(backend="megatron"), []
    backend._build_optimizer(1e-5, 0.0, 1.0, (0.9, 0.95), 1e-8)
    config = built["config"]
    assert config.bf16 and not config.fp16 and config.params_dtype == torch.bfloat16
    assert not config.use_precision_aware_optimizer  # so Float16OptimizerWithFloat16Params: fp32 main params
    assert (config.main_params_dtype, config.main_grads_dtype, config.exp_avg_dtype, config.exp_avg_sq_dtype) \
        == (torch.float32,) * 4
