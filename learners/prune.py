"""Structured pruning of a merged Llama-family model, scored on the branch's own traffic.

Two measurements on that traffic, one policy decision (``selftune.policies.pruning``), one surgery:
- MLP channel importance, Wanda-style: ``||W_down[:, j]||_1 * ||x_j||_2``, where ``x_j`` is the
  intermediate activation (``act(gate) * up``) of channel ``j`` over every traffic token. The same
  count is removed in every layer, so ``intermediate_size`` stays a single standard config value.
- Block influence per decoder layer (ShortGPT): ``1 - cos(h_in, h_out)`` averaged over tokens; the
  layers that change their input least are dropped, and ``num_hidden_layers`` shrinks with them.

Layers go all at once (``layer_dropping = "fraction"``, one scoring) or stepwise (``"stepwise"``): remove
the least influential removable layer, measure the specialty's held-out loss, undo the removal and stop if
it passed ``max_drop_cost`` above the unpruned model's, else re-score on the traffic and go on, until the
size target or the layer cap stops it. Every step is recorded for the report. Trial removals only swap the
model's layer list (no copy); the chosen plan is then cut once, channels included, by ``apply_plan``.
The result is an ordinary transformers model: ``save_pretrained`` then ``from_pretrained`` in any process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from selftune.policies.pruning import (
    PruningConfig, PruningPlan, next_layer_to_drop, plan_for_layers, plan_pruning, within_prune_budget,
)

from .chat import Row, encode_chat, pad_id
from .evaluate import autocast_for, held_out_loss, parameter_count

Traffic = Sequence[Union[Sequence[int], str, Row]]
"""Token-id sequences, raw texts, or (prompt, response) rows / conversations (chat template applied)."""

PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers", "mlp_only_layers", "sliding_window_layers")
"""Config lists with one entry per decoder layer; they shrink with the layers."""

LossFn = Callable[[PreTrainedModel], float]
"""The specialty's held-out loss of a model as it is now (lower is better)."""


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
    _renumber(model)
    return _shrink_config(model.config, plan)


def _renumber(model: PreTrainedModel) -> None:
    """The KV cache is indexed by ``layer_idx``: it must count the remaining layers."""
    for new_index, layer in enumerate(model.model.layers):
        for owner in (layer, getattr(layer, "self_attn", None)):
            if owner is not None and hasattr(owner, "layer_idx"):
                owner.layer_idx = new_index


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


# ---- stepwise layer dropping --------------------------------------------------------------------


def use_layers(model: PreTrainedModel, originals: Sequence[nn.Module], kept: Sequence[int],
               config_lists: dict[str, Any]) -> None:
    """Make the model run only ``originals[i]`` for ``i`` in ``kept`` (a trial removal, undone by passing
    every index): the layer list, ``num_hidden_layers``, the per-layer config lists and the KV-cache indices."""
    model.model.layers = nn.ModuleList(originals[i] for i in kept)
    _renumber(model)
    for key, value in config_lists.items():
        setattr(model.config, key, type(value)(value[i] for i in kept))
    model.config.num_hidden_layers = len(kept)


