"""Merging a LoRA adapter into its base model: trim it (rank, magnitude), merge safely, save plainly.

The tensor functions are short and pure, in the manner of peft's ``utils/merge_utils.py``; the merge
refuses non-finite weights like peft's ``safe_merge`` but names the layer. ``merge_adapter`` loads
with peft, checks the adapter file for NaN/Inf before anything else, and writes a transformers
directory that loads without peft.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.utils import transpose
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftune.policies.errors import SelftuneError
from selftune.policies.pruning import AdapterTrimConfig, rank_for_energy

from .evaluate import parameter_count

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class NonFiniteWeightsError(SelftuneError, ValueError):
    """An adapter, or the weights a merge would produce, hold NaN or Inf; ``layer`` names where."""

    def __init__(self, layer: str, detail: str) -> None:
        self.layer = layer
        super().__init__(
            f"{layer}: {detail}. The adapter is broken (training diverged?): do not merge it; retrain with a "
            "lower learning rate or check the data."
        )


# ---- pure tensor functions -----------------------------------------------------------------------


def adapter_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``B @ A`` (out x r times r x in) without forming it: ``U, S, Vh`` with ``U S Vh = B A``.

    QR of both factors leaves an r x r core, so the cost is O((out + in) r^2), not O(out in min(out, in)).
    """
    qb, rb = torch.linalg.qr(B.float())
    qa, ra = torch.linalg.qr(A.float().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def trim_adapter_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``B @ A`` (Eckart-Young), energy split evenly between them."""
    if rank < 1:
        raise ValueError(f"rank = {rank}: keep at least rank 1 (or skip the trim)")
    u, s, vh = adapter_svd(B, A)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    new_b = (u[:, :rank] * root).to(B.dtype)
    new_a = (root[:, None] * vh[:rank]).to(A.dtype)
    return new_b.contiguous(), new_a.contiguous()


def magnitude_trim(delta: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Zero all but the ``keep_fraction`` largest-magnitude entries (TIES-style trim)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction = {keep_fraction}: use a share in (0, 1]")
    if keep_fraction == 1.0:
        return delta
    keep = max(1, math.ceil(delta.numel() * keep_fraction))
    threshold = delta.abs().flatten().float().topk(keep).values[-1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def safe_merge(base_weight: torch.Tensor, delta: torch.Tensor, layer: str = "weight") -> torch.Tensor:
    """``base_weight + delta`` computed in float32 and cast to the base dtype; refuses NaN/Inf results."""
    merged = (base_weight.float() + delta.float()).to(base_weight.dtype)
    finite = torch.isfinite(merged)
    if not finite.all():
        nan = int(torch.isnan(merged).sum())
        inf = int((~finite).sum()) - nan
        raise NonFiniteWeightsError(layer, f"merging gives {nan} NaN and {inf} Inf weight(s) of {merged.numel()}")
    return merged


# ---- the adapter on disk -------------------------------------------------------------------------


def check_adapter_finite(adapter_dir: str | Path) -> int:
    """Raise ``NonFiniteWeightsError`` naming the first layer whose adapter tensor holds NaN/Inf.

    Returns the number of tensors checked.
    """
    path = _adapter_weights(Path(adapter_dir))
    tensors = _read_adapter(path)
    for key, tensor in tensors.items():
        finite = torch.isfinite(tensor)
        if not finite.all():
            nan = int(torch.isnan(tensor).sum())
            raise NonFiniteWeightsError(
                layer_name(key), f"adapter tensor {key} holds {nan} NaN and {int((~finite).sum()) - nan} Inf value(s)"
            )
    return len(tensors)


def layer_name(adapter_key: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    name = adapter_key.removeprefix("base_model.model.")
    for marker in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
        if marker in name:
            return name.split(marker)[0]
    return name.rsplit(".", 1)[0]


def _adapter_weights(adapter_dir: Path) -> Path:
    for name in ADAPTER_WEIGHT_FILES:
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    raise FileNotFoundError(f"{adapter_dir} holds no {' or '.join(ADAPTER_WEIGHT_FILES)}: is it a peft adapter directory?")


def _read_adapter(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- merging a peft model ------------------------------------------------------------------------


def merge_lora_layers(model: PeftModel, trim: AdapterTrimConfig | None = None, adapter: str = "default") -> dict[str, Any]:
    """Fold every LoRA layer of ``adapter`` into its base weight (trimmed first); returns the facts.

    The LoRA modules stay in place; ``model.unload()`` afterwards returns the merged base model.
    """
    trim = trim or AdapterTrimConfig()
    ranks_before: dict[str, int] = {}
    ranks_after: dict[str, int] = {}
    energy_kept: list[float] = []
    relative_change: list[float] = []
    for name, module in model.base_model.model.named_modules():
        if not isinstance(module, LoraLinear) or adapter not in module.lora_A:
            continue
        if adapter in module.lora_variant:
            raise NotImplementedError(f"{name}: LoRA variants such as DoRA are not merged here; train plain LoRA")
        base = module.get_base_layer()
        _refuse_tied(model, name, base.weight)
        B, A = module.lora_B[adapter].weight.detach(), module.lora_A[adapter].weight.detach()
        B, A, kept = _trim_rank(B, A, trim)
        delta = transpose(B.float() @ A.float(), module.fan_in_fan_out) * module.scaling[adapter]
        delta = magnitude_trim(delta, trim.keep_fraction)
        merged = safe_merge(base.weight.data, delta, name)
        relative_change.append(float(delta.norm() / base.weight.data.float().norm().clamp_min(1e-12)))
        base.weight.data = merged
        if module.lora_bias.get(adapter, False):
            bias = module.lora_B[adapter].bias.detach() * module.scaling[adapter]
            base.bias.data = safe_merge(base.bias.data, bias, f"{name}.bias")
        ranks_before[name], ranks_after[name] = module.r[adapter], A.shape[0]
        energy_kept.append(kept)
    if not ranks_before:
        raise ValueError(f"the model has no LoRA layers of adapter {adapter!r}: nothing to merge")
    return {
        "layers_merged": len(ranks_before),
        "rank_before": max(ranks_before.values()),
        "rank_after": max(ranks_after.values()),
        "ranks_after": ranks_after,
        "energy_kept_min": min(energy_kept),
        "energy_kept_mean": sum(energy_kept) / len(energy_kept),
        "magnitude_keep_fraction": trim.keep_fraction,
        "relative_change_mean": sum(relative_change) / len(relative_change),
        "relative_change_max": max(relative_change),
    }


def _trim_rank(B: torch.Tensor, A: torch.Tensor, trim: AdapterTrimConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-trimmed factors and the share of the squared spectrum they keep."""
    if trim.rank == 0 and trim.energy >= 1.0:
        return B, A, 1.0
    _, s, _ = adapter_svd(B, A)
    values = s.tolist()
    rank = rank_for_energy(values, trim.energy, trim.rank)
    total = sum(v * v for v in values)
    kept = sum(v * v for v in values[:rank]) / total if total > 0 else 1.0
    if rank >= len(values):
        return B, A, kept
    new_b, new_a = trim_adapter_rank(B, A, max(rank, 1))
    return new_b, new_a, kept


def _refuse_tied(model: PeftModel, name: str, weight: torch.Tensor) -> None:
    embeddings = model.base_model.model.get_input_embeddings()
    if embeddings is not None and embeddings.weight.data_ptr() == weight.data_ptr():
        raise NotImplementedError(
            f"{name} shares its weight with the input embeddings (tied): leave it out of the LoRA target modules"
        )


def merge_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    trim: AdapterTrimConfig | None = None,
) -> dict[str, Any]:
    """Merge a peft adapter into its base model and save a plain transformers directory at ``out_dir``.

    The adapter file is checked for NaN/Inf before loading; every merged weight is checked again.
    Returns facts for the generation record (layers, ranks, energy kept, relative change, params).
    """
    tensors = check_adapter_finite(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    facts = merge_lora_layers(model, trim)
    merged = model.unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    _copy_tokenizer(model_dir, out)
    facts.update(
        adapter_tensors=tensors,
        params=parameter_count(merged),
        dtype=str(next(merged.parameters()).dtype).removeprefix("torch."),
    )
    return facts


def _copy_tokenizer(model_dir: str | Path, out: Path) -> None:
    if any((Path(model_dir) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
