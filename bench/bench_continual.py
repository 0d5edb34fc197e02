"""Continual-learning benchmark: naive sequential LoRA vs replay+EWC on SmolLM2-135M.

The public stream python_docs -> hacker_jargon -> devils_dictionary -> chemistry_elements
(``../shared/data``). Each domain's rows are split once, by seed, into a held-out set and a training pool.
For each arm and each stage: a training job on the new domain's rows (the learner's own worker code,
run in-process), the adapter merged into the parent, then the held-out loss (mean NLL per answer token,
float32) of every domain on the merged model. The next stage starts from that merged model; the
replay+EWC arm also hands on the replay buffer's members and the running Fisher.

Both arms use the same steps, learning rate, rank and seed, and train on the same number of new sequences
per step (``--batch-size``); the replay+EWC arm adds ``--replayed`` sequences from its buffer on top, as
Avalanche's ``ReplayPlugin`` does (its memory batch comes on top of ``train_mb_size``). Printed:
  * the loss matrix per arm (rows: domains; columns: before training, after each stage),
  * forgetting of each earlier domain = loss after the last stage - loss right after its own stage,
  * gain on each domain since the foundation = loss before any training - loss right after its own stage:
    the level an arm reaches on a new domain, from the start both arms share (the "learning accuracy" of
    the continual-learning literature, the counterpart of intransigence). This is the gain the target is
    on. Also printed, for information, the gain during its stage = loss right before its own stage - loss
    right after it: an arm that forgot less enters a stage already lower on the new domain (what it kept
    carries over), so the same level reached shows as a smaller gain there, and naive's includes
    relearning what its previous stage made it lose,
  * the targets: replay+EWC's mean forgetting <= 40% of naive's; its gain on each domain >= 85% of naive's.

    .venv/bin/python bench/bench_continual.py --eval-bf16                        # both arms (~25 min, 1 thread)
    .venv/bin/python bench/bench_continual.py --eval-bf16 --arms replay_ewc --reuse   # rerun one arm
    .venv/bin/python bench/bench_continual.py --eval-bf16 --arms "" --reuse           # reprint the tables
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from selftune.learners import jobs
from selftune.learners.data import encode_rows, read_rows
from selftune.learners.lm import load_base, load_tokenizer, mean_token_nll, set_threads
from selftune.learners.train import run_job
from selftune.policies.training import EwcConfig, ReplayConfig, TrainConfig

from common import ensure_model  # bench/ is the script's directory, first on sys.path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DOMAINS = ("python_docs", "hacker_jargon", "devils_dictionary", "chemistry_elements")


def merge(parent: Path, adapter: Path, out: Path) -> None:
    """Adapter into the parent's float32 weights, saved as a plain transformers directory."""
    try:
        from selftune.learners.merge import merge_adapter
    except ImportError:  # the merge helper is another module's; plain peft does the same
        merge_adapter = None
    shutil.rmtree(out, ignore_errors=True)
    if merge_adapter is not None:
        merge_adapter(parent, adapter, out)
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(parent), dtype=torch.float32), str(adapter))
    model.merge_and_unload(safe_merge=True).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(parent)).save_pretrained(str(out))


