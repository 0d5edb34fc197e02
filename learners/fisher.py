"""EWC for LoRA: a diagonal Fisher of the adapted layers' base weights, and its penalty on B @ A.

The penalty anchors the *effective weight change* ``scale * B @ A`` of each adapted layer (anchor 0: every
cycle starts a fresh adapter on the merged parent, whose weights already hold the earlier adapters):

    penalty = lambda * sum(F * (scale * B @ A) ** 2)

F is the mean over batches of ``(dL/dW0) ** 2`` on earlier data (dL/dW0 equals dL/dW_eff), accumulated
online across generations: ``F = gamma * F_old + F_new``. Two representations:

* ``dense``: F as large as the layer; the penalty's gradient is added in closed form after backward, one
  layer at a time (no autograd graph, exactly the autograd gradient).
* ``rank1``: F ~ outer(a, b) (the Perron pair of F, non-negative), then
  ``sum(F * D**2) = ||diag(sqrt a) D diag(sqrt b)||^2 = s^2 tr((B'^T B')(A' A'^T))`` with
  ``B' = diag(sqrt a) B`` and ``A' = A diag(sqrt b)``: r x r products, a few KB per layer.

Stored as safetensors: ``<layer>.F`` (dense) or ``<layer>.a`` / ``<layer>.b`` (rank-1), the layer being
its name in the plain model; metadata says the representation and how many generations it folds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .data import Encoded, batches
from .lm import autocast, load_base, load_tokenizer, lora_layers, target_linears, target_logits, to_device, token_loss

REPRESENTATIONS = ("dense", "rank1")


@dataclass
class Fisher:
    """Per-layer diagonal Fisher: dense ``(F,)`` or rank-1 ``(a, b)`` with F ~ outer(a, b)."""

    representation: str
    factors: dict[str, tuple[torch.Tensor, ...]]
    meta: dict[str, Any] = field(default_factory=dict)

    def dense(self, name: str) -> torch.Tensor:
        f = self.factors[name]
        return f[0] if self.representation == "dense" else torch.outer(f[0], f[1])

    def dense_shape(self, name: str) -> tuple[int, int]:
        f = self.factors[name]
        return tuple(f[0].shape) if self.representation == "dense" else (f[0].numel(), f[1].numel())  # type: ignore[return-value]

    def to(self, representation: str) -> Fisher:
        """The same Fisher in another representation (rank-1 from dense by power iteration)."""
        if representation == self.representation:
            return self
        if representation == "dense":
            return Fisher("dense", {n: (self.dense(n),) for n in self.factors}, dict(self.meta))
        return Fisher("rank1", {n: rank1(f[0]) for n, f in self.factors.items()}, dict(self.meta))


def rank1(matrix: torch.Tensor, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative (a, b) with outer(a, b) the best rank-1 fit of a non-negative matrix (power iteration)."""
    m = matrix.float()
    b = m.mean(dim=0)
    if not torch.any(b > 0):
        return torch.zeros(m.shape[0]), torch.zeros(m.shape[1])
    b = b / b.norm()
    for _ in range(iterations):
        a = m @ b
        b = m.T @ a
        b = b / b.norm().clamp_min(1e-30)
    a = m @ b  # b has unit norm: outer(a, b) is the projection of m on it
    return a.clamp_min(0), b.clamp_min(0)


