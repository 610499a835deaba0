"""CPU shims that let megatron-core 0.16.1 (GPTModel, pipeline schedules, DDP, optimizer) run on CPU over gloo.

TEST SUPPORT ONLY. megatron-core has no CPU path: a handful of its functions call `torch.cuda.*` or allocate on
`device="cuda"` unconditionally. `apply()` patches exactly those places, inside the current (test) process, and
`check()` verifies that every patch is in place. Production code (`nova_rt/parallel/`) never imports this file;
the torchrun worker in tests/parallel/ calls `apply()` before building a model.

The shims, one by one (all verified against megatron-core 0.16.1, which pyproject.toml pins):

1. `torch` proxy in megatron modules. Each module listed in `PROXIED_MODULES` holds a module-level name `torch`;
   we replace it with `_CpuTorch`, which forwards everything to the real torch except:
     - tensor factories (`zeros`, `empty`, `ones`, `tensor`, `full`, `arange`, `randn`, `rand`, `empty_like`,
       `zeros_like`, ...) whose `device` argument names CUDA ("cuda", "cuda:0", an int) get `device="cpu"`, and
       `pin_memory=True` becomes False (pinning needs a CUDA driver);
     - `torch.cuda` becomes `_FakeCuda`: `current_device()` -> "cpu", `synchronize/empty_cache` no-ops,
       `Stream/stream/default_stream/current_stream` dummies, `get_rng_state/manual_seed/set_rng_state` mapped
       to the CPU generator (so megatron's RNG tracker keeps its states on the CPU default generator),
       `nvtx.range_push/pop` no-ops, `is_available()` -> False.
   Hit sites (0.16.1): schedules.py `torch.zeros([], device="cuda")` (total_num_tokens); p2p_communication.py
   (`torch.cuda.current_device()`, `torch.cuda.synchronize()`); rotary_pos_embedding.get_emb (moves inv_freq to
   the current CUDA device); utils.GlobalMemoryBuffer.get_tensor and local_multi_tensor_l2_norm; tensor_parallel
   mappings/layers (sequence-parallel all-gather / reduce-scatter buffers); random (RNG tracker);
   param_and_grad_buffer / distributed_data_parallel (grad buffers, communication streams); clip_grads and
   optimizer (norm and overflow buffers on 'cuda'); finalize_model_grads; rope_utils (CP index tensor);
   distrib_optimizer (load_state_dict allocates its state placeholders on `torch.cuda.current_device()`).
2. `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state`: read/write the CPU generator state,
   because the originals index `torch.cuda.default_generators`.
3. `optimizer.optimizer.clip_grad_by_total_norm_fp32`: the original asserts
   `param.grad.type() == 'torch.cuda.FloatTensor'` before scaling; the replacement does the same scaling
   (coefficient max_norm / (total_norm + 1e-6), applied when < 1) without the CUDA type assertion.
4. `LanguageModule.setup_embeddings_and_output_layer`: with tied embeddings and PP > 1 it runs
   `weight.data = weight.data.cuda()`; the wrapper makes `torch.Tensor.cuda` return `self` only for the duration
   of that call (the only place torch itself is touched, and it is restored before returning).
5. `DistributedOptimizer._build_model_and_main_param_groups` (a classmethod) sorts parameters by
   `model_param.type()` and raises "Wrapped parameters must be one of torch.cuda.FloatTensor, ... Received
   torch.FloatTensor" for CPU tensors. That string check is what stops megatron's distributed optimizer on CPU;
   the rest of it (fp32, DDP overlap off) runs on gloo as is: grad reduce-scatter, param all-gather, and the
   dp-zero gather/scatter of its state over megatron's own gloo DP group; the one CUDA allocation left, in its
   load_state_dict, is covered by shim 1. The wrapper
   gives each parameter passed to that one call an instance attribute `type` answering its CUDA name
   ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", ...), and deletes it before returning (torch.Tensor
   itself is untouched).

6. `Float16OptimizerWithFloat16Params.__init__` (megatron's bf16/fp16 optimizer without the distributed optimizer)
   sorts parameters by `param.type()` the same way and raises the same TypeError for CPU tensors; the wrapper gives
   each parameter of the wrapped torch optimizer the same temporary `type` attribute for that one call. Shims 5 and
   6 answer the CUDA name for fp32, bf16 and fp16 CPU tensors (`_cuda_type_name`), so both 16-bit paths build: fp32
   main params cloned from the bf16 ones, main grads copied from megatron's fp32 grad buffers, the update copied
   back (the rest of MixedPrecisionOptimizer is device-agnostic; its found-inf / scale tensors are covered by
   shim 1, and without Apex/TE megatron's multi-tensor copy is its torch fallback). Nothing in the training math is
   replaced: a type string is all these two shims change.

None of the shims changes what autograd saves for backward (tests/plan/test_megatron_activations.py counts it):
shims 1-2 redirect device arguments and RNG state, 3 runs after backward, 4-6 run while the model and optimizer are
built. Context parallelism needs no shim: it runs in nova_rt's own core attention
(nova_rt/parallel/context_parallel.py), not Transformer Engine's.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import types

import torch

MEGATRON_VERSION = "0.16.1"

PROXIED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
)

_FACTORIES = ("zeros", "empty", "ones", "tensor", "full", "arange", "randn", "rand", "randint", "empty_like",
              "zeros_like", "ones_like", "full_like", "as_tensor", "empty_strided", "linspace")


class ShimError(RuntimeError):
    """A shim target vanished or changed: megatron-core is not the version these shims were written for."""


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


class _DummyStream:
    def wait_stream(self, *_a, **_k):
        return None

    def synchronize(self):
        return None


class _FakeCuda:
    """Stands in for `torch.cuda` inside the proxied megatron modules."""

    FloatTensor = torch.cuda.FloatTensor
    HalfTensor = torch.cuda.HalfTensor
    BFloat16Tensor = torch.cuda.BFloat16Tensor
    nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def synchronize(*_a, **_k):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def stream(_s=None):
        return contextlib.nullcontext()

    @staticmethod
    def Stream(*_a, **_k):  # noqa: N802 - mirrors torch.cuda.Stream
        return _DummyStream()

    @staticmethod
    def default_stream(*_a, **_k):
        return _DummyStream()

    @staticmethod
    def current_stream(*_a, **_k):
        return _DummyStream()

    @staticmethod
    def get_rng_state(*_a, **_k):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *_a, **_k):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """A stand-in for the `torch` module: CUDA devices in factories become CPU; `cuda` is `_FakeCuda`."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _FakeCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH = _CpuTorch()
