"""The model as the planner sees it: its shape from an HF config.json (or a `tiny:` config), and the exact list of
parameter tensors each rank holds under the HF backend (whole model) or megatron's TP / PP / VPP layout.

Megatron's tensors follow nova_rt.parallel.megatron_model (local layer spec, the layout of docs/parallelism.md "TP
layout kinds"): per layer [input_layernorm, linear_proj, linear_qkv (+ bias), pre_mlp_layernorm, linear_fc1,
linear_fc2] in registration order; the embedding on the first stage, the final norm and the output layer (a copy of a
tied embedding when PP > 1, a (1, D) score head for a reward model) on the last; vocab padded to a multiple of TP.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from nova_rt.errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    name: str
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool
    tied: bool
    gated: bool = True  # SwiGLU (gate, up, down); False: a GPT-style 2-matrix MLP (published comparisons only)

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated else 2

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        d, q, kv, f = self.hidden, self.q_width, self.kv_width, self.ffn
        bias = (q + 2 * kv) if self.qkv_bias else 0
        return d * (q + 2 * kv) + bias + q * d + self.mlp_matrices * d * f + 2 * d

    def total_params(self, head: str = "lm") -> int:
        """Parameters of the HF model (head "score": a (1, D) score head instead of the LM head)."""
        head_params = self.hidden if head == "score" else (0 if self.tied else self.vocab * self.hidden)
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden + head_params


def shape_from_hf(config: dict, name: str) -> ModelShape:
    """ModelShape of an HF Llama / Qwen2 config.json mapping; ConfigError naming the missing key."""
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in need if key not in config]
    if missing:
        raise ConfigError(f"{name}: config.json has no {', '.join(missing)} (an HF causal-LM config is needed)")
    heads = int(config["num_attention_heads"])
    return ModelShape(name=name, vocab=int(config["vocab_size"]), hidden=int(config["hidden_size"]),
                      ffn=int(config["intermediate_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
                      kv_heads=int(config.get("num_key_value_heads") or heads),
                      head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
                      qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
                      tied=bool(config.get("tie_word_embeddings", False)))


def load_shape(path: str, tiny: dict | None = None) -> ModelShape:
    """The shape of model.path: `tiny:llama|qwen2` (with model.tiny), an HF directory or a config.json file."""
    if path.startswith("tiny:"):
        from nova_rt.models.tiny import tiny_config

        try:
            return shape_from_hf(tiny_config(path.split(":", 1)[1], **(tiny or {})).to_dict(), path)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.path={path} / model.tiny: {exc}") from None
    if path.startswith("builtin:"):
        from nova_rt.models.loading import resolve_model_path

        path = resolve_model_path(path)
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model.path: {file} not found (an HF model directory or config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"model.path: {file} is not a JSON config ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"model.path: {file} is not a JSON object")
    return shape_from_hf(config, str(path))


def hf_param_numels(shape: ModelShape, head: str = "lm") -> list[int]:
    """Element counts of the HF model's parameter tensors, in registration order (model.parameters())."""
    d, q, kv, f = shape.hidden, shape.q_width, shape.kv_width, shape.ffn
    layer = [q * d] + ([q] if shape.qkv_bias else []) + [kv * d] + ([kv] if shape.qkv_bias else [])
    layer += [kv * d] + ([kv] if shape.qkv_bias else []) + [d * q] + [f * d] * (shape.mlp_matrices - 1) + [d * f, d, d]
    out = [shape.vocab * d] + layer * shape.layers + [d]
    if head == "score":
        out.append(d)
    elif not shape.tied:
        out.append(shape.vocab * d)
    return out


def hf_param_shapes(shape: ModelShape, head: str = "lm") -> list[tuple[int, int]]:
    """(dim 0, elements per dim-0 row) of each HF parameter tensor (what FSDP2 shards along), registration order."""
    d, q, kv, f = shape.hidden, shape.q_width, shape.kv_width, shape.ffn
    bias = shape.qkv_bias
    layer = [(q, d)] + ([(q, 1)] if bias else []) + [(kv, d)] + ([(kv, 1)] if bias else [])
    layer += [(kv, d)] + ([(kv, 1)] if bias else []) + [(d, q)] + [(f, d)] * (shape.mlp_matrices - 1)
    layer += [(d, f), (d, 1), (d, 1)]
    out = [(shape.vocab, d)] + layer * shape.layers + [(d, 1)]
    if head == "score":
        out.append((1, d))
    elif not shape.tied:
        out.append((shape.vocab, d))
    return out


def padded_vocab(vocab: int, tp: int, multiple: int = 1) -> int:
    step = multiple * tp
    return math.ceil(vocab / step) * step


@dataclass(frozen=True)
class MegatronParam:
    numel: int
    shared_embedding: bool = False  # a tied embedding's copy split into its own bucket under the dist. optimizer
    is_embedding: bool = False


def megatron_chunk_params(shape: ModelShape, tp: int, pp: int, vpp: int, stage: int, chunk: int,
                          head: str = "lm") -> list[MegatronParam]:
    """Parameter tensors of model chunk `chunk` (0..vpp-1) on pipeline stage `stage`, one TP rank, registration
    order. Every TP rank holds the same sizes (heads and columns split evenly, vocab padded)."""
    vpp = max(vpp, 1)
    d, q, kv, f = shape.hidden, shape.q_width, shape.kv_width, shape.ffn
    first = stage == 0 and chunk == 0
    last = stage == pp - 1 and chunk == vpp - 1
    vocab_rows = padded_vocab(shape.vocab, tp) // tp
    tied = shape.tied and head == "lm"
    out: list[MegatronParam] = []
    if first:
        out.append(MegatronParam(vocab_rows * d, shared_embedding=tied and pp > 1, is_embedding=True))
    layer = [d, d * q // tp, (q + 2 * kv) // tp * d] + ([(q + 2 * kv) // tp] if shape.qkv_bias else [])
    layer += [d, (shape.mlp_matrices - 1) * f // tp * d, d * f // tp]
    per_chunk = shape.layers // (pp * vpp)
    out += [MegatronParam(n) for n in layer * per_chunk]
    if last:
        out.append(MegatronParam(d))
        if head == "score":
            out.append(MegatronParam(d))
        elif not tied or pp > 1:
            out.append(MegatronParam(vocab_rows * d, shared_embedding=tied, is_embedding=True))
    return out


def check_layout(shape: ModelShape, tp: int, pp: int, vpp: int, cp: int, gpus: int, where: str) -> None:
    """ConfigError naming what a forced layout fails to divide (heads, kv heads, ffn, layers, GPUs)."""
    problems = []
    for what, value in (("num_attention_heads", shape.heads), ("num_key_value_heads", shape.kv_heads),
                        ("intermediate_size", shape.ffn)):
        if value % tp:
            problems.append(f"tensor_parallel={tp} does not divide {what}={value}")
    if shape.layers % (pp * max(vpp, 1)):
        problems.append(f"pipeline_parallel={pp} x virtual_pipeline_parallel={max(vpp, 1)} does not divide "
                        f"num_hidden_layers={shape.layers}")
    if vpp > 1 and pp <= 2:
        problems.append("virtual_pipeline_parallel needs pipeline_parallel > 2")
    if gpus % (tp * pp * cp):
        problems.append(f"tensor_parallel x pipeline_parallel x context_parallel = {tp * pp * cp} does not divide "
                        f"--gpus {gpus}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
