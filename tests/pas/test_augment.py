"""Augment round trip: a saved PAS model returns each prompt unchanged, followed by its complement.

The fast tests use a random tiny model and recompute the complement with a hand-written greedy loop (no
`generate`, no padding); the slow test trains a tiny model to memorise complements and expects them back exactly.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from nova_rt.models.tiny import build_tiny_model, byte_tokenizer, save_tiny_model
from nova_rt.pas.augment import PromptAugmenter
from nova_rt.pas.cli import main as augment_main
from nova_rt.pas.generate import clean_complement
from nova_rt.pas.template import format_pas_input

SEED = int.from_bytes(os.urandom(4), "little")
WORDS = "alpha river copper lantern violet orbit maple quartz ember harbor tundra falcon cedar prism".split()


def _prompts(rng, n):
    return [rng.choice(["Explain", "Why is", "Write about", "¿Qué es"]) + " " +
            " ".join(rng.choices(WORDS, k=rng.randint(1, 6))) + rng.choice(["?", ".", "", "  "]) for _ in range(n)]


def _greedy_reference(model, tok, prompt: str, max_new: int) -> str:
    """Token-by-token argmax over the full sequence each step (no KV cache, batch of one)."""
    text = tok.apply_chat_template([{"role": "user", "content": format_pas_input(prompt)}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return clean_complement(tok.decode(new, skip_special_tokens=True).strip())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pas_tiny")
    save_tiny_model(path, "qwen2", seed=SEED % 997)
    return path


def test_augment_keeps_prompt_and_appends_complement(tiny_dir):
    rng = random.Random(SEED)
    prompts = _prompts(rng, rng.randint(1, 5))
    aug = PromptAugmenter(str(tiny_dir), max_new_tokens=12, batch_size=rng.randint(1, 3))
    out = aug.augment(prompts)
    ref_model = aug.client.model
    for p, full in zip(prompts, out):
        comp = _greedy_reference(ref_model, aug.client.tok, p, 12)
        assert full == (p + "\n\n" + comp if comp else p), (SEED, p, full, comp)
        assert full.startswith(p), SEED


def test_augment_rejects_bare_string(tiny_dir):
    aug = PromptAugmenter(str(tiny_dir), max_new_tokens=2)
    with pytest.raises(TypeError, match="list of prompts"):
        aug.augment("one prompt")


def test_cli_json_output(tiny_dir, capsys, tmp_path):
    f = tmp_path / "more.jsonl"
    f.write_text(json.dumps({"prompt": "Why is ice slippery?"}) + "\n")
    assert augment_main(["--model", str(tiny_dir), "--max-new-tokens", "6", "--json", "Explain tides.",
                         "--file", str(f)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Explain tides.", "Why is ice slippery?"]
    for r in rows:
        assert r["augmented"] == (r["prompt"] + "\n\n" + r["complement"] if r["complement"] else r["prompt"])


def test_cli_errors(tmp_path, capsys):
    assert augment_main(["--model", str(tmp_path / "nope"), "hello"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert augment_main(["--model", str(tmp_path)]) == 2


@pytest.mark.slow
def test_trained_model_round_trip(tmp_path):
    """Train a tiny model on (PAS template, complement) with the loss on the complement only; augment returns the
    memorised complements after the unchanged prompts."""
    rng = random.Random(SEED)
    prompts = list(dict.fromkeys(_prompts(rng, 3)))
    comps = [f"Mention the {w} and keep it short." for w in rng.sample(WORDS, len(prompts))]
    tok = byte_tokenizer()
    torch.manual_seed(SEED % 2**31)
    model = build_tiny_model("llama", seed=SEED % 997)
    rows = []
    for p, c in zip(prompts, comps):
        pre = tok.apply_chat_template([{"role": "user", "content": format_pas_input(p)}], add_generation_prompt=True,
                                      tokenize=False)
        a = tok(pre, add_special_tokens=False)["input_ids"]
        b = tok(pre + c + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((torch.tensor(b), len(a)))
    T = max(len(b) for b, _ in rows)
    ids_BT = torch.zeros(len(rows), T, dtype=torch.long)
    labels_BT = torch.full((len(rows), T), -100)
    mask_BT = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (b, n_prompt) in enumerate(rows):
        ids_BT[i, :len(b)], mask_BT[i, :len(b)], labels_BT[i, n_prompt:len(b)] = b, 1, b[n_prompt:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(input_ids=ids_BT, attention_mask=mask_BT, labels=labels_BT).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:  # measured: greedy decoding reproduces every complement from here
            break
    model.save_pretrained(tmp_path / "pas")
    tok.save_pretrained(tmp_path / "pas")
    out = PromptAugmenter(str(tmp_path / "pas"), max_new_tokens=48).augment(prompts)
    assert out == [p + "\n\n" + c for p, c in zip(prompts, comps)], (SEED, loss.item(), out)
