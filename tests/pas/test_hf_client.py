"""The local HF generator client: batched left-padded generation and the forced reply prefix.

Oracle: transformers' generate on one conversation at a time (no padding), the prefix appended to the rendered prompt.
"""

import os

import torch

from nova_rt.models.tiny import build_tiny_model, byte_tokenizer
from nova_rt.pas.clients import HFChatClient


def _one(model, tok, conv, prefix: str, n: int) -> str:
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) + prefix
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_reply_prefix_is_forced_and_returned():
    seed = int.from_bytes(os.urandom(4), "little")
    # float64: batched (left-padded) and single greedy runs must not flip a near-tie argmax
    model, tok = build_tiny_model("llama", seed=seed % 1000, dtype=torch.float64).eval(), byte_tokenizer()
    client = HFChatClient("", model=model, tokenizer=tok, batch_size=2)
    convs = [[{"role": "user", "content": c}] for c in ("judge: be brief", "x", "a longer prompt to judge here")]
    prefix = '{"reason": "'
    got = client.chat(convs, max_new_tokens=6, reply_prefix=prefix)
    for conv, g in zip(convs, got):
        assert isinstance(g, str) and g.startswith(prefix), (seed, g)
        assert g == prefix + _one(model, tok, conv, prefix, 6).rstrip(), f"seed {seed}"
    plain = client.chat(convs, max_new_tokens=6)
    assert plain == [_one(model, tok, c, "", 6).strip() for c in convs], f"seed {seed}"