def estimate_fisher(
    model_or_dir: Any,
    examples: Sequence[Encoded],
    *,
    target_modules: Sequence[str],
    pad_id: int | None = None,
    batch_size: int = 4,
    representation: str = "dense",
    bf16: bool = True,
    base_dtype: str = "bfloat16",
    before_batch: Callable[[], None] = lambda: None,
) -> Fisher:
    """Diagonal empirical Fisher of the target layers: mean over batches of (dL/dW0)^2 on ``examples``.

    ``model_or_dir`` is a (peft or plain) causal LM, or a transformers directory to load. The base weights
    get ``requires_grad`` only for the duration; the adapter, if any, is left untouched (its effective
    weight is what dL/dW0 measures). ``before_batch`` runs before each batch: the training worker's stop
    check, which raises to end an estimate that can take minutes (the model is restored either way).
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation = {representation!r}: use one of {REPRESENTATIONS}")
    if not examples:
        raise ValueError("estimate_fisher needs at least one example with assistant tokens")
    if isinstance(model_or_dir, (str, Path)):
        model = load_base(model_or_dir, base_dtype=base_dtype)
        pad_id = load_tokenizer(model_or_dir).pad_token_id if pad_id is None else pad_id
    else:
        model = model_or_dir
    if pad_id is None:
        raise ValueError("estimate_fisher: pass pad_id (the tokenizer's pad token id) with a loaded model")
    layers = dict(target_linears(model, target_modules))
    if not layers:
        raise ValueError(f"none of the target modules {list(target_modules)} is a linear layer of the model")
    device = next(model.parameters()).device
    before = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    sums = {n: torch.zeros(l.weight.shape, dtype=torch.float32, device=device) for n, l in layers.items()}
    count = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers.values():
            layer.weight.requires_grad_(True)
        model.eval()  # no dropout: the Fisher of the model as it will be used
        for batch in batches(examples, batch_size, pad_id):
            before_batch()
            batch = to_device(batch, device)
            with autocast(device, bf16):
                logits, targets = target_logits(model, batch)
            token_loss(logits, targets).backward()
            for name, layer in layers.items():
                sums[name] += layer.weight.grad.float().square()
                layer.weight.grad = None
            count += 1
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
        model.train(was_training)
    dense = Fisher("dense", {n: ((s / count).cpu(),) for n, s in sums.items()}, {"examples": len(examples), "generations": 1})
    return dense.to(representation)


def fold_fisher(old: Fisher | None, new: Fisher, gamma: float) -> Fisher:
    """Online EWC: ``gamma * old + new``, per layer, in ``new``'s representation.

    Rank-1 folds stay rank-1 without a dense matrix: the top singular pair of ``gamma a1 b1^T + a2 b2^T``
    comes from a 2 x 2 problem. Layers only in one of them are kept as they are (scaled by gamma if old).
    A layer whose shape changed (e.g. pruned) must be sliced by the pruner first: that is an error here.
    """
    if old is None:
        return new
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma = {gamma}: use a decay from 0 to 1")
    for name in set(old.factors) & set(new.factors):
        if old.dense_shape(name) != new.dense_shape(name):
            raise ValueError(
                f"Fisher layer {name}: shape {old.dense_shape(name)} of the earlier generations differs from "
                f"{new.dense_shape(name)} now; slice the old Fisher with the same indices as the pruned weights"
            )
    old = old.to(new.representation)
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for name in set(old.factors) | set(new.factors):
        if name not in new.factors:
            out[name] = tuple(t * gamma if i == 0 else t for i, t in enumerate(old.factors[name]))
        elif name not in old.factors:
            out[name] = new.factors[name]
        elif new.representation == "dense":
            out[name] = (gamma * old.factors[name][0] + new.factors[name][0],)
        else:
            out[name] = _fold_rank1(old.factors[name], new.factors[name], gamma)
    meta = dict(new.meta)
    meta["generations"] = int(old.meta.get("generations", 1)) + int(new.meta.get("generations", 1))
    meta["gamma"] = gamma
    return Fisher(new.representation, out, meta)


def _fold_rank1(old: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...], gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 fit of ``gamma a1 b1^T + a2 b2^T`` (exact, through a 2 x 2 core)."""
    a = torch.stack([old[0] * gamma, new[0]], dim=1)  # m x 2
    b = torch.stack([old[1], new[1]], dim=1)  # n x 2
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    left, right = qa @ u[:, 0], qb @ vh[0]
    sign = 1.0 if float(left.sum()) >= 0 else -1.0  # the Perron pair is non-negative: pick that sign
    return (sign * s[0] * left).clamp_min(0), (sign * right).clamp_min(0)


