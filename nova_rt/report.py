"""`<run dir>/report.md` for a pipeline run: first whether each stage made the model better on held-out items
(before -> after, with the noise of the change), then a metrics table per stage, PNG plots (loss, reward, KL,
utilization) and the per-category eval before and after GRPO. Every number is read from the stages' metrics.jsonl,
GRPO's eval_final.json and the merge stage's heldout.json, so the report can be checked against them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from nova_rt.telemetry import read_metrics

# (metric, label) columns per stage kind; a column appears when the stage logged it.
COLUMNS = [("loss", "loss"), ("reward_mean", "reward"), ("accuracy", "accuracy"), ("kl", "KL"),
           ("eval_accuracy", "eval acc"), ("pack_utilization", "pack util"), ("tokens_per_s", "tok/s")]


def stage_dirs(run_dir: Path, artifacts: dict) -> list[tuple[str, Path]]:
    """(label, dir) of every stage that wrote metrics, in pipeline order."""
    out = []
    if (run_dir / "pas" / "pas_model" / "metrics.jsonl").exists():
        out.append(("pas (PAS model SFT)", run_dir / "pas" / "pas_model"))
    for name in artifacts.get("sft", {}).get("models", {}):
        out.append((f"sft/{name}", run_dir / "sft" / name))
    for stage in ("rm", "grpo"):
        if (run_dir / stage / "metrics.jsonl").exists():
            out.append((stage, run_dir / stage))
    return [(label, directory) for label, directory in out if (directory / "metrics.jsonl").exists()]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summarize(rows: list[dict]) -> dict[str, tuple]:
    """{metric: (first, last, mean)} over the steps that logged it."""
    out = {}
    for key, _ in COLUMNS:
        vals = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        if vals:
            out[key] = (float(vals[0]), float(vals[-1]), float(sum(vals) / len(vals)))
    return out


def _plot(series: dict[str, list[tuple[int, float]]], title: str, path: Path) -> bool:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        ax.plot([point[0] for point in points], [point[1] for point in points], label=label,
                marker="." if len(points) < 60 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def eval_before_after(grpo_dir: Path) -> tuple[dict, dict]:
    """Per-category accuracy at GRPO's first eval (before any update) and at its final eval."""
    rows = read_metrics(grpo_dir / "metrics.jsonl")
    first = next((row for row in rows if "eval_accuracy" in row), {})
    before = {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith("eval_accuracy/")}
    after = {}
    final = grpo_dir / "eval_final.json"
    if final.exists():
        data = json.loads(final.read_text())
        after = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("eval_accuracy/")}
    return before, after


# ----------------------------------------------------------------------------------------------- held-out
def paired_nll_change(before: list, after: list) -> tuple[float, float]:
    """(change of NLL per token, its standard error) between two models scored on the same documents
    ([summed NLL, tokens] each): a ratio estimate whose error comes from the per-document differences."""
    before_array, after_array = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before_array.shape != after_array.shape or not np.array_equal(before_array[:, 1], after_array[:, 1]):
        raise ValueError("paired_nll_change: the two models were not scored on the same documents")
    tokens, diff = before_array[:, 1], after_array[:, 0] - before_array[:, 0]
    change = float(diff.sum() / tokens.sum())
    n = len(diff)
    resid = diff - change * tokens
    standard_error = float(math.sqrt(n / (n - 1) * (resid ** 2).sum()) / tokens.sum()) if n > 1 else float("nan")
    return change, standard_error


def accuracy_change_se(p0: float, p1: float, n0: float, n1: float) -> float:
    """Standard error of p1 - p0 for two accuracies over n0 and n1 items, taken as independent (conservative for
    the same items scored twice)."""
    return math.sqrt(p0 * (1 - p0) / max(n0, 1) + p1 * (1 - p1) / max(n1, 1))


def paired_accuracy_change(before: dict[str, list], after: dict[str, list]) -> tuple[float, float]:
    """(change of accuracy, its standard error) from per-prompt correctness {category: [0/1 per prompt]} of the same
    prompts before and after: the mean and s.e. of the per-prompt differences (only flipped prompts add noise)."""
    if before.keys() != after.keys() or any(len(before[category]) != len(after[category]) for category in before):
        raise ValueError("paired_accuracy_change: the two evals did not score the same prompts")
    differences = np.array([after_value - before_value for category in before
                            for before_value, after_value in zip(before[category], after[category])], dtype=np.float64)
    if len(differences) < 2:
        return (float(differences.mean()) if len(differences) else 0.0), float("nan")
    return float(differences.mean()), float(differences.std(ddof=1) / math.sqrt(len(differences)))


def verdict(change: float, se: float, higher_is_better: bool) -> str:
    if not math.isfinite(se):
        return "too few items to tell"
    gain = change if higher_is_better else -change
    if gain > 2 * se:
        return "better (beyond noise)"
    if gain < -2 * se:
        return "**worse** (beyond noise)"
    return "**no change beyond noise**"


