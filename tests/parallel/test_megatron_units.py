"""Single-process checks of the megatron glue: packing, shard layouts, the packed attention fallback, config mapping,
and the CPU shims (in a subprocess, so this test process's megatron stays unpatched).

Random inputs are drawn afresh each run; the seed is printed and included in failure messages.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nova_rt.parallel import hf_convert, packed
from nova_rt.parallel.megatron_model import HFArch, _sdpa_per_document, hf_arch, padded_vocab_size

REPO = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("NOVA_RT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
print(f"seed={SEED}")


def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def _row(lengths: list[int], vocab: int = 50, gen=None) -> dict:
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    ids = torch.randint(0, vocab, (T,), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths if n > 0])
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": pos, "cu_seqlens": cu}


# ----------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("lengths", [[1], [5], [1, 1, 1], [3, 1, 7], [4, 0, 2], [9, 1]])
def test_next_token_targets_match_naive_loop(lengths):
    gen = _gen(len(lengths))
    row = _row(lengths, gen=gen)
    row["labels"][torch.rand(len(row["labels"]), generator=gen) < 0.3] = -100
    cu = packed.validate(row)
    got = packed.next_token_targets(row["labels"], cu)
    want = []
    bounds = row["cu_seqlens"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        want += [int(row["labels"][t + 1]) for t in range(a, b - 1)] + ([-100] if b > a else [])
    assert got.tolist() == want, f"seed={SEED} lengths={lengths}"


def test_prepare_pads_to_common_multiple_with_a_masked_document():
    rows = [_row([3, 1, 5], gen=_gen(1)), _row([1, 2], gen=_gen(2))]
    out = packed.prepare(rows, multiple=4, device="cpu", pad_id=7)
    assert [r.input_ids.numel() for r in out] == [12, 12]
    short = out[1]
    assert short.length == 3 and short.cu_seqlens.tolist() == [0, 1, 3, 12]
    assert short.input_ids[3:].eq(7).all() and short.targets[3:].eq(-100).all()
    assert short.position_ids.tolist() == [0, 0, 1] + list(range(9))
    assert short.max_seqlen == 9 and out[0].max_seqlen == 5


@pytest.mark.parametrize("field, mutate, match", [
    ("labels", lambda r: r.update(labels=r["labels"][:-1]), "labels"),
    ("cu_seqlens", lambda r: r.update(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "end at T"),
    ("cu_seqlens", lambda r: r.update(cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32)), "non-decreasing"),
    ("cu_seqlens", lambda r: r.update(cu_seqlens=r["cu_seqlens"].float()), "int32"),
    ("position_ids", lambda r: r.update(position_ids=torch.arange(9)), "restart"),
    ("input_ids", lambda r: r.pop("input_ids"), "missing"),
])
def test_bad_micro_batch_names_the_field(field, mutate, match):
    row = _row([4, 5], gen=_gen(3))
    mutate(row)
    with pytest.raises(ValueError, match=match) as err:
        packed.validate(row, index=2)
    assert "micro-batch 2" in str(err.value) and field in str(err.value)


# ----------------------------------------------------------------------------------------------- shard layouts
class _DictReader:
    """In-memory stand-in for SafetensorsReader."""

    def __init__(self, tensors):
        self.tensors = tensors

    def rows(self, name, start=0, stop=None):
        return self.tensors[name][start:stop].clone()

    def cols(self, name, start, stop):
        return self.tensors[name][:, start:stop].clone()


def _arch(heads, kv_heads, vocab, head_dim=4, hidden=12, ffn=24) -> HFArch:
    return HFArch(model_type="qwen2", hidden=hidden, ffn=ffn, layers=1, heads=heads, kv_heads=kv_heads,
                  head_dim=head_dim, vocab=vocab, eps=1e-6, rope_theta=1e4, rope_scaling_factor=None, qkv_bias=True,
                  tied=False, max_positions=64, init_std=0.02, pad_token_id=0)


@pytest.mark.parametrize("heads, kv_heads, tp", [(6, 3, 1), (6, 3, 3), (4, 2, 2), (8, 2, 2), (4, 4, 4)])
def test_shards_match_naive_layout_and_reassemble_exactly(heads, kv_heads, tp):
    arch = _arch(heads, kv_heads, vocab=301)
    gen, h, d = _gen(heads * 10 + tp), arch.head_dim, arch.hidden
    t = {"q.w": torch.randn(heads * h, d, generator=gen), "k.w": torch.randn(kv_heads * h, d, generator=gen),
         "v.w": torch.randn(kv_heads * h, d, generator=gen), "q.b": torch.randn(heads * h, generator=gen),
         "k.b": torch.randn(kv_heads * h, generator=gen), "v.b": torch.randn(kv_heads * h, generator=gen),
         "gate": torch.randn(arch.ffn, d, generator=gen), "up": torch.randn(arch.ffn, d, generator=gen),
         "down": torch.randn(d, arch.ffn, generator=gen), "emb": torch.randn(arch.vocab, d, generator=gen)}
    reader, vp = _DictReader(t), padded_vocab_size(arch.vocab, tp)
    specs = [("qkv", ("q.w", "k.w", "v.w"), ((heads + 2 * kv_heads) * h // tp, d)),
             ("qkv", ("q.b", "k.b", "v.b"), ((heads + 2 * kv_heads) * h // tp,)),
             ("fc1", ("gate", "up"), (2 * arch.ffn // tp, d)), ("row", ("down",), (d, arch.ffn // tp)),
             ("vocab", ("emb",), (vp // tp, d))]
    pieces = []
    q_per = heads // kv_heads
    for rank in range(tp):
        for kind, names, shape in specs:
            shard = hf_convert.load_shard(reader, kind, names, arch, shape, tp, rank)
            assert tuple(shard.shape) == shape, f"seed={SEED}: {kind} rank {rank}"
            pieces.append((kind, names, rank, shard))
        # naive layout of rank's qkv weight: for each of its groups, its q heads, then k, then v
        naive = []
        for g in range(rank * kv_heads // tp, (rank + 1) * kv_heads // tp):
            naive += [t["q.w"][(g * q_per + i) * h:(g * q_per + i + 1) * h] for i in range(q_per)]
            naive += [t["k.w"][g * h:(g + 1) * h], t["v.w"][g * h:(g + 1) * h]]
        assert torch.equal(pieces[-5][3], torch.cat(naive)), f"seed={SEED}: qkv layout, rank {rank}"
        n = arch.ffn // tp
        assert torch.equal(pieces[-3][3], torch.cat([t["gate"][rank * n:(rank + 1) * n],
                                                      t["up"][rank * n:(rank + 1) * n]]))
    full = hf_convert.assemble(pieces, arch, tp)
    for name, tensor in t.items():
        assert torch.equal(full[name], tensor), f"seed={SEED}: {name} not reassembled exactly (tp={tp})"


def test_padded_vocab_rows_are_zero():
    arch = _arch(4, 2, vocab=7)
    emb = torch.randn(7, 12, generator=_gen(5))
    shard = hf_convert.load_shard(_DictReader({"e": emb}), "vocab", ("e",), arch, (4, 12), 2, 1)
    assert torch.equal(shard[:3], emb[4:]) and shard[3].eq(0).all()


# ----------------------------------------------------------------------------------------------- attention fallback
# ----------------------------------------------------------------------------------------------- last-stage outputs
class _GroupRank:
    """Stands in for the tensor-parallel group where only this rank's position is read."""

    def __init__(self, rank: int):
        self._rank = rank

    def rank(self) -> int:
        return self._rank


