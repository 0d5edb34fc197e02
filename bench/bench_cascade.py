"""The cascade at serving time: ``"model": "auto"`` against always-the-generalist and the oracle, in one run.

Given a state directory (``--state``) with a generalist (the default branch, ``main``) and specialist branches
whose champions carry a routing index (``router.faiss``, generation.json "routing"), the bench builds a mixed
stream of held-out prompts from the shared data (``--data``: DOMAIN.jsonl files of prompt/response rows). A file
belongs to the specialist whose scope names its stem (or its rows' own ``domain``); the other files are general
prompts, the generalist's share. Held out means never ingested: every prompt in the state's interactions table
(any branch) is left out, so the specialist's training and calibration rows never reach the stream. Each file's
remaining rows are shuffled by a fixed seed and capped (``--per-domain``), then the stream is shuffled.

Three policies answer every request, interleaved (their order rotates from one request to the next), with every
champion loaded once beforehand (``ChampionPool``): *generalist* (the default branch's champion always), *oracle*
(the file's own specialist, the generalist for general prompts) and *auto* (``CascadeRouter.choose``, deferral up
the lineage included, then the model it chose). A request's time is the routing (auto only: the whole ``choose``)
plus greedy generation of exactly ``--new-tokens`` tokens at batch 1 (an answer that would end sooner goes on:
every model does the same work). Its loss is ``evaluate.held_out_loss`` of [prompt, reference response] under the
answering model, in nats per byte of the reference answer, summed over the stream (``nll / bytes``).

Printed: routing accuracy (the router's own choice before any deferral: a specialty's prompt to its specialist, a
general one to the generalist) and deferrals per domain; per policy the loss, mean and median time per request and
who answered; routing time p50/p99 (the router's ``route_seconds``: embed, search, decide; and the whole
``choose`` with deferral). Targets (issue 14): accuracy >= 95%; auto's loss <= the oracle's +2%; auto >= 1.2x
faster per request than the generalist (mean); route p99 < 10 ms. The speed target needs specialists smaller than
the generalist (pruned: issue 13): a specialist of the generalist's size answers no faster, and a deferral adds
its first tokens (measured, then generated afresh by the parent) to the request.

The bench writes nothing into the state beyond what opening it does (schema migrations); run it on a copy.

    .venv/bin/python bench/bench_cascade.py --state /tmp/cascade_state --per-domain 40 --new-tokens 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the shared helpers, imported as a script too
from bench_specialists import DATA, bf16_verdict, cpu_model  # noqa: E402

POLICIES = ("generalist", "oracle", "auto")
TARGETS = {"accuracy": 0.95, "loss": 0.02, "speedup": 1.2, "route_p99_ms": 10.0}
WARM_UP = "Warm-up request: say hello."


def ingested_prompts(context: Any) -> set[str]:
    """The last user message of every interaction in the state (every branch): what is not held out."""
    seen: set[str] = set()
    with context.store.transaction() as tx:
        after = 0
        while batch := tx.interactions.list(after_id=after, limit=1000):
            seen.update(i.prompt.strip() for i in batch)
            after = batch[-1].id
    return seen


def owner(domain: str, rows: list[dict[str, Any]], scopes: dict[str, tuple[str, ...]]) -> str | None:
    """The specialist whose scope names the file's stem (or a row's own domain), else None (general prompts)."""
    names = {domain} | {str(r.get("domain")) for r in rows if r.get("domain")}
    return next((branch for branch, domains in scopes.items() if names & set(domains)), None)


def build_stream(data: Path, domains: list[str], scopes: dict[str, tuple[str, ...]], generalist: str,
                 ingested: set[str], per_domain: int, seed: str = "bench_cascade") -> tuple[list[dict], dict]:
    """(the mixed stream: rows with domain and expected branch, {domain: counts}); ingested prompts left out."""
    stream, counts = [], {}
    for domain in domains:
        rows = [json.loads(line) for line in (data / f"{domain}.jsonl").read_text().splitlines() if line.strip()]
        specialist = owner(domain, rows, scopes)
        held = [r for r in rows if r["prompt"].strip() not in ingested and r.get("response", "").strip()]
        random.Random(f"{seed}:{domain}").shuffle(held)
        taken = held[: per_domain or None]
        counts[domain] = {"rows": len(rows), "held_out": len(held), "taken": len(taken),
                          "expected": specialist or generalist, "specialist": specialist is not None}
        stream += [{"domain": domain, "prompt": r["prompt"], "response": r["response"],
                    "expected": specialist or generalist} for r in taken]
    random.Random(seed).shuffle(stream)
    return stream, counts


def generate(loaded: Any, prompt: str, new_tokens: int) -> int:
    """Greedy decoding of exactly ``new_tokens`` tokens at batch 1 (the prompt in the chat template); token count."""
    import torch

    from selftune.learners.chat import pad_id

    ids = torch.tensor([loaded.prompt_ids([{"role": "user", "content": prompt}])])
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id(loaded.tokenizer))
    return int(out.shape[1] - ids.shape[1])


def first_choice(decision: Any) -> str:
    """The branch the router chose before any deferral."""
    return decision.deferred_from[0].partition("@")[0] if decision.deferred_from else decision.branch


def run_stream(router: Any, models: dict[str, Any], generalist: str, stream: list[dict], new_tokens: int,
               max_length: int) -> list[dict[str, Any]]:
    """Each request under the three policies, interleaved; then each row's reference loss under each model."""
    from selftune.learners import evaluate as ev

    records = []
    for k, row in enumerate(stream):
        rec: dict[str, Any] = {"domain": row["domain"], "expected": row["expected"], "seconds": {}, "branch": {}}
        for policy in POLICIES[k % 3:] + POLICIES[: k % 3]:
            started = time.perf_counter()
            if policy == "auto":
                decision = router.choose([{"role": "user", "content": row["prompt"]}])
                chose = time.perf_counter() - started
                branch = decision.branch
                rec.update(routed=first_choice(decision), deferred_from=list(decision.deferred_from),
                           route_s=decision.details.get("route_seconds"), choose_s=chose,
                           confidence=decision.details.get("confidence"), reason=decision.reason)
            else:
                branch = generalist if policy == "generalist" else row["expected"]
            generate(models[branch], row["prompt"], new_tokens)
            rec["seconds"][policy], rec["branch"][policy] = time.perf_counter() - started, branch
        records.append(rec)
        if (k + 1) % 20 == 0:
            print(f"  {k + 1}/{len(stream)} requests", flush=True)
    losses: dict[tuple[int, str], tuple[float, int]] = {}
    for k, row in enumerate(stream):
        conversation = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        for branch in set(records[k]["branch"].values()):
            loaded = models[branch]
            result = ev.held_out_loss(loaded.model, loaded.tokenizer, [conversation], max_length=max_length)
            losses[k, branch] = (result.nll, result.bytes)
    for k, rec in enumerate(records):
        rec["nll"] = {p: losses[k, b][0] for p, b in rec["branch"].items()}
        rec["bytes"] = {p: losses[k, b][1] for p, b in rec["branch"].items()}
    return records


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Routing accuracy and deferrals (overall, per domain), per policy loss and time, routing-time percentiles."""
    n = len(records)
    right = sum(r["routed"] == r["expected"] for r in records)
    per_domain: dict[str, dict[str, Any]] = {}
    for r in records:
        d = per_domain.setdefault(r["domain"], {"expected": r["expected"], "requests": 0, "routed_right": 0,
                                                "deferred": 0, "routed_to": Counter()})
        d["requests"] += 1
        d["routed_right"] += r["routed"] == r["expected"]
        d["deferred"] += bool(r["deferred_from"])
        d["routed_to"][r["routed"]] += 1
    policies = {}
    for p in POLICIES:
        seconds = [r["seconds"][p] for r in records]
        nll, size = sum(r["nll"][p] for r in records), sum(r["bytes"][p] for r in records)
        policies[p] = {"loss_per_byte": nll / size if size else None,
                       "mean_s": statistics.fmean(seconds) if n else None,
                       "median_s": statistics.median(seconds) if n else None,
                       "answered_by": dict(Counter(r["branch"][p] for r in records))}
    route = [r["route_s"] for r in records if r.get("route_s") is not None]
    choose = [r["choose_s"] for r in records]
    return {"requests": n, "routing_accuracy": right / n if n else None, "routed_right": right,
            "deferred": sum(bool(r["deferred_from"]) for r in records),
            "domains": {k: {**v, "routed_to": dict(v["routed_to"])} for k, v in per_domain.items()},
            "policies": policies,
            "route_ms": {"p50": _ms(percentile(route, 50)), "p99": _ms(percentile(route, 99)), "n": len(route)},
            "choose_ms": {"p50": _ms(percentile(choose, 50)), "p99": _ms(percentile(choose, 99)),
                          "mean": _ms(statistics.fmean(choose) if choose else None)}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target's value, threshold and verdict (a missing measurement fails)."""
    pol = summary["policies"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    rows = [("routing accuracy >= 95%", summary["routing_accuracy"], ">=", TARGETS["accuracy"]),
            ("auto loss <= oracle +2%", ratio(pol["auto"]["loss_per_byte"], pol["oracle"]["loss_per_byte"]), "<=",
             1 + TARGETS["loss"]),
            ("auto >= 1.2x faster than generalist", ratio(pol["generalist"]["mean_s"], pol["auto"]["mean_s"]), ">=",
             TARGETS["speedup"]),
            ("route p99 < 10 ms", summary["route_ms"]["p99"], "<", TARGETS["route_p99_ms"])]
    return [{"target": name, "value": value, "threshold": limit,
             "passed": value is not None and (value <= limit if op == "<=" else value >= limit if op == ">=" else
                                              value < limit)} for name, value, op, limit in rows]


def print_report(summary: dict[str, Any], targets: list[dict[str, Any]], new_tokens: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    routing = Table(title=f"routing: {summary['requests']} held-out requests, auto's first choice (before deferral)")
    for column in ("domain", "goes to", "requests", "routed right", "routed to", "deferred"):
        routing.add_column(column, justify="left" if column in ("domain", "goes to", "routed to") else "right")
    for domain, d in summary["domains"].items():
        routing.add_row(domain, d["expected"], str(d["requests"]),
                        f"{d['routed_right']} ({d['routed_right'] / d['requests']:.0%})",
                        ", ".join(f"{b} {c}" for b, c in sorted(d["routed_to"].items())), str(d["deferred"]))
    console.print(routing)
    pol, oracle, general = summary["policies"], summary["policies"]["oracle"], summary["policies"]["generalist"]
    table = Table(title=f"policies: loss of the reference answer, time per request (routing + {new_tokens} tokens, "
                        "batch 1)")
    for column in ("policy", "loss nats/B", "vs oracle", "mean ms", "median ms", "speed x generalist", "answered by"):
        table.add_column(column, justify="left" if column in ("policy", "answered by") else "right", no_wrap=True)
    for name in POLICIES:
        p = pol[name]
        table.add_row(name, num(p["loss_per_byte"], ".4f"),
                      num(p["loss_per_byte"] / oracle["loss_per_byte"] - 1 if p["loss_per_byte"] and
                          oracle["loss_per_byte"] else None, "+.2%"),
                      num(_ms(p["mean_s"]), ".1f"), num(_ms(p["median_s"]), ".1f"),
                      num(general["mean_s"] / p["mean_s"] if p["mean_s"] else None, ".2f"),
                      ", ".join(f"{b} {c}" for b, c in sorted(p["answered_by"].items())))
    console.print(table)
    r, c = summary["route_ms"], summary["choose_ms"]
    console.print(f"routing accuracy {num(summary['routing_accuracy'], '.1%')} ({summary['routed_right']}/"
                  f"{summary['requests']}); deferred {summary['deferred']}; route (embed + search + decide) "
                  f"p50 {num(r['p50'], '.2f')} ms, p99 {num(r['p99'], '.2f')} ms; whole choose() with deferral "
                  f"p50 {num(c['p50'], '.1f')} ms, p99 {num(c['p99'], '.1f')} ms, mean {num(c['mean'], '.1f')} ms",
                  highlight=False, soft_wrap=True)
    for t in targets:
        verdict = "[green]PASS[/]" if t["passed"] else "[red]FAIL[/]"
        console.print(f"  {verdict} {t['target']}: {num(t['value'], '.3f')} (threshold {t['threshold']:g})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state", type=Path, required=True, help="the selftune state directory (use a copy)")
    p.add_argument("--data", type=Path, default=DATA, help="folder of DOMAIN.jsonl files (default: the shared data)")
    p.add_argument("--domains", default="", help="comma-separated file stems (default: every DOMAIN.jsonl there)")
    p.add_argument("--per-domain", type=int, default=40, help="held-out rows per domain (0: all)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--threads", type=int, default=2, help="torch threads for generation (routing uses routing.threads)")
    p.add_argument("--out", type=Path, default=Path("/tmp/selftune-bench/cascade/results.json"))
    args = p.parse_args()
    if not (args.state / "selftune.toml").exists() and not (args.state / "selftune.db").exists():
        p.error(f"--state {args.state}: no selftune state there")
    domains = [d for d in args.domains.split(",") if d] or sorted(f.stem for f in args.data.glob("*.jsonl"))
    if missing := [d for d in domains if not (args.data / f"{d}.jsonl").exists()]:
        p.error(f"--domains: no {', '.join(missing)} in {args.data}")

    import torch
    import transformers

    from selftune.daemon.context import Context
    from selftune.daemon.service.cascade import CascadeRouter
    from selftune.daemon.service.pool import ChampionPool
    from selftune.learners.lm import set_threads
    from selftune.policies.records import CHAMPION

    set_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    header = {"cpu": cpu_model(), "bf16": bf16_verdict(), "torch": torch.__version__, "threads": args.threads}
    print(f"CPU: {header['cpu']}; torch {header['torch']}; {args.threads} thread(s) here; {header['bf16']}", flush=True)
    context = Context.open(str(args.state))
    generalist = context.config.ingest.default_branch
    pool = ChampionPool(context, threads=args.threads)
    router = CascadeRouter(context, pool)
    pool.models.router = router
    with context.store.transaction() as tx:
        scopes = {b.name: b.domains for b in tx.branches.list() if b.is_specialist}
        champions = {a.branch: a.generation_id for a in tx.aliases.list() if a.name == CHAMPION}
    specialists = router.refresh()
    indexed = {name: scopes[name] for name, s in specialists.items() if s.index is not None}
    for name in sorted(set(scopes) - set(indexed)):
        print(f"specialist {name} has no routing index on its champion: its domains count as general", flush=True)
    if not indexed:
        sys.exit("no specialist's champion has a routing index: nothing to route to")
    stream, counts = build_stream(args.data, domains, indexed, generalist, ingested_prompts(context), args.per_domain)
    if not stream:
        sys.exit("no held-out rows: every row of the data was ingested")
    started = time.perf_counter()
    models = {b: pool.get(b) for b in [generalist, *indexed, *(s.parent_branch for s in specialists.values()
                                                                if s.parent_branch)] if b in champions}
    for name, loaded in models.items():
        params = sum(t.numel() for t in loaded.model.parameters())
        print(f"  {name}@{loaded.generation_id}: {params:,} parameters, {loaded.model.config.num_hidden_layers} layers",
              flush=True)
        generate(loaded, WARM_UP, args.new_tokens)  # warm-up, not counted
    router.warm()
    router.choose([{"role": "user", "content": WARM_UP}])
    router.embedder().clear_cache()
    print(f"models loaded and warmed in {time.perf_counter() - started:.1f} s; {len(stream)} requests: "
          + ", ".join(f"{d} {c['taken']} of {c['held_out']} held out -> {c['expected']}" for d, c in counts.items()),
          flush=True)
    records = run_stream(router, models, generalist, stream, args.new_tokens, context.config.train.max_length)
    summary = summarise(records)
    targets = check_targets(summary)
    print_report(summary, targets, args.new_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models_facts = {b: {"generation": m.generation_id, "params": sum(t.numel() for t in m.model.parameters())}
                    for b, m in models.items()}
    args.out.write_text(json.dumps({"header": header, "args": {k: str(v) for k, v in vars(args).items()},
                                    "models": models_facts, "domains": counts, "summary": summary, "targets": targets,
                                    "requests": records}, indent=1, default=str))
    print(f"{sum(t['passed'] for t in targets)}/{len(targets)} targets passed; results in {args.out}")
    context.store.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
