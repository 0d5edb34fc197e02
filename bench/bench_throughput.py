"""Throughput: HF Trainer + peft at their defaults (fp32) vs our learner, on the same batches.

Arms, each timed per optimizer step (median over the timed steps, the first ``--warmup`` dropped):
  trainer      transformers Trainer, peft LoraConfig defaults but the same rank and target modules, fp32
  ours         our learner (Avalanche strategy, bf16 autocast and bf16 frozen base where the hardware has
               bf16, eager attention, logits on labelled positions only), no replay, no EWC
  ours+replay+ewc[REPR]   our learner with a replay share and the EWC penalty against a real Fisher

Tokens are the non-padding input tokens of a batch. Target: ours >= 1.5x trainer's tokens/s, and a
replay+EWC step <= 15% slower than a plain one (replay rows come from the same file so that lengths match).

    .venv/bin/python bench/bench_throughput.py --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from selftune.learners import jobs
from selftune.learners.data import encode_rows, pad_collate, EncodedDataset, read_rows
from selftune.learners.fisher import estimate_fisher, save_fisher
from selftune.learners.lm import load_base, load_tokenizer, set_threads
from selftune.learners.train import run_job
from selftune.policies.replay import plan_batches
from selftune.policies.training import EwcConfig, ReplayConfig, TrainConfig

from common import ensure_model  # bench/ is the script's directory, first on sys.path

TRAINER = "trainer (HF + peft defaults, fp32)"
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def trainer_step_times(model_dir: Path, batches: list[dict], cfg: TrainConfig, out: Path) -> list[float]:
    """HF Trainer + peft defaults (fp32, sdpa, AdamW, linear schedule), one pre-collated batch per step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t)

    class Batches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(batches)

        def __getitem__(self, i: int) -> dict:
            return batches[i]

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    timer = Timer()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=1,
        max_steps=len(batches),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=cfg.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Batches(), data_collator=lambda items: items[0], callbacks=[timer])
    trainer.train()
    return timer.times


def our_step_times(workdir: Path, **job) -> tuple[list[float], list[int], dict]:
    shutil.rmtree(workdir, ignore_errors=True)
    jobs.write_job(workdir, **job)
    result = run_job(workdir)
    progress = jobs.read_progress(workdir)
    return [p["step_s"] for p in progress], [p["tokens"] for p in progress], result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA / "python_docs.jsonl")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/selftune-bench/smollm2-135m-f32"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/selftune-bench/throughput"))
    p.add_argument("--steps", type=int, default=6, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per arm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a CPU shared with others)")
    p.add_argument("--replay-ratio", type=float, default=0.125)
    p.add_argument("--ewc", default="rank1,dense", help="EWC representations to time (comma-separated)")
    p.add_argument("--fisher-examples", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1, help="repeat all arms, interleaved, this many times")
    p.add_argument("--skip-trainer", action="store_true")
    args = p.parse_args()

    set_threads(args.threads)
    model_dir = ensure_model(args.model_dir)
    tok = load_tokenizer(model_dir)
    rows = [{"id": i, **r} for i, r in enumerate(read_rows(args.data))]
    random.Random(0).shuffle(rows)
    total = args.warmup + args.steps
    new_rows = rows[: total * args.batch_size]
    replay_rows = [{**r, "experience": 0, "priority": random.Random(r["id"]).random()} for r in rows[len(new_rows) : len(new_rows) + 64]]
    cfg = TrainConfig(
        lora_rank=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        steps=total,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads=args.threads,
        checkpoint_every=0,
    )

    # the batches our learner will train on (same plan function, same seed), handed to the Trainer too
    items, _ = encode_rows(tok, new_rows, cfg.max_length)
    plan = plan_batches([len(it.input_ids) for it in items], [], steps=cfg.steps, batch_size=cfg.batch_size, ratio=0.0, seed=cfg.seed, bucket_steps=cfg.bucket_steps)
    collate, ds = pad_collate(tok.pad_token_id), EncodedDataset(items)
    batches = [{k: v for k, v in collate([ds[i] for i in b.new]).items() if k in ("input_ids", "attention_mask", "labels")} for b in plan]
    batch_tokens = [int(b["attention_mask"].sum()) for b in batches]

    # Fisher files for the EWC arms (estimated once, on rows outside the training batches; not timed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    fisher_paths, fisher_seconds = {}, {}
    representations = [r for r in args.ewc.split(",") if r]
    if representations:
        model = load_base(model_dir, base_dtype="bfloat16")
        sample, _ = encode_rows(tok, replay_rows[: args.fisher_examples], cfg.max_length)
        for representation in representations:
            t = time.perf_counter()
            fisher = estimate_fisher(model, sample, target_modules=cfg.target_modules, pad_id=tok.pad_token_id, representation=representation)
            fisher_paths[representation] = args.workdir / f"fisher-{representation}.safetensors"
            save_fisher(fisher, fisher_paths[representation])
            fisher_seconds[representation] = time.perf_counter() - t
        del model

    replay = ReplayConfig(buffer_size=len(replay_rows), ratio=args.replay_ratio)
    no_ewc = EwcConfig(strength=0.0, fisher_examples=0)
    arms: list[tuple[str, dict]] = [("ours", dict(replay=ReplayConfig(buffer_size=0), ewc=no_ewc))]
    arms.append((f"ours + replay {args.replay_ratio:g}", dict(replay_rows=replay_rows, experience=1, replay=replay, ewc=no_ewc)))
    for representation in representations:
        ewc = EwcConfig(strength=1e3, representation=representation, fisher_examples=0)
        arms.append((f"ours + replay {args.replay_ratio:g} + EWC {representation}",
                     dict(replay_rows=replay_rows, experience=1, replay=replay, ewc=ewc, fisher_in=fisher_paths[representation])))

    timings: dict[str, tuple[list[float], list[int]]] = {}

    def record(name: str, times: list[float], tokens: list[int]) -> None:
        old = timings.setdefault(name, ([], []))
        old[0].extend(times[args.warmup :])
        old[1].extend(tokens[args.warmup :])

    for round_ in range(args.rounds):  # arms interleaved, so that load from other processes hits all alike
        if not args.skip_trainer:
            record(TRAINER, trainer_step_times(model_dir, batches, cfg, args.workdir / "trainer"), batch_tokens)
        for name, job in arms:
            times, tokens, _ = our_step_times(args.workdir / name.replace(" ", "_"), base_model=model_dir, train_rows=new_rows, train=cfg, **job)
            if name == "ours" and tokens != batch_tokens:
                print("warning: our batches differ from the Trainer's", file=sys.stderr)
            record(name, times, tokens)

    base = {name: (statistics.median(t), sum(n) / sum(t)) for name, (t, n) in timings.items()}
    trainer_tps = base[TRAINER][1] if TRAINER in base else None
    replay_step = base.get(f"ours + replay {args.replay_ratio:g}", (None,))[0]
    print(f"\nSmolLM2-135M, LoRA r={args.rank} on {len(cfg.target_modules)} projections, batch {args.batch_size}, "
          f"max_length {args.max_length}, {args.threads} thread(s), {args.rounds} round(s) of {args.steps} timed steps "
          f"after {args.warmup} warm-up")
    print(f"{'arm':40s} {'s/step':>8s} {'tokens/s':>9s} {'vs trainer':>11s} {'s/token vs ours':>16s} {'s/step vs replay':>17s}")
    for name, (step, tps) in base.items():
        vs_trainer = f"{tps / trainer_tps:.2f}x" if trainer_tps else "-"
        per_token = f"{base['ours'][1] / tps - 1:+.1%}"
        vs_replay = f"{step / replay_step - 1:+.1%}" if replay_step and "EWC" in name else ""
        print(f"{name:40s} {step:8.3f} {tps:9.1f} {vs_trainer:>11s} {per_token:>16s} {vs_replay:>17s}")
    print("s/step is the median step; tokens/s = non-padding tokens / summed step time. Replay changes which rows "
          "are in a batch, so replay vs plain compares time per token; EWC vs replay-only has identical batches.")
    for representation, seconds in fisher_seconds.items():
        print(f"Fisher estimate ({representation}, {args.fisher_examples} examples): {seconds:.1f} s")
    print(f"peak RSS (this process, every arm trained in it): {jobs.peak_rss_mb():.0f} MiB")
    summary = {name: {"s_per_step": s, "tokens_per_s": t} for name, (s, t) in base.items()}
    (args.workdir / "throughput.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