def test_local_logits_divide_by_temperature_and_mask_the_padded_vocab():
    from nova_rt.parallel.megatron_outputs import local_logits

    logits_BTV = torch.randn(1, 3, 4, generator=_gen(3))
    first = local_logits(logits_BTV, 2.0, vocab_size=6, group=_GroupRank(0))  # columns 0-3: all real
    last = local_logits(logits_BTV, 2.0, vocab_size=6, group=_GroupRank(1))  # columns 4-7: 6 and 7 are padding
    assert torch.equal(first, logits_BTV[0] / 2.0), f"seed={SEED}"
    assert torch.equal(last[:, :2], logits_BTV[0, :, :2] / 2.0), f"seed={SEED}"
    assert last[:, 2:].eq(torch.finfo(torch.float32).min).all()


def test_score_outputs_take_each_documents_last_token_and_skip_the_padding():
    from nova_rt.parallel.megatron_outputs import score_outputs

    row = packed.prepare([_row([3, 1, 2], gen=_gen(4))], multiple=8, device="cpu")[0]
    assert row.cu_seqlens.tolist() == [0, 3, 4, 6, 8]  # a padding document at positions 6-7
    assert score_outputs(row, torch.arange(8.0).reshape(1, 8, 1))["scores"].tolist() == [2.0, 3.0, 5.0]


