"""The replay batch plan: exact replay share, every new row used, seeded, length-bucketed."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selftune.policies.replay import batch_split, fisher_sample, plan_batches
from selftune.policies.training import ReplayConfig


def test_batch_split_rounds_the_ratio_and_keeps_one_new_sequence() -> None:
    assert batch_split(8, 0.25, replay_available=100) == (6, 2)
    assert batch_split(8, 0.5, replay_available=1) == (4, 4)
    assert batch_split(2, 0.9, replay_available=10) == (1, 1)
    assert batch_split(8, 0.25, replay_available=0) == (8, 0)  # empty buffer: nothing to replay
    assert batch_split(8, 0.0, replay_available=10) == (8, 0)


def test_batch_split_rejects_a_ratio_of_one() -> None:
    with pytest.raises(ValueError, match="ratio = 1.0"):
        batch_split(8, 1.0, replay_available=10)


@settings(max_examples=60, deadline=None)
@given(
    n_new=st.integers(1, 40),
    n_replay=st.integers(0, 30),
    steps=st.integers(1, 25),
    batch_size=st.integers(1, 9),
    ratio=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75]),
    bucket=st.integers(1, 8),
    seed=st.integers(0, 10),
)
def test_every_batch_has_the_exact_replay_share(n_new, n_replay, steps, batch_size, ratio, bucket, seed) -> None:
    rng = random.Random(seed)
    new_lengths = [rng.randint(5, 90) for _ in range(n_new)]
    replay_lengths = [rng.randint(5, 90) for _ in range(n_replay)]
    plan = plan_batches(
        new_lengths, replay_lengths, steps=steps, batch_size=batch_size, ratio=ratio, seed=seed, bucket_steps=bucket
    )
    want_new, want_replay = batch_split(batch_size, ratio, n_replay)
    assert len(plan) == steps
    for batch in plan:
        assert len(batch.new) == want_new and len(batch.replay) == want_replay
        assert all(0 <= i < n_new for i in batch.new) and all(0 <= j < n_replay for j in batch.replay)
    # new rows are drawn pass by pass: no row is used twice more often than another
    counts = Counter(i for b in plan for i in b.new)
    assert max(counts.values()) - min(counts.get(i, 0) for i in range(n_new)) <= 1


def test_the_plan_is_a_function_of_the_seed() -> None:
    lengths = [random.Random(1).randint(5, 90) for _ in range(50)]
    kwargs = dict(steps=20, batch_size=8, ratio=0.25, bucket_steps=4)
    assert plan_batches(lengths, lengths[:20], seed=3, **kwargs) == plan_batches(lengths, lengths[:20], seed=3, **kwargs)
    assert plan_batches(lengths, lengths[:20], seed=3, **kwargs) != plan_batches(lengths, lengths[:20], seed=4, **kwargs)


@pytest.mark.parametrize("n_buffer", [0, 30])
def test_rehearsal_rows_keep_their_own_share_beside_a_growing_buffer(n_buffer: int) -> None:
    rng = random.Random(2)
    new, buffer, rehearsal = ([rng.randint(5, 90) for _ in range(n)] for n in (60, n_buffer, 12))
    plan = plan_batches(new, buffer, steps=24, batch_size=8, ratio=0.125, seed=0, bucket_steps=4,
                        rehearsal_lengths=rehearsal, rehearsal_ratio=0.25)
    for batch in plan:
        rehearsed = [j - n_buffer for j in batch.replay if j >= n_buffer]
        assert len(rehearsed) == 2 and all(0 <= j < 12 for j in rehearsed)  # the pool: buffer first, then rehearsal
        assert len(batch.replay) - len(rehearsed) == (1 if n_buffer else 0)
        assert len(batch.new) == 8 - len(batch.replay)
    assert Counter(j for b in plan for j in b.replay if j >= n_buffer) == Counter({n_buffer + j: 4 for j in range(12)})


def test_replay_and_rehearsal_shares_must_leave_room_for_new_data() -> None:
    assert ReplayConfig(ratio=0.5, rehearsal_ratio=0.25).problems() == []
    (problem,) = ReplayConfig(ratio=0.5, rehearsal_ratio=0.5).problems()
    assert "replay.ratio + replay.rehearsal_ratio = 1" in problem and "below 1" in problem


def test_bucketing_cuts_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(400)]

    def padded(plan) -> int:
        return sum(len(b.new) * max(lengths[i] for i in b.new) for b in plan)

    plain = plan_batches(lengths, [], steps=50, batch_size=8, ratio=0.0, seed=0, bucket_steps=1)
    bucketed = plan_batches(lengths, [], steps=50, batch_size=8, ratio=0.0, seed=0, bucket_steps=16)
    assert padded(bucketed) < 0.8 * padded(plain)


def test_plan_needs_new_rows() -> None:
    with pytest.raises(ValueError, match="no new sequences"):
        plan_batches([], [3], steps=1, batch_size=2, ratio=0.5, seed=0)


def test_fisher_sample_is_seeded_and_bounded() -> None:
    assert fisher_sample(10, 4, seed=1) == fisher_sample(10, 4, seed=1)
    assert len(fisher_sample(10, 4, seed=1)) == 4
    assert fisher_sample(3, 10, seed=0) == [0, 1, 2]
