"""A specialist branch's routing index: its training prompts' embeddings in faiss, stored with its generation.

The router asks each specialist "how close is this prompt to what you were trained on?": the mean cosine of
its ``k`` nearest training prompts (nearest-neighbour similarity) and the cosine to the normalised mean of
them all (centroid similarity). ``policies.routing`` turns those scores into a decision. Vectors come from
``embed.PromptEmbedder`` and are unit length, so a flat inner-product index gives cosines; a flat index is
exact, and at a specialist's size (thousands of prompts) one query costs well under a millisecond.

On disk, in a generation directory: ``router.faiss`` (the index) and ``router.json`` (the embedder settings
that made the vectors, dims, count, centroid, ``k`` and, once calibrated, the threshold).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .jobs import atomic_write_json

INDEX_FILE = "router.faiss"
META_FILE = "router.json"
FORMAT = 1
"""router.json's format version: a file of another version is refused, not misread."""
SCORE_KINDS = ("neighbours", "centroid")


@dataclass(frozen=True)
class RouteScores:
    """Per query: the mean cosine of its ``k`` nearest indexed prompts, and its cosine to the centroid."""

    neighbours: np.ndarray
    centroid: np.ndarray

    def of(self, kind: str) -> np.ndarray:
        if kind not in SCORE_KINDS:
            raise ValueError(f"score kind {kind!r}: use one of {', '.join(SCORE_KINDS)}")
        return self.neighbours if kind == "neighbours" else self.centroid


@dataclass(frozen=True, eq=False)
class RouteIndex:
    index: faiss.IndexFlatIP
    centroid: np.ndarray
    """Unit-length mean of the indexed vectors, (dims,) float32."""
    embedder: dict[str, Any]
    """``PromptEmbedder.settings()`` of the embedder that made the vectors: queries must come from the same."""
    k: int = 4
    """Nearest neighbours averaged into the neighbour score (fewer when the index holds fewer)."""
    threshold: float | None = None
    """The calibrated routing threshold for ``score_kind``, once the generation's promotion has calibrated it."""
    score_kind: str = "neighbours"
    """Which score the threshold applies to: "neighbours" or "centroid"."""

    @classmethod
    def build(cls, vectors: np.ndarray, embedder: Mapping[str, Any], *, k: int = 4,
              score_kind: str = "neighbours") -> RouteIndex:
        """An index over these (unit-length) vectors, one row per training prompt."""
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"vectors of shape {vectors.shape}: a route index needs at least one row of (n, dims)")
        if k < 1:
            raise ValueError(f"k = {k}: use 1 or more neighbours")
        if score_kind not in SCORE_KINDS:
            raise ValueError(f"score kind {score_kind!r}: use one of {', '.join(SCORE_KINDS)}")
        dims = embedder.get("dims")
        if dims is not None and dims != vectors.shape[1]:
            raise ValueError(f"vectors have {vectors.shape[1]} dims but the embedder settings say {dims}")
        vectors = vectors.copy()
        faiss.normalize_L2(vectors)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index=index, centroid=_unit(vectors.mean(axis=0)), embedder=dict(embedder), k=k,
                   score_kind=score_kind)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def dims(self) -> int:
        return int(self.index.d)

    def with_threshold(self, threshold: float) -> RouteIndex:
        """This index with a calibrated threshold (``policies.routing.calibrate_route_threshold``)."""
        return dataclasses.replace(self, threshold=float(threshold))

    def scores(self, queries: np.ndarray) -> RouteScores:
        """Scores of (n, dims) or (dims,) unit-length query vectors: arrays of n float32."""
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.shape[1] != self.dims:
            raise ValueError(f"queries have {queries.shape[1]} dims, the index {self.dims}: embed them with "
                             f"the embedder that built it ({self.embedder})")
        k = min(self.k, self.count)
        sims, _ = self.index.search(queries, k)
        return RouteScores(neighbours=sims.mean(axis=1), centroid=queries @ self.centroid)

    def score(self, query: np.ndarray) -> float:
        """One query's score of the kind the threshold applies to."""
        return float(self.scores(query).of(self.score_kind)[0])

    def check_embedder(self, settings: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming each setting where the query embedder differs from the index's."""
        differ = {key: (self.embedder.get(key), settings.get(key))
                  for key in sorted(set(self.embedder) | set(settings)) if self.embedder.get(key) != settings.get(key)}
        if differ:
            detail = ", ".join(f"{key}: index {a!r} vs query {b!r}" for key, (a, b) in differ.items())
            raise ValueError(f"the route index was built by another embedder ({detail}): rebuild the index "
                             "or embed queries with the index's settings")

    def save(self, directory: str | Path) -> None:
        """Write ``router.faiss`` and ``router.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (INDEX_FILE + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, directory / INDEX_FILE)
        atomic_write_json(directory / META_FILE, {
            "format": FORMAT, "embedder": self.embedder, "dims": self.dims, "count": self.count, "k": self.k,
            "score_kind": self.score_kind, "threshold": self.threshold, "centroid": [float(x) for x in self.centroid],
        })

    @classmethod
    def load(cls, directory: str | Path) -> RouteIndex:
        """The index saved in ``directory``; a missing or inconsistent one raises, naming the file."""
        directory = Path(directory)
        meta_path, index_path = directory / META_FILE, directory / INDEX_FILE
        if not meta_path.exists() or not index_path.exists():
            raise FileNotFoundError(f"{directory} has no route index ({META_FILE} + {INDEX_FILE}): build one "
                                    "from the branch's training prompts")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this version reads {FORMAT}: rebuild it")
        index = faiss.read_index(str(index_path))
        centroid = np.asarray(meta["centroid"], dtype=np.float32)
        if index.d != meta["dims"] or index.ntotal != meta["count"] or len(centroid) != index.d:
            raise ValueError(f"{directory}: {INDEX_FILE} holds {index.ntotal} x {index.d} but {META_FILE} says "
                             f"{meta['count']} x {meta['dims']} (centroid {len(centroid)}): rebuild the index")
        threshold = meta.get("threshold")
        return cls(index=index, centroid=centroid, embedder=meta["embedder"], k=int(meta["k"]),
                   threshold=None if threshold is None else float(threshold), score_kind=meta["score_kind"])


def score_branches(indexes: Mapping[str, RouteIndex], query: np.ndarray, kind: str | None = None) -> dict[str, float]:
    """{branch: score} of one query vector against each branch's index (its own score kind unless ``kind``)."""
    return {branch: float(index.scores(query).of(kind or index.score_kind)[0]) for branch, index in indexes.items()}


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)
