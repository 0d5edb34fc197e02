"""Specialists, pruned against unpruned: one cycle per domain through the product, both arms in the same run.

For each shared domain (``../shared/data``: python_docs, hacker_jargon, devils_dictionary, chemistry_elements) the
rows are shuffled by a fixed seed (``--rows`` caps them); every fifth is the bench's own held-out set, never
ingested; the other 80% go through the real product path, once per arm, each arm in a state directory of its own:
``selftune init`` (generation 0), ``selftune branch create D --from 0 --domain D`` (a specialist: pruning on by its
defaults; the unpruned arm adds ``selftune branch set D pruning.enabled false``), ``selftune ingest`` (the rows,
their domain named so ingest routes them to the branch; the cycle splits them into train/held-out itself), then
``selftune cycle --branch D --wait``, timed by wall clock. The arms are interleaved: pruned first in one domain,
unpruned first in the next.

The foundation is converted once (``selftune init`` in ``<workdir>/foundation``, then ``selftune export 0``) and
each arm's state is initialised from that export (a copy, no conversion); generation 0's probe and rehearsal
answers, which a state records on its first cycle, are recorded once there and copied into each arm's state, so
the cycle times hold no one-time work. Those times are printed apart (SmolLM2 on 2 cores: conversion ~50 s,
probe and rehearsal answers ~7 min at 1 thread); a later run with the same ``--workdir`` reuses them.

Printed per domain, for the parent (generation 0), the unpruned and the pruned generation: parameters and their
ratio to the parent; decode tokens/s at batch 1, greedy, on the same held-out prompts, each generation timed
interleaved with the parent in rounds in this process (``speed.compare_decode_speed``; median of every timing) and
the ratio to the parent; the loss per byte of
answer text on the bench's held-out rows (each model with its own tokenizer; bf16 autocast where the CPU computes
bf16, as the cycle's gates measure, ``--eval-fp32`` for float32: 2.4x slower, 0.02% apart on SmolLM2); the foundation
probe loss (generation.json); the cycle's wall time; promoted or not; whether it loads with ``from_pretrained`` in a fresh
Python process and generates. Then the targets, PASS/FAIL per domain: the pruned generation has >= 20% fewer
parameters than the parent, decodes >= 1.25x the parent's tokens/s, its held-out loss is within +2% of the
unpruned arm's, it is promoted, it loads fresh, and its cycle takes <= 2x the unpruned one's.

    .venv/bin/python bench/bench_specialists.py                                # all four domains (~1 h on 2 cores)
    .venv/bin/python bench/bench_specialists.py --domains hacker_jargon --reuse  # rerun what is missing, reprint
    .venv/bin/python bench/bench_specialists.py --foundation DIR --domains hacker_jargon --rows 60 --steps 2 \\
        --set pruning.heal_steps=2 --workdir /tmp/selftune-bench/specialists-smoke  # a tiny model: a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DOMAINS = ("python_docs", "hacker_jargon", "devils_dictionary", "chemistry_elements")
SELFTUNE = str(Path(sys.executable).with_name("selftune"))
TARGETS = {"params": 0.80, "decode": 1.25, "loss": 0.02, "cycle": 2.0}
"""Pruned params <= 0.80x the parent's; decode >= 1.25x the parent's; held-out loss <= unpruned's +2%; cycle <= 2x."""
FRESH_LOAD = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
text = tokenizer.apply_chat_template([{"role": "user", "content": "What is a kludge?"}], tokenize=False,
                                     add_generation_prompt=True)
