"""Time to quality: held-out greedy accuracy against training wall-clock, nova_rt's GRPO stage vs TRL's GRPOTrainer.

Both providers get the same model (SmolLM2-135M-Instruct from the bundled GGUF, fp32), the same train prompts and
held-out prompts (reasoning-gym basic_arithmetic, 2 terms of 1-2 digits, train seed 0, held-out seed 7919: nova_rt's
own split), the same prompt rendering (calculator system prompt, chat template, assistant turn pre-filled with the
expression; TRL receives the rendered text and the script checks that it tokenizes to nova_rt's prompt ids), the
same reward (`reward_fn` below: one Python function both call, the math verifier on the reply), the same
hyper-parameters (lr, constant schedule, AdamW betas, G, prompts per step, max new tokens, temperature 1, beta 0,
token-mean / "dapo" aggregation, clip 0.2 / 0.28, grad clip 1, one optimizer step per rollout batch), the same
number of threads and the same training wall-clock budget, on the same machine, one provider after the other for
each seed (so load changes hit both).

Evaluation is the same code for both (`greedy_accuracy`): nova_rt's batched greedy decode (token-for-token equal to
HF `generate`) of the policy being trained on the held-out prompts, scored by `reward_fn`. It runs at step 0, every
`--eval-every` optimizer steps and after the last step; its time is excluded from the training clock, which counts
rollouts, rewards, forward/backward and optimizer steps only (process CPU time is logged too: the machines are
shared and wall time is noisy).

Each (provider, seed) runs in its own subprocess of this script (`--worker`), under the interpreter that runs the
script: use `.venv-bench/bin/python` (TRL must not be installed into .venv). Outputs: a JSON with every curve, a
PNG of accuracy vs training minutes, and a markdown row for README.

    .venv-bench/bin/python benchmarks/bench_grpo_quality.py --minutes 10 --seeds 0,1 [--providers nova_rt,trl]
        [--nova-set grpo.dynamic_sampling=true ...]   # nova_rt-only overrides, recorded in the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_grpo_step import SYSTEM, plain_model_dir  # noqa: E402
from benchmarks.common import RESULTS_DIR, environment, markdown_table  # noqa: E402

TASK = {"name": "basic_arithmetic", "category": "arithmetic", "size": 2000, "seed": 0, "eval_size": 200,
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
        "prefill": "{metadata[expression]} ="}


# ----------------------------------------------------------------------------------------------- shared pieces
def reward_fn(completions: list[str], answers: list[str]) -> list[float]:
    """The one reward both providers call: 1 when the reply's final answer (nova_rt's math extraction) is right."""
    from nova_rt.rewards.math import answers_match, extract_answer

    return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answers)]


def nova_reward(completions: list[str], samples: list[dict]) -> list[float]:
    """reward_fn as a nova_rt `user` reward (grpo.rewards: {type: user, function: <this file>:nova_reward})."""
    return reward_fn(completions, [s["answer"] for s in samples])


def prompt_records(eval_size: int) -> tuple[list[dict], list[dict]]:
    from nova_rt.data.rl import gym_prompts

    task = {**TASK, "eval_size": eval_size}
    return gym_prompts(task, "train", SYSTEM), gym_prompts(task, "eval", SYSTEM)


def greedy_accuracy(model, tok, prompt_ids: list[list[int]], answers: list[str], max_new_tokens: int,
                    batch: int = 50) -> float:
    """Held-out greedy accuracy of `model` (any HF causal LM): the same decode and scoring for both providers."""
    from nova_rt.rollout.generate import RolloutGenerator

    gen = RolloutGenerator(model, tok, max_new_tokens=max_new_tokens)
    texts = []
    for i in range(0, len(prompt_ids), batch):
        texts += gen.generate(prompt_ids[i:i + batch], 1, greedy=True).texts
    return sum(reward_fn(texts, answers)) / len(answers)


class Clock:
    """Training wall / CPU clock that stops while the evaluation runs."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self._t = None

    def start(self):
        self._t = (time.perf_counter(), time.process_time())

    def stop(self):
        if self._t is not None:
            self.wall += time.perf_counter() - self._t[0]
            self.cpu += time.process_time() - self._t[1]
            self._t = None


class Recorder:
    """Evaluates at step 0, every `eval_every` steps and at the end; keeps the curve; says when the budget is spent."""

    def __init__(self, args, tok, eval_ids, eval_answers):
        self.args, self.tok, self.eval_ids, self.eval_answers = args, tok, eval_ids, eval_answers
        self.clock, self.curve, self.steps, self.last_eval = Clock(), [], [], -1

    def eval(self, model, step: int):
        t0 = time.perf_counter()
        acc = greedy_accuracy(model, self.tok, self.eval_ids, self.eval_answers, self.args.max_new_tokens)
        model.train()
        self.curve.append({"step": step, "train_min": self.clock.wall / 60, "train_cpu_min": self.clock.cpu / 60,
                           "eval_acc": acc, "eval_s": time.perf_counter() - t0})
        self.last_eval = step
        print(f"step {step}: train {self.clock.wall / 60:.2f} min, held-out greedy accuracy {acc:.3f}", flush=True)

    def step_done(self, model, step: int, reward: float, step_s: float) -> bool:
        """Log one optimizer step; evaluate when due. True when the training budget is spent."""
        self.steps.append({"step": step, "reward": reward, "step_s": step_s, "train_min": self.clock.wall / 60})
        done = self.clock.wall >= 60 * self.args.minutes or step >= self.args.max_steps
        if done or step % self.args.eval_every == 0:
            self.eval(model, step)
        return done


