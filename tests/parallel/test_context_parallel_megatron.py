"""Context parallelism on the megatron backend (nova_rt.parallel.context_parallel) on CPU with gloo.

CP=2 SFT on a tiny Llama and a tiny Qwen2 (GQA, tied embeddings) must give the same per-step losses, gradient norms,
token counts, row-0 log-probs and updated weights as the same model at CP=1 (DP=2) and as the unpacked transformers
reference of tests/parallel/test_megatron_trainer.py, with its tolerances. The rows hold ragged documents: always a
length-1 document and one shorter than 2*CP, so documents are padded inside the row and a CP rank can hold
only padding of it.
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel.test_megatron_trainer import _run_suite, row_from_lengths

LAYOUTS = {"tp1pp1_dp2": {}, "cp2": {"context_parallel": 2}}  # world of 2: the CP=1 run first (the comparison base)


def _cp_row(gen: torch.Generator, vocab: int) -> dict:
    """One packed row: a length-1 document, one of 2-3 tokens (< 2*CP) and 1-3 of 4-13, shuffled; prompts masked."""
    lengths = [1, int(torch.randint(2, 4, (1,), generator=gen))]
    lengths += torch.randint(4, 14, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
    return row_from_lengths(gen, vocab, lengths)


@pytest.mark.distributed
def test_llama_cp2_matches_cp1_and_reference(tmp_path):
    _run_suite("llama", tmp_path, LAYOUTS, nproc=2, row=_cp_row)


@pytest.mark.distributed
def test_qwen2_tied_cp2_matches_cp1_and_reference(tmp_path):
    _run_suite("qwen2", tmp_path, LAYOUTS, nproc=2, row=_cp_row)


@pytest.mark.distributed
@pytest.mark.slow
def test_llama_cp2_with_dp_tp_sp_pp_matches_reference(tmp_path):
    """World of 4: CP=2 next to DP=2 (sums over DP x CP), TP=2 + SP (the local CP share split again over TP) and
    PP=2, against pure DP=4 and transformers."""
    layouts = {"tp1pp1_dp4": {}, "cp2_dp2": {"context_parallel": 2},
               "cp2_tp2_sp": {"context_parallel": 2, "tensor_parallel": 2, "sequence_parallel": True},
               "cp2_pp2": {"context_parallel": 2, "pipeline_parallel": 2}}
    _run_suite("llama", tmp_path, layouts, nproc=4, row=_cp_row)


# ----------------------------------------------------------------------------------------------- single process
@pytest.mark.parametrize("cp", [2, 3])
def test_split_covers_every_token_once_with_balanced_chunks(cp):
    from nova_rt.parallel import packed
    from nova_rt.parallel.context_parallel import gathered_order, local_positions, pad_documents

    lengths = [1, 2, 5, 2 * cp, 13]
    cu = torch.tensor([0] + lengths).cumsum(0)
    cu_p, index = pad_documents(cu, cp)
    assert ((cu_p[1:] - cu_p[:-1]) % (2 * cp) == 0).all()
    assert index[index >= 0].tolist() == list(range(sum(lengths)))  # original order, padding only after a doc
    locals_ = [local_positions(cu_p, cp, r) for r in range(cp)]
    assert sorted(torch.cat(locals_).tolist()) == list(range(int(cu_p[-1])))
    assert len({x.numel() for x in locals_}) == 1
    order = gathered_order(cu_p, cp)
    assert torch.equal(torch.cat(locals_)[order], torch.arange(int(cu_p[-1])))
    # prepare keeps each local token's id, target and global (RoPE) position
    row = {"input_ids": torch.arange(100, 100 + sum(lengths)), "cu_seqlens": cu.to(torch.int32),
           "position_ids": torch.cat([torch.arange(n) for n in lengths])}
    row["labels"] = row["input_ids"].clone()
    full = packed.prepare([row], multiple=1, device="cpu")[0]
    for r in range(cp):
        got = packed.prepare([row], multiple=1, device="cpu", cp=cp, cp_rank=r)[0]
        real = got.cp_index >= 0
        assert torch.equal(got.input_ids[real], full.input_ids[got.cp_index[real]])
        assert torch.equal(got.targets[real], full.targets[got.cp_index[real]])
        assert torch.equal(got.position_ids[real], full.position_ids[got.cp_index[real]])
        assert (got.targets[~real] == packed.IGNORE_INDEX).all()


def test_attention_and_kv_gradients_match_unsplit(monkeypatch):
    """Every CP rank's output with the all-gather replaced by the concatenation of all ranks' K/V leaves: the summed
    backward over ranks is what the gather's reduce-scatter does. Output and dQ, dK, dV must equal per-document
    causal SDPA on the unsplit row (float64)."""
    import megatron.core.tensor_parallel as tp

    from nova_rt.parallel.context_parallel import context_parallel_attention, local_positions, pad_documents
    from nova_rt.parallel.megatron_model import _sdpa_per_document

    cp, n, nkv, h = 2, 4, 2, 8
    lengths = [3, 1, 9, 4, 2]
    cu = torch.tensor([0] + lengths).cumsum(0)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(int(cu[-1]), heads, h, generator=gen, dtype=torch.float64, requires_grad=True)
               for heads in (n, nkv, nkv))
    want = _sdpa_per_document(q, k, v, cu, max(lengths), causal=True, softmax_scale=0.3)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad(want, (q, k, v), g)
    cu_p, index = pad_documents(cu, cp)
    pad = lambda x: torch.where((index >= 0)[:, None, None], x.detach()[index.clamp(min=0)], 0.0)  # noqa: E731
    shards = [[pad(x)[local_positions(cu_p, cp, r)].requires_grad_() for r in range(cp)] for x in (q, k, v)]
    k_all, v_all = torch.cat(shards[1]), torch.cat(shards[2])

    class Group:
        def __init__(self, rank):
            self.r = rank

        def size(self):
            return cp

        def rank(self):
            return self.r

    gp = pad(g)
    for r in range(cp):
        monkeypatch.setattr(tp, "gather_from_sequence_parallel_region",
                            lambda x, tensor_parallel_output_grad, group: k_all if x is shards[1][group.r] else v_all)
        out = context_parallel_attention(shards[0][r], shards[1][r], shards[2][r], cu_p, softmax_scale=0.3,
                                         group=Group(r))
        mine = local_positions(cu_p, cp, r)
        real = index[mine] >= 0
        torch.testing.assert_close(out[real], want.detach()[index[mine][real]])
        out.backward(gp[mine])
    for got, ref in zip(shards, (dq, dk, dv)):
        grad = torch.zeros((int(cu_p[-1]), *ref.shape[1:]), dtype=torch.float64)
        for r in range(cp):
            grad[local_positions(cu_p, cp, r)] = got[r].grad
        torch.testing.assert_close(grad[index >= 0], ref)
        assert (grad[index < 0] == 0).all()  # padding keys are seen by no real query


def test_stages_without_cp_support_are_rejected_with_what_is_supported():
    from nova_rt.config import ParallelConfig
    from nova_rt.parallel.megatron_trainer import _reject_context_parallel

    _reject_context_parallel(ParallelConfig(backend="megatron"), "forward")  # CP=1: nothing to reject
    with pytest.raises(NotImplementedError, match="forward .*SFT .*logprobs"):
        _reject_context_parallel(ParallelConfig(backend="megatron", context_parallel=2), "forward")
