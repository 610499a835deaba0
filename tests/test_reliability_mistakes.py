"""User mistakes met through the CLI are one line and exit 2, as early as they can be: chat rows the template cannot
render name the file and row and obey data.on_error; a user reward that raises or returns bad scores names its
module:function and the first bad completion; sampling values, eval keys without eval data and sequence lengths
beyond the model's positions are refused at config load (before the run dir exists); and a relative path in an
included config is relative to the file that sets it."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from nova_rt.data.io import DataError
from nova_rt.models.tiny import CHATML_TEMPLATE, byte_tokenizer
from tests.reliability_helpers import ROOT, chat_rows, run_cli, tiny_config, write_jsonl

ASSISTANT_FIRST = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "the answer is 4."}]}
TOOL_ROW = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "tool", "content": "4"},
                         {"role": "assistant", "content": "the answer is 4."}]}
NO_TOOLS = ("{% for message in messages %}{% if message['role'] == 'tool' %}"
            "{{ raise_exception('tool turns are not supported') }}{% endif %}{% endfor %}" + CHATML_TEMPLATE)


def _one_error_line(err: str) -> str:
    """The error line of `nova_rt: <kind>: <message>` + the NOVA_RT_DEBUG hint (transformers' progress bars aside)."""
    lines = [line for line in err.splitlines() if line.startswith("nova_rt: ")]
    assert len(lines) == 2 and "Traceback" not in err and "NOVA_RT_DEBUG=1" in lines[1], err
    return lines[0]


def _strict_tokenizer(path: Path) -> Path:
    tok = byte_tokenizer()
    tok.chat_template = NO_TOOLS
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from nova_rt.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", seed=0, hidden=32, layers=1, heads=2,
                           kv_heads=1, intermediate=64)


# ----------------------------------------------------------------------------------------------- chat templates
def test_assistant_first_row_names_file_and_row(tmp_path, capsys):
    rows = chat_rows(6)
    rows.insert(2, ASSISTANT_FIRST)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, data)))
    assert code == 2
    assert _one_error_line(err) == (f"nova_rt: data error: {data}: row 3: the conversation starts with an assistant "
                                    "message; the chat template needs a user (or system) message before it")


def test_row_the_template_refuses_names_file_and_row(tmp_path, capsys, tiny_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", [*chat_rows(3), TOOL_ROW])
    tokenizer = _strict_tokenizer(tmp_path / "tokenizer")
    cfg = tiny_config(tmp_path, data, model={"path": str(tiny_dir), "tokenizer": str(tokenizer)})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2
    assert _one_error_line(err) == (f"nova_rt: data error: {data}: row 4: the chat template cannot render this "
                                    "conversation (TemplateError: tool turns are not supported)")


def test_assistant_first_row_is_skipped_and_counted_with_on_error_skip(tmp_path, capsys):
    from nova_rt.data.sft import load_sft_samples

    rows = chat_rows(6)
    rows.insert(2, ASSISTANT_FIRST)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    samples, counts = load_sft_samples([str(data)], byte_tokenizer(), max_seq_len=256, on_error="skip")
    assert counts["rows"] == 7 and counts["skipped_bad_rows"] == 1 and len(samples) == 6
    code, err = run_cli(capsys, "--config", str(tiny_config(tmp_path, data, data={"on_error": "skip"})),
                        "--set", "train.max_steps=1")
    assert code == 0, err
    assert (tmp_path / "run" / "final").is_dir()


def test_preference_and_prompt_rows_the_template_refuses_obey_on_error(tmp_path):
    from nova_rt.data.preference import load_preference_pairs
    from nova_rt.data.rl import load_prompt_files

    tok = byte_tokenizer()
    tok.chat_template = NO_TOOLS
    good = {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}
    refused = {"messages": TOOL_ROW["messages"][:2], "chosen": "4", "rejected": "5"}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [good, refused, good])
    with pytest.raises(DataError, match=rf"^{pairs}: row 2: field 'chosen': the chat template cannot render"):
        load_preference_pairs([str(pairs)], tok, max_seq_len=64)
    kept, counts = load_preference_pairs([str(pairs)], tok, max_seq_len=64, on_error="skip")
    assert len(kept) == 2 and counts["skipped_bad_rows"] == 1
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1 + 1?"}, {"messages": TOOL_ROW["messages"][:2]}])
    with pytest.raises(DataError, match=rf"^{prompts}: row 2: the chat template cannot render .*tool turns"):
        load_prompt_files([str(prompts)], tokenizer=tok)
    assert [r["id"] for r in load_prompt_files([str(prompts)], on_error="skip", tokenizer=tok)] == ["prompts.jsonl:1"]


