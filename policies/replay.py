"""Pure replay decisions: how a batch splits into new and replayed sequences, and the batch plan of a cycle.

The plan fixes, before training starts, which sequences every step trains on. It is a function of the
sequence lengths and a seed only, so a resumed run replays exactly the steps an uninterrupted run would
have taken, and the share of replayed sequences per batch is exact rather than a random outcome.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PlannedBatch:
    """One optimizer step: indices into the new sequences and into the replay pool (buffer, then rehearsal rows)."""

    new: tuple[int, ...]
    replay: tuple[int, ...]


def batch_split(batch_size: int, ratio: float, replay_available: int) -> tuple[int, int]:
    """(new, replayed) sequences per batch: ``round(batch_size * ratio)`` replayed, at least one new.

    Nothing is replayed while the buffer is empty (the first cycle of a branch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: use 1 or more")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"replay ratio = {ratio}: use a share from 0 up to (not including) 1")
    if replay_available <= 0:
        return batch_size, 0
    replayed = min(int(round(batch_size * ratio)), batch_size - 1)
    return batch_size - replayed, replayed


def plan_batches(
    new_lengths: Sequence[int],
    replay_lengths: Sequence[int],
    *,
    steps: int,
    batch_size: int,
    ratio: float,
    seed: int,
    bucket_steps: int = 16,
    rehearsal_lengths: Sequence[int] = (),
    rehearsal_ratio: float = 0.0,
) -> list[PlannedBatch]:
    """The batches of a whole cycle, length-bucketed, with exact replay and rehearsal shares in every batch.

    Two pools are replayed, each with its own share of the batch: the buffer (``ratio``) and the
    rehearsal rows (``rehearsal_ratio``), so that a growing buffer never crowds the rehearsal out; a
    batch keeps at least one new sequence. ``PlannedBatch.replay`` indexes the pool of both: the
    buffer's rows first, then the rehearsal rows.

    New sequences are drawn epoch by epoch (each once per pass, in a seeded random order), replayed ones
    likewise from their pool. Within each window of ``bucket_steps`` steps the drawn sequences are sorted by
    length and cut into batches, the i-th shortest new group paired with the i-th shortest replayed group,
    and the window's batches are shuffled: similar lengths share a batch (little padding) while the order
    of steps stays random.
    """
    if not new_lengths:
        raise ValueError("no new sequences to train on: the cycle needs at least one training row")
    if steps < 1 or bucket_steps < 1:
        raise ValueError(f"steps = {steps}, bucket_steps = {bucket_steps}: use 1 or more for both")
    n_new, n_replay = batch_split(batch_size, ratio, len(replay_lengths))
    n_rehearsal = min(batch_split(batch_size, rehearsal_ratio, len(rehearsal_lengths))[1], n_new - 1)
    n_new -= n_rehearsal
    offset = len(replay_lengths)
    rng = random.Random(seed)
    new_stream = _epochs(len(new_lengths), steps * n_new, rng)
    replay_stream = _epochs(len(replay_lengths), steps * n_replay, rng)
    rehearsal_stream = _epochs(len(rehearsal_lengths), steps * n_rehearsal, rng)
    plan: list[PlannedBatch] = []
    for start in range(0, steps, bucket_steps):
        window = range(start, min(start + bucket_steps, steps))
        new_groups = _bucket(new_stream, new_lengths, n_new, window)
        replay_groups = _bucket(replay_stream, replay_lengths, n_replay, window)
        rehearsal_groups = _bucket(rehearsal_stream, rehearsal_lengths, n_rehearsal, window)
        batches = [PlannedBatch(tuple(new), tuple(replayed) + tuple(offset + j for j in rehearsed))
                   for new, replayed, rehearsed in zip(new_groups, replay_groups, rehearsal_groups)]
        rng.shuffle(batches)
        plan.extend(batches)
    return plan


def fisher_sample(n_rows: int, count: int, seed: int) -> list[int]:
    """Which training rows estimate the Fisher: a seeded sample of ``count`` (all of them if fewer)."""
    indices = list(range(n_rows))
    random.Random(seed ^ 0x5EED).shuffle(indices)
    return sorted(indices[:count])


def _epochs(n: int, count: int, rng: random.Random) -> list[int]:
    """``count`` indices from 0..n-1: whole shuffled passes, the last one cut short."""
    out: list[int] = []
    while n and len(out) < count:
        order = list(range(n))
        rng.shuffle(order)
        out.extend(order)
    return out[:count]


def _bucket(stream: list[int], lengths: Sequence[int], per_batch: int, window: range) -> list[list[int]]:
    """The window's draws from ``stream`` cut into groups of ``per_batch``, shortest first (ties keep their
    drawn order): one group per step of the window, empty ones when nothing is drawn."""
    drawn = stream[window.start * per_batch : window.stop * per_batch]
    ordered = [i for _, _, i in sorted((lengths[i], pos, i) for pos, i in enumerate(drawn))]
    return [ordered[k * per_batch : (k + 1) * per_batch] for k in range(len(window))]
