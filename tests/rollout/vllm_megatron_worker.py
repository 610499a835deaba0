"""torchrun worker for test_vllm_megatron.py: a megatron TP=2 policy (gloo, CPU shims) and one colocated vLLM engine
per rank (rollout TP 1), each synced from the HF copy the ranks gather the TP shards into, as the megatron GRPO stage
does before its rollouts (nova_rt/backends/megatron.py, MegatronPolicy.sync_generation_model: backend.hf_state_dict() ->
hf.load_state_dict).

    torchrun --nproc_per_node=2 tests/rollout/vllm_megatron_worker.py MODEL_DIR OUT_DIR STEPS

Per optimizer step: train_step on the same packed rows on both ranks (TP), gather, every rank's engine generates
(which syncs: the policy version moved). Then each rank writes OUT_DIR/rank<r>.json: the names of the engine tensors
that differ from the gathered trainer weights after the last sync (must be none), the names that differ after one
more step that is not synced (must be all: the check can fail), and whether generation on rank 0 alone (what the
stage does: only the first model-parallel rank samples) returns without the other rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.parallel import megatron_cpu_shims  # noqa: E402
from tests.rollout.engine_weights import engine_state_dict  # noqa: E402

megatron_cpu_shims.apply()


def _rows(gen: torch.Generator, vocab: int, n: int = 2) -> list[dict]:
    """Packed SFT rows (2-4 documents, first token of each masked) for the backend's default next-token loss."""
    rows = []
    for _ in range(n):
        lengths = torch.randint(3, 12, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        ids = torch.randint(3, vocab, (int(cu[-1]),), generator=gen)
        labels = ids.clone()
        labels[cu[:-1].long()] = -100
        rows.append({"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(k) for k in lengths]),
                     "cu_seqlens": cu})
    return rows


def _differ(engine, want: dict) -> list[str]:
    got = engine_state_dict(engine)
    missing = sorted(set(want) - set(got))
    if missing:
        raise RuntimeError(f"engine lacks {missing[:5]}")
    return [k for k, v in want.items() if not torch.equal(got[k], v)]


def main() -> None:
    model_dir, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from transformers import AutoModelForCausalLM

    from nova_rt.config import ParallelConfig
    from nova_rt.models.tiny import byte_tokenizer
    from nova_rt.parallel.megatron_trainer import MegatronTrainer
    from nova_rt.rollout.engine import RolloutConfig, Sampling, build_rollout_engine

    be = MegatronTrainer(str(model_dir), ParallelConfig(backend="megatron", tensor_parallel=2), dtype=torch.float32,
                         lr=1e-2, seed=1)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    version = [0]
    engine = build_rollout_engine(RolloutConfig(engine="vllm", sync_bucket_mb=1, logprob_check=-1), hf,
                                  byte_tokenizer(), Sampling(max_new_tokens=8, seed=100 + rank),
                                  policy_version=lambda: version[0], backend="megatron")
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(7)  # the same rows on both ranks: one data-parallel replica
    prompts = [[5, 6, 7, 8], [9, 10]]
    report: dict = {"rank": rank, "steps": steps, "metrics": []}

    def gather() -> dict:
        state = be.hf_state_dict()  # collective
        missing, unexpected = hf.load_state_dict(state, strict=False)
        if unexpected or set(missing) - ({"lm_head.weight"} if be.arch.tied else set()):
            raise RuntimeError(f"gather: missing {missing}, unexpected {unexpected}")
        return {k: v.detach().clone() for k, v in hf.state_dict().items()}

    for _ in range(steps):
        be.train_step(_rows(gen, vocab))
        version[0] += 1
        trainer = gather()
        ro = engine.generate(prompts, 2)  # syncs from hf
        report["metrics"].append(engine.pop_metrics())
        assert len(ro.response_ids) == 4
    report["differ_after_sync"] = _differ(engine, trainer)
    report["n_tensors"] = len(trainer)
    be.train_step(_rows(gen, vocab))  # one step the engine never sees
    version[0] += 1
    report["differ_when_stale"] = _differ(engine, gather())
    # The stage samples on the first model-parallel rank only: rank 0 generates (and syncs) while rank 1 waits.
    if rank == 0:
        report["rank0_alone_responses"] = len(engine.generate(prompts, 2).response_ids)
        report["differ_rank0_alone"] = _differ(engine, {k: v.detach() for k, v in hf.state_dict().items()})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    engine.close()  # vLLM's own shutdown would destroy torch.distributed's default group; close keeps it
    report["pg_after_close"] = dist.is_initialized()
    report["gather_after_close"] = len(be.hf_state_dict())  # megatron collectives still work (the stage's final save)
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
