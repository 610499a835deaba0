"""Algorithm breadth on the quickstart tasks: which GRPO loss mode x advantage estimator, and which preference loss,
learns fastest here, at equal steps and against wall clock (issue 24 item 5).

GRPO: `configs/quickstart_grpo.yaml` (SmolLM2-135M-Instruct, reasoning-gym + and - arithmetic, 200 held-out prompts,
greedy decoding scored by the math verifier) once per (grpo.loss.mode, grpo.loss.advantage, run.seed), the same
steps, eval every `--eval-every` steps; per run the held-out accuracy curve against training seconds (rollout +
update, eval excluded) and the mean step time. Across seeds: mean final accuracy, its s.e. over seeds, and the gain
over the shared initial accuracy with the paired s.e. over prompts (eval_initial/eval_final hold per-prompt results).

DPO: `configs/quickstart_dpo.yaml` (the arithmetic preference pairs, 40 held-out pairs) once per dpo.loss_type in
sigmoid / ipo / simpo / orpo and seed. Each loss's own eval_accuracy measures a different thing (a reward against the
reference for sigmoid/ipo, length-normalised log-probs for simpo/orpo), so the script also scores every final model
the same way: the share of held-out pairs whose chosen reply has the higher mean token log-prob under the trained
policy, and under the DPO implicit reward against the initial model (log-ratio of chosen minus rejected > 0).

On-policy with one optimizer step per rollout batch (the quickstart: ppo_epochs 1, minibatches 1) every ratio is 1,
and ppo_clip, gspo, gspo_token, cispo and sapo then have the same gradient (docs/algorithms.md): they differ only
off-policy. So the GRPO part runs with `--ppo-epochs 2` by default (each rollout batch serves two optimizer steps,
the second off-policy; train.max_steps counts optimizer steps, so 24 steps are 12 rollouts).

Every run is a subprocess `python -m nova_rt.train` of the interpreter running this script (.venv). Outputs:
results/bench_algorithms_<part>.json (every run and curve), a PNG of accuracy vs training seconds, and the markdown
table for README. `--tiny` runs the same code on configs/tiny_grpo.yaml / tiny_dpo.yaml (seconds; the CI test).

    .venv/bin/python benchmarks/bench_algorithms.py --part grpo --seeds 0,1,2 \
        [--modes ppo_clip,gspo,cispo] [--advantages group,rloo,reinforce_pp_baseline] [--max-steps 24]
    .venv/bin/python benchmarks/bench_algorithms.py --part dpo --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS_DIR, environment, markdown_table  # noqa: E402

MODES = ("ppo_clip", "gspo", "gspo_token", "cispo", "sapo", "gmpo")
ADVANTAGES = ("group", "rloo", "reinforce_pp_baseline")
MODE_SETTINGS = {  # each mode with the clip its paper / TRL recommend (docs/algorithms.md); the rest: the quickstart's
    "ppo_clip": {}, "sapo": {},
    "gspo": {"grpo.loss.eps_low": 3e-4, "grpo.loss.eps_high": 4e-4},
    "gspo_token": {"grpo.loss.eps_low": 3e-4, "grpo.loss.eps_high": 4e-4},
    "cispo": {"grpo.loss.eps_low": 1.0, "grpo.loss.eps_high": 4.0},  # TRL's epsilon_high = 5 (ScaleRL), no lower cap
    "gmpo": {"grpo.loss.eps_low": 0.4, "grpo.loss.eps_high": 0.4, "grpo.loss.agg": "seq-mean-token-mean"}}
DPO_LOSSES = {  # loss_type -> its settings (TRL's defaults where TRL has the loss: SimPO beta 2, gamma = 0.5 beta)
    "sigmoid": {"dpo.beta": 0.1}, "ipo": {"dpo.beta": 0.1},
    "simpo": {"dpo.beta": 2.0, "dpo.simpo_gamma": 1.0}, "orpo": {"dpo.beta": 0.1}}


def _train(config: Path, run_dir: Path, sets: dict, threads: int, timeout: float) -> float:
    """One nova_rt run; returns its wall seconds. A failed run raises with the tail of its log."""
    argv = [sys.executable, "-m", "nova_rt.train", "--config", str(config)]
    base = {"run.dir": str(run_dir), "train.num_threads": threads, "logging.plot": False,
            "logging.tensorboard": False, "logging.progress_bar": False, "checkpoint.every": 0}
    for key, value in {**base, **sets}.items():
        argv += ["--set", f"{key}={value}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(threads, 1)), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(argv[4:])}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _flat_correct(eval_file: Path) -> list[float]:
    correct = json.loads(eval_file.read_text())["correct"]
    return [float(x) for category in sorted(correct) for x in correct[category]]


def grpo_run(args, mode: str, advantage: str, seed: int, work: Path) -> dict:
    config = ROOT / "configs" / ("tiny_grpo.yaml" if args.tiny else "quickstart_grpo.yaml")
    run_dir = work / f"grpo_{mode}_{advantage}_{seed}"
    sets = {"run.seed": seed, "grpo.loss.advantage": advantage, "train.max_steps": args.max_steps,
            "grpo.eval.every": args.eval_every, "checkpoint.save_final": False, "grpo.ppo_epochs": args.ppo_epochs}
    if mode != "ppo_clip":
        sets["grpo.loss.mode"] = mode
    sets.update(MODE_SETTINGS[mode])
    for item in args.set:
        key, _, value = item.partition("=")
        sets[key] = value
    wall = _train(config, run_dir, sets, args.threads, args.timeout)
    rows = _rows(run_dir)
    initial, final = _flat_correct(run_dir / "eval_initial.json"), _flat_correct(run_dir / "eval_final.json")
    curve, seconds = [(0, 0.0, statistics.fmean(initial))], 0.0
    for row in rows:  # an eval row holds the accuracy before that row's updates: the time of the steps before it
        if "eval_accuracy" in row and row["step"] > args.ppo_epochs:  # evaluated before this rollout's updates
            curve.append((row["step"] - args.ppo_epochs, seconds, row["eval_accuracy"]))
        seconds += row["rollout_time_s"] + row["train_time_s"]
    curve.append((rows[-1]["step"], seconds, statistics.fmean(final)))
    gains = [b - a for a, b in zip(initial, final)]
    return {"part": "grpo", "mode": mode, "advantage": advantage, "seed": seed, "wall_s": wall,
            "train_s": seconds, "step_s": statistics.fmean(row["step_time_s"] for row in rows),
            "initial": statistics.fmean(initial), "final": statistics.fmean(final),
            "gain": statistics.fmean(gains), "gain_se": statistics.stdev(gains) / math.sqrt(len(gains)),
            "zero_adv_frac": statistics.fmean(row.get("zero_adv_frac", 0.0) for row in rows),
            "curve": curve}


def _pair_scores(model_dir: str, pairs: list[dict]) -> list[tuple[float, float, int, int]]:
    """(sum log-prob chosen, rejected, their token counts) per pair, fp32, the model's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for pair in pairs:
            prompt = tok.apply_chat_template([{"role": "user", "content": pair["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            sums = []
            for reply in (pair["chosen"], pair["rejected"]):
                reply_ids = tok(reply + tok.eos_token, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt_ids + reply_ids])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
                targets = ids[0, 1:]
                token_lp = logprobs.gather(1, targets[:, None])[:, 0][len(prompt_ids) - 1:]
                sums.append((float(token_lp.sum()), len(reply_ids)))
            out.append((sums[0][0], sums[1][0], sums[0][1], sums[1][1]))
    return out


def dpo_run(args, loss_type: str, seed: int, work: Path, initial_dir: str, initial_scores, pairs) -> dict:
    config = ROOT / "configs" / ("tiny_dpo.yaml" if args.tiny else "quickstart_dpo.yaml")
    run_dir = work / f"dpo_{loss_type}_{seed}"
    sets = {"run.seed": seed, "model.path": initial_dir, "dpo.loss_type": loss_type, **DPO_LOSSES[loss_type],
            "checkpoint.save_final": True}
    if args.max_steps:
        sets["train.max_steps"] = args.max_steps
    for item in args.set:
        key, _, value = item.partition("=")
        sets[key] = value
    wall = _train(config, run_dir, sets, args.threads, args.timeout)
    rows = _rows(run_dir)
    evals = [row for row in rows if "eval_accuracy" in row]
    scores = _pair_scores(str(run_dir / "final"), pairs)
    mean_acc = [float(c / nc > r / nr) for c, r, nc, nr in scores]
    implicit = [float((c - c0) - (r - r0) > 0) for (c, r, _, _), (c0, r0, _, _) in zip(scores, initial_scores)]
    return {"part": "dpo", "loss_type": loss_type, "seed": seed, "wall_s": wall,
            "train_s": sum(row.get("step_time_s", 0.0) for row in rows),
            "own_eval_accuracy_first": evals[0]["eval_accuracy"] if evals else None,
            "own_eval_accuracy_last": evals[-1]["eval_accuracy"] if evals else None,
            "mean_logp_accuracy": statistics.fmean(mean_acc), "implicit_reward_accuracy": statistics.fmean(implicit)}


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def summarise(runs: list[dict], keys: tuple[str, ...], measures: tuple[str, ...]) -> list[dict]:
    table = {}
    for run in runs:
        table.setdefault(tuple(run[k] for k in keys), []).append(run)
    rows = []
    for key, group in table.items():
        row = dict(zip(keys, key), seeds=len(group))
        for measure in measures:
            values = [run[measure] for run in group if run.get(measure) is not None]
            if values:
                row[measure], row[f"{measure}_se"] = statistics.fmean(values), _se(values)
        rows.append(row)
    return sorted(rows, key=lambda row: -row.get(measures[0], 0.0))


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    curves = {}
    for run in runs:
        curves.setdefault(f"{run['mode']} / {run['advantage']}", []).append(run["curve"])
    for label, group in sorted(curves.items()):
        points = len(min(group, key=len))
        xs = [statistics.fmean(curve[i][1] for curve in group) for i in range(points)]
        ys = [statistics.fmean(curve[i][2] for curve in group) for i in range(points)]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("training seconds (rollout + update, eval excluded)")
    ax.set_ylabel("held-out greedy accuracy (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["grpo", "dpo"], default="grpo")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--advantages", default=",".join(ADVANTAGES))
    p.add_argument("--losses", default=",".join(DPO_LOSSES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", type=int, default=None, help="default: the config's (GRPO quickstart 24)")
    p.add_argument("--eval-every", type=int, default=6, help="GRPO eval every N rollout steps")
    p.add_argument("--ppo-epochs", type=int, default=2, help="GRPO optimizer steps per rollout batch (see above)")
    p.add_argument("--threads", type=int, default=0, help="train.num_threads (0: every core)")
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every run")
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--tiny", action="store_true", help="the tiny configs: checks the script in seconds")
    p.add_argument("--out", default=None)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no runs: combine these result files of one --part (e.g. sweeps split over processes) into "
                        "--out, with the summary, table and PNG over all their runs")
    args = p.parse_args(argv)
    if args.merge:
        merge(args)
        return
    if args.part == "grpo" and args.max_steps is None:
        args.max_steps = 4 if args.tiny else 24
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_algorithms_"))
    name = f"bench_algorithms_{args.part}{'_tiny' if args.tiny else ''}.json"
    out = Path(args.out) if args.out else RESULTS_DIR / name
    runs = []
    if args.part == "grpo":
        for seed in seeds:  # seeds outermost: a load change hits every setting of a seed alike
            for mode in args.modes.split(","):
                for advantage in args.advantages.split(","):
                    runs.append(grpo_run(args, mode, advantage, seed, work))
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
                    write(out, args, runs)  # after every run: an interrupted sweep keeps what it measured
    else:
        pairs = [json.loads(line) for line in (ROOT / "data" / "preference" / "arith_pairs_eval.jsonl")
                 .read_text().splitlines()]
        initial_dir = _initial_model_dir(args, work)
        initial_scores = _pair_scores(initial_dir, pairs)
        for seed in seeds:
            for loss_type in args.losses.split(","):
                runs.append(dpo_run(args, loss_type, seed, work, initial_dir, initial_scores, pairs))
                print(json.dumps(runs[-1]), flush=True)
                write(out, args, runs)
    print(markdown_table(*_summary(args.part, runs)))
    if args.part == "grpo":
        plot(runs, out.with_suffix(".png"))
    print(f"wrote {out}")


def _summary(part: str, runs: list[dict]) -> tuple[list[dict], list[str]]:
    if part == "grpo":
        return (summarise(runs, ("mode", "advantage"), ("final", "gain", "train_s", "step_s", "zero_adv_frac")),
                ["mode", "advantage", "seeds", "final", "final_se", "gain", "gain_se", "train_s", "step_s",
                 "zero_adv_frac"])
    return (summarise(runs, ("loss_type",), ("mean_logp_accuracy", "implicit_reward_accuracy",
                                             "own_eval_accuracy_last", "train_s")),
            ["loss_type", "seeds", "mean_logp_accuracy", "mean_logp_accuracy_se", "implicit_reward_accuracy",
             "implicit_reward_accuracy_se", "own_eval_accuracy_last", "train_s"])


def write(out: Path, args, runs: list[dict]) -> None:
    """The JSON of every run so far, its summary and the markdown table (temp file, then rename)."""
    summary, columns = _summary(args.part, runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": "bench_algorithms", "part": args.part, "args": vars(args),
                               "env": environment(), "summary": summary, "table": markdown_table(summary, columns),
                               "runs": runs}, indent=2))
    os.replace(tmp, out)


def merge(args) -> None:
    """One result file from several of the same part: every run once (a run is keyed by its settings and seed; a
    repeated key is an error, not silently dropped), the environments and arguments of each source kept."""
    sources = [json.loads(Path(name).read_text()) for name in args.merge]
    parts = {source["part"] for source in sources}
    if parts != {args.part}:
        raise SystemExit(f"--merge: the files hold parts {sorted(parts)}; pass --part to match one part")
    keys = ("mode", "advantage", "seed") if args.part == "grpo" else ("loss_type", "seed")
    runs, seen = [], {}
    for name, source in zip(args.merge, sources):
        for run in source["runs"]:
            key = tuple(run[k] for k in keys)
            if key in seen:
                raise SystemExit(f"--merge: run {dict(zip(keys, key))} is in both {seen[key]} and {name}")
            seen[key] = name
            runs.append(run)
    out = Path(args.out) if args.out else RESULTS_DIR / f"bench_algorithms_{args.part}.json"
    summary, columns = _summary(args.part, runs)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": "bench_algorithms", "part": args.part,
                               "args": [source["args"] for source in sources],
                               "env": [source["env"] for source in sources], "merged_from": list(args.merge),
                               "summary": summary, "table": markdown_table(summary, columns), "runs": runs},
                              indent=2))
    os.replace(tmp, out)
    print(markdown_table(summary, columns))
    if args.part == "grpo":
        plot(runs, out.with_suffix(".png"))
    print(f"wrote {out}")


def _initial_model_dir(args, work: Path) -> str:
    """The model every DPO run starts from, as an HF directory: the quickstart's builtin model, or (--tiny) one tiny
    random Llama saved once (a tiny: path would build a new one per seed)."""
    if args.tiny:
        from nova_rt.models.tiny import save_tiny_model

        return str(save_tiny_model(work / "tiny", "llama", seed=0, hidden=64, layers=2, heads=4, kv_heads=2,
                                   intermediate=128))
    from nova_rt.models.loading import resolve_model_path

    return resolve_model_path("builtin:smollm2-135m-instruct")


if __name__ == "__main__":
    main()
