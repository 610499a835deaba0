"""Multi-turn rollout cost: time per episode and tokens/s for 1, 2 and 4 turns, HF loop with and without KV reuse
across turns, and vLLM (issue 27 item 9).

A scripted environment asks for another turn after every reply ("Go on.") until the episode has --turns turns
(grpo.env.max_turns is the same), so the turn count is fixed whatever the model says. One process, one model
(SmolLM2-135M-Instruct from the bundled GGUF, or --model DIR; --tiny: a random tiny Llama with the byte tokenizer,
the CI check), --prompts rows x --group episodes per rollout, temperature 1, up to --tokens-per-turn tokens a turn.
The first --warmup rollouts are not timed. Reported per turn count and mode (--modes: hf_reuse, the HF loop with
grpo.env.reuse_kv_cache; hf, without: every turn prefills the whole trajectory so far, so prefill grows
quadratically with turns; vllm, needs the vllm package, its prefix cache on): median s per rollout and per episode,
sampled tokens/s (the policy's tokens over rollout seconds; also per process CPU second, steadier on a shared
machine), prefilled tokens per episode (prompt tokens the engine computed: the HF driver's prompt_tokens -
cached_tokens, vLLM's rollout_prompt_tokens - rollout_prefix_cached_tokens, whose cache holds whole blocks of 128
tokens on CPU) and the process CPU seconds.

    python benchmarks/bench_multiturn.py [--turns 1,2,4] [--modes hf,hf_reuse] [--prompts 4] [--group 4] [--tiny]

Writes benchmarks/results/bench_multiturn_<device>_<date>.json (+ .png with matplotlib) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, report  # noqa: E402

QUESTIONS = ["Count the planets of the solar system.", "Name an animal that lives in the sea.",
             "What is 12 + 30?", "Describe rain in a few words.", "Name a colour of the rainbow.",
             "What is the opposite of cold?", "Give one word that rhymes with light.", "What is 9 times 3?"]


class ScriptedTurnsEnv:
    """Asks for another turn after every reply until `turns` replies were given; reward 1.0 then (the count is what
    is controlled, not the content)."""

    def __init__(self, example: dict, turns: int = 1):
        self.question, self.turns, self.replies = example["prompt"], turns, 0

    def reset(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    def step(self, reply: str) -> tuple[list[dict], float, bool]:
        self.replies += 1
        if self.replies >= self.turns:
            return [], 1.0, True
        return [{"role": "user", "content": "Go on."}], 0.0, False


def prefilled_tokens(trajectory, shared_opening: bool, group_size: int) -> float:
    """Tokens the driver fed the model as a prompt over the episode: before each sampled turn, the whole trajectory
    so far (no KV reuse); the opening prompt counted 1/group_size when the group shares it (prefilled once)."""
    total, previous = 0.0, False
    for position, sampled in enumerate(trajectory.sampled_mask):
        if sampled and not previous:
            opening = position == trajectory.prompt_len
            total += position / group_size if opening and shared_opening else position
        previous = sampled
    return total


def _load(args):
    if args.tiny:
        from nova_rt.models.tiny import build_tiny_model, byte_tokenizer

        return build_tiny_model("llama", seed=0, vocab_size=259), byte_tokenizer()
    from nova_rt.models.loading import load_causal_lm

    return load_causal_lm(args.model, dtype="float32", attn_impl="sdpa")


def make_engine(model, tok, mode: str, args):
    from nova_rt.rollout.engine import HFEngine, RolloutConfig, Sampling, build_rollout_engine

    if mode == "vllm":
        return build_rollout_engine(RolloutConfig(engine="vllm", logprob_check=0), model, tok,
                                    Sampling(max_new_tokens=args.tokens_per_turn, temperature=1.0, seed=0),
                                    policy_version=lambda: 0)
    return HFEngine(model, tok, max_new_tokens=args.tokens_per_turn, temperature=1.0, seed=0)


def run_turns(model, tok, turns: int, args, mode: str = "hf", engine=None) -> dict:
    """Time --steps rollouts (after --warmup) of --prompts x --group episodes of exactly `turns` turns."""
    from nova_rt.envs import EnvConfig, build_env_factory
    from nova_rt.rollout.multiturn import MultiTurnDriver

    cfg = EnvConfig(type="user", path="benchmarks.bench_multiturn:ScriptedTurnsEnv", params={"turns": turns},
                    max_turns=turns, max_new_tokens_per_turn=args.tokens_per_turn, max_total_tokens=4096,
                    reuse_kv_cache=mode == "hf_reuse")
    engine = engine or make_engine(model, tok, mode, args)
    driver = MultiTurnDriver(engine, tok, build_env_factory(cfg), cfg)
    examples = [{"prompt": QUESTIONS[index % len(QUESTIONS)]} for index in range(args.prompts)]
    times, cpu, sampled, prefilled, recount, turns_seen, lengths = [], [], 0, 0.0, 0.0, [], []
    for step in range(args.warmup + args.steps):
        if mode == "vllm":
            engine.llm.reset_prefix_cache()  # each rollout starts cold, as after a weight sync
            engine.pop_metrics()
        wall, process = time.perf_counter(), time.process_time()
        rollout = driver.run(examples, args.group)
        wall, process = time.perf_counter() - wall, time.process_time() - process
        if step < args.warmup:
            continue
        counts = engine.pop_metrics() if mode == "vllm" else rollout.metrics
        prefix = "rollout_" if mode == "vllm" else ""
        prefilled += counts[prefix + "prompt_tokens"] - counts[prefix + ("prefix_cached_tokens" if mode == "vllm"
                                                                         else "cached_tokens")]
        errors = [trajectory.error for trajectory in rollout.trajectories if trajectory.error]
        if errors:
            raise RuntimeError(f"scripted environment failed: {errors[0]}")
        times.append(wall), cpu.append(process)
        for trajectory in rollout.trajectories:
            sampled += sum(trajectory.sampled_mask)
            recount += prefilled_tokens(trajectory, args.group > 1, args.group)
            turns_seen.append(trajectory.turns)
            lengths.append(len(trajectory.token_ids))
    episodes = args.prompts * args.group
    return {"turns": turns, "episodes": episodes, "s_per_rollout": statistics.median(times),
            "s_per_episode": statistics.median(times) / episodes, "sampled_tokens_per_s": sampled / sum(times),
            "sampled_tokens_per_episode": sampled / len(turns_seen),
            "prefilled_tokens_per_episode": prefilled / len(turns_seen),
            "prefilled_without_reuse_per_episode": recount / len(turns_seen), "mode": mode,
            "episode_tokens_mean": statistics.fmean(lengths), "turns_mean": statistics.fmean(turns_seen),
            "cpu_s_per_rollout": statistics.median(cpu),
            "sampled_tokens_per_cpu_s": sampled / sum(cpu), "kv_reuse": mode != "hf", "steps": args.steps}


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for mode in dict.fromkeys(row["mode"] for row in rows):
        mine = [row for row in rows if row["mode"] == mode]
        turns = [row["turns"] for row in mine]
        left.plot(turns, [row["sampled_tokens_per_cpu_s"] for row in mine], "o-", label=mode)
        right.plot(turns, [row["prefilled_tokens_per_episode"] for row in mine], "s--", label=mode)
        for axis in (left, right):
            axis.set_xticks(turns)
    left.set(xlabel="turns per episode", ylabel="sampled tokens / CPU s", title="throughput")
    right.set(xlabel="turns per episode", ylabel="tokens", title="prefilled tokens per episode")
    left.legend()
    right.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="a random tiny Llama: checks the script in seconds")
    ap.add_argument("--turns", default="1,2,4")
    ap.add_argument("--modes", default="hf,hf_reuse", help="comma-separated: hf, hf_reuse, vllm")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens-per-turn", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = _load(args)
    rows = []
    for mode in args.modes.split(","):
        engine = make_engine(model, tok, mode, args)
        for turns in (int(value) for value in args.turns.split(",")):
            row = run_turns(model, tok, turns, args, mode, engine)
            row.update(model="tiny" if args.tiny else args.model, prompts=args.prompts, group=args.group,
                       tokens_per_turn=args.tokens_per_turn, threads=args.threads, load=os.getloadavg()[0])
            rows.append(row)
        if mode == "vllm":
            engine.close()
    out = args.out or (str(RESULTS_DIR / "bench_multiturn_tiny.json") if args.tiny else None)
    columns = ["mode", "turns", "s_per_episode", "sampled_tokens_per_s", "sampled_tokens_per_cpu_s",
               "sampled_tokens_per_episode", "prefilled_tokens_per_episode", "turns_mean", "cpu_s_per_rollout", "load"]
    path = report("bench_multiturn", rows, columns, out)
    plot(rows, path.with_suffix(".png"))
    return path


if __name__ == "__main__":
    main()
