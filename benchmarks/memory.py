"""Peak live tensor memory of a piece of code, counted from its allocations: works on `meta` tensors, so an op can be
measured at full size (T=16k, V=152k) on a CPU machine without allocating anything.

`LiveBytes` is a TorchDispatchMode: every aten op that returns a tensor whose storage is new (not the storage of one
of the op's tensor arguments, so views, in-place and out= ops allocate nothing) adds the storage's bytes; a storage
is released when its StorageImpl dies (a weak reference to the StorageImpl, not to a Python tensor, so tensors kept
only by C++, such as autograd's saved tensors, still count). The log is replayed at the end to give the peak of
everything alive, or of everything except the storages of given tensors (the op's outputs and gradients).
What it does not see: allocations that do not go through aten (a Triton kernel's own scratch, cuBLAS workspaces,
allocator rounding and fragmentation); the caller must check the code under test has none of the first kind.

Speed: pointwise ops on meta tensors run Python meta kernels (0.1-3 ms each on a loaded 2-core machine), and a
chunked op at full size issues ~10^5 of them. With fast_pointwise=True (default) a functional pointwise op on meta
tensors gets an empty meta output of the broadcast shape, its dtype taken from the op run on one-element CPU
stand-ins (cached); in-place and out= variants return their destination. That is what a pointwise op allocates;
tests/benchmarks/test_memory.py checks both settings give the same peaks.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


def _tensors(args, kwargs):
    """The tensors among an aten op's arguments (or outputs): top level and inside lists/tuples (faster than pytree)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, torch.Tensor))


def _kind(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.dim()
    if isinstance(a, (list, tuple)):
        return tuple(_kind(x) for x in a)
    return type(a)


def _stand_in(a):
    """A one-element CPU tensor of a's dtype and rank (rank matters to type promotion); lists mapped; scalars kept."""
    if isinstance(a, torch.Tensor):
        return torch.ones([1] * a.dim(), dtype=a.dtype)
    if isinstance(a, (list, tuple)):
        return type(a)(_stand_in(x) for x in a)
    return a


class LiveBytes(TorchDispatchMode):
    """Track storage bytes allocated inside the mode. After exit: `peak` (all tracked storages) and `peak_excluding`."""

    def __init__(self, fast_pointwise: bool = True) -> None:
        super().__init__()
        self.fast_pointwise = fast_pointwise
        self._dtypes: dict[tuple, object] = {}  # (op, argument kinds) -> output dtypes, for the fast path
        self._live: dict[int, tuple[StorageWeakRef, int, int]] = {}  # cdata -> (weak ref, log index, bytes)
        self._log: list[tuple[int, int]] = []  # (allocation index, +bytes or -bytes), in time order
        self._origin: list[object] = []  # allocation index -> the op that made it

    def _sweep(self) -> None:
        for cdata, (ref, idx, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[cdata]
                self._log.append((idx, -nbytes))

    def _pointwise(self, func, args, kwargs):
        """The outputs of a pointwise op on meta tensors, without its meta kernel; None where not applicable."""
        if "out" in kwargs:
            return kwargs["out"]
        if func._schema.is_mutable:  # in-place pointwise ops return self
            return args[0]
        key = (func, _kind(args), _kind(tuple(kwargs.items())))
        if key not in self._dtypes:
            try:
                res = func(*_stand_in(args), **{k: _stand_in(v) for k, v in kwargs.items()})
            except Exception:  # noqa: BLE001 - no CPU kernel for these dtypes: use the meta kernel
                res = None
            self._dtypes[key] = None if res is None else tree_map(lambda r: r.dtype, res)
        dtypes = self._dtypes[key]
        if dtypes is None:
            return None
        shape = torch.broadcast_shapes(*(t.shape for t in _tensors(args, kwargs)))
        return tree_map(lambda dt: torch.empty(shape, dtype=dt, device="meta"), dtypes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if self.fast_pointwise and torch.Tag.pointwise in func.tags and all(
                t.device.type == "meta" for t in _tensors(args, kwargs)):
            out = self._pointwise(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
        seen = None
        for t in _tensors((out,), {}):
            storage = t.untyped_storage()
            cdata, nbytes = storage._cdata, storage.nbytes()
            entry = self._live.get(cdata)
            if entry is not None and entry[0].expired():  # its StorageImpl died and the address was reused
                entry = None
            if entry is not None:  # an existing storage, possibly grown by resize_
                if nbytes != entry[2]:
                    self._log.append((entry[1], nbytes - entry[2]))
                    self._live[cdata] = (entry[0], entry[1], nbytes)
                continue
            if seen is None:
                seen = {x.untyped_storage()._cdata for x in _tensors(args, kwargs)}
            if cdata in seen or not nbytes:  # a view of, or written into, an argument
                continue
            self._sweep()  # frees since the last allocation, logged before it
            self._live[cdata] = (StorageWeakRef(storage), len(self._origin), nbytes)
            self._log.append((len(self._origin), nbytes))
            self._origin.append(func)
        return out

    def __exit__(self, *exc):
        self._sweep()
        return super().__exit__(*exc)

    def peak_excluding(self, *keep: torch.Tensor | None) -> int:
        """Peak bytes of tracked storages other than those of `keep` (tensors still alive; None entries skipped)."""
        return self._replay(keep)[0]

    def breakdown(self, *keep: torch.Tensor | None) -> list[tuple[str, int]]:
        """(op that allocated it, bytes) for each storage alive at the peak of `peak_excluding(*keep)`."""
        return self._replay(keep)[1]

    def _replay(self, keep) -> tuple[int, list[tuple[str, int]]]:
        self._sweep()
        keep_idx = set()
        for t in keep:
            if t is None:
                continue
            entry = self._live.get(t.untyped_storage()._cdata)
            if entry is not None:
                keep_idx.add(entry[1])
        cur = peak = 0
        alive: dict[int, int] = {}
        at_peak: dict[int, int] = {}
        for idx, delta in self._log:
            if idx in keep_idx:
                continue
            cur += delta
            alive[idx] = alive.get(idx, 0) + delta
            if not alive[idx]:
                del alive[idx]
            if cur > peak:
                peak, at_peak = cur, dict(alive)
        return peak, [(str(self._origin[i]), n) for i, n in sorted(at_peak.items())]

    @property
    def peak(self) -> int:
        return self.peak_excluding()

    @property
    def live_bytes(self) -> int:
        self._sweep()
        return sum(nbytes for _, _, nbytes in self._live.values())


class NoLaunch:
    """Stands in for a @triton.jit kernel on meta tensors: `kernel[grid](*args, **meta)` records the call, runs nothing.

    Launchers allocate their buffers with torch before launching, so with the kernels replaced the launcher code
    allocates exactly what it allocates on the GPU."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch
