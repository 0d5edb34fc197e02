"""The `selftune` command as a user runs it: a real process, a real SQLite database, a tiny model."""

from __future__ import annotations

import json
import os
import pkgutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import selftune.daemon.cli
from selftune.daemon.context import Context
from selftune.daemon.cycle.control import worker_alive

SELFTUNE = str(Path(sys.executable).with_name("selftune"))
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "python_docs.jsonl"
CLI_MODULES = sorted(m.name for m in pkgutil.iter_modules(selftune.daemon.cli.__path__, "selftune.daemon.cli."))
SLOW_TO_IMPORT = ("torch", "transformers", "avalanche", "peft", "fastapi", "uvicorn", "matplotlib")


def selftune(state: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None,
             ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([SELFTUNE, "--state", str(state), *args], input=stdin, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=300)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def ingest_json(state: Path, *args: str, stdin: str | None = None) -> dict[str, int]:
    return json.loads(selftune(state, "ingest", *args, "--json", stdin=stdin).stdout)


def dump(state: Path) -> list[str]:
    """The whole database content, statement by statement."""
    with sqlite3.connect(state / "selftune.db") as con:
        return list(con.iterdump())


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "selftune.db-shm"}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    state = tmp_path_factory.mktemp("state")
    selftune(state, "init", "--foundation", str(tiny_model_dir))
    return state


def test_init_twice_changes_nothing(state: Path, tiny_model_dir: Path) -> None:
    before_db, before_files = dump(state), tree(state / "generations")
    result = selftune(state, "init", "--foundation", str(tiny_model_dir))
    assert "already initialised" in result.stdout
    assert dump(state) == before_db and tree(state / "generations") == before_files
    assert (state / "selftune.toml").read_text().startswith("# selftune configuration")


def test_ingest_is_idempotent(state: Path) -> None:
    rows = SAMPLE.read_text().count("\n")
    assert ingest_json(state, str(SAMPLE), "--branch", "main") == {"accepted": rows, "duplicates": 0, "rejected": 0}
    assert ingest_json(state, str(SAMPLE)) == {"accepted": 0, "duplicates": rows, "rejected": 0}