def drop_layers_stepwise(
    model: PreTrainedModel,
    sequences: Sequence[Sequence[int]],
    loss_fn: LossFn,
    config: PruningConfig,
    pad: int,
    batch_size: int = 4,
    autocast: bool = True,
    params_reference: int | None = None,
    reference_loss: float | None = None,
) -> dict[str, Any]:
    """Remove layers one at a time as ``PruningConfig.layer_dropping = "stepwise"`` says; returns the facts.

    ``target_params_ratio`` is measured against ``params_reference`` and ``max_drop_cost`` against
    ``reference_loss`` (defaults: this model's own), so that after a vocabulary trim both budgets still count
    from the untrimmed model: the trim and the cuts share them.

    The model comes back whole (every layer in place): the caller cuts ``kept_layers`` with ``apply_plan``.
    Facts: ``kept_layers``, ``loss_unpruned``, ``loss_after`` (of the last kept state), ``stopped`` (why),
    ``first_scores`` (the full model's ``ChannelAndLayerScores``), ``final_scores`` (of the kept layers) and
    ``steps``: one dict per tried removal (``layer``, its ``influence``, ``influence_of_remaining`` = every
    remaining layer's block influence when it was chosen, ``loss``, ``loss_ratio``, ``params``,
    ``layers_left``, ``kept`` = whether the removal stayed within the budget).
    """
    originals = list(decoder_layers(model))
    n = len(originals)
    config_lists = {key: getattr(model.config, key) for key in PER_LAYER_CONFIG_KEYS
                    if isinstance(getattr(model.config, key, None), (list, tuple))
                    and len(getattr(model.config, key)) == n}
    params_unpruned = params_reference or parameter_count(model)
    loss_now = float(loss_fn(model))
    unpruned_loss = loss_now if reference_loss is None else reference_loss
    if not (math.isfinite(unpruned_loss) and math.isfinite(loss_now)):
        raise ValueError(f"the unpruned model's held-out loss is {unpruned_loss}: the model or the rows are broken")
    kept = list(range(n))
    first = scores = score_model(model, sequences, pad, batch_size, autocast)
    steps: list[dict[str, Any]] = []
    try:
        while True:
            influence = scores.layer_scores()
            choice = next_layer_to_drop(influence, kept, n, parameter_count(model) / params_unpruned, config)
            if choice.layer is None:
                stopped = choice.reason
                break
            trial = [i for i in kept if i != choice.layer]
            use_layers(model, originals, trial, config_lists)
            loss = float(loss_fn(model))
            within = within_prune_budget(loss, unpruned_loss, config.max_drop_cost)
            steps.append({
                "layer": choice.layer, "influence": influence[kept.index(choice.layer)],
                "influence_of_remaining": dict(zip(kept, influence)), "loss": loss,
                "loss_ratio": loss / unpruned_loss if unpruned_loss else math.inf, "params": parameter_count(model),
                "layers_left": len(trial), "kept": within,
            })
            if not within:
                use_layers(model, originals, kept, config_lists)
                stopped = (f"removing layer {choice.layer} raised the held-out loss to {loss:.4f}, more than "
                           f"max_drop_cost = {config.max_drop_cost:g} above the unpruned {unpruned_loss:.4f}: undone")
                break
            kept, loss_now = trial, loss
            scores = score_model(model, sequences, pad, batch_size, autocast)  # re-scored without that layer
    finally:
        use_layers(model, originals, range(n), config_lists)
    return {"kept_layers": kept, "loss_unpruned": unpruned_loss, "loss_after": loss_now, "stopped": stopped,
            "first_scores": first, "final_scores": scores, "steps": steps}


def held_out_loss_fn(tokenizer: Any, rows: Sequence[Row], max_length: int = 512, autocast: bool = True) -> LossFn:
    """The specialty's loss for stepwise dropping: ``evaluate.held_out_loss(...).loss`` on ``rows`` (their
    assistant turns). The budget is relative and layer dropping keeps the tokenizer, so whether that loss is
    per byte or per token the same removals pass."""
    if not rows:
        raise ValueError("stepwise layer dropping needs held-out rows of the specialty to check its loss: pass some")
    return lambda model: held_out_loss(model, tokenizer, rows, max_length=max_length, autocast=autocast).loss


# ---- the step ------------------------------------------------------------------------------------


