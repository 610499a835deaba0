"""Shared pytest setup. TRITON_INTERPRET must be set before any @triton.jit decoration runs, so it is set here,
before test modules import nova_rt.kernels, whenever no CUDA device exists."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep CPU runs reproducible and inside the 2-core budget.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_slow = os.environ.get("NOVA_RT_SKIP_SLOW") == "1"
    for item in items:
        if not has_cuda and ("gpu" in item.keywords or "multigpu" in item.keywords):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if skip_slow and "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="NOVA_RT_SKIP_SLOW=1"))
