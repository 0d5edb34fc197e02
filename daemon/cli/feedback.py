"""CLI command ``selftune feedback ID``: thumbs, a score, a correction or a comment on a stored interaction."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from selftune.policies.errors import InvalidRecordError
from selftune.policies.ingest import parse_feedback

from selftune.daemon import views
from selftune.daemon.cli.common import JsonOption, console, fail, open_context, print_json


def feedback(ctx: typer.Context,
             interaction: Annotated[str, typer.Argument(help="Interaction id, or the chat completion id "
                                                             "(chatcmpl-...) its exchange was logged under.")],
             thumbs: Annotated[str | None, typer.Option(help="up or down.", show_default=False)] = None,
             score: Annotated[float | None, typer.Option(help="A score (selection.min_score filters on it).",
                                                         show_default=False)] = None,
             correction: Annotated[str | None, typer.Option(help="The response it should have given; it trains "
                                                                 "in place of the logged one.", show_default=False)] = None,
             comment: Annotated[str | None, typer.Option(help="A note kept with the feedback.", show_default=False)] = None,
             as_json: JsonOption = False) -> None:
    """Attach feedback to an interaction after the fact, as POST /v1/interactions/ID/feedback does."""
    if thumbs is None and score is None and correction is None:
        fail("no feedback given: use --thumbs up|down, --score X or --correction TEXT (--comment goes with one)")
    given: dict[str, Any] = {"thumbs": thumbs, "score": score, "correction": correction, "comment": comment}
    try:  # the parser of the HTTP API and of ingest files checks the values
        items = parse_feedback({key: value for key, value in given.items() if value is not None})
    except InvalidRecordError as exc:
        fail(exc.reason)

    context = open_context(ctx)
    with context.store.transaction(write=True) as tx:
        stored = [views.feedback_view(tx.feedback.add(views.resolve_interaction(tx, interaction), item)) for item in items]
    if as_json:
        print_json({"interaction_id": stored[0]["interaction_id"], "feedback": stored})
    else:
        kinds = ", ".join(item["kind"] for item in stored)
        console.print(f"stored {kinds} on interaction {stored[0]['interaction_id']}", highlight=False)
