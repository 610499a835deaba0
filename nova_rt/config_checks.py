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
    lora = cfg.to_dict().get("lora") or {}
    if lora.get("rank", 0) > 0:
        check_lora(cfg)


_LORA_STAGES = ("sft", "rm", "dpo", "grpo", "pipeline")  # a pipeline's SFT / RM / GRPO stages (its PAS model: full)


def check_lora(cfg) -> None:
    """Where LoRA (nova_rt.stages.lora) cannot run yet: refused naming both keys, never silently trained in full."""
    stage, parallel = cfg.run.stage, cfg.parallel
    where = f"{cfg.source}: lora.rank: {cfg.lora.rank}"
    if stage not in _LORA_STAGES:
        raise ConfigError(f"{where} applies to run.stage {', '.join(_LORA_STAGES)}, not run.stage={stage} (remove the "
                          "lora section)")
    if parallel.backend == "megatron" and stage not in ("sft", "dpo", "rm"):  # nova_rt.parallel.megatron_lora
        raise ConfigError(f"{where} is not supported with parallel.backend=megatron and run.stage={stage} yet (SFT, "
                          "DPO and RM are); use parallel.backend=hf or lora.rank: 0")
    if parallel.backend == "megatron" and cfg.lora.dropout > 0:
        raise ConfigError(f"{cfg.source}: lora.dropout: {cfg.lora.dropout} is not supported with "
                          "parallel.backend=megatron yet; use lora.dropout: 0 or parallel.backend=hf")
    if parallel.backend == "megatron" and parallel.context_parallel > 1:  # untested there: refused, not guessed
        raise ConfigError(f"{where} is not supported with parallel.context_parallel={parallel.context_parallel} yet; "
                          "use parallel.context_parallel: 1 or lora.rank: 0")
    if parallel.backend == "megatron" and cfg.lora.merge_final:
        raise ConfigError(f"{cfg.source}: lora.merge_final: true is not supported with parallel.backend=megatron yet "
                          "(final/ is the adapter; merge it with nova-rt merge); use lora.merge_final: false")
    if parallel.backend not in ("hf", "megatron"):
        raise ConfigError(f"{where} is not supported with parallel.backend={parallel.backend} yet; use "
                          "parallel.backend=hf or lora.rank: 0")
    if parallel.data_parallel != "ddp":
        raise ConfigError(f"{where} is not supported with parallel.data_parallel={parallel.data_parallel} yet; use "
                          "parallel.data_parallel=ddp or lora.rank: 0")
    runs_grpo = stage == "grpo" or (stage == "pipeline" and "grpo" in cfg.pipeline.stages)
    rollout = cfg.grpo.rollout  # vllm: the base synced once, then the adapter alone (nova_rt.rollout.vllm_engine)
    if runs_grpo and rollout.engine == "vllm" and rollout.tensor_parallel > 1:  # untested with LoRA: refused
        raise ConfigError(f"{where} is not supported with grpo.rollout.engine=vllm and grpo.rollout.tensor_parallel="
                          f"{rollout.tensor_parallel} yet; use grpo.rollout.tensor_parallel: 1 or lora.rank: 0")
    if runs_grpo and rollout.engine == "vllm" and cfg.grpo.env.type:  # its episode check scores the peft wrapper
        raise ConfigError(f"{where} is not supported with grpo.rollout.engine=vllm and grpo.env.type="
                          f"{cfg.grpo.env.type} yet; use grpo.rollout.engine: hf or lora.rank: 0")
