"""Exact and near-duplicate removal for raw prompts: normalised-text hash, then MinHash LSH, then embedding ANN.

The three passes go from cheap and strict to costly and loose:
  1. exact: identical after NFKC, casefolding and whitespace collapsing;
  2. MinHash (datasketch): Jaccard similarity of character `shingle`-gram sets, estimated from `num_perm`
     permutations; LSH proposes candidates and a candidate counts when the estimate is >= `jaccard`. Catches small
     edits (typos, a changed word, punctuation) whatever the embedding thinks of them;
  3. embeddings (see embed.py) in an HNSW index (hnswlib, cosine space): catches paraphrases whose spelling differs.
Within each pass the first occurrence is the representative: we scan in input order, query only the items kept so
far, and add an item to the index only when it is kept. So an index holds no two items above the threshold, and the
result does not depend on how similar the duplicates are to each other.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DedupResult:
    keep: list[int]
    """Indices (into the input) of the kept items, in input order."""
    dup_of: dict[int, tuple[int, str, float]] = field(default_factory=dict)
    """Removed index -> (index it duplicates, pass name: exact | minhash | embedding, similarity)."""

    def counts(self) -> dict[str, int]:
        out = {"exact": 0, "minhash": 0, "embedding": 0}
        for _, kind, _ in self.dup_of.values():
            out[kind] += 1
        return out

    def representative(self, i: int) -> int:
        """The kept item that `i` duplicates, following chains across passes."""
        while i in self.dup_of:
            i = self.dup_of[i][0]
        return i


def normalize_text(text: str) -> str:
    """NFKC, casefold, collapse whitespace: the key for exact duplicates and the input to shingling."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str, n: int) -> set[str]:
    """Character n-grams of the normalised text (the whole text when it is shorter than n)."""
    norm = normalize_text(text)
    if len(norm) <= n:
        return {norm}
    return {norm[i:i + n] for i in range(len(norm) - n + 1)}


def _exact_pass(texts: Sequence[str], order: list[int], res: DedupResult) -> list[int]:
    first: dict[str, int] = {}
    kept = []
    for i in order:
        key = normalize_text(texts[i])
        if key in first:
            res.dup_of[i] = (first[key], "exact", 1.0)
        else:
            first[key] = i
            kept.append(i)
    return kept


def _minhash_pass(texts: Sequence[str], order: list[int], res: DedupResult, *, jaccard: float, num_perm: int,
                  shingle: int, seed: int) -> list[int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=jaccard, num_perm=num_perm)
    sigs: dict[int, MinHash] = {}
    kept = []
    for i in order:
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([s.encode("utf-8") for s in shingles(texts[i], shingle)])
        best, best_j = -1.0, -1
        for j in lsh.query(m):
            est = m.jaccard(sigs[j])
            if est > best:
                best, best_j = est, j
        if best >= jaccard:
            res.dup_of[i] = (best_j, "minhash", float(best))
            continue
        sigs[i] = m
        lsh.insert(i, m)
        kept.append(i)
    return kept


def _embedding_pass(emb_ND: np.ndarray, order: list[int], res: DedupResult, *, cosine: float, k: int = 8,
                    ef: int = 64) -> list[int]:
    import hnswlib

    if not order:
        return []
    index = hnswlib.Index(space="cosine", dim=emb_ND.shape[1])
    index.init_index(max_elements=len(order), ef_construction=200, M=16, random_seed=0)
    index.set_ef(max(ef, k))
    kept = []
    for i in order:
        vec = emb_ND[i:i + 1]
        if kept:
            labels, dists = index.knn_query(vec, k=min(k, len(kept)))
            sim = 1.0 - float(dists[0, 0])  # hnswlib's cosine distance is 1 - cos; results come nearest first
            if sim >= cosine:
                res.dup_of[i] = (int(labels[0, 0]), "embedding", sim)
                continue
        index.add_items(vec, np.array([i]))
        kept.append(i)
    return kept


def find_duplicates(texts: Sequence[str], *, jaccard: float = 0.7, cosine: float = 0.9, embedder=None,
                    num_perm: int = 128, shingle: int = 5, seed: int = 1) -> DedupResult:
    """Run the exact, MinHash and (when `embedder` is given) embedding passes; see the module docstring.

    jaccard/cosine: thresholds in (0, 1]; a value > 1 disables that pass."""
    if shingle < 1 or num_perm < 2:
        raise ValueError(f"dedup: shingle must be >= 1 and num_perm >= 2 (got {shingle}, {num_perm})")
    res = DedupResult(keep=[])
    order = _exact_pass(texts, list(range(len(texts))), res)
    if jaccard <= 1.0:
        order = _minhash_pass(texts, order, res, jaccard=jaccard, num_perm=num_perm, shingle=shingle, seed=seed)
    if embedder is not None and cosine <= 1.0 and order:
        sub = embedder.fit([texts[i] for i in order]).encode([texts[i] for i in order])
        emb_ND = np.zeros((len(texts), sub.shape[1]), dtype=np.float32)
        emb_ND[order] = sub
        order = _embedding_pass(emb_ND, order, res, cosine=cosine)
    res.keep = sorted(order)
    return res
