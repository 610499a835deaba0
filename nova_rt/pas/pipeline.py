"""The PAS sub-steps as functions of the `pas` config section, each reading and writing files under `out_dir`:

    curate   input_files -> curated.jsonl (+ dropped.jsonl: why each removed prompt went, quality.jsonl: scores)
    generate curated.jsonl -> generated.jsonl
    critique generated.jsonl -> critiqued.jsonl (kept and rejected rows, with the reasons)
    pairs    critiqued.jsonl (kept) -> sft_pairs.jsonl: {"messages": [user: PAS template, assistant: complement]}
    train    sft_pairs.jsonl -> <run.dir>/pas_model/final through the SFT stage

curated.jsonl is written whole (atomically) once curation has finished and is reused as is on a rerun; the judge
scores behind it, generated.jsonl and critiqued.jsonl are appended per finished row and skip finished ids. Every
step returns a dict of counts; the stage prints them.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from nova_rt.pas.curate import (
    EmbeddingCategorizer,
    JudgeScorer,
    KeywordCategorizer,
    heuristic_quality,
    load_prompts,
    select_with_quotas,
)
from nova_rt.pas.dedup import find_duplicates
from nova_rt.pas.records import JsonlAppender, read_jsonl, write_jsonl_atomic
from nova_rt.pas.template import GoldenExample, format_pas_input

log = logging.getLogger(__name__)


def _quality(rows: list[dict], pas, out_dir: Path, client_fn) -> dict[str, float]:
    """id -> quality score; judge scores are cached in quality.jsonl per row so a rerun resumes."""
    if pas.curate.quality_scorer == "heuristic":
        return {r["id"]: heuristic_quality(r["prompt"]) for r in rows}
    path = out_dir / "quality.jsonl"
    scores = {row["id"]: row["quality"] for row in read_jsonl(path)} if path.exists() else {}
    todo = [r for r in rows if r["id"] not in scores]
    if todo:
        judge = JudgeScorer(client_fn())
        with JsonlAppender(path) as out:
            for i, score, source in judge.stream([r["prompt"] for r in todo]):
                scores[todo[i]["id"]] = score
                out.write({"id": todo[i]["id"], "quality": score, "source": source})
    return scores


def _categorize(rows: list[dict], pas, embedder, seeds: dict[str, list[GoldenExample]]) -> list[str]:
    mode = pas.curate.categorizer
    if mode == "given":
        missing = [r["id"] for r in rows if "category" not in r]
        if missing:
            raise ValueError(f"pas.curate.categorizer=given but {len(missing)} rows have no 'category' "
                             f"(first: {missing[0]})")
        return [r["category"] for r in rows]
    if mode == "keyword":
        return KeywordCategorizer(pas.curate.keywords)([r["prompt"] for r in rows])
    anchors = {c: [ex.prompt for ex in exs] for c, exs in seeds.items()}
    for c, extra in pas.curate.anchors.items():
        anchors.setdefault(c, []).extend(extra)
    return EmbeddingCategorizer(embedder, anchors)([r["prompt"] for r in rows])


def curate_step(pas, input_files: list[str], out_dir: Path, embedder, seeds, client_fn) -> tuple[list[dict], dict]:
    """Load -> dedup -> quality filter -> categories -> quotas; see the module docstring."""
    path = out_dir / "curated.jsonl"
    if path.exists():
        rows = list(read_jsonl(path))
        return rows, {"reused": True, "kept": len(rows), "per_category": dict(Counter(r["category"] for r in rows))}
    raw, skipped = load_prompts(input_files)
    d = pas.dedup
    res = find_duplicates([r["prompt"] for r in raw], jaccard=d.jaccard, cosine=d.cosine, embedder=embedder,
                          num_perm=d.num_perm, shingle=d.shingle)
    dropped = [{"id": raw[i]["id"], "reason": f"duplicate:{kind}", "of": raw[j]["id"], "similarity": round(s, 4)}
               for i, (j, kind, s) in sorted(res.dup_of.items())]
    rows = [raw[i] for i in res.keep]
    scores = _quality(rows, pas, out_dir, client_fn)
    good = []
    for r in rows:
        q = scores[r["id"]]
        if q >= pas.curate.min_quality:
            good.append({**r, "quality": q})
        else:
            dropped.append({"id": r["id"], "reason": "low_quality", "quality": q})
    for r, cat in zip(good, _categorize(good, pas, embedder, seeds)):
        r["given_category"], r["category"] = r.get("category"), cat
    selected = select_with_quotas(good, pas.curate.quotas, pas.curate.default_quota)
    chosen = {r["id"] for r in selected}
    dropped += [{"id": r["id"], "reason": "over_quota", "category": r["category"]} for r in good
                if r["id"] not in chosen]
    curated = [{"id": r["id"], "prompt": r["prompt"], "category": r["category"], "quality": r["quality"]}
               for r in selected]
    write_jsonl_atomic(out_dir / "dropped.jsonl", dropped)
    write_jsonl_atomic(path, curated)  # last: its presence means curation finished
    stats = {"loaded": len(raw), **{f"skipped_{k}": v for k, v in skipped.items()},
             "duplicates": res.counts(), "low_quality": sum(x["reason"] == "low_quality" for x in dropped),
             "over_quota": len(good) - len(selected), "kept": len(curated),
             "per_category": dict(sorted(Counter(r["category"] for r in curated).items()))}
    return curated, stats


def pairs_step(critiqued: list[dict], out_dir: Path) -> dict:
    """Kept complements -> SFT rows in the PAS template; rewritten whole each run (cheap and deterministic)."""
    rows = [{"id": r["id"], "category": r["category"],
             "messages": [{"role": "user", "content": format_pas_input(r["prompt"])},
                          {"role": "assistant", "content": r["complement"]}]}
            for r in critiqued if r["status"] == "kept"]
    write_jsonl_atomic(out_dir / "sft_pairs.jsonl", rows)
    return {"pairs": len(rows), "per_category": dict(sorted(Counter(r["category"] for r in rows).items()))}


def train_step(cfg, pairs_path: Path, model_dir: Path, overrides: dict) -> dict:
    """Train the PAS model with the SFT stage on the pairs; skipped when model_dir/final already holds a model."""
    final = model_dir / "final"
    if (final / "config.json").exists():
        return {"reused": True, "final": str(final)}
    from nova_rt.stages import get_stage

    sft_cfg = cfg.with_overrides({"run.stage": "sft", "run.dir": str(model_dir),
                                  "data.train_files": [str(pairs_path)], "data.eval_files": [], **overrides})
    result = get_stage("sft")(sft_cfg)
    return {"final": result.get("final"), "data": result.get("data")}
