"""Adapter trim and safe merge, and structured pruning of the tiny Llama (the plan itself: tests/policies)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftune.learners.merge import (
    NonFiniteWeightsError,
    adapter_svd,
    check_adapter_finite,
    magnitude_trim,
    merge_adapter,
    safe_merge,
    trim_adapter_rank,
)
from selftune.learners.prune import apply_plan, prune_directory, prune_model
from selftune.policies.pruning import AdapterTrimConfig, PruningConfig, plan_pruning

TRAFFIC = [
    ("What is a list in Python?", "A mutable sequence of items, written with square brackets."),
    ("What does len() return?", "The number of items in a container."),
    ("Define a generator.", "A function that yields values lazily, one at a time."),
    "Plain text traffic works as well: the quick brown fox jumps over the lazy dog.",
]


# ---- tensor functions ------------------------------------------------------------------------------


def test_trim_adapter_rank_is_the_truncated_svd_of_b_a() -> None:
    torch.manual_seed(0)
    B, A = torch.randn(32, 8), torch.randn(8, 24)
    product = B @ A
    _, s, _ = adapter_svd(B, A)
    assert torch.allclose(s, torch.linalg.svdvals(product)[:8], rtol=1e-4, atol=1e-4)
    new_b, new_a = trim_adapter_rank(B, A, 3)
    assert new_b.shape == (32, 3) and new_a.shape == (3, 24)
    u, sv, vh = torch.linalg.svd(product)
    best = u[:, :3] @ torch.diag(sv[:3]) @ vh[:3]
    assert torch.allclose(new_b @ new_a, best, atol=1e-3)
    full_b, full_a = trim_adapter_rank(B, A, 8)
    assert torch.allclose(full_b @ full_a, product, atol=1e-3)


def test_magnitude_trim_keeps_the_largest_entries() -> None:
    delta = torch.tensor([[0.1, -5.0, 0.2], [3.0, -0.05, 1.0]])
    trimmed = magnitude_trim(delta, 0.5)
    assert torch.equal(trimmed, torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 1.0]]))
    assert magnitude_trim(delta, 1.0) is delta


def test_safe_merge_refuses_overflow_naming_the_layer() -> None:
    base = torch.full((2, 2), 60000.0, dtype=torch.float16)
    assert safe_merge(base, torch.full((2, 2), 100.0), "ok").dtype == torch.float16
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.3\.mlp\.up_proj: merging gives 0 NaN and 4 Inf"):
        safe_merge(base, torch.full((2, 2), 10000.0), "model.layers.3.mlp.up_proj")


# ---- merge_adapter ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA on the tiny model with non-zero B (init_lora_weights=False), saved by peft."""
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_adapter_writes_a_plain_model_equal_to_base_plus_adapter(
    tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    facts = merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "merged")
    assert facts["layers_merged"] == 8 and facts["rank_before"] == facts["rank_after"] == 4
    assert facts["energy_kept_min"] == 1.0 and facts["relative_change_max"] > 0
    weights = tmp_path / "merged" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").eos_token == "<|im_end|>"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)
    assert not torch.allclose(base_logits, logits_of(reference, ids), atol=1e-3)  # the adapter does something
    assert torch.allclose(logits_of(merged, ids), logits_of(reference, ids), atol=1e-4)
    assert facts["params"] == sum(p.numel() for p in merged.parameters())


def test_merge_adapter_trims_rank_and_magnitude(tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    facts = merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "trimmed",
                          trim=AdapterTrimConfig(rank=2, keep_fraction=0.5))
    assert facts["rank_after"] == 2 and set(facts["ranks_after"].values()) == {2}
    assert 0.3 < facts["energy_kept_min"] < 1.0
    assert facts["magnitude_keep_fraction"] == 0.5
    untrimmed = merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "full")
    assert facts["relative_change_mean"] < untrimmed["relative_change_mean"]


