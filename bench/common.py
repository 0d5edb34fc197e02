"""What the real-model benchmarks share: the embedded foundation as a float32 transformers directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def ensure_model(cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the embedded GGUF, saved once as a float32 transformers directory
    (float32 so that merging small adapter updates loses nothing to bfloat16 rounding)."""
    if (cache / "config.json").exists():
        return cache
    from selftune.learners.foundation import materialise

    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    materialise("embedded", tmp, dtype=torch.float32)
    tmp.rename(cache)
    return cache
