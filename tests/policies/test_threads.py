"""A cycle's torch threads: every core from the CLI, all but one while `selftune serve` holds the state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from selftune.policies.config import Config
from selftune.policies.training import cycle_threads

from selftune.daemon.context import Context
from selftune.daemon.cycle.control import service_lock, service_running


@pytest.mark.parametrize(("configured", "cores", "serving", "threads"), [
    (0, 8, False, 8),   # a cycle from the CLI, no service: every core
    (0, 8, True, 7),    # under `selftune serve`: one core left for serving
    (0, 2, True, 1),
    (0, 1, True, 1),    # never fewer than one
    (0, 1, False, 1),
    (3, 8, True, 3),    # train.threads set: as configured, service or not
    (3, 8, False, 3),
    (16, 2, False, 16),
])
def test_cycle_threads(configured: int, cores: int, serving: bool, threads: int) -> None:
    assert cycle_threads(configured, cores, serving) == threads


def test_a_cycle_leaves_a_core_only_while_a_service_holds_the_state(tmp_path: Path) -> None:
    context = Context(tmp_path / "state", tmp_path / "config.toml", Config())
    assert not service_running(context)  # no service has ever run here
    assert cycle_threads(0, 4, service_running(context)) == 4
    with service_lock(context):  # what `selftune serve` holds while it runs
        assert service_running(context)
        assert cycle_threads(0, 4, service_running(context)) == 3
        assert service_running(context)  # looking took nothing from the service
        assert _seen_from_another_process(context) == "True"  # as the cycle's worker, a process of its own, sees it
    assert not service_running(context)  # the service ended: its lock is gone with it
    assert cycle_threads(0, 4, service_running(context)) == 4


def _seen_from_another_process(context: Context) -> str:
    code = ("import sys; from pathlib import Path; from selftune.daemon.cycle.control import service_running; "
            "from types import SimpleNamespace; print(service_running(SimpleNamespace(state=Path(sys.argv[1]))))")
    return subprocess.run([sys.executable, "-c", code, str(context.state)], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()
