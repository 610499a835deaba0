"""LoRA adapters on an HF model through peft (the `lora` config section, nova_rt.stages.lora).

add_adapters wraps the model in a peft model: every chosen linear layer of every decoder layer gets W x + (alpha /
r) B A x with A (r, in) drawn from run.seed and B (out, r) zero, and only A, B (and, for a reward model, the score
head: peft's modules_to_save) require grad. The wrapper forwards get_decoder() / get_output_embeddings() to the
model, so nova_rt's packed attention, the fused log-prob op (it reads the LM head, never adapted) and the
activation checkpointing of the decoder layers run unchanged. The base model with the adapters disabled is the
reference of DPO and GRPO; final/ is a PEFT adapter directory and merged_state gives peft's merge_and_unload.
base_state and save_engine_adapter feed the vLLM rollout engine: the base once, then the adapter alone per step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from nova_rt.errors import ConfigError

log = logging.getLogger("nova_rt.lora")

ADAPTER = "default"
"""peft's adapter name: the one adapter a run trains."""


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Sorted names (the last part) of the nn.Linear layers inside the decoder layers: q_proj, ..., down_proj."""
    layers = model.get_decoder().layers
    return sorted({name.rsplit(".", 1)[-1] for name, module in layers.named_modules() if isinstance(module, nn.Linear)})


def add_adapters(model: nn.Module, lora, *, source: str, seed: int, score_head: bool = False) -> nn.Module:
    """The peft model over `model` (frozen) with LoRA adapters per `lora` (a nova_rt.stages.lora.LoraConfig);
    score_head: a sequence classifier whose `score` head trains in full next to them. A ConfigError (exit 2) names
    a target_modules entry that no decoder layer has, with the names it has."""
    from peft import LoraConfig, get_peft_model

    names = decoder_linear_names(model)
    unknown = [name for name in lora.target_modules if name not in names]
    if unknown:
        raise ConfigError(f"{source}: lora.target_modules: {unknown[0]!r} is no linear layer of this model's decoder "
                          f"layers; they have: {', '.join(names)}")
    targets = list(lora.target_modules) or names
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=targets,
                        task_type="SEQ_CLS" if score_head else "CAUSAL_LM",
                        modules_to_save=["score"] if score_head else None)
    with torch.random.fork_rng(devices=[]):  # A's draw: the same on every rank and for every resume
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    trained, total = peft_model.get_nb_trainable_parameters()
    log.info("lora: rank %d on %s: %d trainable parameters (%.2f%% of %d)", lora.rank, ", ".join(targets), trained,
             100 * trained / total, total)
    return peft_model


def adapters_disabled(peft_model: nn.Module):
    """Context in which `peft_model` computes as its base model (the reference of DPO and GRPO)."""
    return peft_model.disable_adapter()


def peft_state(state: dict, prefix: str = "lm.") -> dict:
    """A trainer module's trained tensors (its `lm.` peft model's adapter and score-head names) as the peft model
    names them (PeftModel.save_pretrained's state_dict)."""
    return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}


def save_adapter_directory(peft_model: nn.Module, tokenizer, out_dir, state: dict, then) -> Path:
    """Write run.dir/final as a PEFT adapter directory (adapter_config.json, adapter_model.safetensors with the
    adapters and any score head, in the trained dtype as peft saves them, plus the tokenizer), to a temporary sibling
    renamed into place (nova_rt.trainer.save_hf_atomic). Returns its path."""
    from nova_rt.trainer import save_hf_atomic

    def save_pretrained(directory, **kwargs):  # no embedding layers: peft's "auto" would look the base up online
        peft_model.save_pretrained(directory, save_embedding_layers=False, **kwargs)

    return save_hf_atomic(SimpleNamespace(save_pretrained=save_pretrained), tokenizer, out_dir, state_dict=state,
                          then=then)


@torch.no_grad()
def merged_state(peft_model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict under its HF names with every adapter merged in (W + peft's delta weight, the
    arithmetic of merge_and_unload) and the trained score head in place of the original (CPU tensors, floating ones
    in `dtype` when given): a full model equal to peft's merge_and_unload, the adapted model itself left as it is."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight  # as merge's `weight += delta` rounds: once, to W's dtype
            merged[f"{name}.weight"] = (weight + module.get_delta_weight(ADAPTER)).to(weight.dtype)
    out = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = key.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")
        tensor = merged.get(name, tensor).detach().cpu()
        out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def save_merged_directory(peft_model: nn.Module, tokenizer, out_dir, dtype: torch.dtype, then) -> Path:
    """Write the merged full model (merged_state in `dtype`) as an HF directory, to a temporary sibling renamed into
    place. Returns its path."""
    from nova_rt.trainer import save_hf_atomic

    return save_hf_atomic(peft_model.get_base_model(), tokenizer, out_dir, state_dict=merged_state(peft_model, dtype),
                          then=then)


def base_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base model's tensors under its HF names, without the adapters (the weights a rollout engine that
    applies the adapter itself loads once)."""
    return {key.replace(".base_layer.", "."): tensor for key, tensor in peft_model.get_base_model().state_dict().items()
            if ".lora_" not in key}


@torch.no_grad()
def save_engine_adapter(peft_model: nn.Module, directory: Path, dtype: torch.dtype) -> int:
    """Write the current adapter as a PEFT adapter directory for a rollout engine (adapter_config.json and
    adapter_model.safetensors: peft's tensor names, A and B only, in `dtype`) to a temporary sibling renamed to
    `directory`. Returns the tensors' bytes."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    state = {}  # get_peft_model_state_dict's names; its key filter took ~5 s a call on SmolLM2-135M (profiled)
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            for part in ("lora_A", "lora_B"):
                weight = getattr(module, part)[ADAPTER].weight
                state[f"{name}.{part}.weight"] = weight.detach().to("cpu", dtype).contiguous()
    partial = directory.with_name(f".{directory.name}.partial")
    partial.mkdir(parents=True)
    peft_model.peft_config[ADAPTER].save_pretrained(str(partial))
    save_file(state, str(partial / "adapter_model.safetensors"))
    os.replace(partial, directory)
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())
