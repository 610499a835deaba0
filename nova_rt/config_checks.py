"""Checks across the sections of the run a user asked for, made by nova_rt.config.load_config before any model or
data loads (a section's own fields are checked by its `validate`): keys that ask for something the rest of the
config does not give, such as an eval interval without eval data. The stage configs a pipeline derives are not
checked here: a pipeline's SFT slice has no eval files by design when the merged model is scored instead.
"""

from __future__ import annotations

from nova_rt.errors import ConfigError

_EVAL_STAGES = ("sft", "rm", "dpo")
"""Stages whose held-out eval reads data.eval_files (grpo has grpo.eval and grpo.data.eval_files)."""


def check_run(cfg) -> None:
    """ConfigError `<config file>: <key>: ...` for the first key that cannot take effect in this run."""
    stage = cfg.run.stage
    if stage in _EVAL_STAGES and not cfg.data.eval_files:
        for key, value in (("train.eval_every", cfg.train.eval_every), ("data.eval_max_rows", cfg.data.eval_max_rows)):
            if value > 0:
                raise ConfigError(f"{cfg.source}: {key}: {value} needs held-out data, but data.eval_files is empty "
                                  f"(give data.eval_files or set {key}: 0)")
    if stage == "grpo":
        grpo = cfg.grpo
        if cfg.train.max_steps % grpo.steps_per_rollout:
            raise ConfigError(f"{cfg.source}: train.max_steps: {cfg.train.max_steps} is not a multiple of the "
                              f"{grpo.steps_per_rollout} optimizer steps of each rollout (grpo.ppo_epochs "
                              f"{grpo.ppo_epochs} x grpo.minibatches {grpo.minibatches})")


def model_positions(cfg) -> tuple[int, str] | None:
    """(the policy's max_position_embeddings, where it comes from) read without loading weights: a tiny model's
    config, or a local directory's config.json; None when unknown (builtin:, no such field)."""
    import json
    from pathlib import Path

    from nova_rt.config import resolve_path

    path = cfg.model.path
    if path.startswith("tiny:"):
        from nova_rt.models.tiny import tiny_config

        return (tiny_config(path.split(":", 1)[1], **cfg.model.tiny).max_position_embeddings,
                f"model.tiny.max_positions of {path}")
    config_file = Path(resolve_path(cfg, path)) / "config.json"
    if ":" in path.split("/")[0] or not config_file.is_file():
        return None
    try:
        positions = json.loads(config_file.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # the model loader names the unreadable file
    return (positions, f"max_position_embeddings in {config_file}") if isinstance(positions, int) else None


def check_model_positions(cfg) -> None:
    """ConfigError naming the key when a sequence length the run is configured for exceeds the model's positions
    (nova_rt.preflight runs it before the weights load)."""
    stage = cfg.run.stage
    if stage in (*_EVAL_STAGES, "pipeline"):
        lengths = {"data.max_seq_len": cfg.data.max_seq_len}
    elif stage == "grpo":
        lengths = {"grpo.sampling.max_new_tokens": cfg.grpo.sampling.max_new_tokens}
        if cfg.grpo.ptx.coef > 0:
            lengths["grpo.ptx.max_len"] = cfg.grpo.ptx.max_len
    else:
        return
    known = model_positions(cfg)
    if known is None:
        return
    positions, source = known
    for key, length in lengths.items():
        if length > positions:
            raise ConfigError(f"{key}: {length} exceeds the model's {positions} positions ({source}); use at most "
                              f"{positions}")
