"""grpo.env (EnvConfig): validation naming the key, the registry of built-in environments, user environments loaded
as user rewards are (module:Class, file.py:Class, relative to the config directory), and bad paths as ConfigErrors
(exit 2 with one line naming grpo.env.path)."""

from __future__ import annotations

import textwrap

import pytest

from nova_rt.envs import Env, EnvConfig, EnvError, build_env_factory, get_env_class, known_env_types
from nova_rt.errors import ConfigError, UserError
from nova_rt.train import report_user_error

USER_ENV = textwrap.dedent("""
    class EchoEnv:
        def __init__(self, example, bonus=0.0):
            self.example, self.bonus = example, bonus

        def reset(self):
            return [{"role": "user", "content": self.example["prompt"]}]

        def step(self, reply):
            return [], float(reply == "yes") + self.bonus, True
""")


@pytest.mark.parametrize("fields, key", [
    ({"type": "nope"}, "grpo.env.type"),
    ({"type": "user"}, "grpo.env.path"),
    ({"type": "user", "path": "no_colon"}, "grpo.env.path"),
    ({"type": "calculator", "path": "x.py:C"}, "grpo.env.path"),
    ({"path": "x.py:C"}, "grpo.env.path"),
    ({"type": "calculator", "max_turns": 0}, "grpo.env.max_turns"),
    ({"type": "calculator", "max_new_tokens_per_turn": 2.5}, "grpo.env.max_new_tokens_per_turn"),
    ({"type": "calculator", "max_total_tokens": 100, "max_new_tokens_per_turn": 100}, "grpo.env.max_total_tokens"),
    ({"type": "calculator", "tool_timeout_s": 0}, "grpo.env.tool_timeout_s"),
    ({"type": "calculator", "step_timeout_s": float("nan")}, "grpo.env.step_timeout_s"),
    ({"type": "calculator", "max_error_frac": 1.5}, "grpo.env.max_error_frac"),
    ({"type": "calculator", "params": [1]}, "grpo.env.params"),
])
def test_validate_names_the_key(fields, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        EnvConfig(**fields).validate()


def test_defaults_are_valid_and_off():
    EnvConfig().validate()
    assert not EnvConfig().enabled
    assert EnvConfig(type="guess_number").label == "guess_number"
    assert EnvConfig(type="user", path="a.py:B").label == "a.py:B"
    assert EnvConfig(type="user", path="a.py:B", name="mine").label == "mine"


def test_builtins_follow_the_protocol():
    assert {"calculator", "guess_number", "user"} <= set(known_env_types())
    env = get_env_class("guess_number")({"answer": "7"})
    assert isinstance(env, Env) and env.reset()[0]["role"] == "user"
    assert env.step("5") == ([{"role": "user", "content": "Higher."}], 0.0, False)
    with pytest.raises(ConfigError, match="grpo.env.type: unknown environment 'chess'"):
        get_env_class("chess")


def test_user_env_from_file_relative_to_config_dir_and_module(tmp_path):
    (tmp_path / "my_env.py").write_text(USER_ENV)
    cfg = EnvConfig(type="user", path="my_env.py:EchoEnv", params={"bonus": 0.5})
    env = build_env_factory(cfg, base_dir=str(tmp_path))({"prompt": "ok?"})
    assert env.reset() == [{"role": "user", "content": "ok?"}]
    assert env.step("yes") == ([], 1.5, True)
    module_env = build_env_factory(EnvConfig(type="user", path="nova_rt.envs.guess_number:GuessNumberEnv",
                                             params={"low": 0, "high": 9}))({"target": 3})
    assert module_env.step("9")[0][0]["content"] == "Lower."


@pytest.mark.parametrize("path, message", [
    ("missing_file.py:EchoEnv", "grpo.env.path: environment class file not found: missing_file.py"),
    ("no_such_module_xyz:Env", "grpo.env.path: cannot import module 'no_such_module_xyz' for environment class"),
    ("my_env.py:Nope", "grpo.env.path: module '.*my_env.py' has no callable 'Nope' \\(environment class"),
    ("broken.py:Env", "grpo.env.path: environment class file .*broken.py failed to load: SyntaxError"),
    ("my_env.py:NotAnEnv", "grpo.env.path: .*my_env.py:NotAnEnv has no method reset or step"),
])
def test_bad_user_env_is_a_config_error_exit_2(tmp_path, capsys, path, message):
    (tmp_path / "my_env.py").write_text(USER_ENV + "\nclass NotAnEnv:\n    pass\n")
    (tmp_path / "broken.py").write_text("def (:\n")
    with pytest.raises(ConfigError, match=message) as info:
        build_env_factory(EnvConfig(type="user", path=path), base_dir=str(tmp_path))
    assert report_user_error(info.value) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("nova_rt: config error: grpo.env.path: ") and len(err) == 2


def test_env_error_is_a_user_error():
    assert issubclass(EnvError, UserError)
