"""A pruned generation against its parent: parameters and decode tokens/s measured in one run.

Builds the case end to end with the real SmolLM2-135M unless --state names an existing one: `selftune
init` (embedded default), ingest of the first 80% of python_docs, one cycle with pruning on (MLP channels
and decoder layers scored on the branch's traffic, then a short LoRA heal), so the candidate is trained,
pruned, healed, evaluated and gated like any generation. Then, in this process, parent and child decode the
same prompt greedily, interleaved for --rounds rounds (``speed.compare_decode_speed``: same threads, same
prompt, same token count),
and a fresh process loads the child with AutoModelForCausalLM.from_pretrained. Prints one table: the
child over its parent (the baseline) for parameters and decode speed, and the cycle's gates.

    .venv/bin/python bench/bench_pruning.py                       # ~15 min on 2 cores
    .venv/bin/python bench/bench_pruning.py --state DIR --generation 1  # measure an existing generation
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from selftune.learners.evaluate import load_model, parameter_count
from selftune.learners.lm import set_threads
from selftune.learners.speed import compare_decode_speed

ROOT = Path(__file__).resolve().parents[1]
SELFTUNE = str(Path(sys.executable).with_name("selftune"))
PYTHON_DOCS = ROOT.parent / "shared" / "data" / "python_docs.jsonl"
PRUNING = {"SELFTUNE_PRUNING__ENABLED": "true"}


def selftune(state: Path, *args: str, env: dict[str, str]) -> str:
    result = subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True,
                            env={**os.environ, **env})
    if result.returncode != 0:
        raise SystemExit(f"selftune {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def build(state: Path, threads: int) -> tuple[int, dict]:
    """A fresh state, 80% of python_docs, one pruning cycle: (generation id, cycle result)."""
    env = {**PRUNING, "SELFTUNE_TRAIN__THREADS": str(threads)}
    lines = PYTHON_DOCS.read_text().splitlines(keepends=True)
    data = state.parent / "python80.jsonl"
    data.write_text("".join(lines[: len(lines) * 8 // 10]))
    selftune(state, "init", env=env)
    selftune(state, "ingest", str(data), env=env)
    result = json.loads(selftune(state, "cycle", "--wait", "--json", env=env))
    if result["generation"] is None:
        raise SystemExit(f"the cycle made no generation: {result}")
    return result["generation"], result


def loads_in_a_fresh_process(directory: Path) -> int:
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, help="an existing state directory (default: build one in a temp dir)")
    p.add_argument("--generation", type=int, help="the pruned generation to measure (with --state)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and for the decode timing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (parent, child) per model")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()

    result = None
    if args.state is None:
        state = Path(tempfile.mkdtemp(prefix="selftune-bench-pruning-")) / "state"
        generation, result = build(state, args.threads)
    else:
        if args.generation is None:
            raise SystemExit("--state needs --generation: the id of the pruned generation to measure")
        state, generation = args.state, args.generation
    child_dir = state / "generations" / str(generation)
    manifest = json.loads((child_dir / "generation.json").read_text())
    parent_dir = state / "generations" / str(manifest["parent"])

    set_threads(args.threads)
    parent, tokenizer = load_model(parent_dir, dtype=torch.float32)
    child, child_tokenizer = load_model(child_dir, dtype=torch.float32)
    # interleaved, so that drift of the machine's load hits both alike
    speed = compare_decode_speed(parent, child, tokenizer, child_tokenizer, new_tokens=args.new_tokens,
                                 rounds=args.rounds)
    params = {"parent": parameter_count(parent), "child": parameter_count(child)}
    fresh_params = loads_in_a_fresh_process(child_dir)

    console = Console()
    table = Table(title=f"generation {generation} (pruned) vs its parent {manifest['parent']} (baseline), {args.threads} thread(s)")
    for column in ("measure", "parent", "child", "child / parent"):
        table.add_column(column, justify="right")
    table.add_row("parameters", f"{params['parent']:,}", f"{params['child']:,}", f"{params['child'] / params['parent']:.3f}")
    table.add_row("decode tokens/s (median)", f"{speed.a.tokens_per_s:.1f}", f"{speed.b.tokens_per_s:.1f}",
                  f"{speed.ratio:.2f}x")
    pruning = manifest["pruning"]
    table.add_row("decoder layers", str(pruning.get("layers_before")), str(pruning.get("layers_after")), "")
    table.add_row("MLP intermediate size", str(pruning.get("intermediate_size_before")),
                  str(pruning.get("intermediate_size_after")), "")
    console.print(table)
    gates = Table(title=f"gates of generation {generation}: {manifest['status']}")
    for column in ("gate", "passed", "value", "threshold"):
        gates.add_column(column)
    for gate in manifest["gates"]:
        gates.add_row(gate["name"], "yes" if gate["passed"] else "NO", _fmt(gate.get("value")), _fmt(gate.get("threshold")))
    console.print(gates)
    console.print(f"fresh process: AutoModelForCausalLM.from_pretrained({child_dir}) -> {fresh_params:,} parameters")
    console.print(f"decode tokens/s per round: parent {list(speed.a.runs)}, child {list(speed.b.runs)}")
    if result is not None:
        console.print(f"cycle: {json.dumps({k: result[k] for k in ('cycle', 'generation', 'status')})}; state {state}")


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