def _nll(docs: list) -> float:
    array = np.asarray(docs, dtype=np.float64)
    return float(array[:, 0].sum() / array[:, 1].sum())


def heldout_rows(run_dir: Path, artifacts: dict) -> list[dict]:
    """One dict per held-out comparison: stage, measure, items, before, after, change, se, verdict."""
    rows: list[dict] = []
    add = lambda stage, measure, items, before, after, standard_error, higher_is_better: rows.append(  # noqa: E731
        {"stage": stage, "measure": measure, "items": items, "before": before, "after": after,
         "change": after - before, "se": standard_error,
         "verdict": verdict(after - before, standard_error, higher_is_better)})
    held = run_dir / "merge" / "heldout.json"
    table = json.loads(held.read_text()) if held.exists() else None
    for name in artifacts.get("sft", {}).get("models", {}):
        if table and name in table["eval_sets"]:  # paired: the same documents under both models
            base, tuned = table["nll"]["base"][name], table["nll"][f"sft/{name}"][name]
            change, standard_error = paired_nll_change(base, tuned)
            add(f"sft/{name}", f"NLL/token on held-out {name} rows (lower is better)", len(base),
                _nll(base), _nll(base) + change, standard_error, False)
            continue
        evals = [row for row in read_metrics(run_dir / "sft" / name / "metrics.jsonl") if "eval_loss" in row]
        if len(evals) >= 2 and evals[0].get("step") == 0:
            first_eval, last_eval = evals[0], evals[-1]
            add(f"sft/{name}", f"NLL/token on held-out {name} rows (lower is better)", int(first_eval["eval_docs"]),
                first_eval["eval_loss"], last_eval["eval_loss"],
                math.hypot(first_eval["eval_loss_se"], last_eval["eval_loss_se"]), False)
    if table and "merged" in table["nll"]:
        nll = table["nll"]
        for eval_set in table["eval_sets"]:
            change, standard_error = paired_nll_change(nll["base"][eval_set], nll["merged"][eval_set])
            add("merge", f"NLL/token on held-out {eval_set} rows: base -> merged (lower is better)",
                len(nll["base"][eval_set]), _nll(nll["base"][eval_set]), _nll(nll["base"][eval_set]) + change,
                standard_error, False)
        inputs = [model for model in nll if model.startswith("sft/")]
        if inputs:  # the merged model against its best input, on the mean over every slice's held-out rows
            sets = list(table["eval_sets"])
            mean = {model: sum(_nll(nll[model][eval_set]) for eval_set in sets) / len(sets)
                    for model in [*inputs, "merged"]}
            best = min(inputs, key=mean.get)
            pairs = [paired_nll_change(nll[best][eval_set], nll["merged"][eval_set]) for eval_set in sets]
            standard_error = math.sqrt(sum(pair_se ** 2 for _, pair_se in pairs)) / len(sets)
            add("merge", f"mean NLL/token over {', '.join(sets)}: best input ({best}) -> merged (lower is better)",
                sum(len(nll[best][eval_set]) for eval_set in sets), mean[best],
                mean[best] + sum(pair_change for pair_change, _ in pairs) / len(sets), standard_error, False)
    rm_evals = [row for row in read_metrics(run_dir / "rm" / "metrics.jsonl") if "eval_accuracy" in row]
    if len(rm_evals) >= 2 and rm_evals[0].get("step") == 0:
        first_eval, last_eval = rm_evals[0], rm_evals[-1]
        n = int(round(first_eval.get("eval_pairs", float("nan")))) if "eval_pairs" in first_eval else 0
        before_accuracy, after_accuracy = first_eval["eval_accuracy"], last_eval["eval_accuracy"]
        add("rm", "pair accuracy on held-out preference pairs (higher is better)", n or "?", before_accuracy,
            after_accuracy, accuracy_change_se(before_accuracy, after_accuracy, n, n) if n else math.nan, True)
    first = next((row for row in read_metrics(run_dir / "grpo" / "metrics.jsonl") if "eval_accuracy" in row), None)
    initial_path, final_path = run_dir / "grpo" / "eval_initial.json", run_dir / "grpo" / "eval_final.json"
    if initial_path.exists():
        first = json.loads(initial_path.read_text())
    if first is not None and final_path.exists():
        final = json.loads(final_path.read_text())
        n0, n1 = first.get("eval_n", 0), final.get("eval_n", 0)
        if "correct" in first and "correct" in final:  # paired: the same prompts before and after
            change, standard_error = paired_accuracy_change(first["correct"], final["correct"])
        else:
            change = final["eval_accuracy"] - first["eval_accuracy"]
            standard_error = (accuracy_change_se(first["eval_accuracy"], final["eval_accuracy"], n0, n1)
                              if n0 and n1 else math.nan)
        add("grpo", "greedy accuracy on held-out prompts (higher is better)", int(n0) or "?",
            first["eval_accuracy"], first["eval_accuracy"] + change, standard_error, True)
    return rows


