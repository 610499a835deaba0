"""The whole Baichuan pipeline from one config: PAS -> SFT (one run per domain slice) -> merge (Model Stock) -> RM ->
GRPO on the merged model with the RM plus verifiers, then `<run.dir>/report.md`.

Each stage runs in its own directory `<run.dir>/<stage>` (SFT slices in `<run.dir>/sft/<slice>`) with the same
config plus its overrides (`pipeline.stage_overrides.<stage>`: dotted keys), and reads the artifacts of the stages
before it. A finished stage writes `STAGE_DONE.json` atomically and a rerun skips it; a killed stage resumes from
its own checkpoints. `report.md` shows held-out measures before -> after (docs/stages.md#pipeline).

    pipeline:
      stages: [pas, sft, merge, rm, grpo]
      sft_slices: [{name: math, train_files: [...], eval_files: [...]}, {name: chat, train_files: [...]}]
      merge_method: model_stock
      stage_overrides: {sft: {train.max_steps: 20}, rm: {data.train_files: [prefs.jsonl]}}
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nova_rt.config import Config, register_section, resolve_path
from nova_rt.distributed import DistInfo, barrier, broadcast_object
from nova_rt.stages import get_stage, register_stage
from nova_rt.stages.common import setup

log = logging.getLogger("nova_rt.pipeline")
StageName = Literal["pas", "sft", "merge", "rm", "grpo"]  # in pipeline order
MergeMethod = Literal["model_stock", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                      "breadcrumbs_ties", "della", "della_linear", "sce", "multislerp", "karcher", "ram", "ramplus_tl"]
STAGES: tuple[str, ...] = typing.get_args(StageName)
MERGE_METHODS: tuple[str, ...] = typing.get_args(MergeMethod)


@register_section("pipeline")
@dataclass(kw_only=True)
class PipelineConfig:
    stages: list[StageName] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in pipeline order (a subset of pas, sft, merge, rm, grpo)."""
    sft_slices: list[dict] = field(default_factory=list)
    """Domain slices: [{name, train_files, eval_files (optional: held-out rows of the slice)}]; one SFT run each,
    then merged. Empty: one slice of data.train_files (and data.eval_files)."""
    merge_method: MergeMethod = "model_stock"
    """How the SFT slices are merged: model_stock (the report's best), linear, task_arithmetic, ties, or another
    merge method that takes any number of models (`nova-rt merge --help` lists their parameters)."""
    merge_parameters: dict = field(default_factory=dict)
    """mergekit parameters: the method's per-model ones (`weight`, `density`, ...) go to every slice model (weight
    defaults to 1/N, an average; task_arithmetic usually wants 1.0, the sum of the task vectors), the rest are global
    (e.g. lambda, normalize)."""
    pas_augment_sft: bool = True
    """With the pas stage: append PAS complements to the first user turn of the SFT rows."""
    pas_augment_max_new_tokens: int = 64
    """Longest PAS complement (tokens, greedy) appended to each SFT prompt."""
    pas_augment_rl: bool = True
    """With the pas stage: GRPO prompts go through the PAS model (grpo.data.pas_model)."""
    rm_reward_weight: float = 1.0
    """With the rm stage: weight of the trained RM's score among GRPO's reward sources."""
    stage_overrides: dict = field(default_factory=dict)
    """{stage: {dotted.key: value}} applied to that stage's config."""
    prune_checkpoints: bool = True
    """Delete a stage's training checkpoints once it is done (its final model stays). A rerun skips finished stages,
    so nothing would read them; a 135M model's checkpoint (weights + AdamW state, fp32) is ~1.6 GB."""
    report: bool = True
    """Write <run.dir>/report.md, the held-out measures before -> after the stages, at the end."""

    def validate(self) -> None:
        if self.pas_augment_max_new_tokens < 1:
            raise ValueError(f"pipeline.pas_augment_max_new_tokens must be >= 1, got {self.pas_augment_max_new_tokens}")
        order = [STAGES.index(stage) for stage in self.stages]  # each item is a StageName (checked by the loader)
        if order != sorted(order) or len(set(order)) != len(order):
            raise ValueError(f"pipeline.stages must follow the order {list(STAGES)} without repeats")
        for i, sft_slice in enumerate(self.sft_slices):
            if (not isinstance(sft_slice, dict) or not isinstance(sft_slice.get("name"), str)
                    or not isinstance(sft_slice.get("train_files"), list)
                    or not isinstance(sft_slice.get("eval_files", []), list)
                    or set(sft_slice) - {"name", "train_files", "eval_files"}):
                raise ValueError(f"pipeline.sft_slices[{i}] must be {{name: str, train_files: [paths], "
                                 f"eval_files: [paths] (optional)}}, got {sft_slice!r}")
        for stage, ovr in self.stage_overrides.items():
            if stage not in STAGES or not isinstance(ovr, dict):
                raise ValueError(f"stage_overrides.{stage}: must name a stage and map dotted keys to values")