def split_domain(name: str, heldout: int, train_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    rows = [{"id": f"{name}:{i}", **r} for i, r in enumerate(read_rows(DATA / f"{name}.jsonl"))]
    random.Random(f"{seed}:{name}").shuffle(rows)
    return rows[:heldout], rows[heldout : heldout + train_rows]


def evaluate(model_dir: Path, held: dict[str, list], pad_id: int, batch_size: int, bf16: bool = False) -> dict[str, float]:
    model = load_base(model_dir, base_dtype="float32")
    losses = {d: round(mean_token_nll(model, items, pad_id=pad_id, batch_size=batch_size, bf16=bf16), 4) for d, items in held.items()}
    del model
    return losses


def run_arm(arm: str, args: argparse.Namespace, foundation: Path, splits: dict, held: dict, pad_id: int, before: dict) -> dict[str, Any]:
    train = TrainConfig(
        lora_rank=args.rank,
        lora_alpha=2.0 * args.rank,
        lora_dropout=0.0,
        learning_rate=args.lr,
        warmup_steps=min(5, args.steps // 5),
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        threads=args.threads,
        checkpoint_every=0,
        progress_every=max(args.steps // 5, 1),
    )
    if arm == "naive":
        replay, ewc = ReplayConfig(buffer_size=0), EwcConfig(strength=0.0, fisher_examples=0)
    else:
        # the learner's ratio is the replayed share of the whole batch (new + replayed)
        replay = ReplayConfig(buffer_size=args.buffer, ratio=args.replayed / (args.batch_size + args.replayed),
                              selection=args.selection)
        ewc = EwcConfig(
            strength=args.strength,
            gamma=args.gamma,
            representation=args.representation,
            fisher_examples=args.fisher_examples,
        )
    root = args.workdir / arm
    shutil.rmtree(root, ignore_errors=True)
    rows_by_id = {r["id"]: r for d in splits for r in splits[d]}
    parent, fisher, buffer = foundation, None, []
    matrix = [before]
    stages = []
    for k, domain in enumerate(args.domains):
        started = time.perf_counter()
        work = root / f"stage{k}-{domain}"
        replayed = args.replayed if buffer and replay.enabled else 0  # nothing to replay in the first stage
        jobs.write_job(
            work,
            base_model=parent,
            train_rows=splits[domain],
            replay_rows=buffer,
            experience=k,
            train=dataclasses.replace(train, batch_size=args.batch_size + replayed),
            replay=replay,
            ewc=ewc,
            fisher_in=fisher,
        )
        result = run_job(work)
        merged = work / "merged"
        merge(parent, work / jobs.ADAPTER_DIR, merged)
        losses = evaluate(merged, held, pad_id, args.eval_batch_size, args.eval_bf16)
        if parent != foundation:
            shutil.rmtree(parent, ignore_errors=True)  # keep one merged model on disk at a time
        parent = merged
        fisher = work / jobs.FISHER_FILE if result["fisher"] else None
        buffer = [
            {**rows_by_id[m["id"]], "experience": m["experience"], "priority": m["priority"]} for m in result["replay_buffer"]
        ]
        matrix.append(losses)
        stage = {
            "domain": domain,
            "seconds": round(time.perf_counter() - started, 1),
            "loss_first": result["loss_first"],
            "loss_last10_mean": result["loss_last10_mean"],
            "ewc_penalty_last": result["ewc_penalty_last"],
            "replayed_sequences": result["replayed_sequences"],
            "tokens_per_s": result["tokens_per_s"],
            "buffer": {e: sum(1 for m in result["replay_buffer"] if m["experience"] == e) for e in range(k + 1)},
        }
        stages.append(stage)
        print(f"[{arm}] stage {k} {domain}: {stage} held-out {losses}", flush=True)
    shutil.rmtree(parent, ignore_errors=True)
    return {"matrix": matrix, "stages": stages, "train": train.__dict__, "replay": replay.__dict__, "ewc": ewc.__dict__}


def forgetting_and_gain(matrix: list[dict[str, float]], domains: list[str]) -> tuple[dict, dict, dict]:
    """Forgetting of each earlier domain; gain on each domain during its own stage (from the loss right
    before it) and since the foundation (from the loss before any training: the level the stage reached)."""
    last = matrix[-1]
    forgetting = {d: round(last[d] - matrix[k + 1][d], 4) for k, d in enumerate(domains[:-1])}
    gain_stage = {d: round(matrix[k][d] - matrix[k + 1][d], 4) for k, d in enumerate(domains)}
    gain_total = {d: round(matrix[0][d] - matrix[k + 1][d], 4) for k, d in enumerate(domains)}
    return forgetting, gain_stage, gain_total


def share_of(mine: float, theirs: float) -> float:
    return mine / theirs if theirs > 0 else float("nan")


def print_matrix(arm: str, matrix: list[dict[str, float]], domains: list[str]) -> None:
    heads = ["before"] + [f"after {d[:10]}" for d in domains]
    print(f"\n{arm}: held-out loss (NLL per answer token)")
    print(f"{'domain':20s}" + "".join(f"{h:>18s}" for h in heads))
    for d in domains:
        print(f"{d:20s}" + "".join(f"{row[d]:18.4f}" for row in matrix))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="naive,replay_ewc")
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/selftune-bench/smollm2-135m-f32"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/selftune-bench/continual"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a CPU shared with others)")
    p.add_argument("--heldout", type=int, default=32, help="held-out rows per domain")
    p.add_argument("--train-rows", type=int, default=240, help="training rows per domain")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-bf16", action="store_true", help="held-out losses under bf16 autocast (faster, less exact)")
    p.add_argument("--buffer", type=int, default=96, help="replay buffer size (replay+EWC arm)")
    p.add_argument("--replayed", type=int, default=1, help="replayed sequences per step, on top of the new ones (replay+EWC arm)")
    p.add_argument("--selection", default="reservoir")
    p.add_argument("--strength", type=float, default=1e3, help="EWC lambda")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--representation", default="rank1")
    p.add_argument("--fisher-examples", type=int, default=32)
    p.add_argument("--reuse", action="store_true", help="take arms not in --arms from the last results.json")
    args = p.parse_args()
    args.domains = args.domains.split(",")
    arms = [a for a in args.arms.split(",") if a]  # none: just print the table of the last results

    set_threads(args.threads)
    torch.manual_seed(args.seed)
    foundation = ensure_model(args.model_dir)
    tok = load_tokenizer(foundation)
    splits, held = {}, {}
    for d in args.domains:
        heldout_rows, splits[d] = split_domain(d, args.heldout, args.train_rows, args.seed)
        held[d], _ = encode_rows(tok, heldout_rows, args.max_length)
    data_key = hashlib.sha256(json.dumps([args.domains, args.heldout, args.train_rows, args.seed, args.max_length,
                                          args.steps, args.lr, args.rank, args.batch_size, args.eval_bf16]).encode()).hexdigest()[:12]
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if args.reuse and results_path.exists() else {}
    if results.get("data_key") != data_key:
        results = {"data_key": data_key, "arms": {}}
    args.workdir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    before = results.get("before") or evaluate(foundation, held, tok.pad_token_id, args.eval_batch_size, args.eval_bf16)
    results["before"] = before
    print(f"foundation held-out losses {before} ({time.perf_counter() - t:.0f} s)", flush=True)
    for arm in arms:
        results["arms"][arm] = run_arm(arm, args, foundation, splits, held, tok.pad_token_id, before)
        results_path.write_text(json.dumps(results, indent=2))

    summary = {}
    for arm, res in results["arms"].items():
        print_matrix(arm, res["matrix"], args.domains)
        forgetting, gain_stage, gain_total = forgetting_and_gain(res["matrix"], args.domains)
        summary[arm] = (forgetting, gain_stage, gain_total)
        print(f"forgetting:            {forgetting}  mean {sum(forgetting.values()) / len(forgetting):+.4f}")
        print(f"gain during its stage: {gain_stage}")
        print(f"gain since foundation: {gain_total}")
    if {"naive", "replay_ewc"} <= summary.keys():
        (f_n, gs_n, gt_n), (f_r, gs_r, gt_r) = summary["naive"], summary["replay_ewc"]
        mean_n, mean_r = sum(f_n.values()) / len(f_n), sum(f_r.values()) / len(f_r)
        ratio = mean_r / mean_n if mean_n > 0 else float("nan")
        print("\nreplay+EWC vs naive")
        print(f"  mean forgetting {mean_r:+.4f} vs {mean_n:+.4f}: {ratio:.0%} of naive's (target <= 40%) "
              f"{'PASS' if mean_n > 0 and ratio <= 0.40 else 'FAIL'}")
        print(f"  {'gain on':28s} {'since the foundation (target >= 85%)':>38s}   {'during its stage (for information)':>34s}")
        share_total = {d: share_of(gt_r[d], gt_n[d]) for d in args.domains}
        share_stage = {d: share_of(gs_r[d], gs_n[d]) for d in args.domains}
        for d in args.domains:
            print(f"  {d:28s} {gt_r[d]:+.4f} vs {gt_n[d]:+.4f} {share_total[d]:5.0%} {'PASS' if share_total[d] >= 0.85 else 'FAIL'}"
                  f"       {gs_r[d]:+.4f} vs {gs_n[d]:+.4f} {share_stage[d]:5.0%}")
        # Why the two gain columns can differ: an arm that forgot less enters a stage with a lower loss on
        # the new domain, so the same level reached is a smaller gain "during its stage".
        ours, naive = results["arms"]["replay_ewc"]["matrix"], results["arms"]["naive"]["matrix"]
        for label, offset in (("loss entering its stage", 0), ("loss after its stage", 1)):
            print(f"  {label:28s} " + "  ".join(f"{d[:10]} {ours[k + offset][d]:.3f} vs {naive[k + offset][d]:.3f}"
                                                for k, d in enumerate(args.domains)))
        results["summary"] = {
            "forgetting_ratio": ratio,
            "gain_share_during_stage": share_stage,
            "gain_share_since_foundation": share_total,
        }
        results_path.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
