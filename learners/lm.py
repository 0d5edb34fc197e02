"""Causal-LM helpers for training on a CPU or a GPU: loading, LoRA, autocast, and a loss on target tokens.

Measured on this 2-core AMX CPU (SmolLM2-135M, LoRA r=8 on all 7 projections, batch 8 x ~113 tokens,
1 thread, median of 3 interleaved steps, same batch): fp32 (HF default, sdpa) 5.97 s/step; bf16 autocast
4.37; + frozen linears stored in bf16 4.27; + logits only where a label is 3.86; + eager attention 3.02
(the CPU flash-attention kernel's bf16 backward is slow for short sequences); + no fp32 round trip of
the LoRA input 2.95. Each is kept below.

bfloat16 pays only where the hardware computes it (``fast_bf16``): on an AVX2-only CPU (2-core AMD EPYC,
1 thread) a 1536x576 by 576x1536 product took 46 ms in float32 and 337 ms in bfloat16, emulated. There
autocast is off and the frozen base stays float32, whatever the config asks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftune.policies.training import TrainConfig, cycle_threads

from .chat import IGNORE_INDEX, pad_id
from .data import Encoded, batches


def pick_device() -> torch.device:
    """A GPU when one is present (chosen at run time), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def set_threads(threads: int) -> None:
    """Torch intra-op threads: a positive count as given (a cycle's worker passes the one it decided,
    ``policies.training.cycle_threads``); 0 (a job run on its own) all cores but one, at least one.

    Measured here (SmolLM2-135M, 2 cores, the other core busy): 2 threads took 39 s a step, 1 thread 2.7 s --
    OpenMP threads that wait on a busy core stall every step.
    """
    torch.set_num_threads(cycle_threads(threads, os.cpu_count() or 1, service_running=True))


BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16")
"""CPU features that compute bfloat16 products in hardware (without them torch emulates bf16, slowly)."""


def bf16_in_hardware(cpu_features: dict[str, Any]) -> bool:
    """Whether a CPU with these features (``torch.cpu.get_capabilities()``) computes bfloat16 products natively."""
    return any(bool(cpu_features.get(name)) for name in BF16_CPU_FEATURES)


@functools.lru_cache(maxsize=None)
def fast_bf16(device_type: str) -> bool:
    """Whether bf16 autocast and bf16 frozen weights speed things up on this kind of device here."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        get_capabilities = getattr(torch.cpu, "get_capabilities", None)
        return get_capabilities is not None and bf16_in_hardware(get_capabilities())
    return False


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device where it is asked for and the hardware computes bf16; else nothing."""
    if not (enabled and fast_bf16(device.type)):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def load_base(model_dir: str | Path, *, base_dtype: str = "float32", device: torch.device | None = None) -> Any:
    """A transformers causal LM in float32, its decoder's linear layers cast to ``base_dtype``.

    Embeddings, norms and the output head stay float32 so that the residual stream keeps its precision;
    the frozen projections, which autocast would cast to bf16 at every step anyway, are stored in bf16
    (where ``fast_bf16``: elsewhere every product would then run emulated, so they stay float32).
    """
    device = device or pick_device()
    # eager attention: measured faster than sdpa for short sequences on this CPU (module docstring)
    attn = "eager" if device.type == "cpu" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn)
    if base_dtype != "float32" and fast_bf16(device.type):
        dtype = getattr(torch, base_dtype)
        for module in decoder(model).modules():
            if isinstance(module, torch.nn.Linear):
                module.to(dtype)
    model.config.use_cache = False
    return model.to(device)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer of a model directory, with a pad token (``chat.pad_id``'s rule) for batches to use."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad_id(tokenizer)
    return tokenizer


def attach_lora(model: Any, cfg: TrainConfig, *, seed: int | None = None) -> Any:
    """Wrap the model in a fresh peft LoRA adapter (float32 weights) on ``cfg.target_modules``."""
    from peft import LoraConfig, get_peft_model  # slow import: of lm's importers only the trainer needs it

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ValueError(
            f"train.target_modules {missing} are not modules of this model; "
            f"linear layers it has: {sorted(n for n in names if n.endswith('proj'))}"
        )
    torch.manual_seed(cfg.seed if seed is None else seed)
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5 (FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.bf16_autocast and fast_bf16(next(model.parameters()).device.type):
        # peft casts the adapter's input to fp32 and autocast casts it back for the matmul: skip the round trip
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return model


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def decoder(model: Any) -> torch.nn.Module:
    """The transformer body (embeddings, layers, final norm) of a causal LM, peft-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix)


def target_logits(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a labelled token, and those tokens.

    Running the output head only where a label is (not on the prompt, template or padding) saves most of
    the vocabulary-sized work of a step.
    """
    body = decoder(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    head = model.get_output_embeddings()
    return head(hidden[:, :-1][keep]), targets[keep]


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the target tokens, computed in float32."""
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def target_replay_mask(batch: dict[str, Any]) -> torch.Tensor:
    """For each target token of ``target_logits``, whether it belongs to a replayed sequence."""
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    return batch["replay"].to(keep.device)[:, None].expand_as(keep)[keep]


def mixed_token_loss(logits: torch.Tensor, targets: torch.Tensor, replayed: torch.Tensor, replay_share: float) -> torch.Tensor:
    """Token loss where replayed sequences weigh ``replay_share`` of the batch, whatever their length.

    A plain token mean would let the replay share of the gradient depend on answer lengths (one replayed
    50-token definition outweighs seven 3-token chemistry answers), so the configured ratio would not mean
    what it says: the mean over new tokens and the mean over replayed tokens are mixed by the share of
    sequences instead. (On the continual bench this measured neutral: forgetting 17% vs 21% of naive's,
    gains within 2 points.)
    """
    if replay_share <= 0 or not bool(replayed.any()) or bool(replayed.all()):
        return token_loss(logits, targets)
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    return (1.0 - replay_share) * per_token[~replayed].mean() + replay_share * per_token[replayed].mean()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def mean_token_nll(
    model: Any,
    items: Sequence[Encoded],
    *,
    pad_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    device: torch.device | None = None,
) -> float:
    """Held-out loss: the mean negative log-likelihood per assistant token (token-weighted, not per row)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches(items, batch_size, pad_id):
            batch = to_device(batch, device)
            with autocast(device, bf16):
                logits, targets = target_logits(model, batch)
            total += float(token_loss(logits, targets, reduction="sum"))
            count += int(targets.numel())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """(canonical name, peft LoRA layer) for every adapted linear layer.

    The canonical name is the layer's name in the plain model (e.g. ``model.layers.0.self_attn.q_proj``),
    the same with or without peft, so Fisher files written by one cycle fit the next one's model.
    """
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and getattr(module, "active_adapters", None):
            yield canonical_name(name), module


def canonical_name(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.removesuffix(".base_layer")


def target_linears(model: Any, target_modules: Iterable[str]) -> Iterator[tuple[str, torch.nn.Linear]]:
    """(canonical name, frozen base linear) of every layer named in ``target_modules``."""
    targets = set(target_modules)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lora_" in name:
            continue
        plain = canonical_name(name)
        if plain.rsplit(".", 1)[-1] in targets:
            yield plain, module
