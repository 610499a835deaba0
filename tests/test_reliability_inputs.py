"""Inputs are never touched: every command that writes (train stages, merge, the PAS stage, the pipeline) refuses
with exit 2 and one line naming both paths when its output holds an input (where --force / a rerun replaces it), lies
inside an input, or is the same directory through a symlink or `..`; the input stays byte-identical. Replacing an
output that holds no input, and data kept beside a run's outputs, still work."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from nova_rt.pas.template import GENERATION_SYSTEM
from tests.pas.chat_server import ChatServer
from tests.reliability_helpers import ROOT, chat_rows, run_cli, tiny_config, write_jsonl


def _snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or the file itself) with its bytes."""
    path = Path(os.path.realpath(path))
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def _refused(code: int, err: str, *paths) -> None:
    line = err.splitlines()[0] if err else ""
    assert code == 2 and "Traceback" not in err, err
    for p in paths:
        assert str(p) in line, (p, err)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nova_rt.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", seed=0, hidden=32, layers=1, heads=2,
                           kv_heads=1, intermediate=64)


# ----------------------------------------------------------------------------------------------- merge
def _merge_yaml(path: Path, models: list[Path], **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", **extra,
                                "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}))
    return path


def _merge(capsys, cfg: Path, out, *flags: str) -> tuple[int, str]:
    from nova_rt.cli import main

    capsys.readouterr()
    code = main(["merge", str(cfg), str(out), "--no-progress", *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("inside", ["models[0]", "tokenizer_source", "merge config"])
def test_merge_force_refuses_an_output_that_holds_an_input(tmp_path, capsys, tiny_dir, inside):
    out = tmp_path / "out"
    a, b = out / "a", tmp_path / "b"
    shutil.copytree(tiny_dir, a if inside == "models[0]" else tmp_path / "a")
    shutil.copytree(tiny_dir, b)
    models = [a if inside == "models[0]" else tmp_path / "a", b]
    extra = {}
    if inside == "tokenizer_source":
        shutil.copytree(tiny_dir, out / "tok")
        extra["tokenizer_source"] = str(out / "tok")
    cfg = _merge_yaml(out / "merge.yaml" if inside == "merge config" else tmp_path / "merge.yaml", models, **extra)
    (out / "notes.txt").write_text("the user's")
    before = _snapshot(out)
    code, err = _merge(capsys, cfg, out, "--force")
    held = {"models[0]": a, "tokenizer_source": out / "tok", "merge config": cfg}[inside]
    _refused(code, err, out, held)
    assert f"{inside} {held} is inside output directory {out}" in err, err
    assert _snapshot(out) == before and not list(tmp_path.glob(".out*"))


def test_merge_refuses_an_input_reached_through_a_symlink_into_the_output(tmp_path, capsys, tiny_dir):
    out = tmp_path / "out"
    shutil.copytree(tiny_dir, out / "a")
    shutil.copytree(tiny_dir, tmp_path / "b")
    (tmp_path / "alias").symlink_to(out)
    cfg = _merge_yaml(tmp_path / "merge.yaml", [tmp_path / "alias" / "a", tmp_path / "b"])
    before = _snapshot(out)
    code, err = _merge(capsys, cfg, out, "--force")
    _refused(code, err, out / "a", out)
    assert _snapshot(out) == before


@pytest.mark.parametrize("via", ["plain", "symlink"])
def test_merge_refuses_an_output_inside_an_input(tmp_path, capsys, tiny_dir, via):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_dir, a)
    shutil.copytree(tiny_dir, b)
    cfg = _merge_yaml(tmp_path / "merge.yaml", [a, b])
    parent = a
    if via == "symlink":
        parent = tmp_path / "link"
        parent.symlink_to(a)
    before = _snapshot(a)
    code, err = _merge(capsys, cfg, parent / "merged")
    _refused(code, err, parent / "merged", a)
    assert "is inside models[0]" in err, err
    assert _snapshot(a) == before and sorted(p.name for p in a.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())


@pytest.mark.parametrize("via", ["symlink", "dotdot"])
def test_merge_refuses_an_output_that_is_an_input_by_another_name(tmp_path, capsys, tiny_dir, via):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_dir, a)
    shutil.copytree(tiny_dir, b)
    cfg = _merge_yaml(tmp_path / "merge.yaml", [a, b])
    out = tmp_path / "a" / ".." / "a"
    if via == "symlink":
        out = tmp_path / "link"
        out.symlink_to(a)
    before = _snapshot(a)
    code, err = _merge(capsys, cfg, out, "--force")
    _refused(code, err, out, a)
    assert f"is the same path as models[0] {a}" in err, err
    assert _snapshot(a) == before


def test_merge_force_still_replaces_an_output_that_holds_no_input(tmp_path, capsys, tiny_dir):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    shutil.copytree(tiny_dir, a)
    shutil.copytree(tiny_dir, b)
    out.mkdir()
    (out / "stale.txt").write_text("old output")
    cfg = _merge_yaml(tmp_path / "merge.yaml", [a, b])
    before = _snapshot(tmp_path / "a"), _snapshot(b)
    code, err = _merge(capsys, cfg, out)
    assert code == 2 and "exists; pass --force" in err, err
    code, err = _merge(capsys, cfg, out, "--force")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert (_snapshot(a), _snapshot(b)) == before


# ----------------------------------------------------------------------------------------------- train stages
def _stage_config(tmp_path: Path, include: str, run_dir: Path, **sections) -> Path:
    cfg = {"include": str(ROOT / "configs" / include), "run": {"dir": str(run_dir)},
           "train": {"num_threads": 1}, "logging": {"tensorboard": False, "plot": False, "progress_bar": False}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _copy_into(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


PREFS = ROOT / "data" / "preference" / "arith_pairs.jsonl"
CHAT = ROOT / "data" / "sft" / "chat_mix.jsonl"


@pytest.mark.parametrize("include, where, key", [
    ("tiny_sft.yaml", "final/chat.jsonl", "data.train_files[0]"),
    ("tiny_rm.yaml", "checkpoints/prefs.jsonl", "data.train_files[0]"),
    ("tiny_dpo.yaml", "final/eval.jsonl", "data.eval_files[0]"),
    ("tiny_grpo.yaml", "checkpoints/ptx.jsonl", "grpo.ptx.files[0]"),
    ("tiny_sft.yaml", "metrics.jsonl", "data.train_files[0]"),
], ids=["sft-final", "rm-checkpoints", "dpo-final", "grpo-checkpoints", "sft-metrics"])
def test_train_refuses_an_input_where_the_run_writes(tmp_path, capsys, include, where, key):
    run = tmp_path / "run"
    data = _copy_into(PREFS if include in ("tiny_rm.yaml", "tiny_dpo.yaml") else CHAT, run / where)
    sections: dict = {"grpo": {"ptx": {"files": [str(data)]}}} if key.startswith("grpo") else {"data": {
        "train_files": [str(PREFS)], "eval_files": [str(PREFS)], key.split("[")[0].split(".")[1]: [str(data)]}}
    if include == "tiny_sft.yaml":
        sections["data"]["eval_files"] = []
    before = _snapshot(run)
    code, err = run_cli(capsys, "--config", str(_stage_config(tmp_path, include, run, **sections)))
    _refused(code, err, data, run)
    assert f"{key} {data} is inside run.dir {run}, whose {where.split('/')[0]} this command replaces" in err, err
    assert _snapshot(run) == before  # nothing written: no config.json, metrics or checkpoints


def test_train_refuses_continuing_from_its_own_final(tmp_path, capsys, tiny_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run / "final")
    before = _snapshot(run)
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, model={"path": str(run / "final")})))
    _refused(code, err, run / "final", run)
    assert _snapshot(run) == before


