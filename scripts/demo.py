"""`make demo`: the service on the embedded SmolLM2-135M, fed real interactions over HTTP in two waves.

The "N new interactions" trigger starts a cycle after each wave; the demo prints each cycle's gates
and where the reports and the lineage page are, then stops the service with SIGTERM, as systemd would.
Usage: .venv/bin/python scripts/demo.py [--state .selftune-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SELFTUNE = str(Path(sys.executable).with_name("selftune"))
WAVES = [ROOT / "data" / "sample" / "python_docs.jsonl", ROOT / "data" / "sample" / "chemistry_elements.jsonl"]
CONFIG = """\
# The demo's settings: short cycles, so that two of them fit in a few minutes on 2 cores. A couple of
# hundred rows a cycle: a quarter of the default learning rate, 3 of 8 slots for the foundation's
# rehearsal (at the defaults the first cycle learned python_docs 15% but drifted 12% from the foundation;
# at half the rate, 9% and 5.2%).
[schedule]
min_new_interactions = 100
check_seconds = 5
[train]
steps = 40
max_length = 192
learning_rate = 5e-5
[replay]
rehearsal_ratio = 0.375
[cycle]
max_eval_rows = 32
sample_answers = 3
[ewc]
fisher_examples = 32
"""
console = Console()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", default=str(ROOT / ".selftune-demo"))
    state = Path(parser.parse_args().state).resolve()
    started = time.time()
    state.mkdir(parents=True, exist_ok=True)
    if not (state / "selftune.toml").exists():
        (state / "selftune.toml").write_text(CONFIG)
    run(state, "init")
    token = run(state, "token", "create", "--scope", "admin", "--name", "demo").split()[-1]
    port = free_port()
    console.rule(f"selftune serve on http://127.0.0.1:{port}")
    service = subprocess.Popen([SELFTUNE, "--state", str(state), "serve", "--port", str(port)],
                               stderr=open(state / "demo-serve.log", "ab"))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                          timeout=120)
    try:
        wait_ready(client)
        for number, wave in enumerate(WAVES, start=1):
            generations_before = len(client.get("/v1/generations").json())
            rows = [json.loads(line) for line in wave.read_text().splitlines()]
            for start in range(0, len(rows), 100):
                client.post("/v1/interactions", json=rows[start:start + 100]).raise_for_status()
            console.print(f"wave {number}: posted {len(rows)} interactions of {wave.stem}; "
                          "waiting for the trigger's cycle...")
            show_cycle(client, wait_for_cycle(client, generations_before))
        answer = client.post("/v1/chat/completions", json={
            "model": "main", "messages": [{"role": "user", "content": "What is the atomic number of Carbon?"}],
            "max_tokens": 32}).json()
        console.print(f"champion {answer['system_fingerprint']} answers: {answer['choices'][0]['message']['content']!r}")
    finally:
        service.send_signal(signal.SIGTERM)
        code = service.wait(timeout=120)
        console.print(f"service stopped (exit status {code})")
    console.rule("where to look")
    console.print(f"reports:  {state / 'generations'}/<id>/report.html  (or `selftune --state {state} report GEN`)")
    console.print(f"lineage:  `selftune --state {state} generations --tree`, or, while serving, "
                  "http://HOST:PORT/v1/lineage?token=<admin token> in a browser (`selftune token create --scope admin`)")
    run(state, "generations", "--tree", show=True)
    console.print(f"demo finished in {(time.time() - started) / 60:.1f} minutes")


def run(state: Path, *args: str, show: bool = False) -> str:
    result = subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"selftune {' '.join(args)} failed:\n{result.stderr}")
    if show:
        print(result.stdout)
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(client: httpx.Client, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    sys.exit("the service did not become ready; see demo-serve.log in the state directory")


def wait_for_cycle(client: httpx.Client, generations_before: int, timeout: float = 1800) -> int:
    """The id of the cycle that made the next generation (promoted or rejected)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        generations = client.get("/v1/generations").json()
        if len(generations) > generations_before:
            return client.get(f"/v1/generations/{generations[-1]['id']}").json()["cycle"]
        time.sleep(5)
    sys.exit("no cycle finished in time; see demo-serve.log and cycles/*/worker.log in the state directory")


def show_cycle(client: httpx.Client, cycle_id: int) -> None:
    view = client.get(f"/v1/cycles/{cycle_id}").json()
    table = Table(title=f"cycle {cycle_id} -> generation {view['generation']}: {view['status']}")
    for column in ("gate", "passed", "value", "threshold", "margin"):
        table.add_column(column)
    for gate in view["gates"]:
        table.add_row(gate["name"], "[green]yes[/]" if gate["passed"] else "[red]no[/]",
                      *(f"{gate[k]:.4g}" if isinstance(gate[k], float) else str(gate[k]) for k in ("value", "threshold", "margin")))
    console.print(table)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
