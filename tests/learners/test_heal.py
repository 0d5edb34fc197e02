"""The distillation heal on a tiny 4-layer Llama: it lowers the KL to the teacher, trains only the layers next to
the cut and the norms above them, resumes to the same weights, and refuses non-finite weights."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from selftune.learners import heal, jobs
from selftune.learners.chat import encode_chat
from selftune.learners.heal import (
    HealStopped, heal_failure, run_heal, start_heal, trained_parameter_names, write_heal_job,
)
from selftune.learners.merge import NonFiniteWeightsError
from selftune.learners.prune import prune_directory
from selftune.policies.pruning import PruningConfig
from selftune.policies.training import TrainConfig

TOPICS = ["gold", "silver", "neon", "argon", "kluge", "cruft", "bore", "lambda", "tuple", "yield", "iterator", "cons"]
ROWS = [{"id": i, "prompt": f"Tell me about {t}, entry {i}.", "response": f"{t.capitalize()} is item {i} of the list."}
        for i, t in enumerate(TOPICS)]
REPLAY = [{"id": 100 + r["id"], "prompt": r["prompt"].upper(), "response": r["response"].upper()} for r in ROWS[:4]]
PRUNING = PruningConfig(enabled=True, mlp_channel_fraction=0.0, layer_fraction=0.25, heal_kind="distill",
                        heal_steps=6, heal_learning_rate=1e-3, heal_min_learning_rate=1e-4, heal_warmup_steps=1)
TRAIN = TrainConfig(batch_size=4, max_length=64, threads=1, checkpoint_every=0)


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 4 layers (the unpruned candidate)."""
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    config.num_hidden_layers = 4
    torch.manual_seed(4)
    out = tmp_path_factory.mktemp("teacher")
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pruned(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The teacher with its least influential inner layer dropped: (directory, prune report)."""
    out = tmp_path_factory.mktemp("student")
    report = prune_directory(teacher_dir, out, [(r["prompt"], r["response"]) for r in ROWS], PRUNING)
    assert report["layers_after"] == 3 and report["layers_removed"][0] in (1, 2)
    return out, report


def _job(workdir: Path, pruned: tuple[Path, dict], teacher_dir: Path, **overrides) -> Path:
    student, report = pruned
    settings = {"train_rows": ROWS, "replay_rows": REPLAY, "pruning": PRUNING, "train": TRAIN, **overrides}
    return write_heal_job(workdir, student=student, teacher=teacher_dir, prune_report=report, **settings)


@pytest.fixture(scope="module")
def healed(teacher_dir: Path, pruned: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One uninterrupted heal of the pruned model: (working directory, result)."""
    work = _job(tmp_path_factory.mktemp("healed") / "heal", pruned, teacher_dir)
    return work, run_heal(work)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


@torch.no_grad()
def kl_to_teacher(student_dir: Path, teacher_dir: Path, rows: list[dict]) -> float:
    """Mean KL(teacher || student) over every position of the rows, computed independently of the heal."""
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    total = positions = 0.0
    for row in rows:
        ids = torch.tensor([encode_chat(tokenizer, row, 64)[0]])
        log_p = F.log_softmax(teacher(input_ids=ids).logits[0], -1)
        log_q = F.log_softmax(student(input_ids=ids).logits[0], -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        positions += ids.shape[1]
    return total / positions


def test_the_heal_lowers_the_kl_to_the_teacher(
    teacher_dir: Path, pruned: tuple[Path, dict], healed: tuple[Path, dict]
) -> None:
    work, result = healed
    healed_dir = Path(result["out_dir"])
    before, after = kl_to_teacher(pruned[0], teacher_dir, ROWS), kl_to_teacher(healed_dir, teacher_dir, ROWS)
    assert after < 0.7 * before, (before, after)
    assert result["steps"] == 6 and result["loss_last"] < result["loss_first"]
    progress = jobs.read_progress(work)
    assert [p["step"] for p in progress] == list(range(1, 7))
    assert progress[0]["lr"] == pytest.approx(1e-3) and progress[-1]["lr"] == pytest.approx(1e-4)  # warm-up 1, cosine
    assert AutoModelForCausalLM.from_pretrained(healed_dir).config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(healed_dir).eos_token == "<|im_end|>"
    assert run_heal(work) == result  # done: the result, nothing rerun


def test_only_the_layers_next_to_the_cut_and_the_norms_above_change(
    pruned: tuple[Path, dict], healed: tuple[Path, dict]
) -> None:
    student, report = pruned
    result = healed[1]
    assert result["trained_layers"] == [0, 1, 2][report["layers_removed"][0] - 1:][:2]  # below and above the cut
    before, after = _weights(student), _weights(Path(result["out_dir"]))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lowest = min(result["trained_layers"])
    intended = {k for k in before if any(k.startswith(f"model.layers.{i}.") for i in result["trained_layers"])}
    intended |= {k for k in before if "norm" in k and (k == "model.norm.weight" or int(k.split(".")[2]) > lowest)}
    assert changed and changed <= intended
    assert {k for k in intended if k.endswith("proj.weight")} <= changed  # every trained projection moved
    assert not [k for k in changed if "embed" in k or k.startswith(f"model.layers.{lowest - 1}.")]
    assert result["trained_parameters"] == sum(before[k].numel() for k in intended)


def test_trained_parameters_skip_the_norms_below_the_lowest_trained_layer(pruned: tuple[Path, dict]) -> None:
    model = AutoModelForCausalLM.from_pretrained(pruned[0])
    names = trained_parameter_names(model, [2])
    assert all(n.startswith("model.layers.2.") for n in names if n != "model.norm.weight")
    assert "model.norm.weight" in names and not [n for n in names if "layers.1." in n or "layers.0." in n]
    with pytest.raises(ValueError, match="nothing was cut"):
        trained_parameter_names(model, [])


def test_a_stopped_heal_resumes_to_the_weights_of_an_uninterrupted_one(
    tmp_path: Path, teacher_dir: Path, pruned: tuple[Path, dict], healed: tuple[Path, dict]
) -> None:
    reference = healed[1]
    work = _job(tmp_path / "stopped", pruned, teacher_dir)
    asked = []

    def stop_after_three_steps() -> bool:
        asked.append(True)
        return len(asked) > 4  # one look before setup, then one before each step: stops before step 4

    with pytest.raises(HealStopped, match="before heal step 4"):
        run_heal(work, stop_requested=stop_after_three_steps)
    assert json.loads((work / "checkpoint" / "state.json").read_text())["step"] == 3
    assert jobs.read_result(work) is None and not (work / "model").exists()
    result = run_heal(work)
    assert result["resumed_from_step"] == 3 and result["steps_this_run"] == 3
    assert [p["step"] for p in jobs.read_progress(work)] == list(range(1, 7))
    want, got = _weights(Path(reference["out_dir"])), _weights(Path(result["out_dir"]))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0.0, atol=1e-6)
    assert result["loss_last"] == reference["loss_last"]


def test_a_changed_job_does_not_resume_a_stale_checkpoint(
    tmp_path: Path, teacher_dir: Path, pruned: tuple[Path, dict]
) -> None:
    work = _job(tmp_path / "heal", pruned, teacher_dir)
    with pytest.raises(HealStopped):
        run_heal(work, stop_requested=iter([False, False, True]).__next__)
    _job(tmp_path / "heal", pruned, teacher_dir, train_rows=ROWS[:5])
    with pytest.raises(ValueError, match="belongs to another heal job"):
        run_heal(work)


def test_a_sabotaged_heal_raises_non_finite_weights(
    tmp_path: Path, teacher_dir: Path, pruned: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = heal.distill_loss
    monkeypatch.setattr(heal, "distill_loss", lambda s, t: real(s, t) * math.nan)  # NaN injected into the gradient
    work = _job(tmp_path / "heal", pruned, teacher_dir)
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.\d\..*non-finite KL \(nan\)") as err:
        run_heal(work)
    assert err.value.layer.startswith("model.layers.") and isinstance(err.value, ValueError)
    assert not (work / "model").exists() and jobs.read_result(work) is None


def test_the_worker_records_non_finite_weights_for_the_cycle(
    tmp_path: Path, teacher_dir: Path, pruned: tuple[Path, dict]
) -> None:
    """A teacher with a NaN weight (in a child process, as the cycle runs it): failed.json, then the same error."""
    broken = tmp_path / "broken-teacher"
    AutoModelForCausalLM.from_pretrained(teacher_dir).save_pretrained(broken)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(broken)
    weights = _weights(broken)
    weights["model.norm.weight"][0] = math.nan
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    work = _job(tmp_path / "heal", pruned, broken)
    run = start_heal(work)
    assert run.wait(180) == 1
    error = heal_failure(work)
    assert isinstance(error, NonFiniteWeightsError) and error.layer.startswith("model.")
    assert "non-finite KL" in str(error)
    assert heal_failure(_job(tmp_path / "fine", pruned, teacher_dir)) is None


def test_sigterm_checkpoints_exits_143_and_resumes(tmp_path: Path, teacher_dir: Path, pruned: tuple[Path, dict]) -> None:
    work = _job(tmp_path / "heal", pruned, teacher_dir, pruning=PruningConfig(**{**PRUNING.__dict__, "heal_steps": 10}))
    run = start_heal(work)
    deadline = time.time() + 120
    while run.poll() is None and not jobs.read_progress(work) and time.time() < deadline:
        time.sleep(0.1)
    assert run.stop(timeout=60) == jobs.EXIT_STOPPED
    step = json.loads((work / "checkpoint" / "state.json").read_text())["step"]
    assert 1 <= step < 10 and run.result() is None and run.last_progress()["step"] == step
    result = run_heal(work)
    assert result["resumed_from_step"] == step and result["steps"] == 10


def test_write_heal_job_refuses_what_it_cannot_heal(tmp_path: Path, teacher_dir: Path, pruned: tuple[Path, dict]) -> None:
    student, report = pruned
    with pytest.raises(ValueError, match="nothing to heal"):
        write_heal_job(tmp_path / "a", student=student, teacher=teacher_dir, prune_report={**report, "layers_removed": []},
                       train_rows=ROWS, pruning=PRUNING)
    with pytest.raises(ValueError, match="heal_steps = 0"):
        write_heal_job(tmp_path / "b", student=student, teacher=teacher_dir, prune_report=report, train_rows=ROWS,
                       pruning=PruningConfig(heal_steps=0))
    work = _job(tmp_path / "c", pruned, teacher_dir, kept_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="maps 3 ids into a teacher of 49152"):
        run_heal(work)


def test_the_teacher_is_restricted_to_the_kept_vocabulary(teacher_dir: Path) -> None:
    """A student over a subset of the teacher's vocabulary compares with the teacher's logits at the kept ids."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    kept = torch.tensor([5, 2, 900, 17, 40000])
    weight, bias = heal.teacher_head(teacher, kept)
    hidden = torch.randn(3, teacher.config.hidden_size)
    full = teacher.get_output_embeddings()(hidden)
    torch.testing.assert_close(F.linear(hidden, weight, bias), full[:, kept])
    assert torch.equal(heal.teacher_ids(kept, torch.tensor([[0, 4, 2]])), torch.tensor([[5, 40000, 900]]))
