"""Bad input and faults as a user meets them through the CLI: every user mistake is exit 2 with one or two lines
naming the file / row / field or config key (no traceback), choice and range errors come before any model or data
loads, a diverging run stops instead of exiting 0, metrics.jsonl stays strict JSON, and the silent-wrong-result cases
(GRPO group of one, empty assistant turns, chosen == rejected, cancelling merge weights, max_steps 0) are errors or
counted warnings. docs/reliability.md is the table of these classes."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nova_rt.config import build_config
from nova_rt.distributed import DistInfo
from nova_rt.errors import NonFiniteError
from tests.reliability_helpers import ROOT, chat_rows, run_cli, tiny_config, write_jsonl


def _strict_json(line: str) -> dict:
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(line, parse_constant=refuse)


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, key", [
    ("optim.scheduler=cosin", "optim.scheduler: must be one of cosine, linear, constant, got 'cosin'"),
    ("parallel.backend=deepspeed", "parallel.backend: must be one of hf, megatron"),
    ("train.precision=fp8", "train.precision: must be one of auto, fp32, bf16"),
    ("data.overlong=cut", "data.overlong: must be one of truncate, drop"),
    ("data.on_error=ignore", "data.on_error: must be one of error, skip"),
    ("train.global_batch=0", "train.global_batch: must be a finite number >= 1, got 0"),
    ("optim.lr=-1", "optim.lr: must be a finite number >= 0, got -1"),
    ("train.max_steps=0", "train.max_steps: must be a finite number >= 1, got 0"),
    ("train.max_step=3", "train: unknown key 'train.max_step'"),
])
def test_config_mistakes_exit_2_before_anything_loads(tmp_path, capsys, override, key):
    cfg = tiny_config(tmp_path)
    code, err = run_cli(capsys, "--config", str(cfg), "--set", override)
    assert code == 2, err
    assert f"{cfg}: {key}" in err and "Traceback" not in err and len(err.splitlines()) == 2
    assert not (tmp_path / "run").exists()  # nothing ran: the run dir is created after loading


def test_include_cycle_names_the_files(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\ntrain: {max_steps: 1}\n")
    code, err = run_cli(capsys, "--config", str(tmp_path / "a.yaml"))
    assert code == 2 and "include cycle" in err and "a.yaml -> " in err and "b.yaml" in err, err


def test_grpo_group_of_one_is_an_error(tmp_path, capsys):
    code, err = run_cli(capsys, "--config", str(ROOT / "configs" / "tiny_grpo.yaml"), "--set",
                        f"run.dir={tmp_path / 'run'}", "--set", "grpo.sampling.group_size=1")
    assert code == 2 and "tiny_grpo.yaml: grpo.sampling.group_size must be >= 2, got 1" in err, err
    assert not (tmp_path / "run").exists()


def test_missing_grpo_prompt_file_is_named_before_loading(tmp_path, capsys):
    cfg = ROOT / "configs" / "tiny_grpo.yaml"
    code, err = run_cli(capsys, "--config", str(cfg), "--set", f"run.dir={tmp_path / 'run'}",
                        "--set", f"grpo.data.prompt_files=[{tmp_path / 'nope.jsonl'}]")
    assert code == 2 and f"grpo.data.prompt_files[0]: {tmp_path / 'nope.jsonl'}: no such file" in err, err
    assert not (tmp_path / "run").exists()


def test_debug_env_keeps_the_traceback(tmp_path, monkeypatch):
    from nova_rt.config import ConfigError
    from nova_rt.train import main

    monkeypatch.setenv("NOVA_RT_DEBUG", "1")
    with pytest.raises(ConfigError, match="optim.scheduler"):
        main(["--config", str(tiny_config(tmp_path)), "--set", "optim.scheduler=x"])


def test_console_script_train_exits_2(tmp_path, capsys):
    from nova_rt.cli import main

    code = main(["train", str(tiny_config(tmp_path)), "--set", "train.micro_batch=0"])
    assert code == 2 and "train.micro_batch: must be" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- data
GOOD = chat_rows(8)
BAD_ROWS = {
    "bad_json": ([GOOD[0], '{"messages": [', *GOOD[1:]], "chat.jsonl: row 2: invalid JSON"),
    "missing_field": ([GOOD[0], {"prompt": "hi"}, *GOOD[1:]], "chat.jsonl: row 2: field 'response': missing"),
    "wrong_role": ([{"messages": [{"role": "bot", "content": "x"}]}, *GOOD],
                   "chat.jsonl: row 1: field 'messages[0].role': must be one of"),
    "wrong_schema": ([*GOOD, {"text": "plain"}], "chat.jsonl: row 9: expected a 'messages' list"),
    "empty_assistant": ([*GOOD[:2], {"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": " "}]}, *GOOD[2:]],
                        "chat.jsonl: row 3: field 'messages[1].content': empty assistant message"),
    "empty_file": ([], "no usable samples in"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_data_mistakes_exit_2_naming_file_row_field(tmp_path, capsys, case):
    rows, want = BAD_ROWS[case]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, data)))
    assert code == 2, err
    assert want in err and "Traceback" not in err and len(err.splitlines()) == 2, err
    if case == "empty_file":
        assert str(data) in err


def test_missing_data_path_exits_2_before_the_model_loads(tmp_path, capsys):
    cfg = tiny_config(tmp_path, tmp_path / "nope.jsonl")
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2 and f"{cfg}: data.train_files[0]: {tmp_path / 'nope.jsonl'}: no such file" in err, err


def _non_utf8_file(tmp_path: Path) -> Path:
    lines = [json.dumps(r).encode() for r in GOOD]
    lines.insert(2, b'{"prompt": "caf\xe9", "response": "ok"}')  # latin-1, not UTF-8
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_non_utf8_row_with_on_error_error_names_file_and_row(tmp_path, capsys):
    data = _non_utf8_file(tmp_path)
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, data)))
    assert code == 2 and f"{data}: row 3: not UTF-8 (byte 0xe9 at column 16)" in err, err


def test_non_utf8_row_with_on_error_skip_is_skipped_and_counted(tmp_path, capsys):
    from nova_rt.data.sft import load_sft_samples
    from nova_rt.models.tiny import byte_tokenizer

    data = _non_utf8_file(tmp_path)
    samples, counts = load_sft_samples([str(data)], byte_tokenizer(), max_seq_len=256, on_error="skip")
    assert counts["rows"] == 9 and counts["skipped_bad_rows"] == 1 and len(samples) == 8
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, data, data={"on_error": "skip"})),
                        "--set", "train.max_steps=1")
    assert code == 0, err
    assert (tmp_path / "run" / "final").is_dir()


def test_damaged_gzip_names_the_file(tmp_path):
    import gzip

    from nova_rt.data.io import DataError, read_rows

    path = tmp_path / "chat.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in chat_rows(500))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=rf"{path}: damaged gzip file \(Compressed file ended"):
        list(read_rows(path))


def test_empty_assistant_row_is_skipped_and_counted_with_on_error_skip(tmp_path):
    from nova_rt.data.sft import load_sft_samples
    from nova_rt.models.tiny import byte_tokenizer

    path = write_jsonl(tmp_path / "x.jsonl", [GOOD[0], {"prompt": "hi", "response": ""}, GOOD[1]])
    samples, counts = load_sft_samples([str(path)], byte_tokenizer(), max_seq_len=256, on_error="skip")
    assert len(samples) == 2 and counts["skipped_bad_rows"] == 1


def test_identical_preference_pairs_are_dropped_counted_and_warned(tmp_path, caplog):
    from nova_rt.data.preference import load_preference_pairs
    from nova_rt.models.tiny import byte_tokenizer

    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "1+1?", "chosen": "2", "rejected": "2"},
            {"prompt": "3+3?", "chosen": "6", "rejected": "6"}, {"prompt": "1+2?", "chosen": "3", "rejected": "4"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        pairs, counts = load_preference_pairs([str(path)], byte_tokenizer(), max_seq_len=128)
    assert len(pairs) == 2 and counts["dropped_identical"] == 2 and counts["rows"] == 4
    assert f"dropped 2 preference pair(s) whose chosen equals rejected (no preference to learn; first: {path}: row 2)" \
        in caplog.text


# ----------------------------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nova_rt.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", seed=0, hidden=32, layers=1, heads=2,
                           kv_heads=1, intermediate=64)


@pytest.mark.parametrize("damage, want", [
    ("no_config", "no config.json, so not an HF model directory"),
    ("truncated", "model.safetensors: the header describes"),
    ("garbage", "model.safetensors: not a safetensors file"),
])
def test_damaged_model_dir_exits_2_naming_the_file(tmp_path, capsys, tiny_dir, damage, want):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    st = model / "model.safetensors"
    if damage == "no_config":
        (model / "config.json").unlink()
    elif damage == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    else:
        st.write_bytes(b"\x00garbage" * 50)
    cfg = tiny_config(tmp_path, model={"path": str(model)})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2 and want in err and "model.path" in err and str(model) in err and "Traceback" not in err, err


@pytest.mark.parametrize("override, want", [
    ("model.path=tiny:gpt2", "tiny model arch must be 'llama' or 'qwen2', got 'gpt2'"),
    ("model.path=builtin:nope", "model.path: unknown builtin model 'builtin:nope'"),
    ("model.tiny={hidden: 63}", "The hidden size (63) is not a multiple of the number of attention heads (4)"),
    ("model.tiny={hiden: 63}", "unexpected keyword argument 'hiden'"),
])
def test_model_spec_mistakes_exit_2_before_loading(tmp_path, capsys, override, want):
    cfg = tiny_config(tmp_path)
    code, err = run_cli(capsys, "--config", str(cfg), "--set", override)
    assert code == 2 and f"{cfg}: model." in err and want in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_merge_weights_that_nearly_cancel_are_an_error(tmp_path, capsys, tiny_dir):
    import shutil

    from nova_rt.merge.cli import main

    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tiny_dir), "parameters": {"weight": 1.0}},
        {"model": str(other), "parameters": {"weight": -0.999}}]}))
    capsys.readouterr()
    assert main([str(cfg), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "linear: weights [1.0, -0.999] sum to 0.001" in err and "x1000" in err and "normalize: false" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    cfg.write_text(cfg.read_text().replace('"models"', '"parameters": {"normalize": false}, "models"'))
    assert main([str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0  # meant it: the unnormalised sum


# ----------------------------------------------------------------------------------------------- non-finite
def _trainer(tmp_path, limit=3):
    from nova_rt.trainer import Trainer

    cfg = build_config({"train": {"max_steps": 20, "max_nonfinite_steps": limit},
                        "optim": {"lr": 0.1, "scheduler": "constant"}, "checkpoint": {"keep_last": 0}})
    torch.manual_seed(0)
    return Trainer(cfg, DistInfo(), torch.nn.Linear(3, 1), run_dir=tmp_path)


def _loss(model, mb):
    return (model(mb["x"]).square().sum() * mb["scale"]), {}


def _step(tr, scale):
    return tr.train_step([{"x": torch.ones(2, 3), "scale": scale}], _loss)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    tr = _trainer(tmp_path)
    _step(tr, 1.0)
    before = [p.detach().clone() for p in tr.raw.parameters()]
    m = _step(tr, float("nan"))
    assert math.isnan(m["loss"]) and m["nonfinite_skipped"] == 1 and tr.step == 2
    assert all(torch.equal(a, b) for a, b in zip(before, tr.raw.parameters()))  # no update
    assert tr.save_checkpoint() is None  # never during a non-finite streak
    with pytest.raises(NonFiniteError, match="ended with 1 non-finite step"):
        tr.model_state()  # so no final model either
    m = _step(tr, 1.0)
    assert m["nonfinite_skipped"] == 1 and not all(torch.equal(a, b) for a, b in zip(before, tr.raw.parameters()))
    assert tr.save_checkpoint().name == "step_00000003"
    _step(tr, float("inf")), _step(tr, float("nan"))
    with pytest.raises(NonFiniteError, match=r"steps 4-6: loss or gradient norm non-finite 3 steps in a row "
                                             r"\(train.max_nonfinite_steps=3\).*step_00000003"):
        _step(tr, float("nan"))


def test_nonfinite_parameter_is_never_saved(tmp_path):
    tr = _trainer(tmp_path)
    _step(tr, 1.0)
    with torch.no_grad():
        tr.raw.weight[0, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="parameter is non-finite"):
        tr.save_checkpoint()
    assert not (tmp_path / "checkpoints").exists()


def test_metrics_jsonl_is_strict_json(tmp_path):
    from nova_rt.telemetry import Telemetry

    t = Telemetry(tmp_path, enabled=True, tensorboard=False, progress_bar=False)
    t.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
    rec = _strict_json((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.1, "nonfinite": ["loss", "grad_norm"]}


def test_diverging_run_stops_with_exit_2_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    """lr 1e30: parameters stay finite but the loss is NaN from step 2 -> skipped, counted, stopped at 3 in a row."""
    cfg = tiny_config(tmp_path, optim={"lr": 1e30}, train={"max_steps": 8})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2, err
    assert "training stopped: steps 2-4: loss or gradient norm non-finite 3 steps in a row" in err, err
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    recs = [_strict_json(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and [r["nonfinite_skipped"] for r in recs] == [0, 1, 2]
    assert recs[1]["loss"] is None and "loss" in recs[1]["nonfinite"]


def test_update_to_infinite_parameters_is_never_checkpointed(tmp_path, capsys):
    """lr 1e38: the first update overflows the parameters; its checkpoint is refused and the run stops."""
    cfg = tiny_config(tmp_path, optim={"lr": 1e38}, train={"max_steps": 8})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2 and "training stopped: step 1: a model parameter is non-finite" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "final").exists()


def test_stage_level_mistake_is_exit_2(tmp_path, capsys):
    cfg = tiny_config(tmp_path, packing={"enabled": True, "max_tokens": 128})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2 and "data.max_seq_len=256 exceeds packing.max_tokens=128" in err, err


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "-m", "nova_rt.train", *argv], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


def assert_user_error_under_torchrun(proc: subprocess.CompletedProcess, message: str) -> None:
    """Both ranks exit 2 (torchrun itself exits 1), the message is printed once (rank 0) and torchrun's failure summary
    shows it for each rank in place of its pointer to tracebacks; no traceback through our code."""
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    ours = [ln for ln in err.splitlines() if ln.startswith("nova_rt: ")]
    assert len(ours) == 2 and message in ours[0] and "NOVA_RT_DEBUG=1" in ours[1], err[-3000:]
    assert err.count("exitcode  : 2 ") == 2, err[-3000:]
    assert err.count(f"traceback : {ours[0]}") == 2 and "To enable traceback see" not in err, err[-3000:]
    assert str(ROOT / "nova_rt") not in err and "[rank" not in err, err[-3000:]


@pytest.mark.distributed
def test_every_rank_exits_2_under_torchrun(tmp_path):
    """A data error after the process group is up: printed once, every worker exits 2."""
    data = write_jsonl(tmp_path / "chat.jsonl", ['{"messages": ['])
    proc = _torchrun("--config", str(tiny_config(tmp_path, data)))
    assert_user_error_under_torchrun(proc, f"nova_rt: data error: {data}: row 1: invalid JSON")


def test_user_error_on_another_rank_goes_to_torchrun_error_file(tmp_path, monkeypatch, capsys):
    """Rank 1 prints nothing (rank 0 prints the run's copy) but writes torchrun's error file, so an error only rank 1
    met still reaches the failure summary; under torchrun a worker that reported ignores torchrun's SIGTERM."""
    import signal

    from nova_rt.data.io import DataError
    from nova_rt.train import report_user_error

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    saved = signal.getsignal(signal.SIGTERM)
    try:
        assert report_user_error(DataError("x.jsonl: row 3: bad")) == 2
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert capsys.readouterr().err == ""
    message = json.loads(error_file.read_text())["message"]
    assert message["message"] == message["extraInfo"]["py_callstack"] == "nova_rt: data error: x.jsonl: row 3: bad"
    monkeypatch.setenv("RANK", "0")
    try:
        report_user_error(DataError("x.jsonl: row 3: bad"))
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert capsys.readouterr().err.startswith("nova_rt: data error: x.jsonl: row 3: bad\n")


@pytest.mark.distributed
def test_fsdp2_resume_of_another_shape_exits_2_naming_checkpoint_and_tensor(tmp_path):
    """FSDP2 loads a full state dict from rank 0; a checkpoint of another model shape is named, like the DDP path."""
    cfg = str(tiny_config(tmp_path, parallel={"data_parallel": "fsdp2"}, checkpoint={"every": 1, "save_final": False}))
    first = _torchrun("--config", cfg)  # 2 steps: a checkpoint after step 1
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert ckpt.is_dir()
    proc = _torchrun("--config", cfg, "--set", "train.max_steps=3",
                     "--set", "model.tiny={hidden: 32, layers: 2, heads: 4, kv_heads: 2, intermediate: 64}")
    assert_user_error_under_torchrun(
        proc, f"nova_rt: checkpoint error: {ckpt}: written by a model of another shape or architecture: "
              "lm.model.embed_tokens.weight is (320, 64) there, (320, 32) in this model")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_the_preflight(path):
    from nova_rt.config import load_config
    from nova_rt.preflight import check_inputs

    check_inputs(load_config(path))


def test_grpo_metrics_carry_the_nonfinite_count():
    """GRPO's step metrics keep the trainer's running `nonfinite_skipped` total (the last optimizer step's), not a sum
    over the step's minibatches and epochs."""
    from types import SimpleNamespace

    from nova_rt.stages.grpo import GRPORun

    totals = iter([0, 1, 1, 2])  # running totals after each of the 4 optimizer steps of one rollout batch

    class StubTrainer:
        def train_step(self, mbs, loss_fn, **options):
            return {"loss": 1.0, "grad_norm": 1.0, "lr": 1e-3, "resp_tokens": 4.0, "clip_tokens": 0.0,
                    "entropy_sum": 2.0, "ratio_sum": 4.0, "nonfinite_skipped": next(totals)}

    run = SimpleNamespace(grpo=SimpleNamespace(minibatches=2, ppo_epochs=2, steps_per_rollout=4), ptx=None,
                          micro_batches=lambda part: [part], trainer=StubTrainer(), loss_fn=None, step_options={})
    out = GRPORun.train_on(run, [{"id": i} for i in range(4)], 1)
    assert out["nonfinite_skipped"] == 2 and out["loss"] == 1.0 and out["entropy"] == 0.5


@pytest.mark.parametrize("stage_cfg", ["tiny_sft.yaml", "tiny_grpo.yaml"])
def test_megatron_with_an_in_memory_tiny_model_is_named(tmp_path, capsys, stage_cfg):
    code, err = run_cli(capsys, "--config", str(ROOT / "configs" / stage_cfg), "--set", f"run.dir={tmp_path / 'run'}",
                        "--set", "parallel.backend=megatron")
    assert code == 2 and f"{stage_cfg}: model.path: 'tiny:llama' is built in memory" in err, err
    assert not (tmp_path / "run").exists()