def test_a_nan_adapter_is_refused_naming_the_layer(tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.1.self_attn.v_proj.lora_B" in k)
    tensors[key][0, 0] = math.nan
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.1\.self_attn\.v_proj: adapter tensor .* 1 NaN") as err:
        merge_adapter(tiny_model_dir, broken, tmp_path / "out")
    assert err.value.layer == "model.layers.1.self_attn.v_proj"
    assert isinstance(err.value, ValueError) and "retrain" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert check_adapter_finite(adapter_dir) == len(tensors)


# ---- pruning ---------------------------------------------------------------------------------------


def test_channel_pruning_equals_zeroing_the_removed_channels(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    config = PruningConfig(enabled=True, mlp_channel_fraction=0.25, layer_fraction=0.0)
    plan, report = prune_model(model, TRAFFIC, config, tokenizer, autocast=False)
    assert report["intermediate_size_after"] == 96 and report["layers_removed"] == []
    for layer, kept in zip(reference.model.layers, plan.kept_channels):
        removed = sorted(set(range(128)) - set(kept))
        layer.mlp.down_proj.weight.data[:, removed] = 0.0
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    assert torch.allclose(logits_of(model, ids), logits_of(reference, ids), atol=1e-5)
    assert all(0.75 < share <= 1.0 for share in report["channel_importance_kept"])  # the important 75% stay


def test_pruned_model_loads_in_a_fresh_process_with_fewer_params(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = PruningConfig(enabled=True, mlp_channel_fraction=0.25, layer_fraction=0.5, min_layers=1,
                           protected_edge_layers=0)
    report = prune_directory(tiny_model_dir, tmp_path / "pruned", TRAFFIC, config)
    assert report["layers_before"] == 2 and report["layers_after"] == 1 and len(report["layers_removed"]) == 1
    assert report["intermediate_size_after"] == 96
    assert report["params_after"] < report["params_before"]
    kept_layer = 1 - report["layers_removed"][0]
    # The removed layer is the one that changes its input least.
    assert report["layer_influence"][kept_layer] >= report["layer_influence"][report["layers_removed"][0]]
    assert report["channels_kept_per_layer"] == {kept_layer: 96}
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "ids = torch.tensor([[1, 50, 60, 70]])\n"
        "out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)\n"
        "print(json.dumps({'layers': m.config.num_hidden_layers, 'width': m.config.intermediate_size,\n"
        "  'n_modules': len(m.model.layers), 'params': sum(p.numel() for p in m.parameters()),\n"
        "  'up': list(m.model.layers[0].mlp.up_proj.weight.shape), 'generated': out.shape[1]}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pruned")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == {"layers": 1, "width": 96, "n_modules": 1, "params": report["params_after"], "up": [96, 64],
                     "generated": 8}


def test_pruned_model_decodes_the_same_with_and_without_the_kv_cache(tiny_model_dir: Path) -> None:
    # Three layers, the middle one removed: the KV cache indices of the remaining layers must be renumbered.
    from transformers import LlamaForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = base.config
    config.num_hidden_layers = 3
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    plan = plan_pruning([[1.0] * 128] * 3, [0.5, 0.1, 0.5],
                        PruningConfig(enabled=True, layer_fraction=0.34, min_layers=1))
    assert plan.removed_layers == (1,)
    apply_plan(model, plan)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                do_sample=False, use_cache=True)
        uncached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                  do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_disabled_pruning_changes_nothing(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = sum(p.numel() for p in model.parameters())
    _, report = prune_model(model, [[1, 2, 3, 4, 5]], PruningConfig(enabled=False))
    assert report["params_after"] == before and report["layers_removed"] == [] and report["params_ratio"] == 1.0
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        prune_model(model, ["text needs a tokenizer"], PruningConfig(enabled=True))


# ---- stepwise layer dropping -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def six_layer_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 6 layers (random, seeded), saved with the tokenizer."""
    from transformers import LlamaForCausalLM

    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    config.num_hidden_layers = 6
    torch.manual_seed(6)
    out = tmp_path_factory.mktemp("six-layers")
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


STEPWISE = PruningConfig(enabled=True, layer_dropping="stepwise", mlp_channel_fraction=0.0, layer_fraction=0.9,
                         min_layers=1, max_drop_cost=0.02)


def _layer_count_loss(calls: list[int]):
    """A held-out 'loss' that rises 1% per removed layer, recording the layer count it was measured at."""
    def loss(model: torch.nn.Module) -> float:
        calls.append(len(model.model.layers))
        return 1.0 + 0.01 * (6 - len(model.model.layers))
    return loss


def test_stepwise_dropping_removes_one_inner_layer_at_a_time_rescoring_between(
    six_layer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selftune.learners import prune

    scored: list[int] = []
    real_score = prune.score_model
    monkeypatch.setattr(prune, "score_model", lambda model, *a, **k: scored.append(len(model.model.layers)) or
                        real_score(model, *a, **k))
    model = AutoModelForCausalLM.from_pretrained(six_layer_dir).eval()
    calls: list[int] = []
    config = PruningConfig(**{**STEPWISE.__dict__, "max_drop_cost": 1.0})  # the budget never binds here
    plan, report = prune_model(model, TRAFFIC, config, AutoTokenizer.from_pretrained(six_layer_dir), autocast=False,
                               loss_fn=_layer_count_loss(calls))
    assert calls == [6, 5, 4, 3, 2]  # unpruned, then after each single removal
    assert scored == [6, 5, 4, 3, 2]  # re-scored on the traffic after every removal
    assert [s["layers_left"] for s in report["steps"]] == [5, 4, 3, 2] and all(s["kept"] for s in report["steps"])
    assert 0 not in report["layers_removed"] and 5 not in report["layers_removed"]  # never the first or last
    assert sorted(s["layer"] for s in report["steps"]) == report["layers_removed"] == [1, 2, 3, 4]
    assert report["kept_layers"] == [0, 5] and "protected edge" in report["stopped"]
    assert [s["params"] for s in report["steps"]][-1] == report["params_after"] == sum(p.numel() for p in model.parameters())
    for step in report["steps"]:  # each was the least influential removable layer, scored after the last removal
        scores = step["influence_of_remaining"]
        assert len(scores) == step["layers_left"] + 1
        assert step["influence"] == scores[step["layer"]] == min(v for k, v in scores.items() if k not in (0, 5))
    assert report["layer_influence"] == list(report["steps"][0]["influence_of_remaining"].values())


def test_stepwise_dropping_stops_at_the_budget_and_undoes_the_removal_that_passed_it(six_layer_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(six_layer_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(six_layer_dir).eval()
    calls: list[int] = []
    plan, report = prune_model(model, TRAFFIC, STEPWISE, AutoTokenizer.from_pretrained(six_layer_dir), autocast=False,
                               loss_fn=_layer_count_loss(calls))
    # +1%, +2% pass the 2% budget; the third removal (+3%) is tried, measured, undone
    assert [s["kept"] for s in report["steps"]] == [True, True, False]
    assert report["layers_after"] == 4 and len(report["layers_removed"]) == 2
    assert report["steps"][-1]["layer"] not in report["layers_removed"]
    assert report["loss_unpruned"] == 1.0 and report["loss_after"] == pytest.approx(1.02)
    assert "max_drop_cost = 0.02" in report["stopped"] and "undone" in report["stopped"]
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    # the cut model is the reference's kept layers, untouched
    from selftune.learners.prune import use_layers

    use_layers(reference, list(reference.model.layers), plan.kept_layers, {})
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    assert torch.allclose(logits_of(model, ids), logits_of(reference, ids), atol=1e-6)


def test_stepwise_dropping_stops_at_the_size_target(six_layer_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(six_layer_dir).eval()
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    target = (total - 2.5 * per_layer) / total  # two removals are not enough, three are
    config = PruningConfig(**{**STEPWISE.__dict__, "max_drop_cost": 1.0, "target_params_ratio": target})
    _, report = prune_model(model, TRAFFIC, config, AutoTokenizer.from_pretrained(six_layer_dir), autocast=False,
                            loss_fn=_layer_count_loss([]))
    assert len(report["layers_removed"]) == 3 and report["params_ratio"] <= target
    assert "size target reached" in report["stopped"]
    capped = PruningConfig(**{**STEPWISE.__dict__, "max_drop_cost": 1.0, "layer_fraction": 0.34})
    _, report = prune_model(AutoModelForCausalLM.from_pretrained(six_layer_dir).eval(), TRAFFIC, capped,
                            AutoTokenizer.from_pretrained(six_layer_dir), autocast=False, loss_fn=_layer_count_loss([]))
    assert len(report["layers_removed"]) == 2 and "layer_fraction = 0.34" in report["stopped"]
    with pytest.raises(ValueError, match="pass loss_fn"):
        prune_model(AutoModelForCausalLM.from_pretrained(six_layer_dir).eval(), TRAFFIC, STEPWISE,
                    AutoTokenizer.from_pretrained(six_layer_dir))


def test_stepwise_prune_directory_checks_held_out_rows_and_the_result_loads(six_layer_dir: Path, tmp_path: Path) -> None:
    from selftune.learners.evaluate import held_out_loss

    held_out = TRAFFIC[:3]
    config = PruningConfig(**{**STEPWISE.__dict__, "max_drop_cost": 5.0, "layer_fraction": 0.5,
                              "mlp_channel_fraction": 0.25})
    report = prune_directory(six_layer_dir, tmp_path / "pruned", TRAFFIC, config, held_out=held_out)
    assert report["layers_after"] == 3 and report["intermediate_size_after"] == 96
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    # width was cut after the steps, so the reported loss is measured again on the saved model's weights
    assert report["loss_after"] == pytest.approx(held_out_loss(model, tokenizer, held_out).loss, rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(six_layer_dir).eval()
    assert report["loss_unpruned"] == pytest.approx(held_out_loss(base, tokenizer, held_out).loss, rel=1e-5)
    with pytest.raises(ValueError, match="needs held-out rows"):
        prune_directory(six_layer_dir, tmp_path / "again", TRAFFIC, config)
