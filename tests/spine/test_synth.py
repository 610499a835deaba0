"""The shipped generated data (nova_rt.data.synth): files reproduce from their seeds, and the helpfulness pairs'
rejected replies are the failure each row claims."""

import json
from pathlib import Path

from nova_rt.data import synth

REPO = Path(__file__).resolve().parents[2]


def test_shipped_files_reproduce(tmp_path):
    synth.main(str(tmp_path))
    for sub in ("sft", "preference"):
        for f in (tmp_path / sub).iterdir():
            assert f.read_text() == (REPO / "data" / sub / f.name).read_text(), f"data/{sub}/{f.name} is stale"


def test_helpful_pairs_rejects_are_what_they_claim():
    rows = synth.helpful_rows(400, seed=123)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"refusal", "off_topic", "truncated", "wrong"}
    for r in rows:
        c, x = r["chosen"], r["rejected"]
        assert c != x, r
        if r["kind"] == "refusal":
            assert x in synth.REFUSALS
        elif r["kind"] == "truncated":
            assert c.startswith(x) and len(x.split()) <= max(1, len(c.split()) // 3)
        elif r["kind"] == "wrong":
            assert len(x) == len(c)
            if any(ch.isdigit() for ch in c):  # exactly the last digit changed
                diff = [i for i, (a, b) in enumerate(zip(c, x)) if a != b]
                assert diff == [max(i for i, ch in enumerate(c) if ch.isdigit())], r
            else:
                assert sorted(x) == sorted(c)
    assert sum("chosen_score" in r for r in rows) == 200
    json.dumps(rows)


def test_slice_eval_files_are_held_out():
    """No prompt of a slice's eval file is a prompt of its training file (nor of the quickstart's quick_* files),
    and no eval prompt repeats: the pipeline's held-out loss measures generalisation, not recall."""
    data = REPO / "data" / "sft"
    for name in ("math", "text"):
        read = lambda f: [json.loads(line) for line in (data / f).read_text().splitlines()]  # noqa: E731
        train = {synth.first_prompt(r) for f in (f"slice_{name}.jsonl", f"quick_{name}.jsonl") for r in read(f)}
        held = [synth.first_prompt(r) for r in read(f"slice_{name}_eval.jsonl")]
        assert len(held) == 32 and len(set(held)) == len(held)
        assert not train & set(held), f"slice_{name}_eval.jsonl repeats training prompts"
