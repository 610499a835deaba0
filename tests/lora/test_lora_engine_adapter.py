"""nova_rt.models.lora's exports for a rollout engine that applies the adapter itself (the vLLM engine's LoRA sync):
save_engine_adapter writes exactly peft's adapter tensors (get_peft_model_state_dict's names and values, cast to the
asked dtype) and config, through a temporary name; base_state is the base model's HF state dict, adapters left out."""

import json
from types import SimpleNamespace

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from nova_rt.models.lora import add_adapters, base_state, save_engine_adapter
from nova_rt.models.tiny import build_tiny_model


def _peft_model(target_modules=()):
    lora = SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, target_modules=list(target_modules))
    model = add_adapters(build_tiny_model("llama", seed=0, dtype=torch.float32, hidden=64, heads=4, kv_heads=2,
                                          layers=2, intermediate=128), lora, source="test", seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model


def test_save_engine_adapter_is_peft_adapter(tmp_path):
    for targets in ((), ("q_proj", "v_proj")):
        model = _peft_model(targets)
        want = get_peft_model_state_dict(model, save_embedding_layers=False)
        for dtype in (torch.float32, torch.bfloat16):
            directory = tmp_path / f"{len(targets)}_{dtype}".replace("torch.", "")
            nbytes = save_engine_adapter(model, directory, dtype)
            got = load_file(directory / "adapter_model.safetensors")
            assert sorted(got) == sorted(want) and len(got) == 2 * 2 * (len(targets) or 7)
            for key, tensor in want.items():
                assert got[key].dtype == dtype and torch.equal(got[key], tensor.to(dtype)), key
            assert nbytes == sum(t.numel() * t.element_size() for t in got.values())
            config = json.loads((directory / "adapter_config.json").read_text())
            assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
            assert sorted(config["target_modules"]) == sorted(targets or ["down_proj", "gate_proj", "k_proj",
                                                                           "o_proj", "q_proj", "up_proj", "v_proj"])
            assert sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(".")) == []


def test_base_state_is_the_base_model_without_adapters():
    model = _peft_model()
    plain = build_tiny_model("llama", seed=0, dtype=torch.float32, hidden=64, heads=4, kv_heads=2, layers=2,
                             intermediate=128).state_dict()
    got = base_state(model)
    assert sorted(got) == sorted(plain)
    assert all(torch.equal(got[key], plain[key]) for key in plain)
