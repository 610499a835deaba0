"""Tiny HF checkpoints for the merge tests: a base and "fine-tunes" (base + shared + own random task vectors)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from nova_rt.models.tiny import save_tiny_model


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (sharded or not)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_finetune(base_dir: Path, out_dir: Path, seed: int, shared_seed: int, scale: float = 0.02,
                  dtype: torch.dtype | None = None, density: float = 1.0) -> Path:
    """Copy of base_dir whose floating tensors get a shared and an own random task vector (single shard); with
    density < 1 the task vector is kept only on a random `density` share of the elements (as RL updates are)."""
    out_dir.mkdir(parents=True)
    for f in base_dir.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out_dir / f.name)
    g_own, g_shared = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(shared_seed)
    weights = {}
    for name, t in sorted(load_weights(base_dir).items()):
        shared = torch.randn(t.shape, generator=g_shared)
        own = torch.randn(t.shape, generator=g_own)
        if density < 1:
            own = own * (torch.rand(t.shape, generator=g_own) < density)
            shared = shared * (torch.rand(t.shape, generator=g_own) < density)
        weights[name] = (t.float() + scale * (shared + own)).to(dtype or t.dtype)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """base (sharded input) + ft1..ft3, tiny Llama fp32, plus the random seed used for the fine-tunes."""
    root = tmp_path_factory.mktemp("tiny_models")
    seed = int.from_bytes(os.urandom(4), "little")
    base = save_tiny_model(root / "base", "llama", seed=seed % 1000, max_shard_size="60KB")
    models = {"base": base}
    for i in range(1, 4):
        models[f"ft{i}"] = make_finetune(base, root / f"ft{i}", seed + i, seed)
    models["root"] = root
    models["seed"] = seed
    return models


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def sparse_agents(tiny_models) -> dict[str, Path]:
    """agent1..agent3: the tiny base with task vectors on a random 40% of each tensor's elements (overlapping at
    random), the shape of RL fine-tunes that RAM merges."""
    root = tiny_models["root"]
    return {f"agent{i}": make_finetune(tiny_models["base"], root / f"agent{i}", tiny_models["seed"] + 10 + i,
                                       tiny_models["seed"] + 20, density=0.4) for i in range(1, 4)}

