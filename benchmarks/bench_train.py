"""Training throughput: tokens/s and MFU of packed SFT steps, Megatron backend (and the plain HF model for comparison).

    python benchmarks/bench_train.py                       # GPU: ~1.2B Llama-shaped model, packed 8k rows, bf16
    python benchmarks/bench_train.py --size tiny           # CPU: a tiny model, just exercises the script

Model FLOPs per step = 6 * N * tokens + 6 * L * (n_heads * head_dim) * sum_i s_i^2 (causal attention inside each
packed document of length s_i: QK^T and PV are 2 * s^2 * d each forward, halved by causality, x3 for fwd + bwd),
where N counts every parameter that takes part in a matmul (all but the input embedding table; the LM head counts).
MFU = model FLOPs / step time / peak dense bf16 FLOP/s of the device (no recomputation counted).

The model is randomly initialised from a config (no download). Rows are packed to exactly --seq tokens from
documents with log-normal lengths (median ~600 tokens); 70% of the tokens are supervised.
On CPU the Megatron backend needs megatron-core's CUDA calls shimmed; the script then borrows the test-only shims
(tests/parallel/megatron_cpu_shims.py), runs fp32 and reports no MFU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import report, time_fn  # noqa: E402

SIZES = {  # Llama-3.2-1B shape (1.24B params with its 128k vocab); tiny for CPU smoke runs
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def write_config(size: str, seq: int, out: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(**SIZES[size], max_position_embeddings=max(seq, 8192), rms_norm_eps=1e-5, rope_theta=500000.0,
                pad_token_id=0, bos_token_id=None, eos_token_id=2).save_pretrained(out)
    return out


def packed_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """n packed rows of exactly `seq` tokens; log-normal document lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        lengths, total = [], 0
        while total < seq:
            length = int(min(seq - total, max(1, math.exp(6.4 + 0.8 * torch.randn(1, generator=gen).item()))))
            lengths.append(length)
            total += length
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        ids = torch.randint(3, vocab, (seq,), generator=gen)
        labels = torch.where(torch.rand(seq, generator=gen) < 0.7, ids, torch.full_like(ids, -100))
        labels[cu[:-1].long()] = -100
        rows.append({"input_ids": ids, "labels": labels, "cu_seqlens": cu,
                     "position_ids": torch.cat([torch.arange(n_) for n_ in lengths])})
    return rows


def model_flops(cfg: dict, rows: list[dict]) -> float:
    h, f, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    n_matmul = layers * (h * hd * (heads + 2 * kv) + heads * hd * h + 3 * h * f) + v * h
    tokens = sum(r["input_ids"].numel() for r in rows)
    sq = sum(float(((r["cu_seqlens"][1:] - r["cu_seqlens"][:-1]).double() ** 2).sum()) for r in rows)
    return 6.0 * n_matmul * tokens + 6.0 * layers * heads * hd * sq


def _init_single_process() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")


def megatron_step_fn(model_dir: Path, dtype: torch.dtype, rows: list[dict]):
    from nova_rt.config import ParallelConfig

    if not torch.cuda.is_available():
        from tests.parallel import megatron_cpu_shims

        megatron_cpu_shims.apply()
    _init_single_process()
    from nova_rt.parallel.megatron_trainer import MegatronTrainer

    backend = MegatronTrainer(model_dir, ParallelConfig(backend="megatron"), dtype=dtype, lr=1e-5, grad_clip=1.0,
                              load_weights=False)
    return lambda: backend.train_step(rows)


def hf_step_fn(model_dir: Path, dtype: torch.dtype, rows: list[dict]):
    """Plain transformers: packed rows with reset position_ids (sdpa / FA2 varlen), token-sum loss, AdamW."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    impl = "flash_attention_2" if device == "cuda" and _has("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype,
                                             attn_implementation=impl).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    tokens = sum(int((r["labels"] != -100).sum()) for r in rows)

    def step():
        opt.zero_grad(set_to_none=True)
        for r in rows:
            logits = model(input_ids=r["input_ids"][None].to(device), position_ids=r["position_ids"][None].to(device),
                           use_cache=False).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, r["labels"][1:].to(device), reduction="sum") / tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--seq", type=int, default=8192 if torch.cuda.is_available() else 256)
    ap.add_argument("--rows", type=int, default=2, help="packed rows (micro-batches) per optimizer step")
    ap.add_argument("--backends", default="megatron,hf")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/...)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32  # megatron's bf16 optimizer needs CUDA
    cfg = SIZES[args.size]
    rows = packed_rows(args.rows, args.seq, cfg["vocab_size"])
    flops, peak = model_flops(cfg, rows), peak_flops()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_config(args.size, args.seq, Path(tmp) / "model")
        for name in args.backends.split(","):
            fn = {"megatron": megatron_step_fn, "hf": hf_step_fn}[name](model_dir, dtype, rows)
            t = time_fn(fn, device="cuda" if cuda else "cpu", warmup=2, reps=args.reps)
            step_s = t["ms"] / 1e3
            row = {"backend": name, "model": args.size, "seq": args.seq, "rows": args.rows, "dtype": str(dtype),
                   "ms_per_step": t["ms"], "ms_p20": t["ms_p20"], "ms_p80": t["ms_p80"],
                   "tokens_per_s": args.rows * args.seq / step_s, "model_tflops": flops / step_s / 1e12,
                   "mfu": (flops / step_s / peak) if peak else None}
            if cuda:
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            results.append(row)
            print(json.dumps(row))
            del fn
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    report("bench_train", results, ["backend", "model", "seq", "rows", "dtype", "ms_per_step", "tokens_per_s",
                                    "model_tflops", "mfu", "peak_mem_gib"], out=args.out)


if __name__ == "__main__":
    main()