# ----------------------------------------------------------------------------------------------- user rewards
REWARDS = textwrap.dedent("""
    import json, os

    def _seen(completions):
        with open(os.path.join(os.path.dirname(__file__), "seen.json"), "w") as f:
            json.dump(completions, f)

    def none_at_1(completions, samples):
        _seen(completions)
        return [0.0, None] + [0.0] * (len(completions) - 2)

    def nan_at_2(completions, samples):
        _seen(completions)
        return [0.0, 0.0, float("nan")] + [0.0] * (len(completions) - 3)

    def inf_at_0(completions, samples):
        _seen(completions)
        return [float("inf")] + [0.0] * (len(completions) - 1)

    def word_at_3(completions, samples):
        _seen(completions)
        return [0.0, 0.0, 0.0, "high"]

    def too_few(completions, samples):
        return [1.0]

    def nothing(completions, samples):
        return None

    def boom(completions, samples):
        raise KeyError("no field 'answer'")
""")


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


@pytest.mark.parametrize("function, want", [
    ("none_at_1", "returned None for completion 1 ({1})"),
    ("nan_at_2", "returned nan for completion 2 ({2})"),
    ("inf_at_0", "returned inf for completion 0 ({0})"),
    ("word_at_3", "returned a non-number 'high' for completion 3 ({3})"),
    ("too_few", "returned 1 scores for 4 completions"),
    ("nothing", "returned None, not a list of 4 scores"),
    ("boom", "raised KeyError: \"no field 'answer'\" (scoring 4 completions)"),
])
def test_bad_user_reward_names_function_and_completion(tmp_path, capsys, monkeypatch, function, want):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(json.dumps({
        "include": str(ROOT / "configs" / "tiny_grpo.yaml"), "run": {"dir": str(tmp_path / "run")},
        "train": {"max_steps": 1, "num_threads": 1}, "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "plot": False},
        "grpo": {"sampling": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 4}, "micro_prompts": 0,
                 "loss": {"beta": 0.0}, "ptx": {"coef": 0.0}, "eval": {"every": 0},
                 "rewards": [{"type": "user", "function": f"my_rewards:{function}"}]}}))
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2
    if "{" in want:
        want = want.format(*map(_short, json.loads((tmp_path / "seen.json").read_text())))
    assert _one_error_line(err) == f"nova_rt: error: reward my_rewards:{function} {want}"


def test_reward_error_names_a_named_source_and_its_file(tmp_path):
    from nova_rt.errors import UserError
    from nova_rt.rewards import build_reward

    (tmp_path / "my_rewards.py").write_text(REWARDS)
    reward = build_reward([{"type": "user", "name": "judge", "function": "my_rewards.py:too_few"}],
                          base_dir=str(tmp_path))  # a relative .py file is found next to the config
    with pytest.raises(UserError, match=r"^reward 'judge' returned 1 scores for 2 completions \(function "
                                        r"my_rewards.py:too_few\)$"):
        reward(["a", "b"], [{}, {}])


# ----------------------------------------------------------------------------------------------- config load
def _grpo_prompts_config(tmp_path: Path, **grpo) -> Path:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1 + 1?", "answer": "2"}])
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(json.dumps({"include": str(ROOT / "configs" / "tiny_grpo.yaml"),
                               "run": {"dir": str(tmp_path / "run")},
                               "grpo": {"data": {"gym_tasks": [], "prompt_files": [str(prompts)]}, **grpo}}))
    return cfg


