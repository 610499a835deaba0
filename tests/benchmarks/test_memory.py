"""benchmarks/memory.py: LiveBytes against hand-counted allocations on small real CPU tensors, and its fast pointwise
path against the real meta kernels."""

import functools

import torch

from benchmarks.memory import LiveBytes, NoLaunch


def test_live_bytes_counts_known_allocations():
    x = torch.randn(1000)  # made before the mode: not counted
    with LiveBytes() as mem:
        a = torch.empty(1000)  # 4000 live
        b = a * 2  # 8000
        v = b[10:]  # a view allocates nothing
        b.add_(1)  # in place: nothing
        torch.mul(a, 3, out=b)  # out=: nothing
        del a  # 4000
        c = torch.empty(250, dtype=torch.float64)  # 6000
        c.resize_(2000)  # grows to 16000 bytes: 20000 live, the peak
        del c  # 4000
        d = x.clone()  # 8000
    assert mem.peak == 20000
    assert mem.peak_excluding(b) == 16000 and mem.peak_excluding(b, d) == 16000
    assert mem.live_bytes == 8000 and v.untyped_storage().nbytes() == 4000
    assert [op for op, _ in mem.breakdown()] == ["aten.mul.Tensor", "aten.empty.memory_format"]


def test_live_bytes_sees_tensors_kept_only_by_autograd():
    """exp saves its output for backward: freed by the Python code, still alive in the graph until backward."""
    w = torch.randn(100, 100, requires_grad=True)
    with LiveBytes() as mem:
        y = (w * 2).exp()  # w * 2: 40000 bytes, freed after exp; y: 40000, saved by exp's backward
        loss = y.sum()
        del y
        assert mem.live_bytes == 40000 + 4  # the saved y and the scalar loss
        loss.backward()  # grad buffers come and go; the graph (and y) is freed
    assert mem.live_bytes == 40000 + 4  # w.grad and loss
    assert mem.peak == 2 * 40000 + 4 + 4  # in exp's backward: saved y, d y, loss and its seed gradient


def test_fast_pointwise_matches_meta_kernels():
    """Promotion (bf16 + fp32, int + float scalar, comparisons), broadcasting, multi-output ops, in place and out=."""
    def body(a, b, i):
        y = a.float() + b  # promotion
        z = torch.where(i > 3, y, 0.5)  # comparison and where
        m, e = torch.frexp(z)  # two outputs
        q = (i * 2.5).exp_()  # int * float scalar
        torch.add(a, 1, out=a)
        return (m, e, q, (a[:, :1] - b).to(torch.float16))

    peaks = []
    for fast in (True, False):
        a = torch.empty(64, 32, dtype=torch.bfloat16, device="meta")
        b, i = torch.empty(32, device="meta"), torch.empty(64, 1, dtype=torch.int32, device="meta")
        with LiveBytes(fast_pointwise=fast) as mem:
            outs = body(a, b, i)
        peaks.append((mem.peak, mem.peak_excluding(*outs), [(o.shape, o.dtype) for o in outs]))
    assert peaks[0] == peaks[1]


def test_no_launch_stub_records_launches():
    stub = NoLaunch()
    stub[(4, 2)](torch.empty(3), 1.0, BLOCK=16)
    stub[lambda meta: (1,)]()
    assert stub.launches == 2


def test_partial_constructor_for_callers():
    """Callers swap the fast path off with functools.partial (as the fll memory test does)."""
    with functools.partial(LiveBytes, fast_pointwise=False)() as mem:
        torch.empty(10, device="meta") + 1
    assert mem.peak == 80