def save_fisher(fisher: Fisher, path: Path) -> None:
    """Write a Fisher as safetensors (atomically: temporary file, then rename)."""
    tensors = {}
    for name, factors in fisher.factors.items():
        keys = ("F",) if fisher.representation == "dense" else ("a", "b")
        for key, tensor in zip(keys, factors):
            tensors[f"{name}.{key}"] = tensor.contiguous().float().cpu()
    meta = {"representation": fisher.representation, "meta": json.dumps(fisher.meta)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_fisher(path: Path) -> Fisher:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        representation = meta.get("representation", "dense")
        if representation not in REPRESENTATIONS:
            raise ValueError(f"{path}: unknown Fisher representation {representation!r}")
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key in fh.keys():
            name, part = key.rsplit(".", 1)
            grouped.setdefault(name, {})[part] = fh.get_tensor(key)
    keys = ("F",) if representation == "dense" else ("a", "b")
    factors = {n: tuple(parts[k] for k in keys) for n, parts in grouped.items()}
    return Fisher(representation, factors, json.loads(meta.get("meta", "{}")))


class EwcPenalty:
    """The EWC penalty of a peft model's adapters against a Fisher, with its gradient in closed form.

    ``apply(add_grad=True)`` returns the penalty value and, after ``loss.backward()``, adds the penalty's
    gradient to the adapters' ``.grad`` (no autograd graph; exactly the autograd gradient of ``value``).
    """

    def __init__(self, model: Any, fisher: Fisher, strength: float) -> None:
        self.strength = float(strength)
        self.representation = fisher.representation
        self.layers: list[tuple[str, torch.nn.Parameter, torch.nn.Parameter, float, tuple[torch.Tensor, ...]]] = []
        for name, layer in lora_layers(model):
            if name not in fisher.factors:
                continue
            adapter = layer.active_adapters[0]
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            shape = (lora_b.shape[0], lora_a.shape[1])
            if fisher.dense_shape(name) != shape:
                raise ValueError(f"Fisher layer {name} has shape {fisher.dense_shape(name)}, the model's is {shape}")
            device = lora_a.device
            factors = tuple(t.to(device=device, dtype=torch.float32) for t in fisher.factors[name])
            self.layers.append((name, lora_a, lora_b, float(layer.scaling[adapter]), factors))

    def value(self) -> torch.Tensor:
        """The penalty through autograd (reference, and for tests)."""
        total = torch.zeros(())
        for _, lora_a, lora_b, s, factors in self.layers:
            delta = s * (lora_b @ lora_a)
            f = factors[0] if self.representation == "dense" else torch.outer(factors[0], factors[1])
            total = total + (f * delta.square()).sum()
        return self.strength * total

    @torch.no_grad()
    def apply(self, add_grad: bool = True) -> float:
        """The penalty's value; with ``add_grad``, its gradient is added to the adapters' ``.grad``."""
        total = 0.0
        lam = self.strength
        for _, lora_a, lora_b, s, factors in self.layers:
            a_w, b_w = lora_a.float(), lora_b.float()
            if self.representation == "dense":
                # W = F * (B @ A), formed in place; with D = s * B @ A the penalty is
                # lam * sum(F * D^2) = lam * s^2 * sum((B^T W) * A), and B^T W is also A's gradient:
                # two passes over the layer-sized matrix instead of five (the step is memory-bound)
                weighted = torch.mm(b_w, a_w).mul_(factors[0])
                bt_w = b_w.T @ weighted  # r x in
                k = lam * s * s
                total += k * float((bt_w * a_w).sum())
                if add_grad:
                    _add_grad(lora_b, (2.0 * k) * (weighted @ a_w.T))
                    _add_grad(lora_a, (2.0 * k) * bt_w)
            else:
                fa, fb = factors
                m = (b_w * fa[:, None]).T @ b_w  # B^T diag(a) B   (r x r)
                n = (a_w * fb[None, :]) @ a_w.T  # A diag(b) A^T   (r x r)
                k = lam * s * s
                total += k * float((m * n).sum())  # tr(M N), both symmetric
                if add_grad:
                    _add_grad(lora_b, (2.0 * k) * (fa[:, None] * (b_w @ n)))
                    _add_grad(lora_a, (2.0 * k) * ((m @ a_w) * fb[None, :]))
        return total


def _add_grad(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype).clone()
    else:
        param.grad.add_(grad.to(param.grad.dtype))
