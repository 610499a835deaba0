"""PEFT LoRA adapter directories as merge inputs: every merge method on adapters equals the same method on the
peft-merged full models (merge_and_unload, saved, merged by the same engine) within 1e-6, and bad adapters are one
line, exit 2, naming the file (and the first offending tensor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nova_rt.merge import run_merge
from nova_rt.merge.cli import main as merge_main
from nova_rt.merge.registry import _REGISTRY
from nova_rt.models.tiny import save_tiny_model
from tests.merge.conftest import load_weights, write_yaml

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (seed, LoraConfig arguments): ranks, scales (rslora, alpha_pattern), targets, modules_to_save
    "a1": (1, {"r": 4, "lora_alpha": 8, "target_modules": LINEAR, "modules_to_save": ["model.norm"]}),
    "a2": (2, {"r": 2, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj"],
               "alpha_pattern": {"v_proj": 4}}),
    "a3": (3, {"r": 8, "lora_alpha": 4, "target_modules": ["o_proj", "up_proj", "down_proj"]}),
}


def make_adapter(base: Path, adapter_dir: Path, merged_dir: Path | None, seed: int, **lora) -> Path:
    """A peft adapter over `base` with random non-zero A, B (and modules_to_save copies), saved as peft saves it;
    merged_dir: also peft's merge_and_unload of it as a full HF directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    peft_model = get_peft_model(model, LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(str(adapter_dir))
    if merged_dir is not None:
        peft_model.merge_and_unload().save_pretrained(str(merged_dir), safe_serialization=True)
    return adapter_dir


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, Path]:
    """The tiny base, adapters a1..a3 over it and their peft-merged full models m1..m3."""
    root = tmp_path_factory.mktemp("lora_experts")
    out = {"base": save_tiny_model(root / "base", "llama", seed=5), "root": root}
    for name, (seed, lora) in ADAPTERS.items():
        out[name] = make_adapter(out["base"], root / name, root / f"m{name[1]}", seed, **lora)
        out[f"m{name[1]}"] = root / f"m{name[1]}"
    return out


def _spec(method: str, base: Path | None, models: list[Path]) -> dict:
    registered = _REGISTRY[method]
    entries = []
    for index, model in enumerate(models):
        params = {"weight": 0.3 + 0.2 * index} if "weight" in registered.model_params else {}
        if "density" in registered.model_params:
            params["density"] = 0.7
        entries.append({"model": str(model), "parameters": params})
    spec = {"merge_method": method, "dtype": "float32", "models": entries}
    if base is not None:
        spec["base_model"] = str(base)
    if method == "slerp":
        spec["parameters"] = {"t": 0.35}
    return spec


def _assert_same(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=tol), (name, (wa[name] - wb[name]).abs().max())


ANY_NUMBER = sorted(name for name, method in _REGISTRY.items() if method.max_models is None)


@pytest.mark.parametrize("method", ANY_NUMBER)
def test_every_method_on_adapters_equals_it_on_peft_merged_models(experts, tmp_path, method):
    base = experts["base"] if _REGISTRY[method].needs_base and not _REGISTRY[method].optional_base else None
    on_adapters = run_merge(_spec(method, base, [experts[n] for n in ("a1", "a2", "a3")]), tmp_path / "from_lora",
                            progress=False)
    on_full = run_merge(_spec(method, base, [experts[n] for n in ("m1", "m2", "m3")]), tmp_path / "from_full",
                        progress=False)
    _assert_same(on_adapters, on_full)
    base_weights = load_weights(experts["base"])
    merged = load_weights(on_adapters)
    assert not torch.equal(merged["model.layers.0.mlp.down_proj.weight"], base_weights[
        "model.layers.0.mlp.down_proj.weight"]) or method == "model_stock"  # the adapters moved it


def test_slerp_between_two_adapters(experts, tmp_path):
    """slerp's base_model is one endpoint: an adapter there reads as its own base + B A too."""
    on_adapters = run_merge(_spec("slerp", experts["a1"], [experts["a2"]]), tmp_path / "from_lora", progress=False)
    on_full = run_merge(_spec("slerp", experts["m1"], [experts["m2"]]), tmp_path / "from_full", progress=False)
    _assert_same(on_adapters, on_full)


