"""Learner rows to tensors: encoded rows (``chat.encode_chat``: every assistant turn a target), padded batches.

A row is a plain dict: ``{"id": ..., "messages": [{"role", "content"}, ...]}`` (or ``{"prompt",
"response"}``), optionally with ``"experience"`` and ``"priority"`` for replay rows (``jobs.write_job`` also takes
``selftune.policies.records.Interaction`` objects and writes them as such rows).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .chat import IGNORE_INDEX, encode_chat


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenised conversation: labels are the input ids on assistant tokens and -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]
    row_id: Any = None
    experience: int = 0
    priority: float = 0.0

    @property
    def target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (one JSON object a line)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def encode_rows(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> tuple[list[Encoded], int]:
    """Encode rows; those cut by ``max_length`` before their first assistant token are dropped.

    Returns the encoded rows and how many were dropped.
    """
    out, dropped = [], 0
    for row in rows:
        ids, labels = encode_chat(tokenizer, row, max_length)
        item = Encoded(ids, labels, row.get("id"), int(row.get("experience", 0)), float(row.get("priority", 0.0)))
        if item.target_tokens == 0:
            dropped += 1
            continue
        out.append(item)
    return out, dropped


class EncodedDataset(torch.utils.data.Dataset):
    """Encoded rows as dict items, the form Avalanche datasets and our collate exchange."""

    def __init__(self, items: Sequence[Encoded], replay: bool = False) -> None:
        self.items = list(items)
        self.replay = replay

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {
            "input_ids": item.input_ids,
            "labels": item.labels,
            "id": item.row_id,
            "experience": item.experience,
            "priority": item.priority,
            "replay": self.replay,
        }


def pad_collate(pad_id: int):
    """Right-pad a list of dict items into a batch; padding gets label -100 and attention 0."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for k, it in enumerate(items):
            n = len(it["input_ids"])
            ids[k, :n] = torch.as_tensor(it["input_ids"])
            labels[k, :n] = torch.as_tensor(it["labels"])
            mask[k, :n] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "replay": torch.tensor([bool(it.get("replay", False)) for it in items]),
            "ids": [it.get("id") for it in items],
        }

    return collate


def batches(items: Sequence[Encoded], batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """Padded batches in length order (for evaluation and Fisher estimation: little padding, fixed order)."""
    collate = pad_collate(pad_id)
    dataset = EncodedDataset(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    for k in range(0, len(order), batch_size):
        yield collate([dataset[i] for i in order[k : k + batch_size]])
