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