@pytest.mark.parametrize("via", ["same", "inside", "symlink", "dotdot"])
def test_train_refuses_a_run_dir_in_the_model_dir(tmp_path, capsys, tiny_dir, via):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    run = {"same": model, "inside": model / "run", "symlink": tmp_path / "link", "dotdot": model / ".." / "model"}[via]
    if via == "symlink":
        run.symlink_to(model)
    cfg = tiny_config(tmp_path, model={"path": str(model)}, run={"dir": str(run)})
    before = _snapshot(model)
    code, err = run_cli(capsys, "--config", str(cfg))
    _refused(code, err, run, model)
    assert _snapshot(model) == before and not (model / "metrics.jsonl").exists()


def test_train_keeps_data_beside_its_outputs_and_replaces_its_own_final(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    data = write_jsonl(run / "train.jsonl", chat_rows())
    cfg = tiny_config(tmp_path, data_file=data)
    before = _snapshot(data)
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 0, err
    first = _snapshot(run / "final")
    code, err = run_cli(capsys, "--config", str(cfg), "--set", "train.max_steps=3")  # resumes, replaces final/
    assert code == 0, err
    assert _snapshot(run / "final") != first and _snapshot(data) == before


# ----------------------------------------------------------------------------------------------- PAS stage
def responder(messages, max_tokens):
    if messages[0]["content"] == GENERATION_SYSTEM:
        return "Complement: Show each step of the work and state the final result clearly."
    comp = messages[-1]["content"].split("\nComplement: ", 1)[1]
    return json.dumps({"reason": "fine", "is_correct": "yes", "final": comp})


PAS_FILES = {"input_files": [str(ROOT / "data" / "pas" / "prompts.jsonl")],
             "seeds_file": str(ROOT / "data" / "pas" / "seeds.jsonl")}


def _pas_config(tmp_path: Path, run: Path, url: str, **pas) -> Path:
    """tiny_pipeline.yaml's PAS settings as a `pas` stage without training, generator at `url`."""
    return _stage_config(tmp_path, "tiny_pipeline.yaml", run, run={"dir": str(run), "stage": "pas"},
                         pas={"train": False, "generator": {"client": "openai", "base_url": url, "model": "responder",
                                                            "retries": 1, "backoff_s": 0.01, "timeout_s": 10.0},
                              **PAS_FILES, **pas})


@pytest.mark.parametrize("key, where", [("pas.input_files[0]", "pas/prompts.jsonl"),
                                        ("pas.seeds_file", "pas_model/seeds.jsonl")])
def test_pas_refuses_an_input_in_its_output_dirs(tmp_path, capsys, key, where):
    run = tmp_path / "run"
    name = "prompts.jsonl" if key.startswith("pas.input") else "seeds.jsonl"
    data = _copy_into(ROOT / "data" / "pas" / name, run / where)
    value = [str(data)] if key.startswith("pas.input") else str(data)
    cfg = _pas_config(tmp_path, run, "http://127.0.0.1:9/v1", **{key.split(".")[1].split("[")[0]: value})
    before = _snapshot(run)
    code, err = run_cli(capsys, "--config", str(cfg))
    _refused(code, err, data, run)
    assert _snapshot(run) == before


def test_pas_reads_prompts_kept_in_its_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    data = _copy_into(ROOT / "data" / "pas" / "prompts.jsonl", run / "prompts.jsonl")
    before = _snapshot(data)
    with ChatServer(responder) as srv:
        code, err = run_cli(capsys, "--config", str(_pas_config(tmp_path, run, srv.base_url,
                                                                 input_files=[str(data)])))
    assert code == 0, err
    assert (run / "pas" / "sft_pairs.jsonl").is_file() and _snapshot(data) == before


# ----------------------------------------------------------------------------------------------- pipeline
def _pipeline_config(tmp_path: Path, run: Path, **sections) -> Path:
    return _stage_config(tmp_path, "tiny_pipeline.yaml", run, **{**sections, "pas": {**PAS_FILES, **sections.get(
        "pas", {})}})


@pytest.mark.parametrize("case", ["data", "slice", "override", "pas", "config"])
def test_pipeline_refuses_an_input_in_a_stage_dir(tmp_path, capsys, case):
    run = tmp_path / "pipe"
    sections: dict = {"pipeline": {"stages": ["pas", "sft", "merge", "rm"], "sft_slices": []}}
    if case == "data":
        data = _copy_into(CHAT, run / "sft" / "chat.jsonl")
        sections["data"] = {"train_files": [str(data)]}
    elif case == "slice":
        data = _copy_into(CHAT, run / "merge" / "math.jsonl")
        sections["pipeline"]["sft_slices"] = [{"name": "math", "train_files": [str(data)]}]
    elif case == "override":
        data = _copy_into(PREFS, run / "rm" / "final" / "prefs.jsonl")
        sections["pipeline"]["stage_overrides"] = {"rm": {"data.train_files": [str(data)]}}
    elif case == "pas":
        data = _copy_into(ROOT / "data" / "pas" / "prompts.jsonl", run / "pas" / "pas" / "prompts.jsonl")
        sections["pas"] = {"input_files": [str(data)]}
    cfg = _pipeline_config(tmp_path, run, **sections)
    if case == "config":  # the config file itself, kept where the pipeline writes its own config.json
        data = run / "config.json"
        run.mkdir()
        cfg = Path(shutil.copyfile(cfg, data))
    before = _snapshot(run)
    code, err = run_cli(capsys, "--config", str(cfg))
    _refused(code, err, data, run)
    assert _snapshot(run) == before


@pytest.mark.parametrize("via", ["inside", "symlink", "dotdot"])
def test_pipeline_refuses_a_run_dir_in_the_base_model(tmp_path, capsys, tiny_dir, via):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    run = {"inside": model / "pipe", "symlink": tmp_path / "link", "dotdot": model / "x" / ".."}[via]
    if via == "symlink":
        run.symlink_to(model)
    cfg = _pipeline_config(tmp_path, run, model={"path": str(model)}, pipeline={"stages": ["sft"], "sft_slices": []},
                           data={"train_files": [str(CHAT)]})
    before = _snapshot(model)
    code, err = run_cli(capsys, "--config", str(cfg))
    _refused(code, err, run, model)
    assert _snapshot(model) == before


def test_pipeline_merge_replaces_its_own_output_and_keeps_data_beside_it(tmp_path, capsys):
    run = tmp_path / "pipe"
    math = _copy_into(ROOT / "data" / "sft" / "slice_math.jsonl", run / "data" / "math.jsonl")
    text = _copy_into(ROOT / "data" / "sft" / "slice_text.jsonl", run / "data" / "text.jsonl")
    before = _snapshot(run / "data")
    cfg = _pipeline_config(tmp_path, run, pipeline={
        "stages": ["sft", "merge"], "report": False,
        "sft_slices": [{"name": "math", "train_files": [str(math)]}, {"name": "text", "train_files": [str(text)]}]})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 0, err
    merged = run / "merge" / "merged"
    (merged / "marker.txt").write_text("from the first merge")
    (run / "merge" / "STAGE_DONE.json").unlink()  # as if killed after the merge: the rerun merges again (force)
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 0, err
    assert (merged / "model.safetensors").is_file() and not (merged / "marker.txt").exists()
    assert _snapshot(run / "data") == before
