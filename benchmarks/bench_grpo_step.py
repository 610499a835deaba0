"""Time per GRPO step, rollout and train separately: nova_rt's grpo stage against TRL's GRPOTrainer.

Same model (SmolLM2-135M-Instruct from the bundled GGUF, fp32), same task (reasoning-gym basic_arithmetic, 2 terms
of 1-2 digits; a calculator system prompt with the assistant turn pre-filled with the expression, rendered to the
same prompt text for both), same group size, prompts per step, max new tokens, sampling (temperature 1, no top-k /
top-p), lr, beta = 0 (no reference model in either), token-mean / DAPO aggregation, one optimizer step per rollout
batch, no gradient accumulation. Rollout = generation + rewards (TRL: `_generate_and_score_completions`); train =
the rest of the step (packing / padding, forward, backward, optimizer). The first `--warmup` steps are not timed.
Each runs with its own process settings: nova_rt with what its setup applies (train.cpu_allocator=cached), TRL with
glibc's allocator defaults.

    python benchmarks/bench_grpo_step.py [--steps 3] [--threads 2] [--max-new-tokens 48] [--providers nova_rt,trl]

On a CPU machine shared with other jobs the wall times are noisy; the rows also give process CPU seconds. Response
lengths come from sampling and differ between the two runs, so the rows also give rollout CPU ms per generated token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import report  # noqa: E402

SYSTEM = "You are a calculator. Reply with the result only."
TASK = {"name": "basic_arithmetic", "category": "arithmetic", "size": 2000, "seed": 0, "eval_size": 0,
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
        "prefill": "{metadata[expression]} ="}


def _timer():
    return time.perf_counter(), time.process_time()


def plain_model_dir(src: str) -> str:
    """The cached SmolLM2 directory with the GGUF `quantization_config` left in its config.json removed (the weights
    are plain fp32 safetensors; TRL's Trainer refuses to fine-tune a model marked quantized). Files are symlinked."""
    import json

    out = Path(tempfile.mkdtemp(prefix="bench_grpo_model_"))
    for f in Path(src).iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(out)


def bench_nova(args, model_dir: str) -> list[dict]:
    from nova_rt.config import build_config
    from nova_rt.stages.grpo import GRPORun

    raw = {"run": {"stage": "grpo", "dir": tempfile.mkdtemp(prefix="bench_grpo_nova_"), "seed": 0},
           "model": {"path": model_dir}, "optim": {"lr": 1e-5, "scheduler": "constant"},
           "train": {"max_steps": 1000, "num_threads": args.threads},
           "checkpoint": {"every": 0, "save_final": False}, "logging": {"progress_bar": False, "tensorboard": False},
           "grpo": {"sampling": {"group_size": args.group, "prompts_per_step": args.prompts,
                                 "max_new_tokens": args.max_new_tokens},
                    "data": {"gym_tasks": [TASK], "system_prompt": SYSTEM}, "rewards": [{"type": "math"}],
                    "loss": {"beta": 0.0, "agg": "token-mean", "eps_high": 0.28}}}
    run = GRPORun(build_config(raw, "<bench>"))
    rows = []
    for i in range(args.warmup + args.steps):
        w0, c0 = _timer()
        groups, m = run.collect()
        w1, c1 = _timer()
        run.train_on(groups, i)
        w2, c2 = _timer()
        if i >= args.warmup:
            rows.append({"rollout_s": w1 - w0, "train_s": w2 - w1, "cpu_rollout_s": c1 - c0, "cpu_train_s": c2 - c1,
                         "response_len": m["response_len"]})
        print(f"nova_rt step {i}: rollout {w1 - w0:.1f}s train {w2 - w1:.1f}s", flush=True)
    return rows


def bench_trl(args, model_dir: str) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nova_rt.cpu_runtime import cpu_allocator
    from nova_rt.data.rl import gym_prompts
    from nova_rt.rewards.math import answers_match, extract_answer

    cpu_allocator("system")  # TRL as launched on its own: glibc's defaults (nova_rt's setup switched them)
    tok = AutoTokenizer.from_pretrained(model_dir)
    recs = gym_prompts(TASK, "train", SYSTEM)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) + r["prefill"]
             for r in recs]
    ds = Dataset.from_dict({"prompt": texts, "answer": [r["answer"] for r in recs]})

    def math_reward(prompts, completions, answer, **_):
        return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answer)]

    n_seq = args.prompts * args.group
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_grpo_trl_"), per_device_train_batch_size=n_seq,
                     num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
                     top_p=1.0, top_k=0, learning_rate=1e-5, lr_scheduler_type="constant", beta=0.0,
                     loss_type="dapo", epsilon_high=0.28, max_steps=args.warmup + args.steps, use_cpu=True,
                     bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                     gradient_accumulation_steps=1, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", attn_implementation="sdpa")
    trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=cfg, train_dataset=ds, processing_class=tok)
    rows, cur = [], {}
    inner = trainer._generate_and_score_completions

    def timed(*a, **kw):
        w0, c0 = _timer()
        out = inner(*a, **kw)
        w1, c1 = _timer()
        cur["rollout_s"], cur["cpu_rollout_s"] = w1 - w0, c1 - c0
        cur["response_len"] = float(out["completion_mask"].sum(1).float().mean())
        return out

    trainer._generate_and_score_completions = timed

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            cur["t0"] = _timer()

        def on_step_end(self, a, state, control, **kw):
            (w0, c0), (w1, c1) = cur["t0"], _timer()
            if state.global_step > args.warmup:
                rows.append({"rollout_s": cur["rollout_s"], "train_s": w1 - w0 - cur["rollout_s"],
                             "cpu_rollout_s": cur["cpu_rollout_s"], "cpu_train_s": c1 - c0 - cur["cpu_rollout_s"],
                             "response_len": cur["response_len"]})
            print(f"trl step {state.global_step}: rollout {cur['rollout_s']:.1f}s train "
                  f"{w1 - w0 - cur['rollout_s']:.1f}s", flush=True)

    trainer.add_callback(StepTimer())
    trainer.train()
    return rows


