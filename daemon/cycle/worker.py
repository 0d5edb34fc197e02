"""The cycle worker process: ``python -m selftune.daemon.cycle.worker --state S --config C CYCLE_ID``.

SIGTERM (``control.cancel_cycle``) cancels the cycle: training checkpoints (or its process is killed after
``server.stop_timeout_seconds``), the step it was in is recorded "cancelled", the cycle ends "cancelled" and
nothing half-made becomes visible. A crash (even kill -9) leaves the cycle unfinished at its step; starting
the worker again resumes it there.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from types import FrameType

from selftune.learners.jobs import exit_now

from selftune.daemon.context import Context
from selftune.daemon.cycle.control import close_running_steps
from selftune.daemon.cycle.trainer import Cancelled
from selftune.daemon.cycle.recipe import run_cycle


def _cancel(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: stopping must not be interrupted
    raise Cancelled(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selftune-worker")
    parser.add_argument("--state", required=True)
    parser.add_argument("--config")
    parser.add_argument("cycle", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    context = Context.open(args.state, args.config)
    signal.signal(signal.SIGTERM, _cancel)

    try:
        cycle = run_cycle(context, args.cycle)
    except Cancelled:  # the recipe has recorded the step it stopped as "cancelled"
        _end(context, args.cycle, "cancelled", "cancelled by SIGTERM")
        return 0
    except Exception as exc:  # recorded as the cycle's outcome; the service goes on
        traceback.print_exc()
        _end(context, args.cycle, "failed", f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        context.store.engine.dispose()  # exit_now skips the interpreter's teardown: close the connections here
    logging.info("cycle %s finished: %s", cycle.id, cycle.outcome)
    return 0


def _end(context: Context, cycle_id: int, outcome: str, error: str) -> None:
    """Finish the cycle with ``outcome``; a step record still open (a signal came between recording the step
    and running it) is closed with the same outcome."""
    with context.store.transaction(write=True) as tx:
        if tx.cycles.get(cycle_id).finished_at is None:
            close_running_steps(tx, cycle_id, outcome)
            tx.cycles.finish(cycle_id, outcome, error)


if __name__ == "__main__":
    exit_now(main())