# ----------------------------------------------------------------------------------------------- providers
def run_nova(args, model_dir: str, seed: int) -> Recorder:
    import yaml

    from nova_rt.config import _set_dotted, build_config  # _set_dotted: the --set parser, for --nova-set
    from nova_rt.stages.grpo import GRPORun

    raw = {"run": {"stage": "grpo", "dir": tempfile.mkdtemp(prefix="bench_grpo_quality_nova_"), "seed": seed},
           "model": {"path": model_dir},
           "optim": {"lr": args.lr, "scheduler": "constant", "betas": list(args.betas), "warmup_steps": 0},
           "train": {"max_steps": 100000, "num_threads": args.threads},
           "checkpoint": {"every": 0, "save_final": False}, "logging": {"progress_bar": False, "tensorboard": False},
           "grpo": {"group_size": args.group, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
                    "temperature": 1.0, "gym_tasks": [{**TASK, "eval_size": 0}], "system_prompt": SYSTEM,
                    "rewards": [{"type": "user", "function": f"{Path(__file__).resolve()}:nova_reward"}],
                    "beta": 0.0, "agg": "token-mean", "eps_low": 0.2, "eps_high": 0.28}}
    for item in args.nova_set:
        key, _, value = item.partition("=")
        _set_dotted(raw, key, yaml.safe_load(value), "--nova-set")
    run = GRPORun(build_config(raw, "<bench_grpo_quality>"))
    _, evals = prompt_records(args.eval_size)
    rec = Recorder(args, run.tok, run.prompt_ids(evals), [r["answer"] for r in evals])
    rec.eval(run.hf, 0)
    step = 0
    while True:
        rec.clock.start()
        t0 = time.perf_counter()
        k = run.trainer.step
        groups, m = run.collect()
        run.train_on(groups, k // run.g.steps_per_rollout)
        step = run.trainer.step
        rec.clock.stop()
        if rec.step_done(run.hf, step, m["reward_mean"], time.perf_counter() - t0):
            break
    return rec


def run_trl(args, model_dir: str, seed: int) -> Recorder:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nova_rt.cpu_runtime import cpu_allocator
    from nova_rt.data.rl import PromptEncoder

    cpu_allocator("system")  # TRL as launched on its own: glibc's defaults
    tok = AutoTokenizer.from_pretrained(model_dir)
    train, evals = prompt_records(args.eval_size)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) + r["prefill"]
             for r in train]
    enc = PromptEncoder(tok)
    for r, t in list(zip(train, texts))[:64]:  # the rendered text is the same token sequence nova_rt feeds
        if tok(t, add_special_tokens=False)["input_ids"] != enc([r])[0]:
            raise RuntimeError(f"prompt rendering differs between TRL and nova_rt for {r['id']}: {t!r}")
    ds = Dataset.from_dict({"prompt": texts, "answer": [r["answer"] for r in train]})

    def trl_reward(prompts, completions, answer, **_):
        return reward_fn(completions, answer)

    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="bench_grpo_quality_trl_"),
                     per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
                     max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                     learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                     adam_beta1=args.betas[0], adam_beta2=args.betas[1], weight_decay=0.0, max_grad_norm=1.0,
                     beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, max_steps=args.max_steps,
                     use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=seed,
                     data_seed=seed, gradient_accumulation_steps=1, dataloader_num_workers=0,
                     gradient_checkpointing=False)  # TRL defaults it on; off is its faster setting for a 135M model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", attn_implementation="sdpa")
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=cfg, train_dataset=ds, processing_class=tok)
    rec = Recorder(args, tok, enc(evals), [r["answer"] for r in evals])
    rewards: list[float] = []
    inner = trainer._generate_and_score_completions

    def scored(*a, **kw):  # the step's mean reward, read from what TRL computed
        out = inner(*a, **kw)
        rewards.append(float(trainer._metrics["train"]["reward"][-1]))
        return out

    trainer._generate_and_score_completions = scored

    class Timed(TrainerCallback):
        def on_train_begin(self, a, state, control, model=None, **kw):
            rec.eval(model, 0)

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()
            rec.clock.start()

        def on_step_end(self, a, state, control, model=None, **kw):
            rec.clock.stop()
            if rec.step_done(model, state.global_step, rewards[-1], time.perf_counter() - self.t0):
                control.should_training_stop = True

    trainer.add_callback(Timed())
    trainer.train()
    return rec


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from nova_rt.models.loading import ensure_builtin

    model_dir = plain_model_dir(str(ensure_builtin("smollm2-135m-instruct")))
    provider, seed = args.worker.split(":")
    rec = {"nova_rt": run_nova, "trl": run_trl}[provider](args, model_dir, int(seed))
    Path(args.worker_out).write_text(json.dumps({"provider": provider, "seed": int(seed), "curve": rec.curve,
                                                 "steps": rec.steps, "loadavg_1m": os.getloadavg()[0]}))


