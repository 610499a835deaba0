"""packed_attention against an independent float64 oracle (nova_rt.kernels.reference.packed_attention_ref): a naive
loop over documents and query heads.

CPU tier: the torch path (fp32, fp64) and the Triton kernels under the interpreter (fp32, fp16; bf16 arithmetic is
wrong in the interpreter) on small random packs; input validation; the block table; the torch.library binding.
GPU tier: bf16 / fp16 / fp32 at T = 4k-16k with realistic document-length mixes.
Every test draws a fresh seed and names it in its assertion messages: rerun with NOVA_RT_SEED=<seed>.
Legend: T packed tokens, N query heads, K kv heads, H head dim.
"""

import math
import os

import pytest
import torch

import nova_rt.kernels.packed_attention as pa_module
from nova_rt.kernels.packed_attention import (
    _block_table,
    packed_attention,
    packed_attention_torch,
)
from nova_rt.kernels.reference import packed_attention_ref
from tests.helpers import assert_close_verbose, assert_no_worse_than_eager


def _seed() -> int:
    return int(os.environ.get("NOVA_RT_SEED", int.from_bytes(os.urandom(4), "little")))


def _random_lengths(gen: torch.Generator, T: int, n_docs: int, single: bool = True) -> list[int]:
    """n_docs random document lengths summing to T; with `single`, at least one document has length 1."""
    cuts = sorted((torch.randperm(T - 1, generator=gen)[: n_docs - 1] + 1).tolist())
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [T])]
    if single and 1 not in lengths and T > 1:
        i = max(range(len(lengths)), key=lambda j: lengths[j])
        lengths[i : i + 1] = [1, lengths[i] - 1]
    return lengths


