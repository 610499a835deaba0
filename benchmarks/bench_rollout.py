"""Rollout engines side by side: nova_rt's HF decode loop and colocated vLLM on the same prompts and sampling.

One process, one model (SmolLM2-135M-Instruct from the bundled GGUF, or --model DIR), the same chat-rendered
prompts, G samples each, temperature 1, up to --max-new-tokens. Each "step" is what GRPO does per rollout: for vLLM a
weight sync from the HF model (the version moves every step, as after an optimizer step) and then the rollout; for
the HF loop the rollout alone. The first --warmup steps are not timed. Reported per engine: median s/step (p20/p80),
generated tokens/s (tokens over rollout seconds), sync s/step, and the process CPU seconds per step. On a GPU,
--sync-1p5b also times one full sync of a Qwen2-1.5B-shaped model (random weights, bf16) into vLLM.

    python benchmarks/bench_rollout.py [--steps 3] [--warmup 1] [--prompts 8] [--group 4] [--max-new-tokens 48]

Needs vllm (docs/rollout.md, "Install (CPU)"); without it only the HF row is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from benchmarks.common import report  # noqa: E402

QUESTIONS = ["What is 17 + 25?", "Name three primary colours.", "What is the capital of France?",
             "Write a haiku about rain.", "What is 9 times 7?", "Give one synonym for 'happy'.",
             "Why is the sky blue? One sentence.", "What is 100 minus 37?", "Translate 'thank you' to Spanish.",
             "List two prime numbers above 10.", "What day comes after Monday?", "Define 'photosynthesis' briefly."]


def _prompts(tok, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        out.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    return [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in out]


def _run(name: str, engine, prompts, args, bump) -> dict:
    times, cpu, toks, syncs = [], [], 0, []
    for step in range(args.warmup + args.steps):
        bump()
        t0, c0 = time.perf_counter(), time.process_time()
        ro = engine.generate(prompts, args.group)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        m = engine.pop_metrics()  # vllm: rollout_sync_s (logprob_check off: not part of the timing)
        if step >= args.warmup:
            times.append(dt), cpu.append(dc), syncs.append(m.get("rollout_sync_s", 0.0))
            toks += sum(len(r) for r in ro.response_ids)
    times_sorted = sorted(times)
    q = lambda p: times_sorted[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    sync = statistics.median(syncs)
    return {"engine": name, "s_per_step": statistics.median(times), "s_p20": q(0.2), "s_p80": q(0.8),
            "tokens_per_s": toks / max(sum(times) - sum(syncs), 1e-9), "sync_s": sync,
            "cpu_s_per_step": statistics.median(cpu), "tokens": toks, "steps": args.steps}


def _sync_1p5b(args) -> dict:
    """One full sync of a Qwen2-1.5B-shaped bf16 model (random weights) into vLLM on CUDA."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from nova_rt.models.tiny import byte_tokenizer
    from nova_rt.rollout.engine import RolloutConfig, Sampling, build_rollout_engine

    cfg = Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    eng = build_rollout_engine(RolloutConfig(engine="vllm", sleep=False, logprob_check=False), model,
                               byte_tokenizer(), Sampling(max_new_tokens=8), policy_version=lambda: 0)
    eng.sync_weights()
    times = [eng.sync_weights() for _ in range(3)]
    eng.close()
    return {"engine": "vllm sync, Qwen2-1.5B shape bf16", "sync_s": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engines", default="hf,vllm")
    ap.add_argument("--sync-1p5b", action="store_true", help="CUDA: also time a 1.5B-parameter sync")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from nova_rt.models.loading import load_causal_lm
    from nova_rt.rollout.engine import RolloutConfig, Sampling, build_rollout_engine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    model, tok = load_causal_lm(args.model, dtype=dtype, attn_impl="sdpa")
    model.to(device)
    prompts = _prompts(tok, args.prompts)
    version = [0]
    bump = lambda: version.__setitem__(0, version[0] + 1)  # noqa: E731
    s = Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    rows = []
    for name in args.engines.split(","):
        try:
            eng = build_rollout_engine(RolloutConfig(engine=name, sleep=False, logprob_check=False), model, tok, s,
                                       policy_version=lambda: version[0])
        except Exception as exc:  # noqa: BLE001 - vllm missing: keep the other row
            print(f"{name}: skipped ({type(exc).__name__}: {exc})")
            continue
        rows.append(_run(name, eng, prompts, args, bump))
        eng.close()
    if args.sync_1p5b and device == "cuda":
        rows.append(_sync_1p5b(args))
    for r in rows:
        r.update(device=device, dtype=dtype, prompts=args.prompts, group=args.group,
                 max_new_tokens=args.max_new_tokens, threads=args.threads, load=os.getloadavg()[0])
    report("rollout", rows, ["engine", "s_per_step", "s_p20", "s_p80", "tokens_per_s", "sync_s", "cpu_s_per_step",
                             "tokens", "load"], args.out)


if __name__ == "__main__":
    main()