# ----------------------------------------------------------------------------------------------- summary
def time_to(curve: list[dict], target: float) -> float | None:
    """Training minutes at the first evaluation whose accuracy reaches `target`, or None."""
    return next((p["train_min"] for p in curve if p["eval_acc"] >= target - 1e-9), None)


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        c, s = r["curve"], r["steps"]
        thirds = [s[i * len(s) // 3:(i + 1) * len(s) // 3] for i in range(3)]
        rows.append({"provider": r["provider"], "seed": r["seed"], "steps": len(s), "train_min": c[-1]["train_min"],
                     "base_acc": c[0]["eval_acc"], "final_acc": c[-1]["eval_acc"],
                     "best_acc": max(p["eval_acc"] for p in c),
                     "median_step_s": statistics.median(x["step_s"] for x in s) if s else float("nan"),
                     "reward_thirds": "/".join(f"{statistics.fmean(x['reward'] for x in t):.2f}" if t else "-"
                                               for t in thirds)})
    for row in rows:  # nova_rt's time to TRL's final accuracy (same seed)
        trl = next((x for x in rows if x["provider"] == "trl" and x["seed"] == row["seed"]), None)
        run = next(r for r in runs if r["provider"] == row["provider"] and r["seed"] == row["seed"])
        if trl is not None:
            row["min_to_trl_final"] = time_to(run["curve"], trl["final_acc"])
            if row["min_to_trl_final"] is not None and trl["train_min"] > 0:
                row["frac_of_trl_time"] = row["min_to_trl_final"] / trl["train_min"]
    return rows


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"nova_rt": "tab:blue", "trl": "tab:orange"}
    for r in runs:
        c = r["curve"]
        ax.plot([p["train_min"] for p in c], [p["eval_acc"] for p in c], marker="o", ms=3,
                color=colors.get(r["provider"]), alpha=0.85, label=f"{r['provider']} seed {r['seed']}")
    ax.set_xlabel("training wall-clock minutes (evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def readme_row(rows: list[dict], args) -> str:
    def cell(p):
        xs = [r for r in rows if r["provider"] == p]
        if not xs:
            return "not run"
        fin = [r["final_acc"] for r in xs]
        return (f"held-out greedy {statistics.fmean(r['base_acc'] for r in xs):.3f} -> {statistics.fmean(fin):.3f} "
                f"(seeds {min(fin):.3f}-{max(fin):.3f}) in {statistics.fmean(r['train_min'] for r in xs):.1f} min, "
                f"{statistics.fmean(r['steps'] for r in xs):.0f} steps")
    frac = [r["frac_of_trl_time"] for r in rows if r["provider"] == "nova_rt" and r.get("frac_of_trl_time") is not None]
    ratio = (f"TRL's final accuracy at {statistics.fmean(frac):.2f}x of TRL's time" if frac
             else "nova_rt did not reach TRL's final accuracy")
    setting = (f"SmolLM2-135M, {args.prompts} prompts x {args.group}, {args.max_new_tokens} new tokens, "
               f"lr {args.lr:g}, {args.eval_size} held-out prompts, {args.minutes:g} min, {args.threads} thread(s)")
    return f"| `bench_grpo_quality.py` | {setting} | {cell('nova_rt')} | TRL {cell('trl')} | {ratio} |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", default="nova_rt,trl")
    p.add_argument("--seeds", default="0")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget per run")
    p.add_argument("--max-steps", type=int, default=10000)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--nova-set", action="append", default=[], help="nova_rt-only override KEY=VALUE")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        return worker(args)
    runs = []
    for seed in args.seeds.split(","):
        for provider in args.providers.split(","):  # interleaved: both providers see the same stretch of load
            out = Path(tempfile.mkdtemp(prefix="bench_grpo_quality_")) / "run.json"
            cmd = [sys.executable, __file__, "--worker", f"{provider}:{seed}", "--worker-out", str(out),
                   *[a for a in (argv if argv is not None else sys.argv[1:])]]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run(cmd, check=True, env=env)
            runs.append(json.loads(out.read_text()))
    rows = summarise(runs)
    env = environment()
    stem = Path(args.out) if args.out else RESULTS_DIR / f"grpo_quality_{env['device']}_{time.strftime('%Y%m%d')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    row = readme_row(rows, args)
    stem.with_suffix(".json").write_text(json.dumps({"benchmark": "grpo_quality", "env": env, "args": vars(args),
                                                     "rows": rows, "runs": runs, "readme_row": row}, indent=2))
    plot(runs, stem.with_suffix(".png"), row.split("|")[2].strip())
    print(markdown_table(rows, ["provider", "seed", "steps", "train_min", "base_acc", "final_acc", "best_acc",
                                "median_step_s", "reward_thirds", "min_to_trl_final", "frac_of_trl_time"]))
    print(row)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