def _done_path(stage_dir: Path) -> Path:
    return stage_dir / "STAGE_DONE.json"


def _read_done(stage_dir: Path) -> dict | None:
    path = _done_path(stage_dir)
    return json.loads(path.read_text()) if path.exists() else None


def _mark_done(info: DistInfo, stage_dir: Path, outputs: dict) -> None:
    if info.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / "STAGE_DONE.json.tmp"
        tmp.write_text(json.dumps(outputs, indent=2))
        os.replace(tmp, _done_path(stage_dir))
    barrier()


def _sub_config(cfg: Config, stage: str, run_dir: Path, extra: dict) -> Config:
    ovr = {"run.stage": stage, "run.dir": str(run_dir)}
    ovr.update(extra)
    ovr.update(cfg.pipeline.stage_overrides.get(stage, {}))
    return cfg.with_overrides(ovr)


def _run_sub(stage: str, sub: Config) -> dict:
    out = get_stage(stage)(sub) or {}
    gc.collect()
    return out


class Pipeline:
    def __init__(self, cfg: Config, info: DistInfo, run_dir: Path):
        from nova_rt.models.loading import resolve_model_path

        self.cfg, self.info, self.dir = cfg, info, run_dir
        path = resolve_path(cfg, cfg.model.path)
        if path.startswith("tiny:"):  # merging needs the base as a directory: materialise the tiny model once
            path = str(run_dir / "base_model")
            if info.is_main and not (Path(path) / "config.json").exists():
                from nova_rt.models.tiny import save_tiny_model

                save_tiny_model(Path(path), cfg.model.path.split(":", 1)[1], seed=cfg.run.seed, **cfg.model.tiny)
            barrier()
        self.base = str(Path(resolve_model_path(path)).resolve())
        self.artifacts: dict[str, dict] = {}

    def run(self) -> dict:
        for stage in self.cfg.pipeline.stages:
            stage_dir = self.dir / stage
            done = _read_done(stage_dir)
            if done is not None:
                log.info("pipeline: %s already done, skipping", stage)
            else:
                log.info("pipeline: running %s", stage)
                t0 = time.perf_counter()
                done = getattr(self, f"_{stage}")(stage_dir)
                done["wall_s"] = round(time.perf_counter() - t0, 1)  # of the run that finished it (a resumed
                # stage's earlier runs are not counted)
                _mark_done(self.info, stage_dir, done)
                if self.cfg.pipeline.prune_checkpoints and self.info.is_main:
                    for ckpts in sorted(stage_dir.rglob("checkpoints")):
                        shutil.rmtree(ckpts, ignore_errors=True)
                        log.info("pipeline: %s done, removed its checkpoints %s", stage, ckpts)
            self.artifacts[stage] = done
        return self.artifacts

    # ----------------------------------------------------------------------------------------------- stages
    def _pas(self, stage_dir: Path) -> dict:  # the PAS model trains in full: PromptAugmenter loads a full model
        _run_sub("pas", _sub_config(self.cfg, "pas", stage_dir, {"lora.rank": 0} if self.cfg.lora.rank > 0 else {}))
        return {"pas_model": str(stage_dir / "pas_model" / "final")}

    def _slices(self) -> list[dict]:
        pipeline = self.cfg.pipeline
        slices = pipeline.sft_slices or [{"name": "all", "train_files": list(self.cfg.data.train_files),
                                   "eval_files": list(self.cfg.data.eval_files)}]
        return [{"name": sft_slice["name"],
                 "train_files": [resolve_path(self.cfg, path) for path in sft_slice["train_files"]],
                 "eval_files": [resolve_path(self.cfg, path) for path in sft_slice.get("eval_files", [])]}
                for sft_slice in slices]

    def _sft(self, stage_dir: Path) -> dict:
        models = {}
        slices = self._slices()
        # the merge stage scores the base and every slice model on every slice's eval rows (heldout.json): the SFT
        # runs then skip their own eval of the same models (two evals each)
        scored_after_merge = "merge" in self.cfg.pipeline.stages and len(slices) >= 2
        for sft_slice in slices:
            files = sft_slice["train_files"]
            if "pas" in self.artifacts and self.cfg.pipeline.pas_augment_sft:
                files = self._augmented(files, stage_dir / "data" / f"{sft_slice['name']}.jsonl")
            slice_dir = stage_dir / sft_slice["name"]
            done = _read_done(slice_dir)
            if done is None:
                _run_sub("sft", _sub_config(self.cfg, "sft", slice_dir, {
                    "data.train_files": files, "data.eval_files": [] if scored_after_merge else sft_slice["eval_files"],
                    "model.path": self.base}))
                done = {"model": str(slice_dir / "final")}
                _mark_done(self.info, slice_dir, done)
            models[sft_slice["name"]] = done["model"]
        return {"models": models}

    def _augmented(self, files: list[str], out: Path) -> list[str]:
        """SFT rows whose first user turn carries the PAS complement (written once, by rank 0)."""
        if self.info.is_main and not out.exists():
            augment_sft_files(files, out, self.artifacts["pas"]["pas_model"],
                              max_new_tokens=self.cfg.pipeline.pas_augment_max_new_tokens)
        barrier()
        return [str(out)]

    def _merge(self, stage_dir: Path) -> dict:
        models = list(self.artifacts.get("sft", {}).get("models", {}).values())
        from nova_rt.merge.adapter import is_adapter_dir

        pipeline = self.cfg.pipeline
        lora_model = len(models) == 1 and is_adapter_dir(Path(models[0]))
        if len(models) < 2 and not lora_model:
            log.info("pipeline: %d SFT model(s), nothing to merge", len(models))
            return {"merged": models[0] if models else self.base}
        # LoRA slices (lora.rank > 0): final/ adapter directories, merged straight from base + B A (one alone: the
        # adapter merged into the base, what the later stages load)
        spec = merge_spec("linear", {"weight": 1.0}, self.base, models) if lora_model else merge_spec(
            pipeline.merge_method, pipeline.merge_parameters, self.base, models)
        out = stage_dir / "merged"
        if self.info.is_main:
            sub = _sub_config(self.cfg, "merge", stage_dir, {"merge.inline": spec, "merge.spec": "",
                                                              "merge.out": str(out), "merge.force": True})
            _run_sub("merge", sub)
        barrier()
        done = {"merged": str(out)}
        eval_sets = {sft_slice["name"]: sft_slice["eval_files"] for sft_slice in self._slices()
                     if sft_slice["eval_files"]}
        if eval_sets:
            done["heldout"] = str(stage_dir / "heldout.json")
            if self.info.is_main:  # the merged model against its inputs, on every slice's held-out documents
                named = {"base": self.base, **{f"sft/{k}": v for k, v in self.artifacts["sft"]["models"].items()},
                         "merged": str(out)}
                sub = _sub_config(self.cfg, "sft", stage_dir, {"model.tokenizer": self.base})
                table = heldout_nll(sub, named, eval_sets, self.info.device)
                tmp = stage_dir / "heldout.json.tmp"
                tmp.write_text(json.dumps({"models": named, "eval_sets": eval_sets, "nll": table}))
                os.replace(tmp, stage_dir / "heldout.json")
            barrier()
        return done

    def _policy_init(self) -> str:
        return self.artifacts.get("merge", {}).get("merged") or next(
            iter(self.artifacts.get("sft", {}).get("models", {}).values()), self.base)

    def _rm(self, stage_dir: Path) -> dict:
        lora = self.cfg.lora.rank > 0  # GRPO's reward_model source loads a full model: the RM's final_merged/
        _run_sub("rm", _sub_config(self.cfg, "rm", stage_dir, {"model.path": self._policy_init(),
                                                                **({"lora.merge_final": True} if lora else {})}))
        return {"rm": str(stage_dir / ("final_merged" if lora else "final"))}

    def _grpo(self, stage_dir: Path) -> dict:
        extra: dict = {"model.path": self._policy_init()}
        if "rm" in self.artifacts and self.cfg.pipeline.rm_reward_weight > 0:
            extra["grpo.rewards"] = list(self.cfg.grpo.rewards) + [
                {"type": "reward_model", "path": self.artifacts["rm"]["rm"],
                 "weight": self.cfg.pipeline.rm_reward_weight}]
        if "pas" in self.artifacts and self.cfg.pipeline.pas_augment_rl:
            extra["grpo.data.pas_model"] = self.artifacts["pas"]["pas_model"]
        _run_sub("grpo", _sub_config(self.cfg, "grpo", stage_dir, extra))
        return {"final": str(stage_dir / "final")}


