"""Checkpoints never run code and never block a rerun: weights_only loading (a planted pickle is refused and runs
nothing), RNG states as tensors/plain types (exact round trip), manifests (a tampered or truncated file is detected),
fallback to the previous complete checkpoint, and a clear error when resuming with a model of another shape."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nova_rt.checkpoint import MANIFEST, CheckpointManager, rng_state, safe_load, set_rng_state
from nova_rt.distributed import DistInfo
from nova_rt.errors import CheckpointError
from tests.reliability_helpers import run_cli, tiny_config


class _Planted:
    """Unpickling this (with weights_only=False) creates `marker`: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _draws() -> tuple:
    return random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist()


def test_rng_state_round_trips_under_weights_only(tmp_path):
    random.seed(3), np.random.seed(5), torch.manual_seed(7)
    np.random.randn()  # a cached gaussian is part of numpy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = _draws()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(safe_load(tmp_path / "rng.pt"))
    assert _draws() == want


def test_rng_file_of_older_versions_still_loads(tmp_path):
    """Older rng_rank*.pt files hold np.random.get_state()'s tuple (a numpy array): allow-listed, still exact."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "old.pt")
    want = _draws()
    # numpy arrays only where asked for; other libraries (megatron-core's dist checkpointing) allow-list numpy
    # globals process-wide when imported earlier in the session, so the check runs with the global list cleared
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(CheckpointError, match="refused"):
            safe_load(tmp_path / "old.pt")
    finally:
        torch.serialization.add_safe_globals(saved)
    set_rng_state(safe_load(tmp_path / "old.pt", numpy_arrays=True))
    assert _draws() == want


def test_planted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ck = tmp_path / "run" / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    torch.save({"trainer_step": 2, "x": _Planted(marker)}, ck / "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt: refused to load.*GLOBAL"):
        CheckpointManager(tmp_path / "run", DistInfo()).load_latest()
    assert not marker.exists()
    torch.load(ck / "state.pt", weights_only=False)  # the old loader would have run it: the test can fail
    assert marker.exists()


def test_planted_pickle_stops_the_cli_with_exit_2(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ck = tmp_path / "run" / "checkpoints" / "step_00000001"
    ck.mkdir(parents=True)
    torch.save({"x": _Planted(marker)}, ck / "state.pt")
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path)))
    assert code == 2, err
    assert f"{ck / 'state.pt'}: refused to load" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "run" / "final").exists()


def _save(mgr: CheckpointManager, step: int) -> Path:
    return mgr.save(step, {"w": torch.full((3,), float(step))}, None, {"trainer_step": step})


def test_tampered_or_truncated_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, DistInfo(), keep_last=5)
    for s in (1, 2, 3):
        _save(mgr, s)
    assert json.loads((tmp_path / "checkpoints" / "step_00000003" / MANIFEST).read_text())["files"]["model.pt"]
    marker = tmp_path / "pwned"
    torch.save({"x": _Planted(marker)}, tmp_path / "checkpoints" / "step_00000003" / "state.pt")  # planted, no hash
    model = tmp_path / "checkpoints" / "step_00000002" / "model.pt"
    model.write_bytes(model.read_bytes()[:-7])  # truncated
    with caplog.at_level(logging.WARNING):
        path, model_sd, _, state = mgr.load_latest()
    assert path.name == "step_00000001" and state["trainer_step"] == 1 and model_sd["w"].tolist() == [1.0] * 3
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000001", "step_00000002.corrupt", "step_00000003.corrupt"]
    assert "step_00000003" in caplog.text and "sha256" in caplog.text and "falling back" in caplog.text
    assert "step_00000002" in caplog.text and "model.pt has" in caplog.text


def test_checkpoint_of_an_older_version_without_manifest_still_loads(tmp_path):
    mgr = CheckpointManager(tmp_path, DistInfo(), keep_last=5)
    path = _save(mgr, 4)
    (path / MANIFEST).unlink()
    found, model_sd, _, state = mgr.load_latest()
    assert found == path and state["trainer_step"] == 4 and model_sd["w"].tolist() == [4.0] * 3


def test_megatron_checkpoints_verify_their_manifest(tmp_path):
    from nova_rt.checkpoint import write_manifest
    from nova_rt.parallel.checkpoint import verified_latest

    root = tmp_path / "checkpoints"
    for s in (1, 2):
        d = root / f"step_{s:08d}"
        d.mkdir(parents=True)
        torch.save({"step": s}, d / "rank_00000.pt")
        write_manifest(d)
        (d / "DONE").write_text("")
    (root / "step_00000002" / "rank_00000.pt").write_bytes(b"garbage")
    assert verified_latest(root) == root / "step_00000001"
    assert (root / "step_00000002.corrupt").is_dir()


def test_corrupt_newest_checkpoint_resumes_from_the_previous_bit_identically(tmp_path, capsys, caplog):
    cfg = str(tiny_config(tmp_path, train={"max_steps": 4}))
    code, err = run_cli(capsys, "--config", cfg)
    assert code == 0, err
    run = tmp_path / "run"
    want = load_file(run / "final" / "model.safetensors")
    shutil.rmtree(run / "final")
    model = run / "checkpoints" / "step_00000004" / "model.pt"  # the last step's, written before final
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        code, err = run_cli(capsys, "--config", cfg)
    assert code == 0, err
    assert "step_00000004" in caplog.text and "falling back" in caplog.text
    assert (run / "checkpoints" / "step_00000004.corrupt").is_dir()
    assert (run / "checkpoints" / "step_00000004" / MANIFEST).exists()  # written again by the resumed run
    got = load_file(run / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_with_a_model_of_another_shape_is_exit_2(tmp_path, capsys):
    cfg = str(tiny_config(tmp_path, train={"max_steps": 2}))
    assert run_cli(capsys, "--config", cfg, "--set", "checkpoint.save_final=false")[0] == 0
    code, err = run_cli(capsys, "--config", cfg, "--set", "train.max_steps=3",
                        "--set", "model.tiny={hidden: 32, layers: 2, heads: 4, kv_heads: 2, intermediate: 64}")
    assert code == 2, err
    assert "step_00000001: written by a model of another shape" in err
    assert "embed_tokens.weight is (320, 64) there, (320, 32) in this model" in err
    assert "Traceback" not in err


def test_dpo_reference_cache_that_is_damaged_or_planted_is_recomputed(tmp_path):
    from nova_rt.config import build_config
    from nova_rt.data.preference import load_preference_pairs
    from nova_rt.models.tiny import byte_tokenizer
    from nova_rt.stages.dpo import cached_reference_logps
    from tests.reliability_helpers import write_jsonl

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "chosen": "2", "rejected": "3"}])
    pairs, _ = load_preference_pairs([str(data)], byte_tokenizer(), max_seq_len=64)
    cfg = build_config({"run": {"stage": "dpo"}, "model": {"path": "tiny:llama"}})
    first = cached_reference_logps(cfg, DistInfo(), tmp_path, "train", lambda: torch.ones(1, 2), pairs)
    (cache,) = tmp_path.glob("ref_logps_train_*.pt")
    assert cached_reference_logps(cfg, DistInfo(), tmp_path, "train", lambda: torch.zeros(1, 2), pairs).equal(first)
    marker = tmp_path / "pwned"
    for damage in (b"garbage", None):
        if damage is None:
            torch.save({"x": _Planted(marker)}, cache)
        else:
            cache.write_bytes(damage)
        got = cached_reference_logps(cfg, DistInfo(), tmp_path, "train", lambda: torch.full((1, 2), 7.0), pairs)
        assert got.tolist() == [[7.0, 7.0]] and safe_load(cache)["logps"].tolist() == [[7.0, 7.0]]
    assert not marker.exists()
