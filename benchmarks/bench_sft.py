"""SFT throughput (real tokens/s) of nova_rt against TRL's SFTTrainer with padding-free BFD packing, side by side.

Same model (SmolLM2-135M-Instruct from the bundled GGUF, a local HF dir), same data (data/sft/chat_mix.jsonl),
same packed length, lr, batch (1 packed row per optimizer step, no accumulation), fp32, CPU threads, and no
activation checkpointing on either side (TRL's SFTConfig defaults it on; we switch it off to compare like with
like). The two run in one process in alternating blocks (nova, TRL, nova, TRL, ...) so that drifting load on a
shared machine hits both; each block starts with untimed warmup steps. Throughput = real (non-pad) tokens of the
timed steps / their wall time, where a step is forward + backward + optimizer step; tokens_per_cpu_s divides by the
process CPU time instead (with 1 thread it is the compute alone, less sensitive to other jobs on a shared machine).
Each side runs under its own process settings: nova_rt's blocks with its `train.cpu_allocator` (cached: glibc keeps
freed large blocks, as `nova_rt.train` sets it up), TRL's blocks with glibc's defaults (restored and trimmed before
each TRL block), i.e. as each is launched on its own.

    python benchmarks/bench_sft.py [--steps 8] [--rounds 2] [--warmup 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import report  # noqa: E402

DATA = REPO / "data" / "sft" / "chat_mix.jsonl"


def nova_block(model_dir: str, args, run_dir: str):
    """A closure running `n` nova_rt SFT steps and returning [(tokens, seconds)] per step; state persists."""
    from nova_rt.backends.hf import sft_objective
    from nova_rt.config import build_config
    from nova_rt.cpu_runtime import cpu_allocator
    from nova_rt.data.packing import collate, loss_weights
    from nova_rt.distributed import DistInfo
    from nova_rt.models.causal import CausalLMLogprobs, batch_logprobs
    from nova_rt.stages.common import load_policy
    from nova_rt.stages.sft import build_sft_batches
    from nova_rt.trainer import Trainer

    cfg = build_config({
        "run": {"stage": "sft", "dir": run_dir, "seed": 0},
        "model": {"path": model_dir, "attn_impl": "auto"},
        "data": {"train_files": [str(DATA)], "max_seq_len": args.max_length},
        "packing": {"max_tokens": args.max_length},
        "optim": {"lr": args.lr, "scheduler": "constant"},
        "train": {"max_steps": 10**6, "global_batch": 1, "micro_batch": 1, "precision": "fp32",
                  "num_threads": args.threads},
        "checkpoint": {"resume": False, "save_final": False},
        "logging": {"progress_bar": False, "tensorboard": False, "plot": False},
    })
    hf_model, tok = load_policy(cfg)
    rows, sched, _, _ = build_sft_batches(cfg, tok, 1)
    trainer = Trainer(cfg, DistInfo(), CausalLMLogprobs(hf_model), run_dir=run_dir)

    def run(n: int) -> list[tuple[int, float]]:
        cpu_allocator(cfg.train.cpu_allocator)
        out = []
        for _ in range(n):
            batch_rows = [rows[i] for i in sched.global_rows(trainer.step)]
            mb = collate(batch_rows, loss_weights(batch_rows, "token"))
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step([mb], lambda model, mb: sft_objective(batch_logprobs(model, mb), mb))
            out.append((int(mb["input_ids"].numel()), time.perf_counter() - t0, time.process_time() - c0))
        return out

    return run


def trl_block(model_dir: str, args, run_dir: str):
    """A closure running `n` TRL SFTTrainer steps (a fresh trainer.train() each call) -> [(tokens, seconds)]."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from nova_rt.cpu_runtime import cpu_allocator

    tok = AutoTokenizer.from_pretrained(model_dir)
    # The cached dir's config.json keeps the GGUF `quantization_config` although its weights are dequantized fp32;
    # transformers' Trainer would refuse to fine-tune a model that claims to be quantized.
    config = AutoConfig.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    from nova_rt.data.chat import row_to_messages
    from nova_rt.data.io import read_rows

    # the same conversations nova_rt trains on, all as "messages" (the file mixes messages and prompt/response rows)
    dataset = Dataset.from_list([{"messages": row_to_messages(r)} for r in read_rows(DATA)])
    log: list[list] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            log.append([0, time.perf_counter(), time.process_time()])

        def on_step_end(self, *a, **k):
            log[-1][1] = time.perf_counter() - log[-1][1]
            log[-1][2] = time.process_time() - log[-1][2]

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            n = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            log[-1][0] += n
            return super().training_step(model, inputs, num_items_in_batch)

    def run(n: int) -> list[tuple[int, float]]:
        cpu_allocator("system")
        conf = SFTConfig(output_dir=run_dir, max_length=args.max_length, packing=True, packing_strategy="bfd",
                         padding_free=True, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                         learning_rate=args.lr, lr_scheduler_type="constant", max_steps=n, logging_steps=10**6,
                         save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                         gradient_checkpointing=False, dataloader_num_workers=0, seed=0, disable_tqdm=True)
        trainer = CountingTrainer(model=model, args=conf, train_dataset=dataset, processing_class=tok,
                                  callbacks=[StepTimer()])
        start = len(log)
        trainer.train()
        return [(int(t), float(s), float(c)) for t, s, c in log[start:]]

    return run


def summarize(provider: str, steps: list[tuple[int, float, float]]) -> dict:
    tokens, secs, cpu = sum(t for t, _, _ in steps), sum(s for _, s, _ in steps), sum(c for _, _, c in steps)
    return {"provider": provider, "steps": len(steps), "tokens_per_step": tokens / len(steps),
            "ms_per_step": 1e3 * statistics.median(s for _, s, _ in steps), "tokens_per_s": tokens / secs,
            "tokens_per_cpu_s": tokens / cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every block")
    p.add_argument("--rounds", type=int, default=2, help="alternating (nova_rt, TRL) block pairs")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sft_<device>_<date>.json)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from nova_rt.models.loading import ensure_builtin

    model_dir = str(ensure_builtin("smollm2-135m-instruct"))
    timed: dict[str, list] = {"nova_rt": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"nova_rt": nova_block(model_dir, args, f"{tmp}/nova"),
                   "trl": trl_block(model_dir, args, f"{tmp}/trl")}
        for r in range(args.rounds):
            for name, run in runners.items():
                steps = run(args.warmup + args.steps)[args.warmup:]
                timed[name].extend(steps)
                s = summarize(name, steps)
                print(f"round {r} {name}: {s['tokens_per_s']:.1f} tok/s, {s['tokens_per_cpu_s']:.1f} tok/CPU-s "
                      f"({s['tokens_per_step']:.0f} tok/step)", flush=True)
    rows = [summarize(name, steps) for name, steps in timed.items()]
    for row in rows:
        row.update(max_length=args.max_length, threads=args.threads, dtype="fp32")
    rows.append({"provider": "speedup nova_rt / trl", "tokens_per_s": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"],
                 "tokens_per_cpu_s": rows[0]["tokens_per_cpu_s"] / rows[1]["tokens_per_cpu_s"],
                 "loadavg_1m": os.getloadavg()[0]})
    report("sft", rows, ["provider", "steps", "tokens_per_step", "ms_per_step", "tokens_per_s", "tokens_per_cpu_s",
                         "loadavg_1m"], out=args.out)


if __name__ == "__main__":
    main()