def prune_model(
    model: PreTrainedModel,
    traffic: Traffic,
    config: PruningConfig,
    tokenizer: Any = None,
    batch_size: int = 4,
    autocast: bool = True,
    loss_fn: LossFn | None = None,
    params_reference: int | None = None,
    reference_loss: float | None = None,
) -> tuple[PruningPlan, dict[str, Any]]:
    """Score on traffic, ask the policy for a plan, apply it in place; returns the plan and a report.

    Stepwise dropping (``config.layer_dropping``) needs ``loss_fn``, the specialty's held-out loss
    (``held_out_loss_fn``); the report then holds its steps, the loss before and after, and why it stopped.
    MLP channels (``mlp_channel_fraction`` > 0) are cut after the layers, unchecked by the budget: the
    report's ``loss_after`` is then measured again on the cut model, for the gates to judge.
    """
    params_before = parameter_count(model)
    sequences = encode_traffic(traffic, tokenizer, config.score_max_tokens, config.score_samples)
    # any id does, right padding being masked out of the scores; token-id traffic may come without a tokenizer
    pad = pad_id(tokenizer) if tokenizer is not None else 0
    stepwise: dict[str, Any] | None = None
    if config.enabled and config.layer_dropping == "stepwise":
        if loss_fn is None:
            raise ValueError('pruning.layer_dropping = "stepwise" checks the specialty\'s loss between removals: '
                             "pass loss_fn (or held-out rows to prune_directory)")
        stepwise = drop_layers_stepwise(model, sequences, loss_fn, config, pad, batch_size, autocast,
                                        params_reference, reference_loss)
        scores = stepwise["first_scores"]
        channel_scores, layer_scores = _channel_scores_by_layer(stepwise), scores.layer_scores()
        plan = plan_for_layers(channel_scores, stepwise["kept_layers"], config,
                               f"stepwise, least block influence first: {stepwise['stopped']}")
    else:
        scores = score_model(model, sequences, pad, batch_size, autocast)
        channel_scores, layer_scores = scores.channel_scores(), scores.layer_scores()
        plan = plan_pruning(channel_scores, layer_scores, config)
    shortened = apply_plan(model, plan) if plan.changes_anything else []
    params_after = parameter_count(model)
    report = {
        "enabled": config.enabled,
        "reason": plan.reason,
        "layer_dropping": config.layer_dropping,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before,
        "layers_before": plan.num_layers_before,
        "layers_after": plan.num_layers_after,
        "layers_removed": list(plan.removed_layers),
        "kept_layers": list(plan.kept_layers),
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
    if stepwise is not None:
        width_cut = plan.intermediate_size_after < plan.intermediate_size_before
        loss_after = float(loss_fn(model)) if width_cut else stepwise["loss_after"]  # type: ignore[misc]
        report.update(
            max_drop_cost=config.max_drop_cost,
            loss_unpruned=stepwise["loss_unpruned"],
            loss_after=loss_after,
            loss_ratio=loss_after / stepwise["loss_unpruned"] if stepwise["loss_unpruned"] else math.inf,
            steps=stepwise["steps"],
            stopped=stepwise["stopped"],
        )
    return plan, report


def _channel_scores_by_layer(stepwise: dict[str, Any]) -> list[list[float]]:
    """Channel importance per parent layer: a kept layer's from the last scoring (on the model as it was cut),
    a removed layer's from the first (its row is never read)."""
    out = stepwise["first_scores"].channel_scores()
    for layer, row in zip(stepwise["kept_layers"], stepwise["final_scores"].channel_scores()):
        out[layer] = row
    return out


def _share(scores: list[float], kept: Sequence[int]) -> float:
    """Share of a layer's total channel importance that the kept channels hold."""
    total = sum(scores)
    return sum(scores[j] for j in kept) / total if total > 0 else 1.0


def prune_directory(
    model_dir: str | Path,
    out_dir: str | Path,
    traffic: Traffic,
    config: PruningConfig,
    *,
    held_out: Sequence[Row] = (),
    held_out_max_length: int = 512,
    params_reference: int | None = None,
    reference_loss: float | None = None,
) -> dict[str, Any]:
    """Load a merged model, prune it on traffic, save it (with its tokenizer) to ``out_dir``.

    Stepwise layer dropping checks the specialty's loss on ``held_out`` rows (cut to ``held_out_max_length``
    tokens, as the cycle's evaluation cuts them). The report's ``layers_before`` and ``layers_removed`` are
    what ``selftune.learners.heal.write_heal_job`` needs to find the cuts.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stepwise = config.enabled and config.layer_dropping == "stepwise"
    loss_fn = held_out_loss_fn(tokenizer, held_out, held_out_max_length) if stepwise else None
    _, report = prune_model(model, traffic, config, tokenizer, loss_fn=loss_fn, params_reference=params_reference,
                            reference_loss=reference_loss)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return report
