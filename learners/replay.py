"""The replay buffers behind Avalanche's storage policies, restored from and saved to plain rows.

* "reservoir": Avalanche's ``ReservoirSamplingBuffer``, its random keys persisted as the rows' priorities.
* "diversity": Avalanche's ``ParametricBuffer`` grouped by the cycle's experience, with our k-center
  selection (farthest-first over the model's mean-pooled hidden states) inside each group.

Imports Avalanche (~7 s) like ``strategy``: only the training worker does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.training.storage_policy import (
    ExemplarsBuffer,
    ExemplarsSelectionStrategy,
    ParametricBuffer,
    ReservoirSamplingBuffer,
    _ParametricSingleBuffer,
)

from .data import Encoded, batches
from .lm import autocast, decoder, to_device
from .strategy import make_dataset


def reservoir_buffer(max_size: int, items: Sequence[Encoded], pad_id: int) -> ReservoirSamplingBuffer:
    """Avalanche's reservoir buffer, restored from persisted rows: their priorities are its random keys."""
    buf = ReservoirSamplingBuffer(max_size)
    ordered = sorted(items, key=lambda it: -it.priority)  # the buffer keeps its keys sorted, descending
    if ordered:
        buf.buffer = make_dataset(ordered, pad_id)
        buf._buffer_weights = torch.tensor([it.priority for it in ordered], dtype=torch.float32)
    return buf


class KCenterSelection(ExemplarsSelectionStrategy):
    """Diversity: farthest-first traversal of the model's mean-pooled last hidden states.

    The first pick is the example closest to the mean; each next one is the example farthest from all
    picked so far, so any prefix is a greedy k-center cover of the group (a 2-approximation). Features
    are cached by row id for the life of the process. (A full-order traversal needs one distance update per
    pick, a matrix-vector product: plain torch does it; a faiss index would not make it cheaper.)
    """

    def __init__(self, pad_id: int, bf16: bool, batch_size: int = 16) -> None:
        self.pad_id, self.bf16, self.batch_size = pad_id, bf16, batch_size
        self._cache: dict[Any, torch.Tensor] = {}

    def make_sorted_indices(self, strategy: Any, data: AvalancheDataset) -> list[int]:
        items = [data[i] for i in range(len(data))]
        feats = self.features(strategy.model, items, strategy.device)
        return farthest_first(feats)

    @torch.no_grad()
    def features(self, model: Any, items: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
        missing = [it for it in items if _key(it) not in self._cache]
        if missing:
            encoded = [Encoded(it["input_ids"], it["labels"], _key(it)) for it in missing]
            was_training = model.training
            model.eval()
            try:
                for batch in batches(encoded, self.batch_size, self.pad_id):
                    batch = to_device(batch, device)
                    with autocast(device, self.bf16):
                        hidden = decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    mask = batch["attention_mask"].unsqueeze(-1).float()
                    pooled = (hidden.last_hidden_state.float() * mask).sum(1) / mask.sum(1)
                    for key, vec in zip(batch["ids"], pooled.cpu()):
                        self._cache[key] = vec
            finally:
                model.train(was_training)
        return torch.stack([self._cache[_key(it)] for it in items])


def _key(item: dict[str, Any]) -> Any:
    return (item.get("experience"), item.get("id"), tuple(item["input_ids"][:8]), len(item["input_ids"]))


def farthest_first(features: torch.Tensor) -> list[int]:
    """Order of a farthest-first traversal (deterministic: ties go to the lower index)."""
    n = features.shape[0]
    if n == 0:
        return []
    x = features.double()
    first = int(torch.argmin((x - x.mean(0)).square().sum(1)))
    order = [first]
    nearest = (x - x[first]).square().sum(1)
    nearest[first] = -1.0
    for _ in range(n - 1):
        pick = int(torch.argmax(nearest))
        order.append(pick)
        nearest = torch.minimum(nearest, (x - x[pick]).square().sum(1))
        nearest[order] = -1.0
    return order


class ExperienceDiversityBuffer(ParametricBuffer):
    """Avalanche's ``ParametricBuffer`` grouped by experience, with k-center selection inside each group.

    Two changes: the group of new data is the cycle's experience number (the stock one counts the
    experiences this process has trained, always 1 in a fresh worker), and groups can be restored from
    persisted rows.
    """

    def __init__(self, max_size: int, selection: KCenterSelection) -> None:
        super().__init__(max_size, groupby="experience", selection_strategy=selection)

    def _split_by_experience(self, strategy: Any, data: AvalancheDataset) -> dict[int, AvalancheDataset]:
        return {int(strategy.experience.current_experience): data}

    def restore(self, items: Sequence[Encoded], pad_id: int) -> None:
        groups: dict[int, list[Encoded]] = {}
        for it in sorted(items, key=lambda it: (it.experience, -it.priority)):
            groups.setdefault(it.experience, []).append(it)
        for exp, members in groups.items():
            single = _ParametricSingleBuffer(len(members), self.selection_strategy)
            single.buffer = make_dataset(members, pad_id)
            self.buffer_groups[exp] = single
            self.seen_groups.add(exp)


def buffer_members(policy: ExemplarsBuffer) -> list[dict[str, Any]]:
    """What the buffer holds after the update: ``{"id", "experience", "priority"}`` per row, for storage.

    Reservoir priorities are the random keys (higher stays longer); diversity priorities are
    ``1 / (1 + rank)`` within the experience's group (rank 0 = first pick).
    """
    out = []
    if isinstance(policy, ReservoirSamplingBuffer):
        buf = policy.buffer
        for i in range(len(buf)):
            item = buf[i]
            out.append({"id": item["id"], "experience": int(item["experience"]), "priority": float(policy._buffer_weights[i])})
    elif isinstance(policy, ParametricBuffer):
        for exp, group in policy.buffer_groups.items():
            for rank in range(len(group.buffer)):
                item = group.buffer[rank]
                out.append({"id": item["id"], "experience": int(exp), "priority": 1.0 / (1.0 + rank)})
    return out
