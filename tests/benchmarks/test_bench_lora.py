"""benchmarks/bench_lora.py --tiny on GRPO (tiny_grpo.yaml, 2 steps, full and LoRA rank 4, HF engine; the vLLM rows
where this interpreter imports vllm, else a recorded skip): the trained-parameter count is the adapters' (rank x (in +
out) per adapted linear), the optimizer state is AdamW's two fp32 moments of exactly the trained tensors, and the
LoRA checkpoint, final/ and (vLLM) per-rollout sync are a small fraction of full fine-tuning's."""

import json
import sys

from benchmarks import bench_lora

HIDDEN, KV, INTERMEDIATE, LAYERS, RANK = 128, 64, 256, 2, 4  # bench_lora.TINY_MODEL (kv: 1 head of 64)
LINEARS = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE),
           (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]  # q, k, v, o, gate, up, down: (in, out)


def test_tiny_grpo_full_against_lora(tmp_path):
    out = tmp_path / "lora.json"
    # the vLLM rows run where this interpreter imports vllm (.venv-vllm); in .venv they are a recorded skip
    bench_lora.main(["--tiny", "--stages", "grpo", "--ranks", str(RANK), "--engines", "hf,vllm", "--vllm-python",
                     sys.executable, "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {(row["method"], row["engine"]): row for row in result["rows"]}
    full, lora = rows["full", "hf"], rows[f"lora{RANK}", "hf"]
    assert lora["trained_params"] == LAYERS * sum(RANK * (i + o) for i, o in LINEARS)
    assert full["trained_share"] == 1.0 and 0 < lora["trained_share"] < 0.1
    for row in (full, lora):  # exp_avg + exp_avg_sq in fp32, plus a 4-byte step per tensor
        assert 0 <= row["optimizer_state_mb"] * 2**20 - 8 * row["trained_params"] < 4 * 1000, row
        assert row["steps"] == 2 and row["step_s"] > 0 and row["peak_rss_mb"] > 100
        assert row["sync_mb"] == row["sync_s"] == 0.0  # the hf engine samples from the trained module
    assert lora["checkpoint_mb"] < full["checkpoint_mb"] / 5 and lora["final_mb"] < full["final_mb"] / 5
    if ("full", "vllm") in rows:
        full_vllm, lora_vllm = rows["full", "vllm"], rows[f"lora{RANK}", "vllm"]
        assert lora_vllm["sync_mb"] * 2**20 == 4 * lora["trained_params"]  # fp32 adapters alone
        assert lora_vllm["first_sync_mb"] > full_vllm["sync_mb"] and full_vllm["sync_mb"] > 10 * lora_vllm["sync_mb"]
    else:
        assert all("cannot import vllm" in row["skipped"] for row in result["rows"])