def merge_spec(method: str, parameters: dict, base: str, models: list[str]) -> dict:
    """The mergekit-style mapping that merges the slice models: the method's per-model parameters in `parameters`
    (weight, density, ...) go to every model (weight defaults to 1/N), the other keys are global; the base is given
    to every method that takes one."""
    from nova_rt.merge import get_merge

    registered = get_merge(method)
    per_model = {k: v for k, v in parameters.items() if k in registered.model_params}
    if "weight" in registered.model_params:
        per_model.setdefault("weight", 1.0 / len(models))
    if method == "ties":
        per_model.setdefault("density", 0.5)
    spec = {"merge_method": method, "dtype": "float32",
            "models": [{"model": model, "parameters": dict(per_model)} for model in models]}
    if registered.needs_base:  # linear and karcher average the slice models themselves
        spec["base_model"] = base
    rest = {k: v for k, v in parameters.items() if k not in per_model}
    if rest:
        spec["parameters"] = rest
    return spec


def heldout_nll(cfg: Config, models: dict[str, str], eval_sets: dict[str, list[str]], device) -> dict:
    """{model name: {eval set: [[summed NLL, supervised tokens] per document]}}, one model in memory at a time; every
    model sees the same documents in the same order (tokenized once, with cfg's tokenizer and packing)."""
    from nova_rt.merge.adapter import is_adapter_dir
    from nova_rt.models.causal import CausalLMLogprobs
    from nova_rt.stages.common import load_policy
    from nova_rt.stages.sft import build_sft_rows, document_nll

    out: dict[str, dict] = {}
    rows = None
    for name, path in models.items():
        hf_model, tok = load_policy(cfg, path) if not is_adapter_dir(Path(path)) else _load_adapter(cfg, path)
        if rows is None:
            rows = {k: build_sft_rows(cfg, tok, files, max_rows=cfg.data.eval_max_rows)[0]
                    for k, files in eval_sets.items()}
        module = CausalLMLogprobs(hf_model).to(device)
        out[name] = {k: document_nll(module, eval_rows, device).tolist() for k, eval_rows in rows.items()}
        del module, hf_model
        gc.collect()
    return out


