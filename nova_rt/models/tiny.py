"""Tiny random causal LMs (Llama or Qwen2 family) with a byte-level tokenizer and a ChatML chat template.

Used by tests and benchmarks that need a real HF directory without network access. The tokenizer maps every
byte to a token (no merges), so any text round-trips; three special tokens frame chat turns.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer():
    """A PreTrainedTokenizerFast over the 256 byte symbols plus ChatML specials (vocab 259)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for sym in sorted(alphabet):
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", *, vocab_size: int = 320, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, max_positions: int = 2048, tie: bool = False):
    """A transformers config for a tiny Llama or Qwen2 (GQA, RMSNorm, SwiGLU, RoPE; Qwen2 adds qkv bias)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                  bos_token_id=None, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    if arch == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, use_sliding_window=False)
    raise ValueError(f"tiny model arch must be 'llama' or 'qwen2', got {arch!r}")


def build_tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **cfg_kwargs):
    """A randomly initialised tiny causal LM (deterministic for a given seed)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **cfg_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def save_tiny_model(path: str | os.PathLike, arch: str = "llama", *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **cfg_kwargs) -> Path:
    """Write a tiny model and its tokenizer as an HF directory (safetensors; sharded when max_shard_size is set)."""
    path = Path(path)
    model = build_tiny_model(arch, seed=seed, dtype=dtype, **cfg_kwargs)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    byte_tokenizer().save_pretrained(path)
    return path
