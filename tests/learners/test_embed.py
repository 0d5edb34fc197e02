"""Prompt embeddings, near-duplicates and the routing index, on the tiny 2-layer Llama."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from selftune.learners.embed import PromptEmbedder, near_duplicates
from selftune.learners.route_index import INDEX_FILE, META_FILE, RouteIndex, score_branches

PROMPTS = [
    'In hacker jargon, what does "kludge" mean?',
    "What is the atomic number of Gold?",
    'How does Ambrose Bierce\'s Devil\'s Dictionary define "Abasement"?',
    "What does the Python function os.getcwd() do?",
    "Write a haiku about autumn leaves.",
]


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: Path) -> PromptEmbedder:
    return PromptEmbedder(tiny_model_dir, layers=None, max_tokens=32, batch_size=2)


def test_vectors_have_the_model_width_unit_length_and_repeat_from_the_cache(embedder: PromptEmbedder,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    embedder.clear_cache()
    hits, misses = embedder.hits, embedder.misses
    vectors = embedder.embed([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[2])
    assert (embedder.hits - hits, embedder.misses - misses) == (1, 2)  # the repeat is computed once

    def no_forward(texts: list[str]) -> np.ndarray:
        raise AssertionError(f"cached texts were recomputed: {texts}")

    monkeypatch.setattr(embedder, "_forward", no_forward)
    assert np.array_equal(embedder.embed_one(PROMPTS[1]), vectors[1])


def test_a_batch_gives_the_vectors_each_text_gets_alone(embedder: PromptEmbedder) -> None:
    embedder.clear_cache()
    together = embedder.embed(PROMPTS)  # padded to each batch's longest, in length order
    alone = []
    for text in PROMPTS:
        embedder.clear_cache()
        alone.append(embedder.embed_one(text))
    assert np.allclose(together, np.stack(alone), atol=1e-5)


def test_the_cache_is_a_bounded_lru(tiny_model_dir: Path) -> None:
    small = PromptEmbedder(tiny_model_dir, cache_size=2)
    small.embed(PROMPTS[:2])
    small.embed_one(PROMPTS[0])  # now the most recently used
    small.embed_one(PROMPTS[2])  # evicts PROMPTS[1]
    misses = small.misses
    small.embed([PROMPTS[0], PROMPTS[2]])
    assert small.misses == misses
    small.embed_one(PROMPTS[1])
    assert small.misses == misses + 1


def test_only_the_asked_blocks_are_loaded(tiny_model_dir: Path) -> None:
    inputs_only = PromptEmbedder(tiny_model_dir, layers=0)
    assert inputs_only.settings()["layers"] == 0 and len(inputs_only.model.layers) == 0
    assert PromptEmbedder(tiny_model_dir, layers=9).layers == 2  # more than the model has: all of them
    with pytest.raises(ValueError, match="layers = -1"):
        PromptEmbedder(tiny_model_dir, layers=-1)


def cluster_and_distinct() -> tuple[list[int], np.ndarray]:
    """Three paraphrase-like rows (ids 7, 3, 12) around one direction, two rows far from it and each other."""
    rng = np.random.default_rng(0)
    base, other, third = np.eye(16, dtype=np.float32)[:3]
    rows = [base + 0.05 * rng.standard_normal(16), other, base + 0.05 * rng.standard_normal(16),
            third, base + 0.05 * rng.standard_normal(16)]
    return [7, 1, 3, 5, 12], np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("chunk", [512, 2])
def test_near_duplicates_keep_the_lowest_id_of_a_cluster_and_every_distinct_row(chunk: int) -> None:
    ids, vectors = cluster_and_distinct()
    assert near_duplicates(ids, vectors, 0.95, chunk=chunk) == {7: 3, 12: 3}


def test_near_duplicates_off_at_one_and_checked() -> None:
    ids, vectors = cluster_and_distinct()
    assert near_duplicates(ids, vectors, 1.0) == {}
    with pytest.raises(ValueError, match="one id per row"):
        near_duplicates(ids[:2], vectors, 0.9)
    with pytest.raises(ValueError, match="repeat"):
        near_duplicates([1, 1, 2, 3, 4], vectors, 0.9)


def test_an_embedded_repeat_is_a_near_duplicate_and_distinct_prompts_are_not(embedder: PromptEmbedder) -> None:
    vectors = embedder.embed([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert near_duplicates([10, 11, 12], vectors, 0.9999) == {12: 10}


def test_the_index_round_trips_through_a_generation_directory(embedder: PromptEmbedder, tmp_path: Path) -> None:
    index = RouteIndex.build(embedder.embed(PROMPTS), embedder.settings(), k=2).with_threshold(0.5)
    queries = embedder.embed(["What is the atomic number of Iron?", PROMPTS[0]])
    index.save(tmp_path)
    assert (tmp_path / INDEX_FILE).exists() and (tmp_path / META_FILE).exists()
    loaded = RouteIndex.load(tmp_path)
    assert (loaded.count, loaded.dims, loaded.k, loaded.threshold) == (5, 64, 2, 0.5)
    before, after = index.scores(queries), loaded.scores(queries)
    assert np.array_equal(before.neighbours, after.neighbours) and np.array_equal(before.centroid, after.centroid)
    loaded.check_embedder(embedder.settings())
    assert score_branches({"b": loaded}, queries[1]) == {"b": pytest.approx(float(before.neighbours[1]))}


def test_an_indexed_prompt_scores_one_against_its_nearest_neighbour(embedder: PromptEmbedder) -> None:
    index = RouteIndex.build(embedder.embed(PROMPTS), embedder.settings(), k=1)
    assert index.score(embedder.embed_one(PROMPTS[3])) == pytest.approx(1.0, abs=1e-5)
    centroid = index.scores(embedder.embed(PROMPTS)).centroid
    assert np.all(centroid < 1.0) and np.all(centroid > -1.0)


def test_a_foreign_or_missing_index_is_refused(embedder: PromptEmbedder, tmp_path: Path) -> None:
    index = RouteIndex.build(embedder.embed(PROMPTS[:2]), embedder.settings())
    with pytest.raises(ValueError, match="layers: index 2 vs query 0"):
        index.check_embedder({**embedder.settings(), "layers": 0})
    with pytest.raises(ValueError, match="dims"):
        index.scores(np.ones(8, dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="no route index"):
        RouteIndex.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="at least one row"):
        RouteIndex.build(np.zeros((0, 64), dtype=np.float32), embedder.settings())
