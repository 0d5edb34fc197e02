"""What each pruning plan costs: the foundation model pruned by several plans, no heal, against itself.

SmolLM2-135M (generation 0) is scored on python_docs traffic and cut by each plan (share of decoder layers,
share of MLP channels); for each the table gives parameters, decode tokens/s (the unpruned model timed in the
same run is the baseline), the foundation probe loss (generation 0's own answers to the probe prompts, as
the cycle's gate measures it) and the held-out python_docs loss. It shows how far each plan is from the
gates (foundation probe within ``gates.max_foundation_regression`` of the parent) before any heal.

    .venv/bin/python bench/bench_pruning_plans.py                     # ~10 min on 2 cores
    .venv/bin/python bench/bench_pruning_plans.py --plans 0.2:0.25,0:0.25
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from selftune.daemon.cycle.probes import ANSWER_TOKENS, PROBE_PROMPTS
from selftune.learners import evaluate as ev
from selftune.learners.lm import set_threads
from selftune.learners.prune import prune_model
from selftune.policies.pruning import PruningConfig

from common import ensure_model  # bench/ is the script's directory, first on sys.path

PYTHON_DOCS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "python_docs.jsonl"


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/selftune-bench/smollm2-135m-f32"))
    p.add_argument("--plans", default="0.2:0.25,0:0.25,0.2:0,0.27:0,0:0.4",
                   help="comma-separated LAYER_FRACTION:MLP_CHANNEL_FRACTION pairs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--held-out", type=int, default=48, help="python_docs rows held out (the file's last rows)")
    args = p.parse_args()

    set_threads(args.threads)
    model, tokenizer = ev.load_model(ensure_model(args.model_dir))
    rows = [json.loads(line) for line in PYTHON_DOCS.read_text().splitlines()]
    traffic = [(r["prompt"], r["response"]) for r in rows[: len(rows) * 8 // 10]]
    held_out = [conversation(r["prompt"], r["response"]) for r in rows[-args.held_out:]]
    prompts = json.loads(PROBE_PROMPTS.read_text())
    answers = ev.complete_answers(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
    probe = [conversation(q, a) for q, a in zip(prompts, answers) if a]

    def measure(m) -> tuple[int, float, float, float]:
        return (ev.parameter_count(m), ev.decode_tokens_per_second(m, tokenizer, new_tokens=32, repeats=3).tokens_per_s,
                ev.held_out_loss(m, tokenizer, probe, autocast=False).loss,
                ev.held_out_loss(m, tokenizer, held_out, autocast=False).loss)

    console = Console(width=160)
    base = measure(model)
    table = Table(title=f"pruning plans on SmolLM2-135M, no heal, each against the unpruned parent ({len(probe)} probe "
                        f"answers, {len(held_out)} held-out rows, {args.threads} threads)")
    for column in ("layers : MLP", "layers removed", "params", "ratio", "decode tok/s", "ratio",
                   "probe loss", "change", "python loss", "change"):
        table.add_column(column, justify="left" if column.startswith("layers") else "right", no_wrap=True)
    table.add_row("parent", "-", f"{base[0] / 1e6:.2f}M", "1.000", f"{base[1]:.1f}", "1.00x",
                  f"{base[2]:.3f}", "+0%", f"{base[3]:.3f}", "+0%")
    for plan in args.plans.split(","):
        layers, channels = (float(x) for x in plan.split(":"))
        pruned = copy.deepcopy(model)
        _, report = prune_model(pruned, traffic, PruningConfig(enabled=True, layer_fraction=layers,
                                                               mlp_channel_fraction=channels), tokenizer, autocast=False)
        params, speed, probe_loss, python_loss = measure(pruned)
        table.add_row(f"{layers:g} : {channels:g}", ",".join(map(str, report["layers_removed"])) or "-", f"{params / 1e6:.2f}M",
                      f"{params / base[0]:.3f}", f"{speed:.1f}", f"{speed / base[1]:.2f}x", f"{probe_loss:.3f}",
                      f"{probe_loss / base[2] - 1:+.0%}", f"{python_loss:.3f}", f"{python_loss / base[3] - 1:+.0%}")
        console.print(f"plan {plan} measured", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