def _load_adapter(cfg: Config, path: str):
    """(hf_model, tokenizer) of a PEFT LoRA adapter directory: its base (adapter_config.json's
    base_model_name_or_path) with the adapters merged in, as the merge engine reads it (nova_rt.merge.adapter)."""
    import torch

    from nova_rt.merge.adapter import AdapterReader, resolve_adapter_base
    from nova_rt.stages.common import load_policy

    base = resolve_adapter_base(Path(path), path, path, Path.cwd(), None, "")
    hf_model, tok = load_policy(cfg, str(base))
    reader = AdapterReader(Path(path), base)
    try:
        with torch.no_grad():
            params = dict(hf_model.named_parameters())
            for name in reader.tensors:
                if name in params:
                    params[name].copy_(reader.view(name))
    finally:
        reader.close()
    return hf_model, tok


def augment_sft_files(files: list[str], out: Path, pas_model: str, max_new_tokens: int = 64) -> None:
    """Rewrite SFT rows so the first user message is `prompt + complement` (the prompt itself is unchanged)."""
    from nova_rt.data.io import read_rows, write_jsonl
    from nova_rt.pas.augment import PromptAugmenter

    rows = [record.data for path in files for record in read_rows(path)]
    slots = []  # (row index, message index or None for prompt/response rows)
    prompts = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            j = next((index for index, message in enumerate(row["messages"])
                      if isinstance(message, dict) and message.get("role") == "user"), None)
            if j is not None:
                slots.append((i, j))
                prompts.append(row["messages"][j]["content"])
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            slots.append((i, None))
            prompts.append(row["prompt"])
    augmented = PromptAugmenter(pas_model, max_new_tokens=max_new_tokens).augment(prompts)
    for (i, j), text in zip(slots, augmented):
        if j is None:
            rows[i] = {**rows[i], "prompt": text}
        else:
            msgs = [dict(message) for message in rows[i]["messages"]]
            msgs[j]["content"] = text
            rows[i] = {**rows[i], "messages": msgs}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".jsonl.tmp")
    write_jsonl(tmp, rows)
    os.replace(tmp, out)


@register_stage("pipeline")
def run(cfg: Config) -> dict:
    info, run_dir = setup(cfg)
    artifacts = Pipeline(cfg, info, run_dir).run()
    report = None
    if cfg.pipeline.report and info.is_main:
        from nova_rt.report import write_report

        report = write_report(run_dir, cfg, artifacts)
    report = broadcast_object(str(report) if report else None)
    return {"artifacts": artifacts, "report": report}
