"""Time to quality: held-out greedy accuracy against training wall-clock, nova_rt's GRPO stage vs TRL's GRPOTrainer.

Both providers get the same model (SmolLM2-135M-Instruct from the bundled GGUF, fp32), the same task, train prompts
and held-out prompts (reasoning-gym basic_arithmetic, train seed from the task, held-out seed + 7919: nova_rt's own
split), the same prompt rendering (system prompt, chat template, assistant turn pre-filled with the expression; TRL
receives the rendered text and the script checks that it tokenizes to nova_rt's prompt ids), the same reward
(`reward_fn` below: one Python function both call, the math verifier on the reply), the same hyper-parameters (lr,
constant schedule without warmup, AdamW betas, G, prompts per step, max new tokens, temperature 1, beta 0, token-mean
/ "dapo" aggregation, clip 0.2 / 0.28, grad clip 1, one optimizer step per rollout batch), the same number of threads,
on the same machine, one provider after the other for each seed (so load changes hit both).

`--task` picks the task and its shared settings:
  * `quickstart` (default): the task `configs/quickstart_grpo.yaml` learns on, read from that file (+ and - only,
    2 terms of 1-2 digits, no parentheses or negation, calculator system prompt, prefill "{metadata[expression]} =",
    its max_new_tokens 8, lr, betas, G and prompts per step); nova_rt also gets the quickstart's nova_rt-only settings
    (`grpo.sampling.dynamic_sampling: true`). TRL 1.16's GRPOTrainer has no dynamic sampling: no GRPOConfig field drops
    equal-reward groups or draws more prompts (it only logs `frac_reward_zero_std`; the replay-buffer GRPO trainer
    of later TRL docs is not in 1.16's `trl.experimental`), so TRL trains on all 8 groups, signal or not. The
    quickstart's 2 warmup steps are left out for both (HF's warmup starts at lr 0, nova_rt's at lr / warmup).
  * `all-ops`: the former quickstart task (+ - * /, parentheses, negation) with 48 new tokens, no nova_rt-only
    settings.
`--nova-set KEY=VALUE` adds nova_rt-only overrides; all of them are recorded in the JSON (`nova_only`).

Budgets: `--minutes` / `--max-steps` for both, or `--nova-budget-frac F`: TRL runs first for each seed and nova_rt's
training budget is F x TRL's training minutes of that seed, steps uncapped (F = 0.5 is issue 16's goal: reach TRL's
final accuracy in at most half its time).

Evaluation is the same code for both (`greedy_correct`): nova_rt's batched greedy decode (token-for-token equal to
HF `generate`) of the policy being trained on the held-out prompts, scored by `reward_fn`; the per-prompt results are
kept, so changes carry paired standard errors. It runs at step 0, every `--eval-every` optimizer steps and after the
last step; its time is excluded from the training clock, which counts rollouts, rewards, forward/backward and
optimizer steps only (process CPU time is logged too: the machines are shared and wall time is noisy).

Each (provider, seed) runs in its own subprocess of this script (`--worker`), under the interpreter that runs the
script: use `.venv-bench/bin/python` (TRL must not be installed into .venv). Outputs: a JSON with every curve, a
PNG of accuracy vs training minutes, and a markdown row for docs/benchmarks.md.

    .venv-bench/bin/python benchmarks/bench_grpo_quality.py --threads 2 --seeds 0,1 --max-steps 24 \
        --nova-budget-frac 0.5 [--task all-ops] [--providers nova_rt,trl] \
        [--nova-set grpo.sampling.dynamic_sampling=false]
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

QUICKSTART_GRPO = Path(__file__).resolve().parents[1] / "configs" / "quickstart_grpo.yaml"
ALL_OPS_TASK = {"name": "basic_arithmetic", "category": "arithmetic", "size": 2000, "seed": 0,
                "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
                "prefill": "{metadata[expression]} ="}
FIXED = {"sampling": {"temperature": 1.0}, "loss": {"beta": 0.0, "agg": "token-mean", "eps_low": 0.2, "eps_high": 0.28}}
"""grpo settings the script hands both providers as they are (TRL: temperature, beta, loss_type "dapo",
epsilon[_high])."""


def task_preset(name: str) -> dict:
    """The gym task, system prompt, shared hyper-parameters and nova_rt-only grpo settings of a --task."""
    if name == "all-ops":
        return {"task": ALL_OPS_TASK, "system": SYSTEM, "max_new_tokens": 48, "lr": 1e-5, "betas": (0.9, 0.999),
                "group": 4, "prompts": 8, "nova_only": {}}
    import yaml

    q = yaml.safe_load(QUICKSTART_GRPO.read_text())
    g, o = q["grpo"], q["optim"]
    s, d = g.get("sampling", {}), g["data"]
    differs = {f"{sec}.{k}": g.get(sec, {}).get(k) for sec, kv in FIXED.items() for k, v in kv.items()
               if g.get(sec, {}).get(k, v) != v}
    if differs or o.get("scheduler") != "constant" or len(d["gym_tasks"]) != 1:
        raise SystemExit(f"{QUICKSTART_GRPO} no longer matches what this script gives TRL ({FIXED}, a constant lr, "
                         f"one gym task): {differs or o.get('scheduler')}; update FIXED / run_trl")
    task = {k: v for k, v in d["gym_tasks"][0].items() if k != "eval_size"}  # --eval-size sets the held-out size
    return {"task": task, "system": d["system_prompt"], "max_new_tokens": s["max_new_tokens"], "lr": o["lr"],
            "betas": tuple(o["betas"]), "group": s["group_size"], "prompts": s["prompts_per_step"],
            "nova_only": {"sampling.dynamic_sampling": s.get("dynamic_sampling", False)}}


def resolve(args) -> None:
    """Fill the options left unset from the --task preset; args.preset keeps the task and nova_rt-only settings."""
    args.preset = task_preset(args.task)
    for key in ("max_new_tokens", "lr", "betas", "group", "prompts"):
        if getattr(args, key) is None:
            setattr(args, key, args.preset[key])


# ----------------------------------------------------------------------------------------------- shared pieces
def reward_fn(completions: list[str], answers: list[str]) -> list[float]:
    """The one reward both providers call: 1 when the reply's final answer (nova_rt's math extraction) is right."""
    from nova_rt.rewards.math import answers_match, extract_answer

    return [float(answers_match(extract_answer(c), a)) for c, a in zip(completions, answers)]


def nova_reward(completions: list[str], samples: list[dict]) -> list[float]:
    """reward_fn as a nova_rt `user` reward (grpo.rewards: {type: user, function: <this file>:nova_reward})."""
    return reward_fn(completions, [s["answer"] for s in samples])


def prompt_records(args) -> tuple[list[dict], list[dict]]:
    from nova_rt.data.rl import gym_prompts

    task, system = {**args.preset["task"], "eval_size": args.eval_size}, args.preset["system"]
    return gym_prompts(task, "train", system), gym_prompts(task, "eval", system)


def greedy_correct(model, tok, prompt_ids: list[list[int]], answers: list[str], max_new_tokens: int,
                   batch: int = 200) -> list[float]:
    """Per-prompt held-out greedy reward of `model` (any HF causal LM): the same decode and scoring for both."""
    from nova_rt.rollout.generate import RolloutGenerator

    gen = RolloutGenerator(model, tok, max_new_tokens=max_new_tokens)
    texts = []
    for i in range(0, len(prompt_ids), batch):
        texts += gen.generate(prompt_ids[i:i + batch], 1, greedy=True).texts
    return reward_fn(texts, answers)


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
        correct = greedy_correct(model, self.tok, self.eval_ids, self.eval_answers, self.args.max_new_tokens)
        acc = sum(correct) / len(correct)
        model.train()
        self.curve.append({"step": step, "train_min": self.clock.wall / 60, "train_cpu_min": self.clock.cpu / 60,
                           "eval_acc": acc, "eval_s": time.perf_counter() - t0,
                           "correct": "".join(str(int(c)) for c in correct)})
        self.last_eval = step
        print(f"step {step}: train {self.clock.wall / 60:.2f} min, held-out greedy accuracy {acc:.3f}", flush=True)

    def step_done(self, model, step: int, reward: float, step_s: float) -> bool:
        """Log one optimizer step; evaluate when due. True when the training budget is spent."""
        self.steps.append({"step": step, "reward": reward, "step_s": step_s, "train_min": self.clock.wall / 60})
        over = self.args.minutes is not None and self.clock.wall >= 60 * self.args.minutes
        done = over or step >= self.args.max_steps
        if done or step % self.args.eval_every == 0:
            self.eval(model, step)
        return done


# ----------------------------------------------------------------------------------------------- providers
def run_nova(args, model_dir: str, seed: int) -> Recorder:
    from nova_rt.config import _set_dotted, build_config  # _set_dotted: the --set parser, for --nova-set
    from nova_rt.stages.grpo import GRPORun

    raw = {"run": {"stage": "grpo", "dir": tempfile.mkdtemp(prefix="bench_grpo_quality_nova_"), "seed": seed},
           "model": {"path": model_dir},
           "optim": {"lr": args.lr, "scheduler": "constant", "betas": list(args.betas), "warmup_steps": 0},
           "train": {"max_steps": 100000, "num_threads": args.threads},
           "checkpoint": {"every": 0, "save_final": False}, "logging": {"progress_bar": False, "tensorboard": False},
           "grpo": {"sampling": {"group_size": args.group, "prompts_per_step": args.prompts,
                                 "max_new_tokens": args.max_new_tokens, **FIXED["sampling"]},
                    "data": {"gym_tasks": [{**args.preset["task"], "eval_size": 0}],
                             "system_prompt": args.preset["system"]},
                    "loss": dict(FIXED["loss"]),
                    "rewards": [{"type": "user", "function": f"{Path(__file__).resolve()}:nova_reward"}]}}
    for key, value in nova_only(args).items():
        _set_dotted(raw, key, value, "--nova-set")
    run = GRPORun(build_config(raw, "<bench_grpo_quality>"))
    _, evals = prompt_records(args)
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
    train, evals = prompt_records(args)
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
                     max_completion_length=args.max_new_tokens, temperature=FIXED["sampling"]["temperature"],
                     top_p=1.0, top_k=0,
                     learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                     adam_beta1=args.betas[0], adam_beta2=args.betas[1], weight_decay=0.0, max_grad_norm=1.0,
                     beta=FIXED["loss"]["beta"], loss_type="dapo", epsilon=FIXED["loss"]["eps_low"],
                     epsilon_high=FIXED["loss"]["eps_high"],
                     max_steps=args.max_steps,
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


def nova_only(args) -> dict:
    """nova_rt-only config overrides: the preset's grpo settings, then --nova-set (parsed as YAML values)."""
    import yaml

    out = {f"grpo.{k}": v for k, v in args.preset["nova_only"].items()}
    for item in args.nova_set:
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


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