def _cu(lengths: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _run(fn, q, k, v, g):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


def _inputs(gen, T, N, K, H, dtype, device="cpu"):
    mk = lambda n: torch.randn(T, n, H, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)  # noqa: E731
    return mk(N), mk(K), mk(K), mk(N)


# (T, documents, N, K, H, causal, softmax_scale): ratios 1/2/4, single doc, all-length-1, H = 128 and padded H = 80.
CASES = [
    (150, 6, 2, 2, 64, True, None),
    (131, 4, 4, 2, 64, False, 0.3),
    (97, 1, 4, 1, 64, True, None),
    (173, 9, 4, 1, 64, False, None),
    (77, 3, 2, 1, 128, True, 0.05),
    (61, 3, 2, 2, 80, True, None),
    (40, 40, 2, 1, 32, True, None),
]


def test_oracle_is_sdpa_on_one_document_and_keeps_documents_apart():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = _inputs(gen, 30, 4, 2, 16, torch.float64)
    out, *_ = packed_attention_ref(q, k, v, [30], g, True, 0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True, scale=0.25).transpose(0, 1)
    assert_close_verbose(out, ref, rtol=1e-12, atol=1e-12, name=f"oracle vs sdpa (seed {seed})")
    split, *_ = packed_attention_ref(q, k, v, [12, 18], g, True, 0.25)
    k2 = k.clone()
    k2[12:] += 1.0  # changing the second document must not touch the first
    split2, *_ = packed_attention_ref(q, k2, v, [12, 18], g, True, 0.25)
    assert torch.equal(split[:12], split2[:12]) and not torch.equal(split[12:], split2[12:]), f"seed {seed}"
    assert torch.equal(split[:12], out[:12]), f"causal prefix must match the unsplit doc (seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES + [(700, 12, 4, 2, 64, True, None), (600, 3, 2, 1, 64, False, None)])
def test_torch_path_matches_oracle(case, dtype):
    T, n_docs, N, K, H, causal, scale = case
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lengths = _random_lengths(gen, T, n_docs, single=n_docs > 1)
    q, k, v, g = _inputs(gen, T, N, K, H, dtype)
    got = _run(lambda q, k, v: packed_attention_torch(q, k, v, _cu(lengths), max(lengths), causal=causal,
                                                      softmax_scale=scale), q, k, v, g)
    want = packed_attention_ref(q, k, v, lengths, g, causal, scale if scale is not None else H**-0.5)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert got[0].dtype == dtype
        assert_close_verbose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                             name=f"{name} {case} {dtype} lengths={lengths} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_triton_interpreter_matches_oracle(case, dtype):
    T, n_docs, N, K, H, causal, scale = case
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lengths = _random_lengths(gen, T, n_docs, single=n_docs > 1)
    q, k, v, g = _inputs(gen, T, N, K, H, dtype)
    cu = _cu(lengths)
    kw = dict(causal=causal, softmax_scale=scale)
    got = _run(lambda q, k, v: packed_attention(q, k, v, cu, max(lengths), impl="triton", **kw), q, k, v, g)
    eager = _run(lambda q, k, v: packed_attention(q, k, v, cu, max(lengths), impl="torch", **kw), q, k, v, g)
    want = packed_attention_ref(q, k, v, lengths, g, causal, scale if scale is not None else H**-0.5)
    for name, a, e, o in zip(("out", "dq", "dk", "dv"), got, eager, want):
        assert a.dtype == dtype
        assert_no_worse_than_eager(a, e, o, name=f"{name} {case} {dtype} lengths={lengths} seed={seed}")


@pytest.mark.parametrize("causal", [True, False])
def test_triton_gpu_like_block_ratios(monkeypatch, causal):
    """Tile ratios like the CUDA configs (fwd/dQ BLOCK_M = 2-4 BLOCK_N, dK/dV BLOCK_N = 4 BLOCK_M), interpreted."""
    blocks = {"fwd": (64, 16), "dkdv": (16, 64), "dq": (64, 32)}
    monkeypatch.setattr(pa_module, "_config", lambda kind, *_: blocks[kind] + (4, 1))
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lengths = _random_lengths(gen, 190, 4)
    q, k, v, g = _inputs(gen, 190, 4, 2, 64, torch.float32)
    cu = _cu(lengths)
    got = _run(lambda q, k, v: packed_attention(q, k, v, cu, 190, causal=causal, impl="triton"), q, k, v, g)
    eager = _run(lambda q, k, v: packed_attention(q, k, v, cu, 190, causal=causal, impl="torch"), q, k, v, g)
    want = packed_attention_ref(q, k, v, lengths, g, causal, 64**-0.5)
    for name, a, e, o in zip(("out", "dq", "dk", "dv"), got, eager, want):
        assert_no_worse_than_eager(a, e, o, name=f"{name} lengths={lengths} seed={seed}")


def test_triton_empty_document_and_strided_inputs():
    """A zero-length document in cu_seqlens, and q/k/v that are views into one fused qkv tensor."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lengths = [17, 0, 1, 33]
    T, N, K, H = sum(lengths), 4, 2, 64
    qkv = torch.randn(T, N + 2 * K, H, generator=gen)
    q, k, v = qkv[:, :N], qkv[:, N : N + K], qkv[:, N + K :]
    g = torch.randn(T, N, H, generator=gen)
    cu = _cu(lengths)
    got = _run(lambda q, k, v: packed_attention(q, k, v, cu, 33, causal=False, impl="triton"), q, k, v, g)
    eager = _run(lambda q, k, v: packed_attention(q, k, v, cu, 33, causal=False, impl="torch"), q, k, v, g)
    want = packed_attention_ref(q, k, v, lengths, g, False, H**-0.5)
    for name, a, e, o in zip(("out", "dq", "dk", "dv"), got, eager, want):
        assert_no_worse_than_eager(a, e, o, name=f"{name} seed={seed}")


def test_auto_impl_on_cpu_is_the_torch_path():
    gen = torch.Generator().manual_seed(_seed())
    q, k, v, _ = _inputs(gen, 20, 2, 1, 16, torch.float32)
    cu = _cu([5, 15])
    assert torch.equal(packed_attention(q, k, v, cu, 15), packed_attention_torch(q, k, v, cu, 15))


@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("causal, reverse", [(True, False), (True, True), (False, False)])
def test_block_table_covers_every_block_once_heaviest_first(block, causal, reverse):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lengths = _random_lengths(gen, 500, 11) + [0, 70]
    cu = _cu(lengths)
    table, n_slots = _block_table(cu, sum(lengths), block, causal, reverse)
    assert table.shape == (2, n_slots) and table.dtype == torch.int32
    doc, blk = table.tolist()
    got = sorted((d, b) for d, b in zip(doc, blk) if d >= 0)
    want = [(s, b) for s, L in enumerate(lengths) for b in range(math.ceil(L / block))]
    assert got == want, f"seed {seed} lengths {lengths}"
    nblk = [math.ceil(L / block) for L in lengths]
    work = [-1 if d < 0 else ((nblk[d] - b if reverse else b + 1) if causal else nblk[d]) for d, b in zip(doc, blk)]
    assert work == sorted(work, reverse=True), f"seed {seed}"


def test_custom_op_registration_opcheck():
    """torch.library.opcheck: schema, fake tensor, autograd registration and AOT dispatch of both ops."""
    gen = torch.Generator().manual_seed(_seed())
    q, k, v, g = _inputs(gen, 21, 2, 1, 16, torch.float32)
    cu = _cu([1, 12, 8])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.nova_rt.packed_attention_fwd.default, (q, k, v, cu, True, 0.25))
    out, lse = torch.ops.nova_rt.packed_attention_fwd(q, k, v, cu, True, 0.25)
    args = (g, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, True, 0.25)
    torch.library.opcheck(torch.ops.nova_rt.packed_attention_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_through_the_custom_op():
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = _inputs(gen, 40, 2, 1, 16, torch.float32)
    cu = _cu([7, 1, 32])
    compiled = torch.compile(lambda q, k, v: packed_attention(q, k, v, cu, 32, impl="triton"), fullgraph=True)
    got = _run(compiled, q, k, v, g)
    want = packed_attention_ref(q, k, v, [7, 1, 32], g, True, 0.25)
    for name, a, o in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close_verbose(a, o, rtol=1e-4, atol=1e-5, name=f"compiled {name} seed={seed}")


def _bad(**over):
    q, k, v = torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    args = dict(q=q, k=k, v=v, cu=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=6)
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    (dict(q=torch.randn(10, 4)), "q must be a 3-D"),
    (dict(k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16)), "multiple of kv heads"),
    (dict(v=torch.randn(10, 2, 8)), "k shape .* != v shape"),
    (dict(k=torch.randn(9, 2, 16), v=torch.randn(9, 2, 16)), "does not match q"),
    (dict(q=torch.randn(10, 4, 16, dtype=torch.float16)), "dtypes differ"),
    (dict(q=torch.randint(0, 3, (10, 4, 16))), "q dtype"),
    (dict(cu=torch.tensor([0, 4, 10])), "int32"),
    (dict(cu=torch.tensor([[0, 4, 10]], dtype=torch.int32)), "1-D int32"),
    (dict(cu=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
    (dict(cu=torch.tensor([0, 4, 9], dtype=torch.int32)), "end at T=10"),
    (dict(cu=torch.tensor([1, 4, 10], dtype=torch.int32)), "start at 0"),
    (dict(max_seqlen=5), "max_seqlen=5"),
    (dict(max_seqlen=0), "max_seqlen must be a positive int"),
])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_inputs_raise_clear_errors(over, match, impl):
    a = _bad(**over)
    with pytest.raises((ValueError, TypeError), match=match):
        packed_attention(a["q"], a["k"], a["v"], a["cu"], a["max_seqlen"], impl=impl)


def test_impl_and_dtype_errors():
    a = _bad()
    with pytest.raises(ValueError, match="impl must be"):
        packed_attention(a["q"], a["k"], a["v"], a["cu"], 6, impl="cuda")
    with pytest.raises(TypeError, match="fp64"):
        packed_attention(a["q"].double(), a["k"].double(), a["v"].double(), a["cu"], 6, impl="triton")


def test_cu_seqlens_changed_in_place_is_checked_again():
    a = _bad()
    packed_attention(a["q"], a["k"], a["v"], a["cu"], 6)  # passes and is remembered
    a["cu"][1] = 7
    with pytest.raises(ValueError, match="max_seqlen=6"):
        packed_attention(a["q"], a["k"], a["v"], a["cu"], 6)


# ------------------------------------------------------------------------------------------------------ GPU tier
def _realistic_lengths(gen, T):
    """Lognormal lengths (median ~400, capped at 4096) plus a few length-1 documents, summing to T."""
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(4096, max(1, int(torch.empty(1).log_normal_(6.0, 1.0, generator=gen).item()))))
        if torch.rand(1, generator=gen).item() < 0.1:
            lengths.append(1)
    lengths[-1] -= sum(lengths) - T
    return [L for L in lengths if L > 0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T, N, K, H, causal", [(4096, 8, 2, 64, True), (8192, 8, 8, 128, False),
                                                (16384, 16, 4, 128, True), (4099, 4, 1, 80, True)])
def test_triton_gpu_matches_oracle(dtype, T, N, K, H, causal):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lengths = _realistic_lengths(gen, T)
    q, k, v, g = _inputs(gen, T, N, K, H, dtype, device="cuda")
    cu = _cu(lengths, device="cuda")
    got = _run(lambda q, k, v: packed_attention(q, k, v, cu, max(lengths), causal=causal), q, k, v, g)
    eager = _run(lambda q, k, v: packed_attention(q, k, v, cu, max(lengths), causal=causal, impl="torch"),
                 q, k, v, g)
    want = packed_attention_ref(q, k, v, lengths, g, causal, H**-0.5)
    for name, a, e, o in zip(("out", "dq", "dk", "dv"), got, eager, want):
        assert_no_worse_than_eager(a, e, o, name=f"{name} T={T} {dtype} seed={seed} n_docs={len(lengths)}")
