"""Config loading: every shipped config loads; unknown keys and wrong types name the key and the file."""

from pathlib import Path

import pytest

from nova_rt.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert CONFIGS, "configs/ has no YAML files"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    from nova_rt.stages import KNOWN_STAGES

    assert cfg.run.stage in KNOWN_STAGES


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "max_stepz" in str(e.value) and str(p) in str(e.value)


def test_unknown_section(tmp_path):
    p = _write(tmp_path, "trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="trian"):
        load_config(p)


@pytest.mark.parametrize("text, key", [
    ("train:\n  max_steps: three\n", "train.max_steps"),
    ("optim:\n  lr: [1]\n", "optim.lr"),
    ("packing:\n  enabled: 1\n", "packing.enabled"),
    ("data:\n  train_files: a.jsonl\n", "data.train_files"),
    ("optim:\n  betas: [0.9, x]\n", "optim.betas[1]"),
])
def test_wrong_type_names_key(tmp_path, text, key):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert key in str(e.value) and str(p) in str(e.value)


def test_overrides_and_types(tmp_path):
    p = _write(tmp_path, "train:\n  max_steps: 3\n")
    cfg = load_config(p, ["train.max_steps=7", "optim.lr=2e-4", "run.dir=/tmp/x", "data.train_files=[a, b]",
                          "optim.lr=0.001"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.run.dir == "/tmp/x" and cfg.data.train_files == ["a", "b"]
    with pytest.raises(ConfigError, match="--set train.max_steps=x"):
        load_config(p, ["train.max_steps=x"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["train.max_steps"])
    cfg2 = cfg.with_overrides({"train.global_batch": 16})
    assert cfg2.train.global_batch == 16 and cfg.train.global_batch == 8
    assert cfg2.train.max_steps == 7


def test_defaults_and_include(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 11\n  global_batch: 4\n")
    p = _write(tmp_path, "include: base.yaml\ntrain:\n  global_batch: 2\n")
    cfg = load_config(p)
    assert cfg.train.max_steps == 11 and cfg.train.global_batch == 2
    assert cfg.packing.enabled is True and cfg.optim.scheduler == "cosine"
