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
        return {row["id"]: heuristic_quality(row["prompt"]) for row in rows}
    path = out_dir / "quality.jsonl"
    scores = {row["id"]: row["quality"] for row in read_jsonl(path)} if path.exists() else {}
    todo = [row for row in rows if row["id"] not in scores]
    if todo:
        judge = JudgeScorer(client_fn())
        with JsonlAppender(path) as out:
            for i, score, source in judge.stream([row["prompt"] for row in todo]):
                scores[todo[i]["id"]] = score
                out.write({"id": todo[i]["id"], "quality": score, "source": source})
    return scores


def _categorize(rows: list[dict], pas, embedder, seeds: dict[str, list[GoldenExample]]) -> list[str]:
    mode = pas.curate.categorizer
    if mode == "given":
        missing = [row["id"] for row in rows if "category" not in row]
        if missing:
            raise ValueError(f"pas.curate.categorizer=given but {len(missing)} rows have no 'category' "
                             f"(first: {missing[0]})")
        return [row["category"] for row in rows]
    if mode == "keyword":
        return KeywordCategorizer(pas.curate.keywords)([row["prompt"] for row in rows])
    anchors = {category: [example.prompt for example in examples] for category, examples in seeds.items()}
    for category, extra in pas.curate.anchors.items():
        anchors.setdefault(category, []).extend(extra)
    return EmbeddingCategorizer(embedder, anchors)([row["prompt"] for row in rows])


def curate_step(pas, input_files: list[str], out_dir: Path, embedder, seeds, client_fn) -> tuple[list[dict], dict]:
    """Load -> dedup -> quality filter -> categories -> quotas; see the module docstring."""
    path = out_dir / "curated.jsonl"
    if path.exists():
        rows = list(read_jsonl(path))
        return rows, {"reused": True, "kept": len(rows), "per_category": dict(Counter(row["category"] for row in rows))}
    raw, skipped = load_prompts(input_files)
    dedup = pas.dedup
    res = find_duplicates([row["prompt"] for row in raw], jaccard=dedup.jaccard, cosine=dedup.cosine, embedder=embedder,
                          num_perm=dedup.num_perm, shingle=dedup.shingle)
    dropped = [{"id": raw[i]["id"], "reason": f"duplicate:{kind}", "of": raw[j]["id"],
                "similarity": round(similarity, 4)}
               for i, (j, kind, similarity) in sorted(res.dup_of.items())]
    rows = [raw[i] for i in res.keep]
    scores = _quality(rows, pas, out_dir, client_fn)
    good = []
    for row in rows:
        quality = scores[row["id"]]
        if quality >= pas.curate.min_quality:
            good.append({**row, "quality": quality})
        else:
            dropped.append({"id": row["id"], "reason": "low_quality", "quality": quality})
    for row, cat in zip(good, _categorize(good, pas, embedder, seeds)):
        row["given_category"], row["category"] = row.get("category"), cat
    selected = select_with_quotas(good, pas.curate.quotas, pas.curate.default_quota)
    chosen = {row["id"] for row in selected}
    dropped += [{"id": row["id"], "reason": "over_quota", "category": row["category"]} for row in good
                if row["id"] not in chosen]
    curated = [{"id": row["id"], "prompt": row["prompt"], "category": row["category"], "quality": row["quality"]}
               for row in selected]
    write_jsonl_atomic(out_dir / "dropped.jsonl", dropped)
    write_jsonl_atomic(path, curated)  # last: its presence means curation finished
    stats = {"loaded": len(raw), **{f"skipped_{k}": v for k, v in skipped.items()},
             "duplicates": res.counts(), "low_quality": sum(entry["reason"] == "low_quality" for entry in dropped),
             "over_quota": len(good) - len(selected), "kept": len(curated),
             "per_category": dict(sorted(Counter(row["category"] for row in curated).items()))}
    return curated, stats


def pairs_step(critiqued: list[dict], out_dir: Path) -> dict:
    """Kept complements -> SFT rows in the PAS template; rewritten whole each run (cheap and deterministic)."""
    rows = [{"id": row["id"], "category": row["category"],
             "messages": [{"role": "user", "content": format_pas_input(row["prompt"])},
                          {"role": "assistant", "content": row["complement"]}]}
            for row in critiqued if row["status"] == "kept"]
    write_jsonl_atomic(out_dir / "sft_pairs.jsonl", rows)
    return {"pairs": len(rows), "per_category": dict(sorted(Counter(row["category"] for row in rows).items()))}


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