_TENSOR_CUDA = torch.Tensor.cuda
_APPLIED: dict[str, object] = {}


def _require(module, attr: str):
    if not hasattr(module, attr):
        raise ShimError(f"megatron-core changed: {module.__name__}.{attr} is gone; the CPU shims in "
                        f"tests/parallel/megatron_cpu_shims.py were written for megatron-core {MEGATRON_VERSION}")
    return getattr(module, attr)


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _get_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
                    "torch.HalfTensor": "torch.cuda.HalfTensor"}


def _cuda_type_name(param):
    """param.type() as megatron expects it on CUDA, for fp32, bf16 and fp16 CPU tensors."""
    name = torch.Tensor.type(param)
    return _CUDA_TYPE_NAMES.get(name, name)


def _wrap_float16_optimizer_init(orig):
    """Float16OptimizerWithFloat16Params.__init__(optimizer, ...) checks `param.type()` of every parameter of the torch
    optimizer it wraps: for that one call each answers with its CUDA name (an instance attribute, removed after)."""

    @functools.wraps(orig)
    def wrapper(self, optimizer, *args, **kwargs):
        groups = optimizer.param_groups if optimizer is not None else []
        params = [p for group in groups for p in group["params"] if "type" not in vars(p)]
        for p in params:
            p.type = functools.partial(_cuda_type_name, p)
        try:
            return orig(self, optimizer, *args, **kwargs)
        finally:
            for p in params:
                del p.type

    wrapper._nova_rt_shim = True
    return wrapper


def _wrap_build_main_param_groups(orig):
    """DistributedOptimizer._build_model_and_main_param_groups dispatches on `model_param.type()` and raises
    TypeError for anything but torch.cuda.{Float,Half,BFloat16}Tensor. For the duration of that one call, each model
    parameter it is given answers `type()` with the CUDA name (an instance attribute, removed before returning):
    no torch class or other tensor is touched."""
    func = orig.__func__

    @functools.wraps(func)
    def wrapper(cls, gbuf_ranges, param_gbuf_map, *args, **kwargs):
        params = [p for p in param_gbuf_map if "type" not in vars(p)]
        for p in params:
            p.type = functools.partial(_cuda_type_name, p)
        try:
            return func(cls, gbuf_ranges, param_gbuf_map, *args, **kwargs)
        finally:
            for p in params:
                del p.type

    wrapper._nova_rt_shim = True
    return classmethod(wrapper)


