"""Ingest throughput and memory: `selftune ingest` of a large JSONL file into SQLite.

Baseline, in the same run: the bare floor -- one Python process that json-decodes the same file and
inserts (branch, key, messages) with stdlib sqlite3 `executemany`, no validation, no ORM.
Usage: .venv/bin/python bench/bench_ingest.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

DATA = Path(__file__).resolve().parents[1] / "data" / "sample"
BASELINE = r"""
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[2]); con.execute("PRAGMA journal_mode=WAL"); con.execute("PRAGMA synchronous=NORMAL")
con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, branch TEXT, key TEXT, messages TEXT, UNIQUE(branch, key))")
batch = []
with open(sys.argv[1], "rb") as f:
    for line in f:
        row = json.loads(line)
        batch.append(("main", row["id"], json.dumps([row["prompt"], row["response"]])))
        if len(batch) == 5000:
            with con: con.executemany("INSERT INTO t (branch, key, messages) VALUES (?,?,?) ON CONFLICT DO NOTHING", batch)
            batch = []
    with con: con.executemany("INSERT INTO t (branch, key, messages) VALUES (?,?,?) ON CONFLICT DO NOTHING", batch)
"""


def make_file(path: Path, rows: int) -> None:
    """``rows`` distinct rows made from the bundled real samples (an id keeps each one distinct)."""
    seeds = [json.loads(line) for f in sorted(DATA.glob("*.jsonl")) for line in f.open()]
    with path.open("w") as out:
        for i in range(rows):
            seed = seeds[i % len(seeds)]
            out.write(json.dumps({"id": f"r{i}", "prompt": seed["prompt"], "response": seed["response"],
                                  "domain": seed["domain"]}) + "\n")


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB (sampled every 10 ms), and stdout of a command."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    out, errs = proc.communicate()
    if proc.returncode:
        sys.exit(f"{cmd} failed:\n{errs}")
    return time.perf_counter() - start, peak / 2**20, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    selftune = str(Path(sys.executable).with_name("selftune"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "rows.jsonl"
        make_file(data, args.rows)
        state = work / "state"
        # A state with its database and the main branch, without materialising a model.
        subprocess.run([sys.executable, "-c", INIT_DB, str(state)], check=True)
        base_s, base_mb, _ = timed([sys.executable, "-c", BASELINE, str(data), str(work / "baseline.db")])
        ours_s, ours_mb, out = timed([selftune, "--state", str(state), "ingest", str(data), "--json"])
        again_s, _, again = timed([selftune, "--state", str(state), "ingest", str(data), "--json"])
    counts, counts_again = json.loads(out), json.loads(again)
    assert counts["accepted"] == args.rows and counts_again["duplicates"] == args.rows, (counts, counts_again)
    table = Table(title=f"Ingest of {args.rows:,} rows into SQLite")
    for column in ("run", "seconds", "rows/s", "peak RSS MB", "vs baseline"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for name, seconds, mb in (("baseline: stdlib sqlite3 executemany, no checks", base_s, base_mb),
                              ("selftune ingest (new rows)", ours_s, ours_mb),
                              ("selftune ingest (same file again: all duplicates)", again_s, None)):
        table.add_row(name, f"{seconds:.2f}", f"{args.rows / seconds:,.0f}", "-" if mb is None else f"{mb:.0f}",
                      f"{base_s / seconds:.2f}x")
    Console().print(table)
    print(f"targets: >= 20,000 rows/s -> {args.rows / ours_s:,.0f}; peak RSS < 500 MB -> {ours_mb:.0f} MB")


INIT_DB = r"""
import sys
from selftune.daemon.context import Context
ctx = Context.open(sys.argv[1])
with ctx.store.transaction(write=True) as tx:
    tx.branches.create("main")
"""

if __name__ == "__main__":
    main()
