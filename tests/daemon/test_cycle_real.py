"""The real SmolLM2-135M through a whole cycle (slow: minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SELFTUNE = str(Path(sys.executable).with_name("selftune"))
PYTHON_DOCS = Path(__file__).resolve().parents[3] / "shared" / "data" / "python_docs.jsonl"


@pytest.mark.slow
def test_generation_1_learns_python_docs_without_losing_the_foundation(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first_80 = tmp_path / "python80.jsonl"
    lines = PYTHON_DOCS.read_text().splitlines(keepends=True)
    first_80.write_text("".join(lines[: len(lines) * 8 // 10]))

    def selftune(*args: str) -> str:
        result = subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True,
                                env=os.environ, timeout=3600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    selftune("init")
    selftune("ingest", str(first_80))
    result = json.loads(selftune("cycle", "--wait", "--json"))
    assert result["status"] == "promoted", result
    gates = {g["name"]: g for g in result["gates"]}
    assert gates["new_data_improvement"]["value"] >= 0.10, gates["new_data_improvement"]
    assert gates["foundation_regression"]["passed"], gates["foundation_regression"]
    assert gates["foundation_drift"]["passed"], gates["foundation_drift"]