def _wrap_setup_embeddings(orig):
    @functools.wraps(orig)
    def wrapper(self, *args, **kwargs):
        saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return orig(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = saved

    wrapper._nova_rt_shim = True
    return wrapper


def apply() -> None:
    """Install every shim (idempotent). Raises ShimError naming the attribute when a target is missing."""
    import megatron.core

    version = getattr(megatron.core, "__version__", "?")
    if version != MEGATRON_VERSION:
        raise ShimError(f"megatron-core {version} is installed; the CPU shims target {MEGATRON_VERSION}")
    if _APPLIED:
        return
    for name in PROXIED_MODULES:
        mod = importlib.import_module(name)
        current = _require(mod, "torch")
        if current is not torch and current is not _CPU_TORCH:
            raise ShimError(f"{name}.torch is not the torch module; cannot proxy it")
        mod.torch = _CPU_TORCH
        _APPLIED[name + ".torch"] = mod
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    _require(rnd, "_set_cuda_rng_state")
    _require(rnd, "_get_cuda_rng_state")
    rnd._set_cuda_rng_state, rnd._get_cuda_rng_state = _set_rng_state, _get_rng_state
    _APPLIED["random.rng_state"] = rnd
    opt = importlib.import_module("megatron.core.optimizer.optimizer")
    _require(opt, "clip_grad_by_total_norm_fp32")
    opt.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    _APPLIED["optimizer.clip"] = opt
    f16 = _require(opt, "Float16OptimizerWithFloat16Params")
    if list(inspect.signature(f16.__init__).parameters)[:2] != ["self", "optimizer"]:
        raise ShimError("megatron-core changed: Float16OptimizerWithFloat16Params.__init__ no longer takes "
                        f"(self, optimizer, ...); the CPU shims were written for megatron-core {MEGATRON_VERSION}")
    if not getattr(f16.__init__, "_nova_rt_shim", False):
        f16.__init__ = _wrap_float16_optimizer_init(f16.__init__)
    _APPLIED["optimizer.float16_param_types"] = f16
    lm = importlib.import_module("megatron.core.models.common.language_module.language_module")
    cls = _require(lm, "LanguageModule")
    orig = _require(cls, "setup_embeddings_and_output_layer")
    if not getattr(orig, "_nova_rt_shim", False):
        cls.setup_embeddings_and_output_layer = _wrap_setup_embeddings(orig)
    _APPLIED["language_module.setup"] = cls
    dopt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    dcls = _require(dopt, "DistributedOptimizer")
    build = inspect.getattr_static(dcls, "_build_model_and_main_param_groups", None)
    if not isinstance(build, classmethod) or list(inspect.signature(build.__func__).parameters)[:3] != [
            "cls", "gbuf_ranges", "param_gbuf_map"]:
        raise ShimError("megatron-core changed: DistributedOptimizer._build_model_and_main_param_groups is no longer "
                        "a classmethod (cls, gbuf_ranges, param_gbuf_map, ...); the CPU shims were written for "
                        f"megatron-core {MEGATRON_VERSION}")
    if not getattr(build.__func__, "_nova_rt_shim", False):
        dcls._build_model_and_main_param_groups = _wrap_build_main_param_groups(build)
    _APPLIED["distrib_optimizer.param_types"] = dcls


def check() -> list[str]:
    """Names of the shims that are in place; raises ShimError if any of them is not."""
    if not _APPLIED:
        raise ShimError("megatron CPU shims were never applied")
    problems = []
    for name in PROXIED_MODULES:
        if importlib.import_module(name).__dict__.get("torch") is not _CPU_TORCH:
            problems.append(f"{name}.torch")
    rnd = importlib.import_module("megatron.core.tensor_parallel.random")
    if rnd._set_cuda_rng_state is not _set_rng_state or rnd._get_cuda_rng_state is not _get_rng_state:
        problems.append("tensor_parallel.random rng state")
    opt = importlib.import_module("megatron.core.optimizer.optimizer")
    if opt.clip_grad_by_total_norm_fp32 is not _clip_grad_by_total_norm_fp32:
        problems.append("optimizer.clip_grad_by_total_norm_fp32")
    if not getattr(opt.Float16OptimizerWithFloat16Params.__init__, "_nova_rt_shim", False):
        problems.append("Float16OptimizerWithFloat16Params.__init__")
    lm = importlib.import_module("megatron.core.models.common.language_module.language_module")
    if not getattr(lm.LanguageModule.setup_embeddings_and_output_layer, "_nova_rt_shim", False):
        problems.append("LanguageModule.setup_embeddings_and_output_layer")
    dopt = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    build = inspect.getattr_static(dopt.DistributedOptimizer, "_build_model_and_main_param_groups")
    if not getattr(getattr(build, "__func__", None), "_nova_rt_shim", False):
        problems.append("DistributedOptimizer._build_model_and_main_param_groups")
    if torch.Tensor.cuda is not _TENSOR_CUDA:
        problems.append("torch.Tensor.cuda was left patched")
    if problems:
        raise ShimError("CPU shims not in place: " + ", ".join(problems))
    return sorted(_APPLIED)
