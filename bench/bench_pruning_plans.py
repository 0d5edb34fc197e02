"""What each pruning plan costs: the foundation model pruned by several plans, no heal, against itself.

SmolLM2-135M (generation 0) is scored on python_docs traffic and cut by each plan (share of decoder layers,
share of MLP channels); for each the table gives parameters, decode tokens/s (timed interleaved with the
unpruned model, the baseline: ``speed.compare_decode_speed``), the foundation probe loss (generation 0's own
answers to the probe prompts, as the cycle's gate measures it) and the held-out python_docs loss. It shows how
far each plan is from the gates (foundation probe within ``gates.max_foundation_regression`` of the parent)
before any heal.

    .venv/bin/python bench/bench_pruning_plans.py                     # ~10 min on 2 cores
    .venv/bin/python bench/bench_pruning_plans.py --plans 0.2:0.25,0:0.25

``--specialist DOMAIN`` measures the specialist path instead (issue 13): every fifth row of the domain held
out, the rest its traffic and training rows; layers dropped one at a time from generation 0 within
``--budget`` on the held-out loss (``layer_dropping = "stepwise"``), then healed by distillation
(``--heal-steps``; ``--lora-steps`` adds the LoRA heal on the same pruned model for comparison). It prints
layers removed, parameters, held-out loss (per byte and per token) before, after the drop and after each
heal, decode tokens/s (each timed interleaved with generation 0) and seconds per heal step.

    .venv/bin/python bench/bench_pruning_plans.py --specialist hacker_jargon --heal-steps 50   # ~20 min, 1 thread
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from selftune.daemon.cycle.probes import ANSWER_TOKENS, PROBE_PROMPTS
from selftune.learners import evaluate as ev
from selftune.learners.lm import set_threads
from selftune.learners.prune import held_out_loss_fn, prune_model
from selftune.learners.speed import compare_decode_speed
from selftune.policies.pruning import SPECIALIST_PRUNING, PruningConfig
from selftune.policies.training import EwcConfig, ReplayConfig, TrainConfig

from common import ensure_model  # bench/ is the script's directory, first on sys.path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PYTHON_DOCS = DATA / "python_docs.jsonl"


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/selftune-bench/smollm2-135m-f32"))
    p.add_argument("--plans", default="0.2:0.25,0:0.25,0.2:0,0.27:0,0:0.4",
                   help="comma-separated LAYER_FRACTION:MLP_CHANNEL_FRACTION pairs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--held-out", type=int, default=48, help="python_docs rows held out (the file's last rows)")
    p.add_argument("--specialist", metavar="DOMAIN", help="measure stepwise dropping and the heals on DOMAIN instead")
    p.add_argument("--budget", type=float, default=0.02, help="specialist: max_drop_cost of the drop")
    p.add_argument("--check-rows", type=int, default=32, help="specialist: held-out rows the drop checks its loss on")
    p.add_argument("--report-rows", type=int, default=64, help="specialist: held-out rows the losses are reported on")
    p.add_argument("--score-samples", type=int, default=32, help="specialist: traffic rows that score the layers")
    p.add_argument("--heal-steps", type=int, default=50)
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--lora-steps", type=int, default=0, help="specialist: also a LoRA heal of this many steps")
    args = p.parse_args()
    if args.specialist:
        specialist(args)
        return

    set_threads(args.threads)
    model, tokenizer = ev.load_model(ensure_model(args.model_dir))
    rows = [json.loads(line) for line in PYTHON_DOCS.read_text().splitlines()]
    traffic = [(r["prompt"], r["response"]) for r in rows[: len(rows) * 8 // 10]]
    held_out = [conversation(r["prompt"], r["response"]) for r in rows[-args.held_out:]]
    prompts = json.loads(PROBE_PROMPTS.read_text())
    answers = ev.complete_answers(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
    probe = [conversation(q, a) for q, a in zip(prompts, answers) if a]

    def measure(m) -> tuple[int, float, float]:
        return (ev.parameter_count(m), ev.held_out_loss(m, tokenizer, probe, autocast=False).loss,
                ev.held_out_loss(m, tokenizer, held_out, autocast=False).loss)

    console = Console(width=160)
    base = measure(model)
    rows, base_speeds = [], []
    for plan in args.plans.split(","):
        layers, channels = (float(x) for x in plan.split(":"))
        pruned = copy.deepcopy(model)
        _, report = prune_model(pruned, traffic, PruningConfig(enabled=True, layer_fraction=layers,
                                                               mlp_channel_fraction=channels), tokenizer, autocast=False)
        params, probe_loss, python_loss = measure(pruned)
        speed = compare_decode_speed(model, pruned, tokenizer, new_tokens=32, rounds=3)
        base_speeds.append(speed.a.tokens_per_s)
        rows.append((f"{layers:g} : {channels:g}", ",".join(map(str, report["layers_removed"])) or "-",
                     f"{params / 1e6:.2f}M", f"{params / base[0]:.3f}", f"{speed.b.tokens_per_s:.1f}",
                     f"{speed.ratio:.2f}x", f"{probe_loss:.3f}", f"{probe_loss / base[1] - 1:+.0%}", f"{python_loss:.3f}",
                     f"{python_loss / base[2] - 1:+.0%}"))
        console.print(f"plan {plan} measured", style="dim")
    table = Table(title=f"pruning plans on SmolLM2-135M, no heal, each against the unpruned parent ({len(probe)} probe "
                        f"answers, {len(held_out)} held-out rows, {args.threads} threads)")
    for column in ("layers : MLP", "layers removed", "params", "ratio", "decode tok/s", "ratio",
                   "probe loss", "change", "python loss", "change"):
        table.add_column(column, justify="left" if column.startswith("layers") else "right", no_wrap=True)
    base_speed = f"{statistics.median(base_speeds):.1f}" if base_speeds else "-"  # the median of its timings
    table.add_row("parent", "-", f"{base[0] / 1e6:.2f}M", "1.000", base_speed, "1.00x",
                  f"{base[1]:.3f}", "+0%", f"{base[2]:.3f}", "+0%")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def specialist(args: argparse.Namespace) -> None:
    """Stepwise layer dropping on a domain's own traffic, then a distillation heal (and optionally LoRA's)."""
    from selftune.learners import jobs
    from selftune.learners.heal import run_heal, write_heal_job
    from selftune.learners.merge import merge_adapter
    from selftune.learners.train import run_job

    set_threads(args.threads)
    model_dir = ensure_model(args.model_dir)
    model, tokenizer = ev.load_model(model_dir)
    rows = [json.loads(line) for line in (DATA / f"{args.specialist}.jsonl").read_text().splitlines()]
    train = [{"id": i, "prompt": r["prompt"], "response": r["response"]} for i, r in enumerate(rows) if i % 5]
    held_out = [conversation(r["prompt"], r["response"]) for i, r in enumerate(rows) if not i % 5]
    check, report_rows = held_out[: args.check_rows], held_out[: args.report_rows]
    console, facts = Console(width=160), {}

    def measure(name: str, m) -> None:
        loss = ev.held_out_loss(m, tokenizer, report_rows, max_length=256)
        speed = compare_decode_speed(ev.load_model(model_dir)[0], m, tokenizer, new_tokens=32, rounds=5)  # vs gen 0
        facts[name] = {"params": ev.parameter_count(m), "layers": m.config.num_hidden_layers, "loss_per_byte": loss.loss,
                       "loss_per_token": loss.loss_per_token, "decode_tokens_per_s": speed.b.tokens_per_s,
                       "decode_vs_foundation": speed.ratio}
        console.print(f"{name}: {facts[name]}", style="dim")

    measure("foundation", model)
    config = PruningConfig(**{**SPECIALIST_PRUNING.__dict__, "max_drop_cost": args.budget,
                              "score_samples": args.score_samples, "heal_steps": args.heal_steps})
    started = time.perf_counter()
    _, report = prune_model(model, [(r["prompt"], r["response"]) for r in train], config, tokenizer,
                            loss_fn=held_out_loss_fn(tokenizer, check, max_length=256))
    drop_seconds = time.perf_counter() - started
    console.print(f"drop: {report['stopped']} ({drop_seconds:.0f} s)")
    for step in report["steps"]:
        console.print(f"  layer {step['layer']}: influence {step['influence']:.4f}, check loss x{step['loss_ratio']:.4f}"
                      f"{'' if step['kept'] else ' (over budget: undone)'}")
    measure("dropped", model)
    work = Path(tempfile.mkdtemp(prefix="bench-specialist-"))
    model.save_pretrained(work / "pruned")
    tokenizer.save_pretrained(work / "pruned")
    del model
    heal_train = TrainConfig(batch_size=args.heal_batch, max_length=256, threads=args.threads, checkpoint_every=0,
                             steps=max(args.lora_steps, 1))
    heals = {"distill": args.heal_steps, "lora": args.lora_steps} if report["layers_removed"] else {}
    for kind, steps in heals.items():
        if not steps:
            continue
        started = time.perf_counter()
        if kind == "distill":
            write_heal_job(work / "distill", student=work / "pruned", teacher=model_dir, prune_report=report,
                           train_rows=train, pruning=config, train=heal_train)
            result, healed_dir = run_heal(work / "distill"), work / "distill" / "model"
        else:
            jobs.write_job(work / "lora", base_model=work / "pruned", train_rows=train, train=heal_train,
                           replay=ReplayConfig(buffer_size=0), ewc=EwcConfig(strength=0.0, fisher_examples=0))
            result, healed_dir = run_job(work / "lora"), work / "lora" / "healed"
            merge_adapter(work / "pruned", work / "lora" / jobs.ADAPTER_DIR, healed_dir)
        seconds = time.perf_counter() - started
        console.print(f"{kind} heal: {steps} steps in {seconds:.0f} s, step median {result['step_s_median']} s, "
                      f"loss {result['loss_first']} -> {result['loss_last']}")
        measure(f"healed ({kind})", ev.load_model(healed_dir)[0])
        facts[f"healed ({kind})"].update(heal_seconds=round(seconds, 1), step_s_median=result["step_s_median"])

    table = Table(title=f"{args.specialist}: stepwise drop within +{args.budget:.0%} on {len(check)} held-out rows, "
                        f"losses on {len(report_rows)} held-out rows, {args.threads} thread(s)")
    for column in ("model", "layers", "params", "loss (nats/byte)", "change", "loss (nats/token)", "decode tok/s", "x"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    base = facts["foundation"]
    for name, f in facts.items():
        table.add_row(name, str(f["layers"]), f"{f['params'] / 1e6:.2f}M", f"{f['loss_per_byte']:.4f}",
                      f"{f['loss_per_byte'] / base['loss_per_byte'] - 1:+.2%}", f"{f['loss_per_token']:.4f}",
                      f"{f['decode_tokens_per_s']:.1f}", f"{f['decode_vs_foundation']:.2f}x")
    console.print(table)
    print(json.dumps({"layers_removed": report["layers_removed"], "stopped": report["stopped"],
                      "drop_seconds": round(drop_seconds, 1), "models": facts}, indent=1))


if __name__ == "__main__":
    main()
