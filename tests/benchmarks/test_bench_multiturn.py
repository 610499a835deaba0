"""benchmarks/bench_multiturn.py --tiny: every episode plays exactly the asked number of turns (the scripted
environment), the rows' token counts agree with a recount from the trajectories, the prefill count grows with the
turns as the no-KV-reuse driver re-prefills the trajectory, and the JSON and PNG are written."""

import json

from benchmarks import bench_multiturn


def test_tiny_run_controls_turns_and_counts_tokens(tmp_path):
    out = tmp_path / "multiturn.json"
    bench_multiturn.main(["--tiny", "--turns", "1,2,4", "--prompts", "2", "--group", "2", "--steps", "1",
                          "--warmup", "0", "--tokens-per-turn", "6", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["turns"] for row in rows] == [1, 2, 4]
    for row in rows:
        assert row["turns_mean"] == row["turns"] and row["episodes"] == 4 and row["kv_reuse"] is False
        assert 1 <= row["sampled_tokens_per_episode"] <= 6 * row["turns"]
        assert row["s_per_episode"] > 0 and row["sampled_tokens_per_s"] > 0
    prefill = [row["prefilled_tokens_per_episode"] for row in rows]
    assert prefill[0] < prefill[1] < prefill[2], prefill
    assert out.with_suffix(".png").stat().st_size > 0


class _Trajectory:
    def __init__(self, mask, prompt_len):
        self.sampled_mask, self.prompt_len = mask, prompt_len


def test_prefilled_tokens_counts_every_turn_prefix():
    # opening prompt of 3 tokens, a sampled turn of 2, 2 env tokens, a sampled turn of 1
    trajectory = _Trajectory([False] * 3 + [True] * 2 + [False] * 2 + [True], prompt_len=3)
    assert bench_multiturn.prefilled_tokens(trajectory, shared_opening=False, group_size=4) == 3 + 7
    assert bench_multiturn.prefilled_tokens(trajectory, shared_opening=True, group_size=4) == 3 / 4 + 7