def paired(before: str, after: str) -> tuple[float, float]:
    """Mean change and its paired standard error between two per-prompt results ("0110..." strings)."""
    d = [int(b) - int(a) for a, b in zip(before, after)]
    return statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        c, s = r["curve"], r["steps"]
        thirds = [s[i * len(s) // 3:(i + 1) * len(s) // 3] for i in range(3)]
        gain, gain_se = paired(c[0]["correct"], c[-1]["correct"])
        rows.append({"provider": r["provider"], "seed": r["seed"], "steps": len(s), "train_min": c[-1]["train_min"],
                     "base_acc": c[0]["eval_acc"], "final_acc": c[-1]["eval_acc"], "gain": gain, "gain_se": gain_se,
                     "best_acc": max(p["eval_acc"] for p in c),
                     "median_step_s": statistics.median(x["step_s"] for x in s) if s else float("nan"),
                     "mean_step_s": 60 * c[-1]["train_min"] / max(len(s), 1),
                     "reward_thirds": "/".join(f"{statistics.fmean(x['reward'] for x in t):.2f}" if t else "-"
                                               for t in thirds),
                     "load_1m": r.get("loadavg_1m")})
    for row, run in zip(rows, runs):  # against TRL's run of the same seed
        trl = next((x for x in runs if x["provider"] == "trl" and x["seed"] == run["seed"]), None)
        if trl is None or row["provider"] == "trl":
            continue
        trl_final, trl_min = trl["curve"][-1], trl["curve"][-1]["train_min"]
        row["trl_gained"] = trl_final["eval_acc"] > trl["curve"][0]["eval_acc"]  # else the target is the base model
        row["min_to_trl_final"] = time_to(run["curve"], trl_final["eval_acc"])
        if row["min_to_trl_final"] is not None and trl_min > 0:
            row["frac_of_trl_time"] = row["min_to_trl_final"] / trl_min
        row["final_minus_trl"], row["final_minus_trl_se"] = paired(trl_final["correct"], run["curve"][-1]["correct"])
    return rows


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"nova_rt": "tab:blue", "trl": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for r in runs:
        c = r["curve"]
        ax.plot([p["train_min"] for p in c], [p["eval_acc"] for p in c], marker="o", ms=3,
                ls=styles[r["seed"] % len(styles)], color=colors.get(r["provider"]), alpha=0.85,
                label=f"{r['provider']} seed {r['seed']}")
    ax.set_xlabel("training wall-clock minutes (evaluation excluded)")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def readme_row(rows: list[dict], args) -> str:
    def cell(p):
        xs = [r for r in rows if r["provider"] == p]
        return "; ".join(f"seed {r['seed']}: {r['base_acc']:.3f} → {r['final_acc']:.3f} ({r['gain']:+.3f} ± "
                         f"{r['gain_se']:.3f}) in {r['steps']} steps, {r['train_min']:.1f} min "
                         f"({r['mean_step_s']:.1f} s/step)" for r in xs) or "not run"

    ratio = []
    for r in rows:
        if r["provider"] != "nova_rt" or "final_minus_trl" not in r:
            continue
        reach = (f"TRL's final accuracy reached at {r['min_to_trl_final']:.2f} min = {r['frac_of_trl_time']:.2f}× "
                 "TRL's time" if r.get("frac_of_trl_time") is not None else "TRL's final accuracy not reached")
        if not r["trl_gained"]:
            reach += " (TRL ended at or below its base accuracy: nothing to reach)"
        ratio.append(f"seed {r['seed']}: {reach}; final nova_rt − TRL {r['final_minus_trl']:+.3f} ± "
                     f"{r['final_minus_trl_se']:.3f}")
    met = [r["trl_gained"] and r.get("frac_of_trl_time") is not None and r["frac_of_trl_time"] <= 0.5
           for r in rows if r["provider"] == "nova_rt" and "final_minus_trl" in r]
    if met:
        ratio.append(f"goal (reach a TRL gain in ≤ 0.5× TRL's time) met on {sum(met)} of {len(met)} seeds")
    only = ", ".join(f"{k}={v}" for k, v in nova_only(args).items()) or "none"
    budget = (f"TRL {args.max_steps} steps, nova_rt {args.nova_budget_frac:g}× TRL's minutes" if args.nova_budget_frac
              else f"{args.max_steps} steps" + (f" or {args.minutes:g} min" if args.minutes else ""))
    setting = (f"SmolLM2-135M, task {args.task}, {args.prompts} prompts × {args.group}, {args.max_new_tokens} new "
               f"tokens, lr {args.lr:g} constant, betas {tuple(args.betas)}, {args.eval_size} held-out prompts "
               f"(greedy, paired s.e.), {budget}, {args.threads} thread(s); nova_rt-only: {only}")
    return f"| `bench_grpo_quality.py` | {setting} | {cell('nova_rt')} | TRL GRPOTrainer {cell('trl')} | " \
           f"{'; '.join(ratio) or '-'} |"


def run_worker(argv: list[str], provider: str, seed: str, threads: int, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_grpo_quality_")) / "run.json"
    cmd = [sys.executable, __file__, *argv, "--worker", f"{provider}:{seed}", "--worker-out", str(out), *extra]
    load0 = os.getloadavg()[0]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return {**json.loads(out.read_text()), "loadavg_1m_start": load0, "date": time.strftime("%Y-%m-%d %H:%M")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["quickstart", "all-ops"], default="quickstart")
    p.add_argument("--providers", default="nova_rt,trl")
    p.add_argument("--seeds", default="0")
    p.add_argument("--minutes", type=float, default=None, help="training wall-clock budget per run (default: none)")
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--nova-budget-frac", type=float, default=None,
                   help="TRL first; nova_rt trains for this fraction of TRL's training minutes (steps uncapped)")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=None, help="default: the task's")
    p.add_argument("--group", type=int, default=None, help="default: the task's")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (quickstart 8, all-ops 48)")
    p.add_argument("--lr", type=float, default=None, help="default: the task's")
    p.add_argument("--betas", type=float, nargs=2, default=None, help="default: the task's")
    p.add_argument("--nova-set", action="append", default=[], help="nova_rt-only override KEY=VALUE")
    p.add_argument("--out", default=None)
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="summarise the runs of earlier outputs (e.g. one per seed) instead of running")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    argv = list(argv if argv is not None else sys.argv[1:])
    args = p.parse_args(argv)
    if args.combine:  # the settings of the runs being summarised, from the first file
        stored = json.loads(Path(args.combine[0]).read_text())["args"]
        vars(args).update({k: v for k, v in stored.items() if k not in ("combine", "out", "worker", "worker_out")})
    resolve(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        return worker(args)
    providers = args.providers.split(",")
    if args.nova_budget_frac:
        providers.sort(key=lambda x: x != "trl")  # TRL first: its time sets nova_rt's budget
    runs = [r for f in args.combine or [] for r in json.loads(Path(f).read_text())["runs"]]
    for seed in [] if args.combine else args.seeds.split(","):
        for provider in providers:  # interleaved: both providers see the same stretch of load
            extra = []
            if provider == "nova_rt" and args.nova_budget_frac:
                trl = next(r for r in runs if r["provider"] == "trl" and r["seed"] == int(seed))
                extra = ["--minutes", str(args.nova_budget_frac * trl["curve"][-1]["train_min"]),
                         "--max-steps", "100000"]
            runs.append(run_worker(argv, provider, seed, args.threads, extra))
    rows = summarise(runs)
    env = environment()
    stem = Path(args.out) if args.out else RESULTS_DIR / f"grpo_quality_{args.task}_{env['device']}_" \
                                                        f"{time.strftime('%Y%m%d')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    row = readme_row(rows, args)
    meta = {k: v for k, v in vars(args).items() if k != "preset"}
    if args.combine:
        meta["seeds"] = ",".join(str(r["seed"]) for r in runs if r["provider"] == "trl") or meta["seeds"]
    stem.with_suffix(".json").write_text(json.dumps(
        {"benchmark": "grpo_quality", "env": env, "args": meta, "task": args.preset["task"],
         "system_prompt": args.preset["system"], "shared": FIXED, "nova_only": nova_only(args),
         "trl_dynamic_sampling": "none in TRL 1.16 GRPOTrainer (no GRPOConfig field; trains on every group)",
         "rows": rows, "runs": runs, "readme_row": row}, indent=2))
    plot(runs, stem.with_suffix(".png"), row.split("|")[2].strip())
    print(markdown_table(rows, ["provider", "seed", "steps", "train_min", "base_acc", "final_acc", "gain", "gain_se",
                                "median_step_s", "mean_step_s", "reward_thirds", "min_to_trl_final",
                                "frac_of_trl_time", "final_minus_trl", "final_minus_trl_se"]))
    print(row)
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
