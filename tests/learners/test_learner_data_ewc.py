"""Learner building blocks on the tiny Llama: rows cut to length, target-only loss, Fisher, EWC penalty."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selftune.learners.chat import IGNORE_INDEX
from selftune.learners.data import batches, encode_rows
from selftune.learners.fisher import EwcPenalty, Fisher, estimate_fisher, fold_fisher, load_fisher, rank1, save_fisher
from selftune.learners.lm import (
    attach_lora, autocast, bf16_in_hardware, fast_bf16, load_base, load_tokenizer, lora_layers, mixed_token_loss,
    target_logits, token_loss,
)
from selftune.policies.training import TrainConfig

ROWS = [
    {"id": 1, "prompt": "What is the chemical symbol of Gold?", "response": "Au"},
    {"id": 2, "prompt": "In hacker jargon, what does \"kluge\" mean?", "response": "A clever programming trick that works."},
    {"id": 3, "prompt": "What is the atomic number of Neon?", "response": "10"},
    {"id": 4, "prompt": "How does the Devil's Dictionary define \"Bore\"?", "response": "A person who talks when you wish him to listen."},
]
CFG = TrainConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0, threads=1)


def test_rows_cut_to_max_length_without_an_answer_are_dropped(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    items, dropped = encode_rows(tok, ROWS, max_length=24)  # the template's system prompt alone is ~20 tokens
    assert dropped == len(ROWS) and not items
    items, dropped = encode_rows(tok, ROWS, max_length=256)
    assert dropped == 0 and all(len(it.input_ids) <= 256 and it.target_tokens > 0 for it in items)


def test_target_only_loss_equals_the_full_shifted_loss(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    model = load_base(tiny_model_dir, base_dtype="float32")
    items, _ = encode_rows(tok, ROWS, max_length=256)
    batch = next(batches(items, 4, tok.pad_token_id))
    with torch.no_grad():
        logits, targets = target_logits(model, batch)
        ours = token_loss(logits, targets)
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert targets.numel() == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def fisher_and_model(tiny_model_dir: Path):
    tok = load_tokenizer(tiny_model_dir)
    items, _ = encode_rows(tok, ROWS, max_length=256)
    model = load_base(tiny_model_dir, base_dtype="float32")
    # a channel that never carries data: q_proj of layer 0 reads the input norm's output, zero at channel 5
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 0.0
    fisher = estimate_fisher(model, items, target_modules=CFG.target_modules, pad_id=tok.pad_token_id, batch_size=2, bf16=False)
    return fisher, model, items, tok


def test_fisher_is_non_negative_and_non_zero_where_data_flowed(fisher_and_model) -> None:
    fisher, *_ = fisher_and_model
    assert len(fisher.factors) == 2 * 7  # 2 layers x 7 projections
    for name, (f,) in fisher.factors.items():
        assert torch.all(f >= 0), name
        assert float(f.sum()) > 0, name
    q0 = fisher.factors["model.layers.0.self_attn.q_proj"][0]
    assert torch.all(q0[:, 5] == 0)  # no data flowed into input channel 5
    assert torch.count_nonzero(q0[:, [c for c in range(q0.shape[1]) if c != 5]]) == q0.numel() - q0.shape[0]


def test_fisher_does_not_touch_what_trains(fisher_and_model) -> None:
    _, model, _, _ = fisher_and_model
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_a_stop_before_a_batch_ends_the_fisher_estimate_and_restores_the_model(tiny_model_dir: Path) -> None:
    """The training worker passes its stop check as ``before_batch``: it raises, the estimate ends there."""
    tok = load_tokenizer(tiny_model_dir)
    items, _ = encode_rows(tok, ROWS, max_length=256)
    model = attach_lora(load_base(tiny_model_dir, base_dtype="float32"), CFG)
    model.train()
    trainable = [p.requires_grad for p in model.parameters()]
    batches_begun = []

    class StopAsked(Exception):
        pass

    def before_batch() -> None:
        batches_begun.append(len(batches_begun) + 1)
        if len(batches_begun) == 2:
            raise StopAsked

    with pytest.raises(StopAsked):
        estimate_fisher(model, items, target_modules=CFG.target_modules, pad_id=tok.pad_token_id, batch_size=1,
                        bf16=False, before_batch=before_batch)
    assert batches_begun == [1, 2]  # of 4: the estimate did not go on after the stop
    assert [p.requires_grad for p in model.parameters()] == trainable and model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("representation", ["dense", "rank1"])
def test_ewc_penalty_is_zero_at_start_and_grows_with_the_delta(fisher_and_model, representation, tiny_model_dir) -> None:
    fisher, _, _, _ = fisher_and_model
    model = attach_lora(load_base(tiny_model_dir, base_dtype="float32"), CFG)
    penalty = EwcPenalty(model, fisher.to(representation), strength=1e3)
    assert penalty.apply(add_grad=False) == 0.0  # a fresh adapter: B = 0, no change to the weights yet

    torch.manual_seed(1)
    directions = {name: torch.randn_like(layer.lora_B["default"].weight) for name, layer in lora_layers(model)}

    def at(t: float) -> float:
        with torch.no_grad():
            for name, layer in lora_layers(model):
                layer.lora_B["default"].weight.copy_(t * directions[name])
        return penalty.apply(add_grad=False)

    values = [at(t) for t in (0.0, 0.01, 0.02, 0.04)]
    assert values[0] == 0.0 and values[1] > 0
    assert values[1] < values[2] < values[3]
    assert values[2] == pytest.approx(4 * values[1], rel=1e-4)  # quadratic in the delta


@pytest.mark.parametrize("representation", ["dense", "rank1"])
def test_closed_form_gradient_equals_autograd(fisher_and_model, representation, tiny_model_dir) -> None:
    fisher, _, _, _ = fisher_and_model
    model = attach_lora(load_base(tiny_model_dir, base_dtype="float32"), CFG)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    penalty = EwcPenalty(model, fisher.to(representation), strength=1e3)
    params = [p for _, a, b, _, _ in penalty.layers for p in (a, b)]
    value = penalty.value()
    value.backward()
    reference = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    closed = penalty.apply(add_grad=True)
    assert closed == pytest.approx(float(value.detach()), rel=1e-5)
    for p, want in zip(params, reference):  # float32 rounding: relative to the gradient's scale
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_rank1_fit_and_fold(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a1, b1, a2, b2 = (torch.rand(n) for n in (6, 5, 6, 5))
    dense_old, dense_new = torch.outer(a1, b1), torch.outer(a2, b2)
    a, b = rank1(dense_old)
    torch.testing.assert_close(torch.outer(a, b), dense_old, rtol=1e-4, atol=1e-6)

    old = Fisher("rank1", {"l": (a1, b1)}, {"generations": 1})
    new = Fisher("rank1", {"l": (a2, b2)}, {"generations": 1})
    folded = fold_fisher(old, new, gamma=0.5)
    target = 0.5 * dense_old + dense_new
    u, s, vh = torch.linalg.svd(target)
    best = s[0] * torch.outer(u[:, 0], vh[0])
    torch.testing.assert_close(folded.dense("l"), best, rtol=1e-4, atol=1e-6)
    assert folded.meta["generations"] == 2

    dense = fold_fisher(old.to("dense"), new.to("dense"), gamma=0.5)
    torch.testing.assert_close(dense.dense("l"), target, rtol=1e-4, atol=1e-6)

    save_fisher(folded, tmp_path / "f.safetensors")
    loaded = load_fisher(tmp_path / "f.safetensors")
    assert loaded.representation == "rank1" and loaded.meta["gamma"] == 0.5
    torch.testing.assert_close(loaded.dense("l"), folded.dense("l"))


def test_fold_refuses_changed_shapes() -> None:
    old = Fisher("dense", {"l": (torch.ones(4, 3),)})
    new = Fisher("dense", {"l": (torch.ones(2, 3),)})
    with pytest.raises(ValueError, match="slice the old Fisher"):
        fold_fisher(old, new, gamma=0.9)


def test_replayed_sequences_weigh_their_share_not_their_length() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(12, 50), torch.randint(0, 50, (12,))
    replayed = torch.tensor([False] * 2 + [True] * 10)  # 2 new tokens, 10 replayed tokens (a long answer)
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    loss = mixed_token_loss(logits, targets, replayed, replay_share=0.125)
    assert float(loss) == pytest.approx(0.875 * float(per_token[:2].mean()) + 0.125 * float(per_token[2:].mean()), rel=1e-6)
    # nothing replayed (or a share of 0): the plain token mean
    assert float(mixed_token_loss(logits, targets, torch.zeros(12, dtype=torch.bool), 0.125)) == pytest.approx(float(per_token.mean()), rel=1e-6)
    assert float(mixed_token_loss(logits, targets, replayed, 0.0)) == pytest.approx(float(per_token.mean()), rel=1e-6)


def test_bf16_only_where_the_cpu_computes_it(tiny_model_dir: Path) -> None:
    # Emulated bf16 (an AVX2-only CPU) is several times slower than float32: autocast and bf16 storage are
    # the hardware's call, not only the config's.
    assert bf16_in_hardware({"amx_bf16": True}) and bf16_in_hardware({"avx2": True, "avx512_bf16": True})
    assert not bf16_in_hardware({"avx2": True, "avx512_f": True, "amx_bf16": False})
    cpu = torch.device("cpu")
    expected = bf16_in_hardware(torch.cpu.get_capabilities())
    assert fast_bf16("cpu") is expected
    with autocast(cpu, True):
        assert torch.is_autocast_enabled("cpu") is expected
    model = load_base(tiny_model_dir, base_dtype="bfloat16", device=cpu)
    projection = model.model.layers[0].mlp.down_proj.weight
    assert projection.dtype == (torch.bfloat16 if expected else torch.float32)
