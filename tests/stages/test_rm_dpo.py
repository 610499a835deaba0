"""Reward model and DPO: preference data, packed pair forwards, reference log-probs, and end-to-end tiny runs.

References are independent: per-sequence forwards of the plain HF model (eager attention, float64 log-softmax over
full logits) instead of the packed row with cu_seqlens and the fused log-prob op. Random data is drawn afresh each
run; the seed is printed and in the assertion messages.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nova_rt.data.io import DataError
from nova_rt.data.preference import collate_pairs, load_preference_pairs, pack_pairs
from nova_rt.distributed import DistInfo
from nova_rt.losses.preference import DPOLoss
from nova_rt.models.causal import CausalLMLogprobs
from nova_rt.models.loading import load_causal_lm, set_attention
from nova_rt.models.reward import RewardModel
from nova_rt.models.tiny import byte_tokenizer
from nova_rt.stages.dpo import compute_reference_logps, dpo_loss, pair_batch, pair_logps, with_reference
from tests.helpers import assert_close_verbose

SEED = int.from_bytes(os.urandom(4), "little")
print(f"test_rm_dpo seed: {SEED}")
REPO = Path(__file__).resolve().parents[2]
TINY = {"hidden": 48, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 96}
ALPHABET = "abcdefghij klmnopqrstuvwxyz0123456789+-*=.,\n"
IM_END = "<|im_end|>\n"


def _text(rng: random.Random, lengths=(1, 2, 3, 7, 18, 41, 64)) -> str:
    """Random text with at least one visible character: a whitespace-only message is a data error (issue 12's
    "empty assistant message"), which drawn single characters (' ', newline) used to hit on some seeds."""
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.choice(lengths)))
    return text if text.strip() else text[:-1] + rng.choice(ALPHABET.replace(" ", "").replace("\n", ""))


def random_rows(rng: random.Random, n: int) -> list[dict]:
    """Preference rows of every accepted shape: prompt strings, message lists, partial assistant prefixes,
    message-list completions, with and without scores; completions down to a single character."""
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            row = {"prompt": _text(rng), "chosen": _text(rng), "rejected": _text(rng)}
        elif kind == 1:
            row = {"prompt": _text(rng), "system": _text(rng), "chosen": _text(rng, (1,)), "rejected": _text(rng)}
        elif kind == 2:  # step-level DPO: the prompt carries the correct steps of the solution
            row = {"messages": [{"role": "user", "content": _text(rng)},
                                {"role": "assistant", "content": "Step 1: " + _text(rng) + "\n"}],
                   "chosen": _text(rng), "rejected": _text(rng)}
        else:
            row = {"messages": [{"role": "user", "content": _text(rng)}, {"role": "assistant", "content": _text(rng)},
                                {"role": "user", "content": _text(rng)}],
                   "chosen": [{"role": "assistant", "content": _text(rng)}],
                   "rejected": [{"role": "assistant", "content": _text(rng)},
                                {"role": "tool", "content": _text(rng)},
                                {"role": "assistant", "content": _text(rng)}]}
        if rng.random() < 0.5:
            row["chosen_score"], row["rejected_score"] = rng.uniform(-1, 1), rng.uniform(-1, 1)
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    rng = random.Random(SEED)
    rows = random_rows(rng, 23)
    path = write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", rows)
    tok = byte_tokenizer()
    pairs, counts = load_preference_pairs([str(path)], tok, max_seq_len=400)
    return rows, pairs, tok


def _supervised_text(tok, sample) -> str:
    return tok.decode([int(t) for t in sample.targets if t != -100])


def test_tokenization_supervises_exactly_the_completion(pair_data):
    rows, pairs, tok = pair_data
    assert len(pairs) == len(rows)
    for row, pair in zip(rows, pairs):
        for side, sample in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            comp = row[side]
            if isinstance(comp, str):
                expected = comp + IM_END
            else:  # assistant turns only, tool turns are context
                expected = "".join(m["content"] + IM_END for m in comp if m["role"] == "assistant")
            got = _supervised_text(tok, sample)
            assert got == expected, f"{side} of {row} (seed {SEED}): supervised {got!r}"
            if "messages" in row and row["messages"][-1]["role"] == "assistant":  # partial prefix is context
                full = tok.decode(sample.input_ids.tolist())
                assert row["messages"][-1]["content"] + comp + IM_END in full
        if "chosen_score" in row:
            assert (pair.chosen_score, pair.rejected_score) == (row["chosen_score"], row["rejected_score"])


def test_pairs_pack_side_by_side(pair_data):
    _, pairs, _ = pair_data
    for cap in (pairs and max(len(p) for p in pairs), 700, 2000):
        rows, util = pack_pairs(pairs, cap)
        seen = sorted(int(i) for r in rows for i in r.pair_ids)
        assert seen == list(range(len(pairs))), f"cap {cap}: every pair exactly once (seed {SEED})"
        for r in rows:
            assert r.row.num_tokens <= cap
            lens = (r.row.cu_seqlens[1:] - r.row.cu_seqlens[:-1]).tolist()
            assert lens == [n for i in r.pair_ids for n in (len(pairs[i].chosen), len(pairs[i].rejected))]
        assert 0 < util <= 1


BAD_ROWS = [
    ({"prompt": "q", "chosen": "a"}, "rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": 5}, "rejected"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt"),
    ({"prompt": "q", "messages": [], "chosen": "a", "rejected": "b"}, "row 3"),
    ({"messages": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "messages[0].role"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 1.0}, "rejected_score"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": "x", "rejected_score": 0}, "chosen_score"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Step 1"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen[0].role"),
    ("{not json", "invalid JSON"),
]


@pytest.mark.parametrize("bad, field", BAD_ROWS)
def test_bad_row_error_names_file_row_field(tmp_path, bad, field):
    good = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as exc:
        load_preference_pairs([str(path)], byte_tokenizer(), max_seq_len=256)
    msg = str(exc.value)
    assert str(path) in msg and "row 3" in msg and field in msg, msg
    pairs, counts = load_preference_pairs([str(path)], byte_tokenizer(), max_seq_len=256, on_error="skip")
    assert len(pairs) == 3 and counts["skipped_bad_rows"] == 1


def _tiny_policy(seed: int):
    model, _ = load_causal_lm("tiny:llama", attn_impl="nova", tiny=TINY, seed=seed)
    return model


def _eager_copy(module):
    ref = copy.deepcopy(module)
    set_attention(ref, "eager")
    return ref.double()


def _batches(pairs, cap: int, per_mb: int):
    rows, _ = pack_pairs(pairs, cap)
    return [collate_pairs(rows[i:i + per_mb], pairs, 1.0 / len(pairs)) for i in range(0, len(rows), per_mb)]


@torch.no_grad()
def test_packed_pair_logps_match_each_sequence_alone(pair_data):
    _, pairs, _ = pair_data
    hf = _tiny_policy(SEED % 1000)
    policy, ref = CausalLMLogprobs(hf).eval(), _eager_copy(hf).eval()
    for mb in map(pair_batch, _batches(pairs, 900, 2)):
        chosen, rejected = pair_logps(policy, mb)
        expected = []
        for i in mb.pair_ids.tolist():
            for s in (pairs[i].chosen, pairs[i].rejected):
                logits = ref(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0]
                logp = torch.log_softmax(logits.double(), -1)
                tgt = torch.from_numpy(s.targets)
                m = tgt != -100
                expected.append(logp[m].gather(-1, tgt[m][:, None]).sum())
        got = torch.stack([chosen, rejected], 1).reshape(-1)
        assert_close_verbose(got, torch.stack(expected), rtol=1e-5, atol=1e-4, name=f"logp sums (seed {SEED})")


@torch.no_grad()
def test_packed_reward_scores_match_each_sequence_alone(pair_data):
    _, pairs, tok = pair_data
    rm = RewardModel.from_causal_lm(_tiny_policy(SEED % 997), tok.pad_token_id, seed=SEED % 991).eval()
    ref = _eager_copy(rm.lm).eval()
    for mb in _batches(pairs, 700, 3):
        got = rm(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], mb["max_seqlen"])
        expected = [ref(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0, 0]
                    for i in mb["pair_ids"].tolist() for s in (pairs[i].chosen, pairs[i].rejected)]
        assert_close_verbose(got, torch.stack(expected), rtol=1e-5, atol=1e-5, name=f"rm scores (seed {SEED})")


def test_precomputed_and_online_reference_give_the_same_loss(pair_data):
    _, pairs, _ = pair_data
    hf = _tiny_policy(SEED % 983)
    ref = CausalLMLogprobs(copy.deepcopy(hf)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    policy = CausalLMLogprobs(hf)
    rows, _ = pack_pairs(pairs, 800)
    table = compute_reference_logps(ref, rows, pairs, DistInfo(), micro_batch=2)
    for loss in (DPOLoss(0.1, "sigmoid", 0.1), DPOLoss(0.5, "ipo")):
        for i in range(0, len(rows), 2):
            mb = pair_batch(collate_pairs(rows[i:i + 2], pairs, 1.0 / len(pairs)))
            online, s_on = dpo_loss(policy, mb, loss, ref)
            pre, s_pre = dpo_loss(policy, with_reference([mb], table)[0], loss)
            assert abs(online.item() - pre.item()) <= 1e-6 * max(1.0, abs(online.item())), \
                f"{loss}: online {online.item()} vs precomputed {pre.item()} (seed {SEED})"
            assert abs(s_on["margin"] - s_pre["margin"]) < 1e-6 and s_on["accuracy"] == s_pre["accuracy"]


# ----------------------------------------------------------------------------------------------- end to end
def _small_data(tmp_path: Path) -> tuple[Path, Path]:
    lines = (REPO / "data/preference/arith_pairs.jsonl").read_text().splitlines()
    rng = random.Random(SEED)
    train = write_jsonl(tmp_path / "train.jsonl", rng.sample(lines, 24))
    evals = write_jsonl(tmp_path / "eval.jsonl", (REPO / "data/preference/arith_pairs_eval.jsonl")
                        .read_text().splitlines()[:10])
    return train, evals


def _train(config: str, run_dir: Path, train: Path, evals: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "nova_rt.train", "--config", str(REPO / "configs" / config),
           "--set", f"run.dir={run_dir}", "--set", f"data.train_files=[{train}]", "--set", f"data.eval_files=[{evals}]",
           "--set", "logging.tensorboard=false", "--set", "logging.plot=false", "--set", "packing.max_tokens=256",
           "--set", "data.max_seq_len=128", "--set", f"run.seed={SEED % 10000}",
           *[a for e in extra for a in ("--set", e)]]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_rm_run_saves_a_sequence_classifier_that_reproduces_scores(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, evals = _small_data(tmp_path)
    metrics = _train("tiny_rm.yaml", tmp_path / "run", train, evals, "train.max_steps=3", "train.eval_every=0",
                     "checkpoint.every=0")
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    last = metrics[-1]
    for key in ("loss", "accuracy", "margin", "eval_accuracy", "eval_loss", "eval_reward_chosen"):
        assert key in last and last[key] == last[key], key
    final = tmp_path / "run" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float64).eval()
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    tok = AutoTokenizer.from_pretrained(final)
    pairs, _ = load_preference_pairs([str(evals)], tok, max_seq_len=128)
    with torch.no_grad():
        score = lambda s: model(input_ids=torch.from_numpy(s.input_ids)[None]).logits[0, 0].item()  # noqa: E731
        rc = torch.tensor([score(p.chosen) for p in pairs], dtype=torch.float64)
        rr = torch.tensor([score(p.rejected) for p in pairs], dtype=torch.float64)
    assert abs(rc.mean().item() - last["eval_reward_chosen"]) < 1e-4, (rc.mean().item(), last, SEED)
    assert abs(rr.mean().item() - last["eval_reward_rejected"]) < 1e-4, (rr.mean().item(), last, SEED)
    assert abs((rc > rr).double().mean().item() - last["eval_accuracy"]) < 1e-9, (last, SEED)


def test_tiny_dpo_run_writes_metrics_final_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    train, evals = _small_data(tmp_path)
    common = ("train.eval_every=0", "checkpoint.every=1", "optim.lr=0.01")
    full = _train("tiny_dpo.yaml", tmp_path / "full", train, evals, "train.max_steps=3", *common)
    assert [m["step"] for m in full] == [0, 1, 2, 3]
    assert full[0]["eval_margin"] == 0.0 and full[0]["eval_accuracy"] == 0.5  # policy == reference at start
    assert full[1]["margin"] == 0.0 and abs(full[-1]["margin"]) > 0
    assert (tmp_path / "full" / "final" / "config.json").exists()
    assert len(list((tmp_path / "full").glob("ref_logps_train_*.pt"))) == 1
    # a run killed after the step-2 checkpoint (simulated: drop what step 3 wrote) resumes to the same end
    import shutil

    weights = load_file(tmp_path / "full/final/model.safetensors")
    shutil.rmtree(tmp_path / "full" / "final")
    resumed = _train("tiny_dpo.yaml", tmp_path / "full", train, evals, "train.max_steps=3", *common)
    assert [m["step"] for m in resumed] == [0, 1, 2, 3]
    assert resumed[-1]["loss"] == full[-1]["loss"], (resumed[-1], full[-1], SEED)
    again = load_file(tmp_path / "full/final/model.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights), \
        f"final weights differ after resume (seed {SEED})"


def test_configs_load():
    from nova_rt.config import load_config

    for name in ("tiny_rm", "tiny_dpo", "quickstart_rm", "quickstart_dpo"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        section = getattr(cfg, cfg.run.stage)
        assert section is not None
    with pytest.raises(Exception, match="label_smoothing"):
        load_config(REPO / "configs/tiny_dpo.yaml", ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"])
