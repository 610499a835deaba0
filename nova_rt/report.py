"""`<run dir>/report.md` for a pipeline run: a metrics table per stage, PNG plots (loss, reward, KL, utilization)
and the per-category eval before and after GRPO. Every number is read from the stages' metrics.jsonl (and GRPO's
eval_final.json), so the report can be checked against them."""

from __future__ import annotations

import json
from pathlib import Path

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
    return [(label, d) for label, d in out if (d / "metrics.jsonl").exists()]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summarize(rows: list[dict]) -> dict[str, tuple]:
    """{metric: (first, last, mean)} over the steps that logged it."""
    out = {}
    for key, _ in COLUMNS:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
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
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="." if len(pts) < 60 else None)
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
    first = next((r for r in rows if "eval_accuracy" in r), {})
    before = {k.split("/", 1)[1]: v for k, v in first.items() if k.startswith("eval_accuracy/")}
    after = {}
    final = grpo_dir / "eval_final.json"
    if final.exists():
        data = json.loads(final.read_text())
        after = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("eval_accuracy/")}
    return before, after


def write_report(run_dir: str | Path, cfg, artifacts: dict) -> Path:
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    lines = ["# nova_rt pipeline report", "", f"Config: `{cfg.source}`; stages: {', '.join(artifacts)}.", ""]
    series: dict[str, dict[str, list]] = {"loss": {}, "reward_mean": {}, "kl": {}, "pack_utilization": {}}
    lines += ["## Metrics per stage", "",
              "Columns: the first, last and mean value over the stage's optimizer steps, from its metrics.jsonl.", ""]
    for label, d in stage_dirs(run_dir, artifacts):
        rows = read_metrics(d / "metrics.jsonl")
        summ = summarize(rows)
        n_steps = len({r["step"] for r in rows if r.get("step", 0) > 0})
        lines += [f"### {label}", "", f"{n_steps} steps; metrics: `{d / 'metrics.jsonl'}`", "",
                  "| metric | first | last | mean |", "|---|---|---|---|"]
        for key, name in COLUMNS:
            if key in summ:
                f, last, mean = summ[key]
                lines.append(f"| {name} | {_fmt(f)} | {_fmt(last)} | {_fmt(mean)} |")
        lines.append("")
        for key in series:
            series[key][label] = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
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
            lines.append("No eval sets were configured (grpo.eval_every = 0).")
        lines.append("")
    lines += ["## Artifacts", "", "```json", json.dumps(artifacts, indent=2), "```", ""]
    out = run_dir / "report.md"
    tmp = run_dir / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    return out
