"""grpo.rollout.correction mistakes on the command line: one line naming the key, exit 2, before anything loads;
the removed grpo.rollout.tis_cap says exactly what to write instead."""

from pathlib import Path

import pytest

from tests.reliability_helpers import run_cli

TINY_GRPO = Path(__file__).resolve().parents[1] / "configs" / "tiny_grpo.yaml"


REPLACED = "tiny_grpo.yaml: grpo.rollout.tis_cap was replaced by grpo.rollout.correction: "


@pytest.mark.parametrize("overrides, message", [
    (["grpo.rollout.tis_cap=2.5"],
     REPLACED + "write grpo.rollout.correction: token_truncate and grpo.rollout.correction_cap: 2.5"),
    (["grpo.rollout.tis_cap=0"], REPLACED + "delete it (0 was off; correction: none is the default)"),
    (["grpo.rollout.correction=token_clip"], "grpo.rollout.correction"),
    (["grpo.rollout.correction=token_mask", "grpo.rollout.correction_cap=0"],
     "grpo.rollout.correction_cap: must be a finite number > 0, got 0.0"),
    (["grpo.rollout.correction=icepop", "grpo.rollout.correction_low=2", "grpo.rollout.correction_high=2"],
     "grpo.rollout.correction_low / correction_high: icepop needs 0 <= correction_low < correction_high, got 2.0 "
     "and 2.0"),
])
def test_correction_mistakes_exit_2_naming_the_key(tmp_path, capsys, overrides, message):
    argv = ["--config", str(TINY_GRPO), "--set", f"run.dir={tmp_path / 'run'}"]
    for override in overrides:
        argv += ["--set", override]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2, err
    assert not (tmp_path / "run").exists()
