"""The ``selftune`` command line: the typer app, built from the command modules beside this one.

Start-up stays fast: torch, transformers and the HTTP service are imported only by the commands that need them.
"""

from __future__ import annotations

import os
import sys

import typer

from selftune.policies.errors import SelftuneError

from selftune.daemon.cli.common import ConfigOption, StateOption, remember_state
from selftune.daemon.cli.feedback import feedback
from selftune.daemon.cli.ingest import ingest
from selftune.daemon.cli.lineage import branch_app, cycle, promote, rollback
from selftune.daemon.cli.report import report
from selftune.daemon.cli.serve import serve, token_app
from selftune.daemon.cli.state import export, generations, init, show_config, status

app = typer.Typer(help="selftune: a continual self-tuning daemon for small language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)


@app.callback()
def main(ctx: typer.Context, state: StateOption = None, config: ConfigOption = None) -> None:
    remember_state(ctx, state, config)


# In the order `selftune --help` lists them.
for command in (init, ingest, feedback, status, generations, export):
    app.command()(command)
app.command("config")(show_config)
for command in (cycle, promote, rollback, report, serve):
    app.command()(command)
app.add_typer(branch_app, name="branch")
app.add_typer(token_app, name="token")


def run() -> None:
    """Entry point: selftune's own errors end in one clear line, not a traceback."""
    # transformers' tqdm bars would only land in pipes and logs (the cycle worker's output is a log file);
    # selftune draws its own progress with rich. The processes it starts inherit the setting.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except SelftuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the machine's (a missing file, a read-only or full disk): its message names the path
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
