"""Every string choice of every config section is a typing.Literal, checked while the config loads: a typo is a
ConfigError (exit 2) naming the key, the bad value and the allowed values, before any model or data loads; a list
of choices (pipeline.stages: list[Literal[...]]) is checked item by item, the error naming the index.

The fields are found by introspecting the registered section dataclasses (core sections, every stage's section and
their nested sections such as grpo.rollout), so a new Literal field is covered without editing this file, and a new
plain `str` field fails `test_every_str_field_is_a_choice_or_listed_as_free_text` until it is declared either way.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path
from typing import Literal

import pytest

from nova_rt import config as config_mod
from nova_rt.config import ConfigError, load_config
from nova_rt.stages import KNOWN_STAGES
from tests.reliability_helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
BAD = "not-a-choice"

for _stage in KNOWN_STAGES:  # a stage registers its config section when its module is imported
    importlib.import_module(f"nova_rt.stages.{_stage}")


def _fields(cls: type, prefix: str):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = f"{prefix}.{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, key)
        else:
            yield key, tp, f


FIELDS = sorted(((key, tp, f) for name, cls in config_mod._SECTIONS.items() for key, tp, f in _fields(cls, name)),
                key=lambda item: item[0])
CHOICES = [(key, typing.get_args(tp), f) for key, tp, f in FIELDS if typing.get_origin(tp) is Literal]
# list fields whose items are choices (pipeline.stages: list[Literal[...]]): each item is checked as a choice
LIST_CHOICES = [(key, typing.get_args(typing.get_args(tp)[0]), f) for key, tp, f in FIELDS
                if typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is Literal]

# str fields whose value is a path, a name, free text or a pattern, not one of a closed set of choices
FREE_TEXT = {
    "run.dir", "model.path", "model.tokenizer", "data.system_prompt",
    "dpo.reference", "grpo.data.system_prompt", "grpo.ref_model", "grpo.data.pas_model",
    "merge.spec", "merge.out", "merge.device", "merge.max_shard_size",  # device: cpu | cuda | cuda:N (validate)
    "pas.seeds_file", "pas.dedup.embedder",  # embedder: auto | minilm | hashed[:DIM] | a directory
    "pas.generator.model", "pas.generator.base_url", "pas.generator.api_key_env",
    "grpo.env.name", "grpo.env.path",  # path: package.module:Class | file.py:Class (validate)
}
# choice fields still declared as str, checked by their section's validate() instead; each with the reason
NOT_YET_LITERAL: dict[str, str] = {
    "grpo.env.type": "a registry name: the built-ins, user, and any environment registered with "
                     "nova_rt.envs.register_env; EnvConfig.validate lists the known ones",
}


def test_introspection_finds_the_sections_and_choices():
    sections = {key.split(".")[0] for key, _, _ in FIELDS}
    assert set(config_mod.CORE_SECTIONS) | {"dpo", "grpo", "rm", "pas", "merge", "pipeline"} <= sections
    keys = {key for key, _, _ in CHOICES}
    assert {"parallel.backend", "grpo.loss.agg", "grpo.loss.kl", "grpo.rollout.engine", "pas.curate.categorizer",
            "dpo.loss_type", "pipeline.merge_method"} <= keys
    assert {key for key, _, _ in LIST_CHOICES} >= {"pipeline.stages"}


@pytest.mark.parametrize("key, choices, fld", CHOICES, ids=[key for key, _, _ in CHOICES])
def test_bad_choice_names_key_value_and_allowed_values(tmp_path, key, choices, fld):
    assert fld.default in choices, f"{key}: default {fld.default!r} is not one of its choices"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, [f"{key}={BAD}"])  # the path `--set` takes
    want = f"{cfg}: {key}: must be one of {', '.join(map(str, choices))}, got '{BAD}' (from --set {key}={BAD})"
    assert str(err.value) == want


@pytest.mark.parametrize("key, choices, fld", LIST_CHOICES, ids=[key for key, _, _ in LIST_CHOICES])
def test_bad_item_of_a_choice_list_names_key_index_value_and_allowed_values(tmp_path, key, choices, fld):
    assert set(fld.default_factory()) <= set(choices), f"{key}: default has items outside its choices"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    item = f"{key}=[{choices[0]}, {BAD}]"
    with pytest.raises(ConfigError) as err:
        load_config(cfg, [item])
    assert str(err.value) == f"{cfg}: {key}[1]: must be one of {', '.join(choices)}, got '{BAD}' (from --set {item})"


def test_yaml_booleans_are_the_strings_true_and_false_where_those_are_choices(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("optim: {fused: true}\n")  # YAML reads a bare true as a bool; optim.fused's choices are strings
    assert load_config(cfg).optim.fused == "true"
    assert load_config(cfg, ["optim.fused=false"]).optim.fused == "false"
    with pytest.raises(ConfigError, match="parallel.backend: must be one of hf, megatron, got True"):
        load_config(cfg, ["parallel.backend=true"])


@pytest.mark.parametrize("device, ok", [("cpu", True), ("cuda", True), ("cuda:1", True), ("gpu", False),
                                        ("cuda:x", False)])
def test_merge_device_is_checked_at_load(tmp_path, device, ok):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("run: {stage: merge}\nmerge: {spec: m.yaml}\n")
    if ok:
        assert load_config(cfg, [f"merge.device={device}"]).merge.device == device
    else:
        with pytest.raises(ConfigError, match=f"merge.device: must be cpu, cuda or cuda:N, got '{device}'"):
            load_config(cfg, [f"merge.device={device}"])


def test_every_str_field_is_a_choice_or_listed_as_free_text():
    plain = {key for key, tp, _ in FIELDS if tp is str}
    undeclared = sorted(plain - FREE_TEXT - set(NOT_YET_LITERAL))
    assert not undeclared, f"declare these as Literal[...] (a choice) or add them to FREE_TEXT: {undeclared}"
    stale = sorted((FREE_TEXT | set(NOT_YET_LITERAL)) - plain)
    assert not stale, f"listed but not a str field (any more): {stale}"


def _stage_config(tmp_path: Path, stage: str) -> Path:
    for name in (f"tiny_{stage}.yaml", f"quickstart_{stage}.yaml"):
        if (ROOT / "configs" / name).exists():
            return ROOT / "configs" / name
    path = tmp_path / f"{stage}.yaml"
    path.write_text(f"run: {{stage: {stage}}}\n")
    return path


@pytest.mark.parametrize("stage", KNOWN_STAGES)
def test_unknown_backend_exits_2_for_every_stage(tmp_path, capsys, stage):
    """`--set parallel.backend=megatorn` stops every stage at load (dpo, rm and grpo used to train on HF)."""
    cfg = _stage_config(tmp_path, stage)
    code, err = run_cli(capsys, "--config", str(cfg), "--set", f"run.stage={stage}", "--set",
                        f"run.dir={tmp_path / 'run'}", "--set", "parallel.backend=megatorn")
    assert code == 2, err
    assert f"{cfg}: parallel.backend: must be one of hf, megatron, got 'megatorn'" in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 2, err
    assert not (tmp_path / "run").exists()  # nothing ran: the run dir is made after the config loads


def test_backend_choices_are_the_backend_modules():
    """parallel.backend's Literal is read from nova_rt/backends/<name>.py (a new backend is its file alone); each
    choice resolves to a registered Policy class of that name."""
    import typing
    from pathlib import Path

    import nova_rt.backends as backends
    from nova_rt.config import ParallelConfig

    files = sorted(p.stem for p in Path(backends.__file__).parent.glob("*.py")
                   if p.stem not in backends.NOT_BACKENDS and not p.stem.startswith("_"))
    choices = typing.get_args(typing.get_type_hints(ParallelConfig)["backend"])
    assert list(choices) == files == list(backends.backend_names()) and "hf" in files and "megatron" in files
    for name in choices:
        assert backends.get_backend(name).name == name
    with pytest.raises(ValueError, match="parallel.backend must be one of hf, megatron, got 'megatorn'"):
        backends.get_backend("megatorn")
