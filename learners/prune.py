"""Structured pruning of a merged Llama-family model, scored on the branch's own traffic.

Two measurements on that traffic, one policy decision (``selftune.policies.pruning.plan_pruning``),
one surgery:
- MLP channel importance, Wanda-style: ``||W_down[:, j]||_1 * ||x_j||_2``, where ``x_j`` is the
  intermediate activation (``act(gate) * up``) of channel ``j`` over every traffic token. The same
  count is removed in every layer, so ``intermediate_size`` stays a single standard config value.
- Block influence per decoder layer (ShortGPT): ``1 - cos(h_in, h_out)`` averaged over tokens; the
  layers that change their input least are dropped, and ``num_hidden_layers`` shrinks with them.
The result is an ordinary transformers model: ``save_pretrained`` then ``from_pretrained`` in any process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from selftune.policies.pruning import PruningConfig, PruningPlan, plan_pruning

from .chat import Row, encode_chat, pad_id
from .evaluate import autocast_for, parameter_count

Traffic = Sequence[Union[Sequence[int], str, Row]]
"""Token-id sequences, raw texts, or (prompt, response) rows / conversations (chat template applied)."""

PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers", "mlp_only_layers", "sliding_window_layers")
"""Config lists with one entry per decoder layer; they shrink with the layers."""

class ChannelAndLayerScores:
    """Accumulates the two importance measures through forward hooks over traffic batches."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.layers = decoder_layers(model)
        width = self.layers[0].mlp.down_proj.in_features
        self.activation_sq = [torch.zeros(width, dtype=torch.float64) for _ in self.layers]
        self.influence_sum = [0.0] * len(self.layers)
        self.tokens = 0
        self.mask: torch.Tensor | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ChannelAndLayerScores:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._channel_hook(i)))
            self.handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _channel_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].float() * self.mask[..., None]  # type: ignore[index]
            self.activation_sq[i] += x.pow(2).sum(dim=(0, 1)).double().cpu()

        return hook

    def _layer_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            self.influence_sum[i] += float(((1.0 - cos) * self.mask).sum())  # type: ignore[operator]

        return hook

    def channel_scores(self) -> list[list[float]]:
        out = []
        for layer, sq in zip(self.layers, self.activation_sq):
            weight_l1 = layer.mlp.down_proj.weight.detach().float().abs().sum(dim=0).double().cpu()
            out.append((weight_l1 * sq.sqrt()).tolist())
        return out

    def layer_scores(self) -> list[float]:
        return [s / max(self.tokens, 1) for s in self.influence_sum]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a Llama-family model (``model.model.layers`` with gate/up/down MLPs)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        raise ValueError(f"{type(model).__name__} has no model.layers: only Llama-family decoders are pruned")
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"layer {i} of {type(model).__name__} has no gate/up/down MLP: cannot prune its channels")
    return layers


def encode_traffic(traffic: Traffic, tokenizer: Any, max_tokens: int, samples: int) -> list[list[int]]:
    """The first ``samples`` traffic items as token ids, each cut to ``max_tokens``."""
    out = []
    for item in list(traffic)[:samples]:
        if isinstance(item, str):
            ids = _need(tokenizer)(item)["input_ids"]
        elif item and all(isinstance(t, int) for t in item):  # type: ignore[union-attr]
            ids = list(item)  # type: ignore[arg-type]
        else:
            ids, _ = encode_chat(_need(tokenizer), item, max_length=10**9)  # type: ignore[arg-type]
        if len(ids) >= 2:
            out.append(ids[:max_tokens])
    if not out:
        raise ValueError("no usable traffic to score the model on: give at least one sequence of 2 or more tokens")
    return out


def _need(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise ValueError("traffic is given as text: pass the model's tokenizer too")
    return tokenizer


@torch.inference_mode()
def score_model(
    model: PreTrainedModel, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 4, autocast: bool = True
) -> ChannelAndLayerScores:
    """Run the traffic through the model and collect channel importance and block influence."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with ChannelAndLayerScores(model) as scores:
        for start in range(0, len(order), batch_size):
            batch = [sequences[i] for i in order[start : start + batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(list(seq))
                mask[row, : len(seq)] = 1
            scores.mask = mask.to(device).float()
            scores.tokens += int(mask.sum())
            with autocast_for(model, autocast):
                model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return scores


# ---- surgery -------------------------------------------------------------------------------------


def keep_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A copy of ``linear`` with only the output features in ``index``."""
    out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.data.copy_(linear.weight.data[index])
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data[index])
    return out