ids = tokenizer(text, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
print(json.dumps({"new_tokens": out.shape[1] - ids["input_ids"].shape[1]}))
"""


def selftune(state: Path, *args: str) -> str:
    """Run a ``selftune`` command on a state directory; its standard output, or an error naming what it said."""
    done = subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"selftune {' '.join(args)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done.stdout


def last_json(text: str) -> Any:
    """A command's JSON output: all of it (indented), or its last line that is a document (after other lines)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    return json.loads(next(line for line in reversed(text.splitlines()) if line.startswith(("{", "["))))


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def bf16_verdict() -> str:
    import torch

    from selftune.learners.lm import BF16_CPU_FEATURES, bf16_in_hardware

    capabilities = getattr(torch.cpu, "get_capabilities", lambda: {})()
    found = [name for name in BF16_CPU_FEATURES if capabilities.get(name)]
    return (f"bf16 in hardware ({', '.join(found)}): training and the cycle's evaluation autocast to bf16" if
            bf16_in_hardware(capabilities) else "no bf16 in hardware (AVX2 or older): everything runs in float32")


def split_rows(domain: str, cap: int | None, data: Path = DATA) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the 80% to ingest, the bench's own 20% held out): a fixed shuffle, capped, every fifth row held out.

    Each row's domain is the file's name, which the branch is scoped to (the files' own ``domain`` fields differ
    for two of them: "python", "chemistry")."""
    lines = (data / f"{domain}.jsonl").read_text().splitlines()
    rows = [{**json.loads(line), "id": f"{domain}:{i}", "domain": domain} for i, line in enumerate(lines)]
    random.Random(f"bench_specialists:{domain}").shuffle(rows)
    rows = rows[:cap] if cap else rows
    return [r for i, r in enumerate(rows) if i % 5], [r for i, r in enumerate(rows) if not i % 5]


def prepare_foundation(args: argparse.Namespace) -> dict[str, Any]:
    """Generation 0 converted once (``selftune init``), exported as a model directory, its probe answers recorded."""
    root = args.workdir / "foundation"
    record = root / "foundation.json"
    if record.exists():
        facts = json.loads(record.read_text())
        if facts["source"] == args.foundation:
            return {**facts, "reused": True}
        sys.exit(f"{root} holds generation 0 made from {facts['source']!r}, not {args.foundation!r}: "
                 "pass another --workdir, or delete that directory")
    shutil.rmtree(root, ignore_errors=True)
    state, model = root / "state", root / "model"
    started = time.perf_counter()
    selftune(state, "init", "--foundation", args.foundation)
    init_s = time.perf_counter() - started
    started = time.perf_counter()
    selftune(state, "export", "0", str(model))
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    record_probes(state)
    facts = {"source": args.foundation, "state": str(state), "model": str(model), "init_s": round(init_s, 1),
             "export_s": round(export_s, 1), "probe_s": round(time.perf_counter() - started, 1)}
    record.write_text(json.dumps(facts, indent=1))
    return {**facts, "reused": False}


def record_probes(state: Path) -> None:
    """Generation 0's answers to the probe and rehearsal prompts, recorded in ``state`` as a first cycle would."""
    from selftune.daemon.context import Context
    from selftune.daemon.cycle.probes import foundation_probe, foundation_rehearsal

    context = Context.open(str(state))
    foundation_probe(context)
    foundation_rehearsal(context, 1)  # records every rehearsal answer; a cycle takes its share of them
    context.store.engine.dispose()


def run_arm(args: argparse.Namespace, domain: str, arm: str, rows: list[dict[str, Any]],
            foundation: dict[str, Any]) -> dict[str, Any]:
    """One arm: its own state from the exported foundation, the specialist branch, the rows ingested, one cycle."""
    from selftune.daemon.cycle.probes import PROBE_FILE, REHEARSAL_FILE

    root = args.workdir / domain / arm
    settings = {"foundation": args.foundation, "rows": len(rows), "steps": args.steps, "set": args.set}
    done = root / "result.json"
    if args.reuse and done.exists() and (old := json.loads(done.read_text())).get("settings") == settings:
        return {**old, "reused": True}
    shutil.rmtree(root, ignore_errors=True)
    state = root / "state"
    started = time.perf_counter()
    selftune(state, "init", "--foundation", foundation["model"])
    init_s = time.perf_counter() - started
    for name in (PROBE_FILE, REHEARSAL_FILE):
        shutil.copy2(Path(foundation["state"]) / name, state / name)
    selftune(state, "branch", "create", domain, "--from", "0", "--domain", domain)
    branch_settings = ([("pruning.enabled", "false")] if arm == "unpruned" else []) + \
        ([("train.steps", str(args.steps))] if args.steps else []) + [tuple(s.split("=", 1)) for s in args.set]
    for key, value in branch_settings:
        selftune(state, "branch", "set", domain, key, value)
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingested = last_json(selftune(state, "ingest", str(root / "rows.jsonl"), "--json"))
    result: dict[str, Any] = {"settings": settings, "state": str(state), "init_s": round(init_s, 1), "ingest": ingested,
                              "parent_path": str(state / "generations" / "0")}
    started = time.perf_counter()
    try:
        cycle = last_json(selftune(state, "cycle", "--branch", domain, "--wait", "--json"))
    except RuntimeError as exc:
        cycle = {"status": "failed", "generation": None, "error": str(exc)}
    result.update(cycle_s=round(time.perf_counter() - started, 1), cycle=cycle, step_s=step_seconds(state, cycle))
    generation = cycle.get("generation")
    if generation is not None:
        view = next(g for g in last_json(selftune(state, "generations", "--json")) if g["id"] == generation)
        manifest = json.loads((Path(view["path"]) / "generation.json").read_text())
        result.update(generation=generation, path=view["path"], status=view["status"], manifest=manifest_facts(manifest))
    done.write_text(json.dumps(result, indent=1))
    return {**result, "reused": False}


def step_seconds(state: Path, cycle: dict[str, Any]) -> dict[str, float]:
    """Seconds of each step of the cycle, from the product's cycle view (empty where it cannot be read)."""
    try:
        from selftune.daemon.context import Context
        from selftune.daemon.views import cycle_view

        context = Context.open(str(state))
        steps = cycle_view(context, int(cycle["cycle"]))["steps"]
        context.store.engine.dispose()
        return {s["step"]: round(float(s["detail"]["seconds"]), 1) for s in steps if "seconds" in (s["detail"] or {})}
    except Exception:  # noqa: BLE001 -- the step times are extra information; a bench run goes on without them
        return {}


def manifest_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the bench reads of generation.json: params, status, the candidate's metrics, pruning (curves left out)."""
    pruning = {k: v for k, v in (manifest.get("pruning") or {}).items() if k not in ("steps", "layer_influence")}
    if isinstance(pruning.get("heal"), dict):
        pruning["heal"] = {k: v for k, v in pruning["heal"].items() if k != "curves"}
    metrics = manifest.get("metrics") or {}
    return {"params": manifest.get("params"), "status": manifest.get("status"), "pruning": pruning,
            "candidate": metrics.get("candidate") or {}, "parent": metrics.get("parent") or {},
            "failed_gates": [g.get("name") for g in manifest.get("gates") or [] if not g.get("passed")]}


def conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def measure_domain(args: argparse.Namespace, arms: dict[str, dict[str, Any]], held_out: list[dict[str, Any]],
                   max_length: int) -> dict[str, dict[str, Any]]:
    """Parent, unpruned and pruned in this process: parameters, decode tokens/s (each generation interleaved with the
    parent, in rounds), held-out loss; then each generation loaded in a fresh process."""
    from selftune.learners import evaluate as ev
    from selftune.learners.speed import compare_decode_speed

    dirs = {"parent": next((a["parent_path"] for a in arms.values() if "parent_path" in a), None),
            **{arm: facts.get("path") for arm, facts in arms.items()}}
    loaded = {name: ev.load_model(path) for name, path in dirs.items() if path}
    prompts = [r["prompt"] for r in held_out[: args.prompts]]
    runs: dict[str, list[float]] = {name: [] for name in loaded}
    reference, *others = loaded  # the parent, when there is one
    reference_model, reference_tokenizer = loaded[reference]
    for name in others:  # each timed with the reference: A, B, B, A, ...
        model, tokenizer = loaded[name]
        speed = compare_decode_speed(reference_model, model, reference_tokenizer, tokenizer, prompts=prompts,
                                     new_tokens=args.new_tokens, rounds=args.timing_rounds)
        runs[reference] += speed.a.runs
        runs[name] += speed.b.runs
    rows = [conversation(r) for r in held_out]
    out = {}
    for name, (model, tokenizer) in loaded.items():
        loss = ev.held_out_loss(model, tokenizer, rows, max_length=max_length, autocast=not args.eval_fp32)
        out[name] = {"path": dirs[name], "params": ev.parameter_count(model), "layers": model.config.num_hidden_layers,
                     "vocab": model.config.vocab_size,
                     "decode_tokens_per_s": statistics.median(runs[name]) if runs[name] else None,
                     "decode_runs": [round(r, 1) for r in runs[name]], "loss_per_byte": loss.loss,
                     "loss_per_token": loss.loss_per_token, "held_out_rows": loss.rows}
    del loaded
    for name in arms:
        if name in out:
            out[name]["loads_fresh"] = loads_fresh(Path(out[name]["path"]))
    return out


def loads_fresh(path: Path) -> bool:
    """Whether a new Python process loads the directory with from_pretrained and generates 4 tokens from it."""
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(path)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        print(f"fresh load of {path} failed:\n{done.stderr[-1500:]}", flush=True)
        return False
    return last_json(done.stdout).get("new_tokens") == 4


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target's value, threshold and verdict for one domain (a missing measurement fails its target)."""
    m, arms = result["measured"], result["arms"]
    parent, pruned, unpruned = m.get("parent", {}), m.get("pruned", {}), m.get("unpruned", {})

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    cycle_pruned, cycle_unpruned = (arms.get(arm, {}).get("cycle_s") if arms.get(arm, {}).get("generation") is not None
                                    else None for arm in ("pruned", "unpruned"))  # a cycle that made none is no time
    rows = [
        ("params <= 0.80x parent", ratio(pruned.get("params"), parent.get("params")), "<=", TARGETS["params"]),
        ("decode >= 1.25x parent", ratio(pruned.get("decode_tokens_per_s"), parent.get("decode_tokens_per_s")), ">=",
         TARGETS["decode"]),
        ("held-out loss <= unpruned +2%", ratio(pruned.get("loss_per_byte"), unpruned.get("loss_per_byte")), "<=",
         1 + TARGETS["loss"]),
        ("promoted", float(arms.get("pruned", {}).get("status") == "promoted"), ">=", 1.0),
        ("loads fresh", float(bool(pruned.get("loads_fresh"))), ">=", 1.0),
        ("cycle <= 2x unpruned", ratio(cycle_pruned, cycle_unpruned), "<=", TARGETS["cycle"]),
    ]
    return [{"target": name, "value": value, "threshold": limit,
             "passed": value is not None and (value <= limit if op == "<=" else value >= limit)}
            for name, value, op, limit in rows]


def print_domain(domain: str, result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console, m, arms = Console(width=200), result["measured"], result["arms"]
    parent = m.get("parent", {})
    table = Table(title=f"{domain}: {result['rows']['ingested']} rows ingested (the cycle splits them), "
                        f"{result['rows']['held_out']} held out by the bench")
    for column in ("model", "gen", "params", "x parent", "layers", "vocab", "decode tok/s", "x parent",
                   "held-out nats/B", "vs unpruned", "probe nats/B", "cycle s", "status", "promoted", "loads fresh"):
        table.add_column(column, justify="left" if column in ("model", "status") else "right", no_wrap=True)

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for name in ("parent", *arms):
        f, a = m.get(name, {}), arms.get(name, {})
        candidate = (a.get("manifest") or {}).get("candidate", {})
        base_loss = m.get("unpruned", {}).get("loss_per_byte")
        probe = candidate.get("foundation_probe_loss") if name != "parent" else next(
            (x["manifest"]["parent"].get("foundation_probe_loss") for x in arms.values() if x.get("manifest")), None)
        table.add_row(
            name, "0" if name == "parent" else str(a.get("generation", "-")), num(f.get("params"), ",d"),
            num(f.get("params") / parent["params"] if f.get("params") and parent.get("params") else None, ".3f"),
            num(f.get("layers"), "d"), num(f.get("vocab"), ",d"), num(f.get("decode_tokens_per_s"), ".1f"),
            num(f["decode_tokens_per_s"] / parent["decode_tokens_per_s"] if f.get("decode_tokens_per_s") and
                parent.get("decode_tokens_per_s") else None, ".2f"), num(f.get("loss_per_byte"), ".4f"),
            num(f["loss_per_byte"] / base_loss - 1 if f.get("loss_per_byte") and base_loss and name != "parent" else
                None, "+.2%"), num(probe, ".4f"), num(a.get("cycle_s"), ".1f"),
            a.get("status", (a.get("cycle") or {}).get("status", "-")) if name != "parent" else "-",
            "-" if name == "parent" else "yes" if a.get("status") == "promoted" else "no",
            "-" if name == "parent" else "yes" if f.get("loads_fresh") else "no")
    console.print(table)
    for name, a in arms.items():
        manifest = a.get("manifest") or {}
        pruning = manifest.get("pruning", {})
        steps = ", ".join(f"{step} {s:g}" for step, s in (a.get("step_s") or {}).items() if s >= 0.1) or "-"
        console.print(f"  {name}: step seconds: {steps}; layers removed {pruning.get('layers_removed', '-')}; "
                      f"layer dropping stopped: {pruning.get('stopped', '-')}; "
                      f"failed gates {manifest.get('failed_gates', '-')}"
                      + (f"; error {a['cycle'].get('error')}" if (a.get("cycle") or {}).get("error") else ""),
                      highlight=False, soft_wrap=True)
    for t in result["targets"]:
        verdict = "[green]PASS[/]" if t["passed"] else "[red]FAIL[/]"
        console.print(f"  {verdict} {domain}: {t['target']}: {num(t['value'], '.3f')} (threshold {t['threshold']:g})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="folder of DOMAIN.jsonl files (default: the shared data)")
    p.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset of " + ", ".join(DOMAINS))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/selftune-bench/specialists"))
    p.add_argument("--foundation", default="embedded", help='generation 0: "embedded" or a transformers model dir')
    p.add_argument("--rows", type=int, default=0, help="rows per domain before the 80/20 split (0: all)")
    p.add_argument("--steps", type=int, default=0, help="train.steps of both arms (0: the product default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another branch setting for both arms, e.g. pruning.heal_steps=2 (repeatable)")
    p.add_argument("--timing-rounds", type=int, default=5, help="interleaved decode rounds over the three models")
    p.add_argument("--prompts", type=int, default=2, help="held-out prompts timed per model and round")
    p.add_argument("--eval-fp32", action="store_true", help="held-out losses in float32 (default: bf16 autocast "
                   "where the CPU computes bf16, as the cycle's gates)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (decode and loss)")
    p.add_argument("--reuse", action="store_true", help="skip arms whose results exist (with the same settings)")
    p.add_argument("--out", type=Path, help="results JSON [default: WORKDIR/results.json]")
    args = p.parse_args()
    args.foundation = str(Path(args.foundation).resolve()) if args.foundation != "embedded" else args.foundation
    domains = [d for d in args.domains.split(",") if d]
    if unknown := [d for d in domains if d not in DOMAINS]:
        p.error(f"--domains: unknown {', '.join(unknown)}; the domains are {', '.join(DOMAINS)}")
    if bad := [s for s in args.set if "=" not in s]:
        p.error(f"--set {bad[0]!r}: give KEY=VALUE, e.g. pruning.heal_steps=2")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    from selftune.learners.lm import set_threads

    set_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    header = {"cpu": cpu_model(), "cores": torch.get_num_threads(), "bf16": bf16_verdict(),
              "torch": torch.__version__, "capabilities": dict(getattr(torch.cpu, "get_capabilities", dict)())}
    print(f"CPU: {header['cpu']}; torch {header['torch']}; {args.threads} thread(s) here; {header['bf16']}", flush=True)
    foundation = prepare_foundation(args)
    print(f"foundation {args.foundation}: init (conversion) {foundation['init_s']} s, export {foundation['export_s']} s, "
          f"probe and rehearsal answers {foundation['probe_s']} s" + (" (an earlier run)" if foundation["reused"] else ""),
          flush=True)
    max_length = json.loads(selftune(Path(foundation["state"]), "config"))["train"]["max_length"]
    results: dict[str, Any] = {"header": header, "args": {k: str(v) for k, v in vars(args).items()},
                               "foundation": foundation, "domains": {}}
    out = args.out or args.workdir / "results.json"
    for k, domain in enumerate(domains):
        ingest, held_out = split_rows(domain, args.rows or None, args.data)
        arms = {}
        for arm in ("pruned", "unpruned") if k % 2 == 0 else ("unpruned", "pruned"):
            print(f"{domain}: {arm} arm ...", flush=True)
            arms[arm] = run_arm(args, domain, arm, ingest, foundation)
            print(f"{domain}: {arm}: {arms[arm].get('status', arms[arm]['cycle'].get('status'))} in "
                  f"{arms[arm]['cycle_s']} s" + (" (an earlier run)" if arms[arm]["reused"] else ""), flush=True)
        arms = {arm: arms[arm] for arm in ("unpruned", "pruned")}
        result = {"rows": {"ingested": len(ingest), "held_out": len(held_out)}, "arms": arms,
                  "measured": measure_domain(args, arms, held_out, max_length)}
        result["targets"] = check_targets(result)
        results["domains"][domain] = result
        out.write_text(json.dumps(results, indent=1))
        print_domain(domain, result)
    passed = sum(t["passed"] for r in results["domains"].values() for t in r["targets"])
    total = sum(len(r["targets"]) for r in results["domains"].values())
    print(f"\n{passed}/{total} targets passed; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