def test_explicit_base_plus_adapter_and_fan_in_fan_out(tmp_path):
    """mergekit's `BASE+ADAPTER` names the base; GPT-2's Conv1D layers (fan_in_fan_out) merge transposed, as peft
    does; a model whose adapter leaves a tensor alone gets the base's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"), safe_serialization=True)
    for name, seed in (("g1", 1), ("g2", 2)):
        make_adapter(tmp_path / "gpt2", tmp_path / name, tmp_path / f"full_{name}", seed, r=4, lora_alpha=8,
                     target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    spec = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "gpt2"), "dtype": "float32",
            "models": [{"model": f"{tmp_path / 'gpt2'}+{tmp_path / 'g1'}", "parameters": {"weight": 0.7}},
                       {"model": str(tmp_path / "g2"), "parameters": {"weight": 0.4}}]}
    on_adapters = run_merge(spec, tmp_path / "from_lora", progress=False)
    spec["models"] = [{"model": str(tmp_path / f"full_{name}"), "parameters": {"weight": weight}}
                      for name, weight in (("g1", 0.7), ("g2", 0.4))]
    _assert_same(on_adapters, run_merge(spec, tmp_path / "from_full", progress=False))


# --------------------------------------------------------------------------------------------------- bad adapters
def _merge_error(capsys, tmp_path, spec: dict) -> str:
    capsys.readouterr()
    code = merge_main([str(write_yaml(tmp_path / "merge.yaml", spec)), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def _ta(base: Path, *models: str | Path) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(model), "parameters": {"weight": 1.0}} for model in models]}


def test_adapter_of_another_base_model_is_refused(experts, tmp_path, capsys):
    other = save_tiny_model(tmp_path / "other", "llama", seed=9)
    err = _merge_error(capsys, tmp_path, _ta(other, experts["a1"]))
    assert f"{experts['a1'] / 'adapter_config.json'}: base_model_name_or_path {str(experts['base'])!r} is not the " \
           f"merge's base model {str(other)!r}" in err
    assert f"write `model: {other}+{experts['a1']}`" in err


def test_adapter_whose_shapes_do_not_match_the_base(experts, tmp_path, capsys):
    wide = save_tiny_model(tmp_path / "wide", "llama", seed=9, hidden=32, heads=2, kv_heads=1)
    adapter = make_adapter(wide, tmp_path / "wide_adapter", None, 1, r=2, lora_alpha=4, target_modules=["q_proj"])
    err = _merge_error(capsys, tmp_path, _ta(experts["base"], f"{experts['base']}+{adapter}"))
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert (f"{adapter / 'adapter_model.safetensors'}: tensor {first!r} has in_features 32 but the base model's "
            "'model.layers.0.self_attn.q_proj.weight' is [64, 64] (in_features 64)") in err


def test_adapter_of_a_module_the_base_lacks(experts, tmp_path, capsys):
    deep = save_tiny_model(tmp_path / "deep", "llama", seed=9, layers=3)
    adapter = make_adapter(deep, tmp_path / "deep_adapter", None, 1, r=2, lora_alpha=4, target_modules=["v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())  # claims the merge's base
    config["base_model_name_or_path"] = str(experts["base"])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    err = _merge_error(capsys, tmp_path, _ta(experts["base"], adapter))
    first = "base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"
    assert f"{adapter / 'adapter_model.safetensors'}: tensor {first!r} adapts 'model.layers.2.self_attn.v_proj." \
           f"weight', which the base model {experts['base']} does not have" in err


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_incomplete_adapter_directory(experts, tmp_path, capsys, missing):
    adapter = tmp_path / "adapter"
    shutil.copytree(experts["a2"], adapter)
    (adapter / missing).unlink()
    err = _merge_error(capsys, tmp_path, _ta(experts["base"], adapter))
    assert f"models[0]: {adapter / missing} is missing" in err


def test_bfloat16_base_rounds_as_peft_merge(tmp_path):
    """A bf16 base with fp32 adapters (peft's default autocast): W + delta rounds once to bf16, as merge_and_unload."""
    base = save_tiny_model(tmp_path / "base", "llama", seed=3, dtype=torch.bfloat16)
    for name, seed in (("b1", 1), ("b2", 2)):
        make_adapter(base, tmp_path / name, tmp_path / f"full_{name}", seed, r=4, lora_alpha=8, target_modules=LINEAR)
    spec = {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(tmp_path / name), "parameters": {"weight": 0.5}} for name in ("b1", "b2")]}
    on_adapters = run_merge(spec, tmp_path / "from_lora", progress=False)
    spec["models"] = [{"model": str(tmp_path / f"full_{name}"), "parameters": {"weight": 0.5}} for name in ("b1", "b2")]
    on_full = run_merge(spec, tmp_path / "from_full", progress=False)
    assert load_weights(on_adapters)["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    _assert_same(on_adapters, on_full, tol=0)