def heldout_section(run_dir: Path, artifacts: dict) -> list[str]:
    rows = heldout_rows(run_dir, artifacts)
    lines = ["## Did the pipeline make the model better? (held-out)", ""]
    if not rows:
        return lines + ["No stage had a held-out set (sft_slices[].eval_files, rm/grpo eval sets).", ""]
    lines += ["Each row scores items no stage trained on, before and after a stage. `± 2 s.e.` is twice the standard "
              "error of the change (paired per document or prompt where both scores are kept, else two binomial "
              "errors); the "
              "verdict says whether the change is larger than that.", "",
              "| stage | measure | items | before | after | change ± 2 s.e. | verdict |",
              "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['measure']} | {row['items']} | {row['before']:.4f} | "
                     f"{row['after']:.4f} | {row['change']:+.4f} ± {2 * row['se']:.4f} | {row['verdict']} |")
    bad = [row for row in rows if not row["verdict"].startswith("better")]
    lines += ["", f"{len(rows) - len(bad)} of {len(rows)} held-out measures improved beyond noise." +
              (f" Not improved: {'; '.join(row['stage'] + ' (' + row['measure'].split(' (')[0] + ')' for row in bad)}."
               if bad else ""), ""]
    held = run_dir / "merge" / "heldout.json"
    if held.exists():
        table = json.loads(held.read_text())
        sets = list(table["eval_sets"])
        lines += ["Held-out NLL per token of every model on every slice's eval rows (`merge/heldout.json`):", "",
                  "| model | " + " | ".join(sets) + " | mean |", "|---|" + "---|" * (len(sets) + 1)]
        for model, per in table["nll"].items():
            vals = [_nll(per[eval_set]) for eval_set in sets]
            lines.append(f"| {model} | " + " | ".join(f"{value:.4f}" for value in vals)
                         + f" | {sum(vals) / len(vals):.4f} |")
        lines.append("")
    return lines


def write_report(run_dir: str | Path, cfg, artifacts: dict) -> Path:
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    lines = ["# nova_rt pipeline report", "", f"Config: `{cfg.source}`; stages: {', '.join(artifacts)}.", ""]
    lines += heldout_section(run_dir, artifacts)
    series: dict[str, dict[str, list]] = {"loss": {}, "reward_mean": {}, "kl": {}, "pack_utilization": {}}
    lines += ["## Metrics per stage", "",
              "Columns: the first, last and mean value over the stage's optimizer steps, from its metrics.jsonl.", ""]
    for label, stage_dir in stage_dirs(run_dir, artifacts):
        rows = read_metrics(stage_dir / "metrics.jsonl")
        summ = summarize(rows)
        n_steps = len({row["step"] for row in rows if row.get("step", 0) > 0})
        lines += [f"### {label}", "", f"{n_steps} steps; metrics: `{stage_dir / 'metrics.jsonl'}`", "",
                  "| metric | first | last | mean |", "|---|---|---|---|"]
        for key, name in COLUMNS:
            if key in summ:
                first, last, mean = summ[key]
                lines.append(f"| {name} | {_fmt(first)} | {_fmt(last)} | {_fmt(mean)} |")
        lines.append("")
        for key in series:
            series[key][label] = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
    lines += ["## Plots", ""]
    for key, title in [("loss", "training loss"), ("reward_mean", "GRPO mean reward"), ("kl", "GRPO KL"),
                       ("pack_utilization", "SFT pack utilization")]:
        png = plots_dir / f"{key}.png"
        if _plot(series[key], title, png):
            lines.append(f"![{title}](plots/{png.name})")
    lines.append("")
    if "grpo" in artifacts:
        before, after = eval_before_after(run_dir / "grpo")
        lines += ["## Per-category eval (greedy accuracy)", ""]
        if before or after:
            lines += ["| category | before GRPO | after GRPO |", "|---|---|---|"]
            for cat in sorted(set(before) | set(after)):
                lines.append(f"| {cat} | {_fmt(before.get(cat, '-'))} | {_fmt(after.get(cat, '-'))} |")
        else:
            lines.append("No eval sets were configured (grpo.eval.every = 0).")
        lines.append("")
    times = {k: v["wall_s"] for k, v in artifacts.items() if isinstance(v, dict) and "wall_s" in v}
    if times:
        lines += ["## Stage wall times", "", "Seconds each stage took in the run that finished it: " +
                  ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f" (total {sum(times.values()):.0f} s).",
                  ""]
    lines += ["## Artifacts", "", "```json", json.dumps(artifacts, indent=2), "```", ""]
    out = run_dir / "report.md"
    tmp = run_dir / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    return out
