"""benchmarks/bench_algorithms.py on the tiny configs (--tiny): the GRPO part runs a non-default estimator, reads
back every run's curve (step 0, the eval steps, the end, against training seconds) and the paired gain; the DPO part
scores every final model with the shared held-out measures, whose values are checked against a direct recount."""

import json
import statistics

from benchmarks import bench_algorithms


def test_grpo_part_writes_curves_and_summary(tmp_path):
    out = tmp_path / "grpo.json"
    bench_algorithms.main(["--part", "grpo", "--tiny", "--seeds", "0", "--modes", "ppo_clip", "--advantages",
                           "rloo", "--max-steps", "4", "--eval-every", "1", "--ppo-epochs", "2", "--threads", "1",
                           "--out", str(out)])
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert (run["mode"], run["advantage"], run["seed"]) == ("ppo_clip", "rloo", 0)
    steps = [point[0] for point in run["curve"]]
    assert steps == [0, 2, 4], run["curve"]
    seconds = [point[1] for point in run["curve"]]
    assert seconds[0] == 0.0 and seconds == sorted(seconds) and seconds[-1] == run["train_s"] > 0
    assert run["curve"][0][2] == run["initial"] and run["curve"][-1][2] == run["final"]
    assert abs(run["gain"] - (run["final"] - run["initial"])) < 1e-12
    (row,) = result["summary"]
    assert row["seeds"] == 1 and row["final"] == run["final"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_dpo_part_scores_final_models(tmp_path, monkeypatch):
    seen = {}
    score = bench_algorithms._pair_scores

    def recording(model_dir, pairs):
        seen[model_dir] = score(model_dir, pairs)
        return seen[model_dir]

    monkeypatch.setattr(bench_algorithms, "_pair_scores", recording)
    out = tmp_path / "dpo.json"
    bench_algorithms.main(["--part", "dpo", "--tiny", "--seeds", "0", "--losses", "simpo", "--max-steps", "2",
                           "--threads", "1", "--out", str(out)])
    (run,) = json.loads(out.read_text())["runs"]
    initial, final = (scores for directory, scores in seen.items() if not directory.endswith("final")), \
        next(scores for directory, scores in seen.items() if directory.endswith("final"))
    initial = next(initial)
    assert len(final) == 40  # data/preference/arith_pairs_eval.jsonl
    assert run["mean_logp_accuracy"] == statistics.fmean(float(c / nc > r / nr) for c, r, nc, nr in final)
    implicit = [float((c - c0) - (r - r0) > 0) for (c, r, _, _), (c0, r0, _, _) in zip(final, initial)]
    assert run["implicit_reward_accuracy"] == statistics.fmean(implicit)
    assert run["own_eval_accuracy_last"] is not None


def _grpo_file(path, runs):
    path.write_text(json.dumps({"part": "grpo", "args": {"seeds": "x"}, "env": {"git_sha": "abc"}, "runs": runs}))
    return str(path)


def _run(mode, advantage, seed, final):
    return {"part": "grpo", "mode": mode, "advantage": advantage, "seed": seed, "final": final, "gain": final - 0.4,
            "train_s": 2.0, "step_s": 1.0, "zero_adv_frac": 0.0, "curve": [[0, 0.0, 0.4], [4, 2.0, final]]}


def test_merge_combines_split_sweeps(tmp_path):
    """Sweeps split over processes merge into one summary over every run; a run in two files is refused."""
    first = _grpo_file(tmp_path / "a.json", [_run("gspo", "group", 0, 0.6), _run("gspo", "group", 1, 0.5)])
    second = _grpo_file(tmp_path / "b.json", [_run("gspo", "group", 2, 0.7), _run("cispo", "rloo", 0, 0.9)])
    out = tmp_path / "merged.json"
    bench_algorithms.main(["--part", "grpo", "--merge", first, second, "--out", str(out)])
    merged = json.loads(out.read_text())
    assert len(merged["runs"]) == 4 and merged["merged_from"] == [first, second]
    rows = {(row["mode"], row["advantage"]): row for row in merged["summary"]}
    assert rows["gspo", "group"]["seeds"] == 3 and abs(rows["gspo", "group"]["final"] - 0.6) < 1e-12
    assert abs(rows["gspo", "group"]["final_se"] - statistics.stdev([0.6, 0.5, 0.7]) / 3 ** 0.5) < 1e-12
    assert rows["cispo", "rloo"]["seeds"] == 1
    assert merged["summary"][0]["mode"] == "cispo"  # sorted by final accuracy, best first
    again = _grpo_file(tmp_path / "c.json", [_run("gspo", "group", 1, 0.55)])
    try:
        bench_algorithms.main(["--part", "grpo", "--merge", first, again, "--out", str(tmp_path / "x.json")])
    except SystemExit as exc:
        assert "in both" in str(exc)
    else:
        raise AssertionError("a run present in two files was merged")
