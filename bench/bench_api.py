"""HTTP API throughput and latency of a real `selftune serve` on SQLite, idle and while a cycle trains.

1. batched ingest: ROWS distinct interactions in 100-row POSTs from CLIENTS concurrent keep-alive
   connections (branch "bench", so the cycle below does not have to read them);
2. single POSTs, one row each, one after the other, while nothing else runs (idle);
3. the same single POSTs while a cycle of branch "main" is training (its first step done, so the model is
   loaded; the worker at its configured nice level and threads), on the python_docs interactions
   ingested first. Single POSTs go at --rate per second, one at a time.

The clients run on the same machine as the service (and share its cores). Prints one table.
Usage: .venv/bin/python bench/bench_api.py [--foundation embedded|DIR] [--rows 50000] [--singles 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
SELFTUNE = str(Path(sys.executable).with_name("selftune"))
TRAINING_DATA = ROOT.parent / "shared" / "data" / "python_docs.jsonl"
FALLBACK_DATA = ROOT / "data" / "sample" / "python_docs.jsonl"
BATCH = 100


def selftune(state: Path, *args: str) -> str:
    result = subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"selftune {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def seed_rows() -> list[dict[str, Any]]:
    source = TRAINING_DATA if TRAINING_DATA.exists() else FALLBACK_DATA
    return [json.loads(line) for line in source.read_text().splitlines() if line.strip()]


def bulk_rows(count: int, seeds: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """Real prompts and responses, each row distinct by its external id."""
    picked = (seeds[i % len(seeds)] for i in range(count))
    return [{"id": f"{tag}-{i}", "prompt": seed["prompt"], "response": seed["response"], "domain": seed.get("domain")}
            for i, seed in enumerate(picked)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def batched_ingest(url: str, token: str, rows: list[dict[str, Any]], clients: int) -> tuple[float, list[float]]:
    """Rows/s of the whole run, and each POST's seconds."""
    batches = [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]
    latencies: list[float] = []
    lock = threading.Lock()
    failures: list[str] = []

    def client(part: list[list[dict[str, Any]]]) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            for batch in part:
                started = time.perf_counter()
                response = http.post("/v1/interactions?branch=bench", content=json.dumps(batch),
                                     headers={"content-type": "application/json"})
                elapsed = time.perf_counter() - started
                if response.status_code != 200 or response.json()["accepted"] != len(batch):
                    failures.append(response.text[:200])
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(batches[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} batched POSTs failed, e.g. {failures[0]}")
    return len(rows) / wall, latencies


def single_posts(url: str, token: str, rows: list[dict[str, Any]], rate: float, until: Any = None) -> list[float]:
    """Seconds of each single-row POST, sent one at a time at ``rate`` per second (as an application logging its
    traffic would); stops early when ``until()`` is true."""
    latencies = []
    start = time.perf_counter()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        for index, row in enumerate(rows):
            if until is not None and until():
                break
            time.sleep(max(0.0, start + index / rate - time.perf_counter()))
            started = time.perf_counter()
            response = http.post("/v1/interactions?branch=bench", content=json.dumps(row),
                                 headers={"content-type": "application/json"})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise SystemExit(f"single POST failed: {response.text[:300]}")
    return latencies


def wait_for_training(http: httpx.Client, cycle_id: int, state: str, timeout: float) -> dict[str, Any]:
    """Wait until the cycle is in ``state`` and its trainer has finished a first step (the model is loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cycle = http.get(f"/v1/cycles/{cycle_id}").json()
        if cycle["state"] == state and cycle["status"] == "running" and (cycle.get("progress") or {}).get("step"):
            return cycle
        if cycle["status"] != "running":
            raise SystemExit(f"cycle {cycle_id} ended ({cycle['status']}: {cycle.get('error')}) "
                             f"before its {state} step")
        time.sleep(1)
    raise SystemExit(f"cycle {cycle_id} did not reach {state} within {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--foundation", default="embedded", help='"embedded" (SmolLM2-135M) or a model directory')
    parser.add_argument("--rows", type=int, default=50_000, help="rows for the batched-ingest run")
    parser.add_argument("--clients", type=int, default=4, help="concurrent connections for the batched run")
    parser.add_argument("--singles", type=int, default=1000, help="single POSTs per latency run")
    parser.add_argument("--rate", type=float, default=20.0, help="single POSTs per second")
    parser.add_argument("--state", help="state directory to use (default: a new temporary one)")
    args = parser.parse_args()

    state = Path(args.state or tempfile.mkdtemp(prefix="selftune-bench-api-"))
    console = Console()
    console.print(f"state: {state}; foundation: {args.foundation}")
    selftune(state, "init", "--foundation", args.foundation)
    os.environ["SELFTUNE_SCHEDULE__ENABLED"] = "false"  # cycles only when this script asks for one
    if "bench" not in selftune(state, "branch", "list", "--json"):
        selftune(state, "branch", "create", "bench", "--from", "0")
    admin = selftune(state, "token", "create", "--scope", "admin", "--name", "bench-admin").split()[-1]
    token = selftune(state, "token", "create", "--scope", "ingest", "--name", "bench-ingest").split()[-1]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(state / "bench-serve.log", "ab")  # noqa: SIM115 - open for the server's whole life
    server = subprocess.Popen([SELFTUNE, "--state", str(state), "serve", "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the service did not become ready; see {state / 'bench-serve.log'}")
            time.sleep(0.5)
        seeds = seed_rows()
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=120)
        for i in range(0, len(seeds), BATCH):  # the cycle's training data, on main
            http.post("/v1/interactions", json=[{**row, "id": f"train-{i + j}"} for j, row in
                                                enumerate(seeds[i:i + BATCH])]).raise_for_status()

        run = time.strftime("%H%M%S")
        bulk_rate, bulk_latencies = batched_ingest(url, token, bulk_rows(args.rows, seeds, f"bulk{run}"), args.clients)
        idle = single_posts(url, token, bulk_rows(args.singles, seeds, f"idle{run}"), args.rate)

        cycle_id = http.post("/v1/cycles", json={"branch": "main"}).json()["cycle"]
        console.print(f"cycle {cycle_id} started; waiting for its train step")
        first = wait_for_training(http, cycle_id, "train", timeout=1800)
        console.print(f"training: step {first['progress']['step']} of {first['progress'].get('total_steps')}")

        def training_over() -> bool:
            return http.get(f"/v1/cycles/{cycle_id}").json()["state"] != "train"

        checks = {"n": 0}

        def still_training() -> bool:  # look every 50 posts, so the check costs little
            checks["n"] += 1
            return checks["n"] % 50 == 0 and training_over()

        busy = single_posts(url, token, bulk_rows(args.singles, seeds, f"busy{run}"), args.rate, until=still_training)
        cycle = http.get(f"/v1/cycles/{cycle_id}").json()
        trained_throughout = cycle["state"] == "train"
        console.print(f"training went on to step {(cycle.get('progress') or {}).get('step')}")
        if cycle["status"] == "running":
            http.delete(f"/v1/cycles/{cycle_id}")
            while http.get(f"/v1/cycles/{cycle_id}").json()["status"] == "running":  # it checkpoints and stops
                time.sleep(1)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)

    table = Table(title=f"selftune API on SQLite ({os.cpu_count()} CPUs, clients on the same machine)")
    for column in ("measurement", "requests", "result", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "measurement" else "right")

    def row(name: str, latencies: list[float], result: str) -> None:
        table.add_row(name, f"{len(latencies):,}", result, f"{statistics.median(latencies) * 1000:.1f}",
                      f"{percentile(latencies, 99) * 1000:.1f}", f"{max(latencies) * 1000:.1f}")

    row(f"batched ingest, {BATCH}-row POSTs, {args.clients} clients", bulk_latencies, f"{bulk_rate:,.0f} rows/s")
    row(f"single-row POST at {args.rate:g}/s, idle", idle, "-")
    row(f"single-row POST at {args.rate:g}/s, cycle training" + ("" if trained_throughout else
                                                                  " (train step ended early)"), busy, "-")
    console.print(table)
    console.print(f"goals: batched >= 5,000 rows/s -> {'met' if bulk_rate >= 5000 else 'MISSED'}; "
                  f"single POST p99 < 50 ms while training -> "
                  f"{'met' if percentile(busy, 99) < 0.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
