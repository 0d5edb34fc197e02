"""A pruned candidate is judged like any other: a broken one is rejected and the branch's champion stays.

Each test stops the cycle's worker as ``evaluate`` begins (the failpoint of the crash tests), breaks the
healed model on disk as a diverged heal or a destructive cut would, and lets the cycle resume from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selftune.daemon.context import Context
from selftune.daemon.cycle import probes
from selftune.learners import evaluate as ev

from .test_cycle import SAMPLES, crash_at, cycle, selftune, state  # noqa: F401  (state: the fixture)

PRUNED = {"SELFTUNE_PRUNING__ENABLED": "true", "SELFTUNE_PRUNING__MLP_CHANNEL_FRACTION": "0.5",
          "SELFTUNE_PRUNING__HEAL_STEPS": "2"}


def break_healed_model(state: Path, cycle_id: int, change: "callable") -> None:
    path = state / "cycles" / str(cycle_id) / "healed" / "model.safetensors"
    tensors = load_file(path)
    save_file({name: change(name, t) for name, t in tensors.items()}, path)


def generations(state: Path) -> list[tuple[int, list[str]]]:
    return [(g["id"], g["aliases"]) for g in json.loads(selftune(state, "generations", "--json").stdout)]


def record_a_probe(state: Path) -> None:
    """The untrained tiny foundation ends no answer within the probe's length, so it records no probe (and its
    foundation gates are skipped): record one of real rows, with generation 0's loss on them, as init would."""
    rows = [{"prompt": r["prompt"], "answer": r["response"]}
            for r in map(json.loads, (SAMPLES / "chemistry_elements.jsonl").read_text().splitlines()[:8])]
    context = Context.open(str(state))
    measured = ev.held_out_loss(*ev.load_model(context.artifacts.path(0)), [probes._conversation(r) for r in rows])
    record = {"generation": 0, "rows": rows, **probes._loss_fields(measured)}
    (state / probes.PROBE_FILE).write_text(json.dumps(record))


def test_a_pruned_candidate_on_main_still_faces_the_five_percent_foundation_gate(state: Path) -> None:
    record_a_probe(state)
    cycle_id = crash_at(state, "evaluate", env=PRUNED)
    # a cut that broke what the foundation knew: the final norm scaled, the logits overconfident everywhere
    break_healed_model(state, cycle_id, lambda name, t: t * 30 if name == "model.norm.weight" else t)
    result = cycle(state, env=PRUNED)
    assert result["cycle"] == cycle_id and result["status"] == "rejected", result
    gates = {g["name"]: g for g in result["gates"]}
    probe = gates["foundation_regression"]
    assert probe["threshold"] == 0.05 and not probe["passed"] and probe["value"] > 0.05, probe  # main's own budget
    assert generations(state)[0] == (0, ["champion"]) and result["generation"] in (None, 1)


def test_a_sabotaged_heal_with_nan_weights_is_rejected_and_the_champion_stays(state: Path) -> None:
    cycle_id = crash_at(state, "evaluate", env=PRUNED)

    def one_nan(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.endswith("mlp.down_proj.weight"):
            tensor = tensor.clone()
            tensor[0, 0] = float("nan")
        return tensor

    break_healed_model(state, cycle_id, one_nan)
    result = cycle(state, env=PRUNED)
    assert result["cycle"] == cycle_id and result["status"] == "rejected", result
    broken = next(g for g in result["gates"] if g["name"] == "finite_weights")
    assert not broken["passed"] and "down_proj" in broken["reason"], broken
    champions = [g for g in generations(state) if "champion" in g[1]]
    assert champions == [(0, ["champion"])]
