"""The whole `pas` stage: curate -> generate -> critique -> pairs -> SFT training -> PromptAugmenter.

The generator is an OpenAI-compatible server on 127.0.0.1 with a deterministic responder: some complements
answer the prompt (the critic rewrites them), some critic replies are not JSON (the code rules decide alone). The
first run has one prompt whose requests keep failing: the stage saves the finished rows and stops before training;
the rerun requests only what is missing, trains a tiny model through the SFT stage, and a third run reuses it all.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from nova_rt.config import ConfigError, build_config
from nova_rt.pas.records import read_jsonl
from nova_rt.pas.template import CRITIQUE_SYSTEM, GENERATION_SYSTEM
from nova_rt.stages import get_stage
from tests.pas.chat_server import ChatServer

SEED = int.from_bytes(os.urandom(4), "little")
ROOT = Path(__file__).resolve().parents[2]
GOOD = "Explain the main idea clearly, give one concrete example, and keep the answer well organized."
REWRITE = "Cover the key points step by step and keep the tone friendly and concise."


def _h(text: str) -> int:
    return int(hashlib.sha1(f"{SEED}:{text}".encode()).hexdigest(), 16)


def responder(messages, max_tokens):
    last = messages[-1]["content"]
    if messages[0]["content"] == GENERATION_SYSTEM:
        return "Sure! Here is the answer you wanted." if _h(last) % 3 == 0 else f"Complement: {GOOD}"
    if messages[0]["content"] == CRITIQUE_SYSTEM:
        comp = last.split("\nComplement: ", 1)[1]
        if _h(last) % 4 == 1:
            return "I cannot decide."  # not JSON: the code rules alone decide
        ok = not comp.startswith("Sure")
        return json.dumps({"reason": "checked", "is_correct": "yes" if ok else "no", "final": comp if ok else REWRITE})
    raise AssertionError(f"unexpected system prompt: {messages[0]['content'][:60]}")


def _config(tmp_path, url, quotas):
    return build_config({
        "run": {"stage": "pas", "dir": str(tmp_path / "run"), "seed": SEED % 1000},
        "model": {"path": "tiny:llama", "attn_impl": "sdpa", "tiny": {"hidden": 32, "layers": 1, "heads": 2,
                                                                      "kv_heads": 1, "intermediate": 64}},
        "data": {"max_seq_len": 1024}, "packing": {"max_tokens": 2048},
        "train": {"max_steps": 2, "global_batch": 2, "micro_batch": 1},
        "logging": {"progress_bar": False, "tensorboard": False, "plot": False},
        "pas": {"input_files": [str(ROOT / "data/pas/prompts.jsonl")], "seeds_file": str(ROOT / "data/pas/seeds.jsonl"),
                "dedup": {"embedder": "hashed:512"},
                "curate": {"categorizer": "given", "quotas": quotas, "default_quota": 0},
                "generator": {"client": "openai", "base_url": url, "model": "responder", "retries": 1,
                              "backoff_s": 0.01, "timeout_s": 10.0, "concurrency": 3}},
    })


def test_stage_end_to_end_with_failures_and_resume(tmp_path):
    from nova_rt.pas.embed import load_embedder
    from nova_rt.pas.pipeline import curate_step
    from nova_rt.pas.template import load_golden_examples

    rng = random.Random(SEED)
    cats = ["coding", "math", "creative_writing", "knowledge_qa", "life_advice", "professional_writing"]
    quotas = {c: rng.randint(0, 3) for c in cats}
    quotas[rng.choice(cats)] = 3  # at least a few prompts
    out = tmp_path / "run" / "pas"
    with ChatServer(responder) as srv:
        cfg = _config(tmp_path, srv.base_url, quotas)
        # curate first (the stage reuses curated.jsonl), so we can pick a prompt whose requests will fail
        curated, cstats = curate_step(cfg.pas, cfg.pas.input_files, out, load_embedder("hashed:512"),
                                      load_golden_examples(cfg.pas.seeds_file), client_fn=None)
        assert cstats["per_category"] == {c: q for c, q in quotas.items() if q > 0}, (SEED, cstats)  # quotas hold
        assert cstats["duplicates"]["exact"] == 8 and cstats["low_quality"] == 8, cstats
        victim = rng.choice(curated)
        srv.faults[victim["prompt"]] = ["500"] * 2  # both attempts of its generation request fail

        run = get_stage("pas")
        with pytest.raises(RuntimeError, match="rerun to complete"):
            run(cfg)
        first = {r["id"] for r in read_jsonl(out / "generated.jsonl")}
        assert first == {r["id"] for r in curated} - {victim["id"]}, SEED
        assert not (tmp_path / "run/pas_model").exists(), SEED

        srv.requests.clear()
        stats = run(cfg)
        assert stats["generate"]["done_before"] == len(first) and stats["generate"]["generated"] == 1, stats
        gen_requests = [r for r in srv.requests if "\nComplement: " not in r]
        assert gen_requests == [f"Prompt: {victim['prompt']}"], (SEED, gen_requests)
        _check_critique(out, curated)
        final = Path(stats["train"]["final"])
        assert (final / "config.json").exists()

        hits = srv.hits
        again = run(cfg)  # everything is reused: no request, no training
        assert srv.hits == hits and again["train"].get("reused") and again["curate"].get("reused"), again

    from nova_rt.pas.augment import PromptAugmenter

    prompt = victim["prompt"]
    (aug,) = PromptAugmenter(str(final), max_new_tokens=8).augment([prompt])
    assert aug.startswith(prompt), SEED


def _check_critique(out: Path, curated: list[dict]) -> None:
    generated = {r["id"]: r for r in read_jsonl(out / "generated.jsonl")}
    critiqued = {r["id"]: r for r in read_jsonl(out / "critiqued.jsonl")}
    assert set(generated) == set(critiqued) == {r["id"] for r in curated}, SEED
    for rid, row in critiqued.items():
        g = generated[rid]
        answered = g["complement"].startswith("Sure")
        assert g["complement"] in (GOOD, "Sure! Here is the answer you wanted."), g  # label stripped by cleaning
        if row["critique_parsed"] is False:  # no usable critique: the code rules alone
            assert (row["status"], row["complement"]) == (("rejected", g["complement"]) if answered
                                                          else ("kept", GOOD)), (SEED, row)
            assert not answered or row["reasons"] == ["answers_prompt"]
        else:
            assert (row["status"], row["complement"]) == ("kept", REWRITE if answered else GOOD), (SEED, row)
    pairs = list(read_jsonl(out / "sft_pairs.jsonl"))
    assert len(pairs) == sum(r["status"] == "kept" for r in critiqued.values())
    for p in pairs:
        assert p["messages"][1]["content"] == critiqued[p["id"]]["complement"]
        assert critiqued[p["id"]]["prompt"] in p["messages"][0]["content"]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="pas.generator.*client"):
        build_config({"pas": {"generator": {"client": "vllm"}}})
    with pytest.raises(ConfigError, match="quotas.math"):
        build_config({"pas": {"curate": {"quotas": {"math": -1}}}})
    with pytest.raises(ConfigError, match="unknown key 'pas.dedup.cosin'"):
        build_config({"pas": {"dedup": {"cosin": 0.9}}})
    with pytest.raises(ConfigError, match="unknown key 'pas.generator.backend'"):  # the former name of client
        build_config({"pas": {"generator": {"backend": "openai"}}})


def test_quickstart_config_loads():
    from nova_rt.config import load_config

    cfg = load_config(ROOT / "configs" / "quickstart_pas.yaml")
    assert cfg.run.stage == "pas" and cfg.pas.input_files and cfg.pas.curate.quotas