def summarise(provider: str, rows: list[dict], args) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"provider": provider, "steps": len(rows), "rollout_s": med["rollout_s"], "train_s": med["train_s"],
            "step_s": med["rollout_s"] + med["train_s"], "cpu_step_s": med["cpu_rollout_s"] + med["cpu_train_s"],
            "cpu_rollout_s": med["cpu_rollout_s"], "cpu_train_s": med["cpu_train_s"],
            "response_len": med["response_len"], "prompts": args.prompts, "group": args.group,
            "cpu_rollout_ms_per_token": 1e3 * med["cpu_rollout_s"] / (args.prompts * args.group * med["response_len"]),
            "max_new_tokens": args.max_new_tokens, "threads": args.threads,
            "loadavg_1m": os.getloadavg()[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--providers", default="nova_rt,trl")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nova_rt.models.loading import ensure_builtin

    model_dir = plain_model_dir(str(ensure_builtin("smollm2-135m-instruct")))  # the same directory for both
    fns = {"nova_rt": bench_nova, "trl": bench_trl}
    results = [summarise(name, fns[name](args, model_dir), args) for name in args.providers.split(",")]
    base = next((r for r in results if r["provider"] == "trl"), None)
    for r in results:
        if base is not None:
            r["speedup_step"] = base["step_s"] / r["step_s"]
            r["speedup_cpu"] = base["cpu_step_s"] / r["cpu_step_s"]
    report("grpo_step", results, ["provider", "steps", "rollout_s", "train_s", "step_s", "cpu_step_s",
                                  "response_len", "cpu_rollout_ms_per_token", "speedup_step", "speedup_cpu",
                                  "loadavg_1m"], out=args.out)


if __name__ == "__main__":
    main()