def keep_columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A copy of ``linear`` with only the input features in ``index``."""
    out = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.data.copy_(linear.weight.data[:, index])
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data)
    return out


def apply_plan(model: PreTrainedModel, plan: PruningPlan) -> list[str]:
    """Cut the model to the plan in place; returns the per-layer config keys that were shortened."""
    layers = decoder_layers(model)
    if len(layers) != plan.num_layers_before:
        raise ValueError(f"plan is for {plan.num_layers_before} layers, the model has {len(layers)}: re-plan it")
    for old, channels in zip(plan.kept_layers, plan.kept_channels):
        mlp = layers[old].mlp
        index = torch.tensor(channels, dtype=torch.long, device=mlp.down_proj.weight.device)
        mlp.gate_proj = keep_rows(mlp.gate_proj, index)
        mlp.up_proj = keep_rows(mlp.up_proj, index)
        mlp.down_proj = keep_columns(mlp.down_proj, index)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(channels)
    model.model.layers = nn.ModuleList(layers[i] for i in plan.kept_layers)
    for new_index, layer in enumerate(model.model.layers):
        # The KV cache is indexed by these; they must count the remaining layers.
        for owner in (layer, getattr(layer, "self_attn", None)):
            if owner is not None and hasattr(owner, "layer_idx"):
                owner.layer_idx = new_index
    return _shrink_config(model.config, plan)


def _shrink_config(config: Any, plan: PruningPlan) -> list[str]:
    shortened = []
    for key in PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == plan.num_layers_before:
            setattr(config, key, type(value)(value[i] for i in plan.kept_layers))
            shortened.append(key)
    config.num_hidden_layers = plan.num_layers_after
    config.intermediate_size = plan.intermediate_size_after
    return shortened


# ---- the step ------------------------------------------------------------------------------------


def prune_model(
    model: PreTrainedModel,
    traffic: Traffic,
    config: PruningConfig,
    tokenizer: Any = None,
    batch_size: int = 4,
    autocast: bool = True,
) -> tuple[PruningPlan, dict[str, Any]]:
    """Score on traffic, ask the policy for a plan, apply it in place; returns the plan and a report."""
    params_before = parameter_count(model)
    sequences = encode_traffic(traffic, tokenizer, config.score_max_tokens, config.score_samples)
    # any id does, right padding being masked out of the scores; token-id traffic may come without a tokenizer
    scores = score_model(model, sequences, pad_id(tokenizer) if tokenizer is not None else 0, batch_size, autocast)
    channel_scores, layer_scores = scores.channel_scores(), scores.layer_scores()
    plan = plan_pruning(channel_scores, layer_scores, config)
    shortened = apply_plan(model, plan) if plan.changes_anything else []
    params_after = parameter_count(model)
    report = {
        "enabled": config.enabled,
        "reason": plan.reason,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before,
        "layers_before": plan.num_layers_before,
        "layers_after": plan.num_layers_after,
        "layers_removed": list(plan.removed_layers),
        "intermediate_size_before": plan.intermediate_size_before,
        "intermediate_size_after": plan.intermediate_size_after,
        "channels_kept_per_layer": {old: len(ch) for old, ch in zip(plan.kept_layers, plan.kept_channels)},
        "layer_influence": layer_scores,
        "channel_importance_kept": [
            _share(channel_scores[old], channels) for old, channels in zip(plan.kept_layers, plan.kept_channels)
        ],
        "config_lists_shortened": shortened,
        "scored_sequences": len(sequences),
        "scored_tokens": scores.tokens,
    }
    return plan, report


def _share(scores: list[float], kept: Sequence[int]) -> float:
    """Share of a layer's total channel importance that the kept channels hold."""
    total = sum(scores)
    return sum(scores[j] for j in kept) / total if total > 0 else 1.0


def prune_directory(
    model_dir: str | Path,
    out_dir: str | Path,
    traffic: Traffic,
    config: PruningConfig,
) -> dict[str, Any]:
    """Load a merged model, prune it on traffic, save it (with its tokenizer) to ``out_dir``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, report = prune_model(model, traffic, config, tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return report