def test_ingest_from_stdin_in_every_format(state: Path) -> None:
    lines = [
        {"messages": [{"role": "user", "content": "stdin q1"}, {"role": "assistant", "content": "a1"}], "id": "s1"},
        {"conversations": [{"from": "human", "value": "stdin q2"}, {"from": "gpt", "value": "a2"}]},
        {"prompt": "stdin q3", "response": "a3", "feedback": "up", "domain": "misc"},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    assert ingest_json(state, "-", "--domain", "stdin", stdin=text) == {"accepted": 3, "duplicates": 0, "rejected": 0}
    domains = {row["domain"]: row["count"] for row in json.loads(selftune(state, "status", "--json").stdout)["interactions"]}
    assert domains["stdin"] == 2 and domains["misc"] == 1


def malformed_file(tmp_path: Path, bad_line: int, rows: int = 1000, prefix: str = "") -> Path:
    path = tmp_path / f"{prefix}rows.jsonl"
    with path.open("w") as out:
        for i in range(1, rows + 1):
            row = {"prompt": f"{prefix}p{i}", "response": f"r{i}"}
            out.write('{"prompt": "broken' if i == bad_line else json.dumps(row))
            out.write("\n")
    return path


def test_a_malformed_line_rejects_the_whole_file(state: Path, tmp_path: Path) -> None:
    before = dump(state)
    result = selftune(state, "ingest", str(malformed_file(tmp_path, bad_line=517)), ok=False)
    assert result.returncode != 0
    assert "line 517: not valid JSON" in result.stderr and "nothing was written" in result.stderr
    assert dump(state) == before


def test_skip_invalid_ingests_the_rest(state: Path, tmp_path: Path) -> None:
    path = malformed_file(tmp_path, bad_line=3, rows=10, prefix="skip-")
    result = selftune(state, "ingest", str(path), "--skip-invalid", "--json")
    assert json.loads(result.stdout) == {"accepted": 9, "duplicates": 0, "rejected": 1}
    assert "line 3" in result.stderr


def test_unknown_branch_and_format_are_refused(state: Path) -> None:
    result = selftune(state, "ingest", str(SAMPLE), "--branch", "nope", ok=False)
    assert result.returncode != 0 and "no branch 'nope'" in result.stderr and "selftune branch create" in result.stderr
    result = selftune(state, "ingest", str(SAMPLE), "--format", "csv", ok=False)
    assert result.returncode != 0 and "--format 'csv'" in result.stderr


def test_invalid_config_lists_every_problem(state: Path) -> None:
    result = selftune(state, "status", env={"SELFTUNE_SERVER__PORT": "0", "SELFTUNE_MODEL__THREADS": "-1"}, ok=False)
    assert result.returncode == 2
    assert "2 problem(s)" in result.stderr and "server.port = 0" in result.stderr and "model.threads = -1" in result.stderr


def test_generations_json_and_export(state: Path, tmp_path: Path) -> None:
    (generation,) = json.loads(selftune(state, "generations", "--json").stdout)
    assert generation == {"id": 0, "parent": None, "branch": "main", "status": "promoted",
                          "params": generation["params"], "path": str(state / "generations" / "0"),
                          "aliases": ["champion"]}
    assert generation["params"] > 0
    out = tmp_path / "exported"
    selftune(state, "export", "0", str(out))
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["id"] == 0 and manifest["params"] == generation["params"]
    load = "import sys; from transformers import AutoModelForCausalLM as M; print(M.from_pretrained(sys.argv[1]).num_parameters())"
    loaded = subprocess.run([sys.executable, "-c", load, str(out)], capture_output=True, text=True, check=True)
    assert int(loaded.stdout.split()[-1]) > 0
    assert selftune(state, "export", "7", str(tmp_path / "x"), ok=False).returncode != 0
    for name in ("main", "main@champion", "main@0"):  # the model names the API takes, too
        assert "exported generation 0" in selftune(state, "export", name, str(tmp_path / name)).stdout
        assert json.loads((tmp_path / name / "generation.json").read_text())["id"] == 0
    for name, problem in (("main@challenger", "branch 'main' has no challenger now"), ("nope", "no branch 'nope'"),
                          ("auto", "it chooses per request")):
        refused = selftune(state, "export", name, str(tmp_path / "refused"), ok=False)
        assert refused.returncode == 2 and problem in refused.stderr and "main" in refused.stderr, refused.stderr


def test_a_specialist_gets_the_rows_of_each_of_its_domains_and_keeps_them(state: Path) -> None:
    created = selftune(state, "branch", "create", "chemists", "--from", "0", "--domain", "chemistry",
                       "--domain", "elements")
    assert "chemistry, elements now go to it" in created.stdout
    rows = [{"prompt": f"specialist q{i}", "response": "a", "domain": d}
            for i, d in enumerate(["chemistry", "elements", "unrouted"])]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    assert ingest_json(state, "-", stdin=text)["accepted"] == 3
    counts = {(r["branch"], r["domain"]): r["count"] for r in json.loads(selftune(state, "status", "--json").stdout)
              ["interactions"]}
    assert counts[("chemists", "chemistry")] == counts[("chemists", "elements")] == counts[("main", "unrouted")] == 1
    before = dump(state)
    refused = selftune(state, "branch", "create", "rival", "--from", "0", "--domain", "physics", "--domain",
                       "elements", ok=False)
    assert refused.returncode == 2 and "domain 'elements' is routed to branch 'chemists'" in refused.stderr
    assert dump(state) == before
    auto = selftune(state, "branch", "create", "auto", "--from", "0", ok=False)  # the name that routes requests
    assert auto.returncode == 2 and "branch name 'auto' is the model name that routes" in auto.stderr
    assert dump(state) == before


def test_branch_set_refuses_a_bad_key_or_value_and_list_shows_each_setting_and_its_source(
        make_state: Callable[..., Path]) -> None:
    state = make_state("[branches.chem.gates]\nmax_params_ratio = 0.8\n")
    selftune(state, "branch", "create", "chem", "--from", "0", "--domain", "chemistry")
    before = dump(state)
    for args, message in ((("gates.max_param_ratio", "0.8"), "did you mean gates.max_params_ratio?"),
                          (("train.steps", "many"), "train.steps = 'many': expected a whole number"),
                          (("train.steps", "0"), "train.steps = 0: use 1 or more"),
                          (("server.port", "1"), "service-wide setting"),
                          (("train.steps",), "give a VALUE, or --unset")):
        result = selftune(state, "branch", "set", "chem", *args, ok=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr
    assert dump(state) == before
    assert "train.steps = 7" in selftune(state, "branch", "set", "chem", "train.steps", "7").stdout
    rows = {row["name"]: row for row in json.loads(selftune(state, "branch", "list", "--json").stdout)}
    assert (rows["main"]["specialist"], rows["main"]["domains"], rows["main"]["settings"]) == (False, [], [])
    chem = rows["chem"]
    assert (chem["specialist"], chem["domains"], chem["champion"], chem["stored"]) == (True, ["chemistry"], 0,
                                                                                        {"train.steps": 7})
    settings = {s["key"]: (s["value"], s["global"], s["source"]) for s in chem["settings"]}
    assert settings["train.steps"] == (7, 100, "branch set")
    assert settings["gates.max_params_ratio"] == (0.8, 1.0, "configuration")
    assert settings["pruning.enabled"] == (True, False, "specialist default")
    assert settings["gates.max_foundation_regression"][2] == "specialist default"
    shown = selftune(state, "branch", "list").stdout
    assert "train.steps = 7 (branch set; global 100)" in shown and "chemistry" in shown
    selftune(state, "branch", "set", "chem", "train.steps", "--unset")
    result = selftune(state, "branch", "unset", "chem", "train.steps", ok=False)
    assert "no stored setting train.steps" in result.stderr
    (chem,) = [row for row in json.loads(selftune(state, "branch", "list", "--json").stdout) if row["name"] == "chem"]
    assert chem["stored"] == {} and "train.steps" not in {s["key"] for s in chem["settings"]}


@pytest.mark.slow
def test_embedded_foundation_end_to_end(tmp_path: Path) -> None:
    """The issue's walk-through with the real SmolLM2-135M and the full python_docs file."""
    state = tmp_path / "state"
    selftune(state, "init")
    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "python_docs.jsonl"
    # python_docs.jsonl has 2,241 lines, two of which (2011 and 2033) are byte-identical.
    assert ingest_json(state, str(data)) == {"accepted": 2240, "duplicates": 1, "rejected": 0}
    assert ingest_json(state, str(data)) == {"accepted": 0, "duplicates": 2241, "rejected": 0}
    selftune(state, "export", "0", str(tmp_path / "gen0"))
    ask = ("import sys; from selftune.learners.evaluate import generate_answers, load_model; "
           "print(generate_answers(*load_model(sys.argv[1]), ['What is the capital of France?'])[0])")
    answer = subprocess.run([sys.executable, "-c", ask, str(tmp_path / "gen0")], capture_output=True, text=True,
                            check=True).stdout
    assert "Paris" in answer


@pytest.mark.parametrize("module", CLI_MODULES)
def test_each_cli_module_imports_on_its_own_and_lightly(module: str) -> None:
    """No import circle between the command modules, and no slow library loaded before a command needs it."""
    code = f"import sys, {module}; print(sorted(m for m in {SLOW_TO_IMPORT!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout


def test_cycle_runs_on_the_configured_default_branch(make_state: Callable[..., Path]) -> None:
    """Without --branch, `selftune cycle` acts on ingest.default_branch, as POST /v1/cycles does."""
    state = make_state('[ingest]\ndefault_branch = "side"\n')
    selftune(state, "branch", "create", "side", "--from", "0")
    started = json.loads(selftune(state, "cycle", "--json").stdout)
    assert started["branch"] == "side", started
    context = Context.open(str(state))  # the cycle has no new interactions: its worker soon ends it as skipped
    deadline = time.monotonic() + 300
    while worker_alive(context, started["cycle"]) and time.monotonic() < deadline:
        time.sleep(0.3)
    with context.store.transaction() as tx:
        assert tx.cycles.get(started["cycle"]).branch == "side"
    context.store.engine.dispose()