@pytest.mark.parametrize("lengths, hq, hkv", [([1], 2, 1), ([5, 1, 7], 4, 2), ([3, 3], 3, 3), ([1, 1, 2], 6, 2)])
def test_sdpa_fallback_matches_float64_loop(lengths, hq, hkv):
    gen, d = _gen(sum(lengths) + hq), 8
    T = sum(lengths)
    q, k, v = (torch.randn(T, n, d, generator=gen) for n in (hq, hkv, hkv))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = _sdpa_per_document(q, k, v, cu, max(lengths), causal=True, softmax_scale=0.3)
    ref = torch.zeros(T, hq, d, dtype=torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for head in range(hq):
            kv = head // (hq // hkv)
            for i in range(a, b):
                s = torch.stack([q[i, head].double() @ k[j, kv].double() * 0.3 for j in range(a, i + 1)])
                ref[i, head] = (s.softmax(0)[:, None] * v[a:i + 1, kv].double()).sum(0)
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-5, f"seed={SEED}: fallback attention error {err:.3e}"


# ----------------------------------------------------------------------------------------------- config mapping
def test_hf_arch_maps_llama3_scaling_and_rejects_unsupported():
    from nova_rt.models.tiny import tiny_config

    cfg = tiny_config("llama")
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    arch = hf_arch(cfg)
    assert arch.rope_theta == 5e5 and arch.rope_scaling_factor == 8.0 and not arch.qkv_bias
    assert hf_arch(tiny_config("qwen2", tie=True)).qkv_bias and hf_arch(tiny_config("qwen2", tie=True)).tied
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(NotImplementedError, match="yarn"):
        hf_arch(cfg)
    cfg = tiny_config("llama")
    cfg.mlp_bias = True
    with pytest.raises(NotImplementedError, match="mlp_bias"):
        hf_arch(cfg)


# ----------------------------------------------------------------------------------------------- CPU shims
def test_cpu_shims_apply_and_fail_loudly_when_a_target_vanishes():
    script = textwrap.dedent("""
        import importlib, sys
        sys.path.insert(0, REPO)
        from tests.parallel import megatron_cpu_shims as shims
        shims.apply()
        print("applied", len(shims.check()))
        mod = importlib.import_module("megatron.core.pipeline_parallel.schedules")
        mod.torch = importlib.import_module("torch")          # a shim silently undone
        try:
            shims.check()
        except shims.ShimError as e:
            print("check raised:", e)
        rnd = importlib.import_module("megatron.core.tensor_parallel.random")
        del rnd._set_cuda_rng_state                            # a target that megatron renamed
        shims._APPLIED.clear()
        try:
            shims.apply()
        except shims.ShimError as e:
            print("apply raised:", e)
    """).replace("REPO", repr(str(REPO)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "applied" in proc.stdout, proc.stdout
    assert "check raised: CPU shims not in place: megatron.core.pipeline_parallel.schedules.torch" in proc.stdout
    assert "apply raised: megatron-core changed: megatron.core.tensor_parallel.random._set_cuda_rng_state" \
        in proc.stdout, proc.stdout


def test_core_attention_uses_nova_kernel_when_importable():
    from nova_rt.parallel.megatron_model import packed_attention_fn

    try:
        from nova_rt.kernels.packed_attention import packed_attention
    except ImportError:
        assert packed_attention_fn() is _sdpa_per_document
    else:
        assert packed_attention_fn() is packed_attention


@pytest.mark.parametrize("fields, match", [
    ({"virtual_pipeline_parallel": 2, "pipeline_parallel": 2}, "pipeline_parallel > 2"),
    ({"tensor_parallel": 3}, "tensor_parallel=3"),
    ({"pipeline_parallel": 3}, "divisible"),  # 8 layers
    ({"sequence_parallel": True}, "sequence_parallel"),
    ({"context_parallel": 0}, "context_parallel"),
    ({"backend": "hf"}, "backend"),
])
def test_bad_parallel_config_is_rejected_before_any_process_group(fields, match):
    from nova_rt.config import ParallelConfig
    from nova_rt.parallel.megatron_trainer import _check_parallel

    arch = dataclasses.replace(_arch(4, 2, vocab=301), layers=8)
    pcfg = ParallelConfig(**{"backend": "megatron", **fields})
    with pytest.raises((ValueError, NotImplementedError), match=match):
        _check_parallel(arch, pcfg)

