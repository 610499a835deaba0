"""benchmarks/bench_multiturn.py --tiny: every episode plays exactly the asked number of turns (the scripted
environment), without KV reuse the prefill count equals a recount from the trajectories and grows with the turns
(every turn re-prefills the trajectory), with reuse the later turns prefill far fewer tokens, and the JSON and PNG
are written."""

import json

from benchmarks import bench_multiturn


def test_tiny_run_controls_turns_and_counts_tokens(tmp_path):
    out = tmp_path / "multiturn.json"
    bench_multiturn.main(["--tiny", "--turns", "1,2,4", "--prompts", "2", "--group", "2", "--steps", "1",
                          "--warmup", "0", "--tokens-per-turn", "6", "--modes", "hf,hf_reuse", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(row["mode"], row["turns"]) for row in rows] == [(mode, turns) for mode in ("hf", "hf_reuse")
                                                             for turns in (1, 2, 4)]
    for row in rows:
        assert row["turns_mean"] == row["turns"] and row["episodes"] == 4
        assert row["kv_reuse"] is (row["mode"] == "hf_reuse")
        assert 1 <= row["sampled_tokens_per_episode"] <= 6 * row["turns"]
        assert row["s_per_episode"] > 0 and row["sampled_tokens_per_s"] > 0
    plain, reuse = rows[:3], rows[3:]
    # without reuse the driver's count is the recount from the trajectories (every turn prefills all so far)
    assert all(abs(row["prefilled_tokens_per_episode"] - row["prefilled_without_reuse_per_episode"]) < 1e-9
               for row in plain)
    prefill = [row["prefilled_tokens_per_episode"] for row in plain]
    assert prefill[0] < prefill[1] < prefill[2], prefill
    assert reuse[0]["prefilled_tokens_per_episode"] == plain[0]["prefilled_tokens_per_episode"]  # one turn: no reuse
    for row in reuse[1:]:  # later turns prefill only their new tokens
        assert row["prefilled_tokens_per_episode"] < 0.7 * row["prefilled_without_reuse_per_episode"], row
    assert out.with_suffix(".png").stat().st_size > 0


class _Trajectory:
    def __init__(self, mask, prompt_len):
        self.sampled_mask, self.prompt_len = mask, prompt_len


def test_prefilled_tokens_counts_every_turn_prefix():
    # opening prompt of 3 tokens, a sampled turn of 2, 2 env tokens, a sampled turn of 1
    trajectory = _Trajectory([False] * 3 + [True] * 2 + [False] * 2 + [True], prompt_len=3)
    assert bench_multiturn.prefilled_tokens(trajectory, shared_opening=False, group_size=4) == 3 + 7
    assert bench_multiturn.prefilled_tokens(trajectory, shared_opening=True, group_size=4) == 3 / 4 + 7
