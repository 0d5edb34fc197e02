"""Prompt embeddings for the cascade's router and for near-duplicate selection.

``PromptEmbedder`` mean-pools the hidden states of a transformers model directory over a prompt's tokens and
L2-normalises the result, so that an inner product is a cosine. It runs only the first ``layers`` blocks
(the rest are never loaded): a routing decision must cost a few milliseconds per request on 2 cores, and a
full forward of SmolLM2-135M does not. Any ``AutoModel`` directory works: the foundation (a decoder,
truncated) or a small sentence encoder such as all-MiniLM-L6-v2 (an encoder, all of it).

Measured (``bench/bench_router.py``, 2-core Xeon, 1 thread, the other core busy; 212 held-out prompts of
the four shared domains and general prompts): SmolLM2's input embeddings alone (``layers=0``) route 100% right
at 1.4 ms median / 2.7 ms p99 a request; each block adds ~5 ms (2 blocks: p99 15 ms) and none routes better;
all 30 take 140 ms. What the foundation's states do not do is generalise: the same questions reworded route
56-94% right (more blocks help the centroid score a little), where all-MiniLM-L6-v2 routes 100% but takes
16.5 ms median / 22.6 ms p99. Pooling the last token instead of the mean routed worse at the depths that fit
the budget (36% right at 0 blocks, 98% at 1).

Embeddings are cached by the SHA-256 of the text (a bounded LRU), so a prompt seen again costs a hash.
``near_duplicates`` keeps one row of each group of rows whose embeddings are within a cosine threshold.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

POOLING = "mean"
"""The only pooling kept: the mean over the prompt's tokens (the last token alone measured worse for routing)."""


def text_key(text: str) -> bytes:
    """The cache key of a text: its SHA-256 digest (a bounded key for any length of prompt)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block on ``threads`` intra-op threads (0: leave torch's setting), then restore it.

    torch's setting is process-wide: restoring it keeps the embedder from changing what generation runs on.
    """
    before = torch.get_num_threads()
    if threads > 0 and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class PromptEmbedder:
    """Texts to L2-normalised float32 vectors: mean-pooled hidden states after ``layers`` blocks of a model.

    ``layers`` = 0 pools the input embeddings (no block runs), ``None`` (or at least the model's depth) runs
    every block. Prompts are cut to their first ``max_tokens`` tokens. Thread-safe: one lock covers the cache
    and the forward, which is short and would only compete for the same cores anyway.
    """

    def __init__(self, model_dir: str | Path, *, layers: int | None = None, max_tokens: int = 64,
                 batch_size: int = 32, threads: int = 1, cache_size: int = 4096) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens = {max_tokens}: use 1 or more")
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}: use 1 or more")
        if layers is not None and layers < 0:
            raise ValueError(f"layers = {layers}: use 0 (input embeddings), a block count, or None for all")
        self.model_dir = Path(model_dir)
        self.max_tokens, self.batch_size, self.threads, self.cache_size = max_tokens, batch_size, threads, cache_size
        config = AutoConfig.from_pretrained(str(self.model_dir))
        depth = int(config.num_hidden_layers)
        self.layers = depth if layers is None or layers >= depth else layers
        if self.layers < depth:  # load only the blocks that run: less memory, faster load
            config.num_hidden_layers = self.layers
            if isinstance(getattr(config, "layer_types", None), list):
                config.layer_types = config.layer_types[: self.layers]
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the blocks left out would be reported as unused weights
        try:
            self.model = AutoModel.from_pretrained(str(self.model_dir), config=config, dtype=torch.float32).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        # right padding: a causal model's real tokens never attend to it, and positions start at 0 as unpadded
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = self.tokenizer.eos_token_id or 0
        self.dims = int(config.hidden_size)
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def settings(self) -> dict[str, Any]:
        """What made these vectors: an index built with other settings cannot be queried with this embedder."""
        return {"model": self.model_dir.name, "layers": self.layers, "pooling": POOLING,
                "max_tokens": self.max_tokens, "dims": self.dims}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dims) float32, each row of unit length; cached texts are not recomputed."""
        keys = [text_key(t) for t in texts]
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        with self._lock:
            missing: dict[bytes, list[int]] = {}
            for i, key in enumerate(keys):
                cached = self._cache.get(key)
                if cached is None:
                    missing.setdefault(key, []).append(i)
                else:
                    self._cache.move_to_end(key)
                    out[i] = cached
            self.misses += len(missing)  # a text repeated within one call is computed once: the rest are hits
            self.hits += len(texts) - len(missing)
            if missing:
                fresh = self._forward([texts[rows[0]] for rows in missing.values()])
                for (key, rows), vector in zip(missing.items(), fresh, strict=True):
                    out[rows] = vector
                    self._remember(key, vector)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """One text's vector, (dims,)."""
        return self.embed([text])[0]

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _remember(self, key: bytes, vector: np.ndarray) -> None:
        if self.cache_size <= 0:
            return
        self._cache[key] = vector
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    @torch.no_grad()
    def _forward(self, texts: list[str]) -> np.ndarray:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_tokens)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        with torch_threads(self.threads):
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
                hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).float().numpy()
        return out


def near_duplicates(ids: Sequence[int], vectors: np.ndarray, threshold: float, *,
                    chunk: int = 512) -> dict[int, int]:
    """{dropped id: kept id}: rows, taken in id order, whose cosine to a row kept before them is >= ``threshold``.

    The lowest id of each group is kept; a dropped row points at its most similar kept row. ``threshold``
    >= 1.0 turns it off (``selection.near_duplicate_similarity``'s convention) and returns ``{}``. Kept rows
    go into a faiss inner-product index that each chunk of rows searches (k=1); rows within one chunk are
    compared with each other directly, so memory stays bounded by ``chunk`` rows whatever the data.
    """
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors: pass one id per row")
    if len(set(ids)) != len(ids):
        raise ValueError("ids repeat: pass each row's id once")
    if not 0.0 < threshold:
        raise ValueError(f"threshold = {threshold}: use a cosine in (0, 1]; 1.0 turns near-duplicates off")
    if threshold >= 1.0 or len(ids) == 0:
        return {}
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    rows = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[order])
    faiss.normalize_L2(rows)  # cosine whatever the caller passed
    kept = faiss.IndexFlatIP(rows.shape[1])
    kept_ids: list[int] = []
    dropped: dict[int, int] = {}
    for start in range(0, len(rows), chunk):
        block = rows[start : start + chunk]
        best_sim, best_at = (kept.search(block, 1) if kept.ntotal else
                             (np.full((len(block), 1), -np.inf, np.float32), np.full((len(block), 1), -1)))
        inner = block @ block.T
        kept_here: list[int] = []  # positions in block
        for j in range(len(block)):
            row_id = ids[order[start + j]]
            sim, match = float(best_sim[j, 0]), (kept_ids[best_at[j, 0]] if best_at[j, 0] >= 0 else None)
            for i in kept_here:  # an earlier row of this chunk, kept, may be closer than any indexed one
                if inner[j, i] > sim:
                    sim, match = float(inner[j, i]), ids[order[start + i]]
            if match is not None and sim >= threshold:
                dropped[row_id] = match
            else:
                kept_here.append(j)
        kept.add(np.ascontiguousarray(block[kept_here]))
        kept_ids.extend(ids[order[start + j]] for j in kept_here)
    return dropped
