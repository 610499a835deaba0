"""The `grpo` section's sub-sections: a former flat key (`grpo.eval_every`, moved to `grpo.eval.every` before any
release) is an unknown key like any other, exit 2 naming it, in YAML, `--set` and `pipeline.stage_overrides`;
unknown keys name the key; validation messages name the sub-section key (tests/spine/test_code_size.py: no section
has more than 12 fields)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nova_rt.config import ConfigError, load_config
from tests.reliability_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_grpo.yaml"


@pytest.mark.parametrize("how", ["yaml", "set", "stage_overrides"])
def test_former_flat_key_is_an_unknown_key_exit_2_naming_it(tmp_path, capsys, how):
    cfg_file, sets = tmp_path / "old.yaml", []
    if how == "yaml":
        cfg_file.write_text(f"include: {TINY}\ngrpo:\n  eval_every: 3\n")
    elif how == "set":
        cfg_file.write_text(f"include: {TINY}\n")
        sets = ["--set", "grpo.eval_every=3"]
    else:
        cfg_file.write_text(f"include: {ROOT / 'configs' / 'tiny_pipeline.yaml'}\n"
                            "pipeline:\n  stage_overrides:\n    grpo: {grpo.eval_every: 3}\n")
    code, err = run_cli(capsys, "--config", str(cfg_file), "--set", f"run.dir={tmp_path / 'run'}", *sets)
    assert code == 2, err
    assert "unknown key 'grpo.eval_every'" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["grpo.bogus_key", "grpo.sampling.bogus_key", "grpo.eval.every_n"])
def test_unknown_grpo_key_is_an_error_naming_it(key):
    with pytest.raises(ConfigError, match=rf"unknown key '{key}'"):
        load_config(TINY, [f"{key}=1"])


def test_validate_names_the_sub_section_key(capsys, tmp_path):
    code, err = run_cli(capsys, "--config", str(TINY), "--set", f"run.dir={tmp_path / 'run'}",
                        "--set", "grpo.sampling.group_size=1")
    assert code == 2 and "grpo.sampling.group_size must be >= 2, got 1" in err, err

