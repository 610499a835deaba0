"""A vLLM engine's weights read back under the HF names, for the tests that check a weight sync bit for bit."""

from __future__ import annotations

import torch


@torch.no_grad()
def engine_state_dict(engine) -> dict[str, torch.Tensor]:
    """The engine's weights under the HF names (tensor_parallel 1), for checking a sync.

    A CPU linear whose weight vLLM repacked (the parameter is empty) is read back through its own kernel as
    cpu_linear(I_K) = W^T: each output element is one weight times 1.0 plus zeros, exact in fp32 and bf16.
    Fused q/k/v and gate/up tensors are split back; a padded vocabulary is cut to the model's."""
    cfg, out = engine.model.config, {}
    for mname, mod in engine.vllm_model().named_modules():
        for pname, param in mod.named_parameters(recurse=False):
            tensor = param.detach()
            if tensor.numel() == 0 and hasattr(mod, "cpu_linear"):
                in_features = getattr(mod, "input_size_per_partition", None) or mod.input_size
                tensor = mod.cpu_linear(torch.eye(in_features, dtype=tensor.dtype), tensor, None).t().contiguous()
            out.update(_split_fused(f"{mname}.{pname}", tensor, cfg))
    return out


def _split_fused(name: str, tensor: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """vLLM's fused qkv_proj / gate_up_proj tensors as the HF q/k/v and gate/up ones; a padded vocab cut to size."""
    if ".qkv_proj." in name:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q_rows, kv_rows = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
        parts = tensor.split([q_rows, kv_rows, kv_rows])
        return {name.replace("qkv_proj", proj): part for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts)}
    if ".gate_up_proj." in name:
        gate, up = tensor.chunk(2)
        return {name.replace("gate_up_proj", "gate_proj"): gate, name.replace("gate_up_proj", "up_proj"): up}
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        tensor = tensor[:cfg.vocab_size]
    return {name: tensor}