@pytest.mark.parametrize("override, want", [
    ("grpo.sampling.temperature=0", "grpo.sampling.temperature: must be a finite number > 0, got 0.0 (rollouts sample "
     "several different responses per prompt and score their log-probs at this temperature; greedy decoding is "
     "only for eval)"),
    ("grpo.sampling.top_p=1.5", "grpo.sampling.top_p: must be in (0, 1], got 1.5 (1: off)"),
    ("grpo.sampling.top_k=-1", "grpo.sampling.top_k: must be >= 0, got -1 (0: off)"),
    ("grpo.sampling.max_new_tokens=0", "grpo.sampling.max_new_tokens: must be a finite number >= 1, got 0"),
    ("grpo.sampling.dynamic_max_rounds=-1", "grpo.sampling.dynamic_max_rounds: must be a finite number >= 0, got -1"),
    ("train.max_steps=3", "train.max_steps: 3 is not a multiple of the 2 optimizer steps of each rollout "
     "(grpo.ppo_epochs 1 x grpo.minibatches 2)"),
    ("grpo.sampling.max_new_tokens=4096", "grpo.sampling.max_new_tokens: 4096 exceeds the model's 2048 positions "
     "(model.tiny.max_positions of tiny:llama); use at most 2048"),
])
def test_grpo_config_mistakes_exit_2_before_the_model_loads(tmp_path, capsys, override, want):
    sets = ["--set", f"run.dir={tmp_path / 'run'}", "--set", override]
    if override.startswith("train."):
        sets += ["--set", "grpo.minibatches=2"]
    cfg = ROOT / "configs" / "tiny_grpo.yaml"
    code, err = run_cli(capsys, "--config", str(cfg), *sets)
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("nova_rt: ") and f": {cfg}: {want}" in line, line
    assert not (tmp_path / "run").exists()


def test_grpo_eval_without_eval_prompts_is_refused_at_load(tmp_path, capsys):
    cfg = _grpo_prompts_config(tmp_path, eval={"every": 2})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2
    assert _one_error_line(err) == (f"nova_rt: config error: {cfg}: grpo.eval.every=2 needs eval prompts: give "
                                    "grpo.data.eval_files (or a grpo.data.gym_tasks entry with eval_size > 0), or set "
                                    "grpo.eval.every: 0")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["train.eval_every=2", "data.eval_max_rows=5"])
def test_eval_keys_without_eval_files_are_refused_at_load(tmp_path, capsys, override):
    cfg = tiny_config(tmp_path)
    code, err = run_cli(capsys, "--config", str(cfg), "--set", override)
    assert code == 2
    key, value = override.split("=")
    assert _one_error_line(err) == (f"nova_rt: config error: {cfg}: {key}: {value} needs held-out data, but "
                                    f"data.eval_files is empty (give data.eval_files or set {key}: 0) "
                                    f"(from --set {override})")
    assert not (tmp_path / "run").exists()


def test_max_seq_len_beyond_the_model_positions_is_refused_before_loading(tmp_path, capsys, tiny_dir):
    cfg = tiny_config(tmp_path, model={"path": str(tiny_dir)}, data={"max_seq_len": 3000})
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2
    assert _one_error_line(err) == (f"nova_rt: error: {cfg}: data.max_seq_len: 3000 exceeds the model's 2048 "
                                    f"positions (max_position_embeddings in {tiny_dir / 'config.json'}); use at "
                                    "most 2048")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- includes
def test_included_config_paths_are_relative_to_the_file_that_sets_them(tmp_path, capsys, monkeypatch):
    from nova_rt.config import load_config

    (tmp_path / "base").mkdir()
    (tmp_path / "exp").mkdir()
    write_jsonl(tmp_path / "base" / "chat.jsonl", chat_rows(6))
    (tmp_path / "base" / "base.yaml").write_text(
        f"include: {ROOT / 'configs' / 'tiny_sft.yaml'}\n"
        "data: {train_files: [chat.jsonl], max_seq_len: 256}\n"
        "packing: {enabled: false, max_tokens: 256}\n"
        "train: {max_steps: 1, global_batch: 2, micro_batch: 1, num_threads: 1}\n"
        "logging: {tensorboard: false, plot: false}\n")
    cfg = tmp_path / "exp" / "cfg.yaml"
    cfg.write_text(f"include: ../base/base.yaml\nrun: {{dir: {tmp_path / 'run'}}}\n")
    monkeypatch.chdir(ROOT)
    assert load_config(cfg).data.train_files == [str(tmp_path / "exp" / ".." / "base" / "chat.jsonl")]
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 0, err
    assert (tmp_path / "run" / "final").is_dir()
    # --set keeps resolving against the current directory
    write_jsonl(tmp_path / "mine.jsonl", chat_rows(4))
    monkeypatch.chdir(tmp_path)
    assert load_config(cfg, ["data.train_files=[mine.jsonl]"]).data.train_files == ["mine.jsonl"]
