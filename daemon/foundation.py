"""Generation 0: the foundation model materialised into the artifact store and registered, exactly once."""

from __future__ import annotations

from selftune.policies.records import CHAMPION, FOUNDATION_ID, MAIN_BRANCH, Generation

from selftune.daemon.context import Context


def ensure_generation_zero(context: Context, source: str) -> tuple[Generation, bool]:
    """Generation 0 of ``main`` with alias ``champion``; (it, True) if this call created it.

    Crash-safe in any order: the directory is renamed into place only when complete, and a
    complete directory without its database row is registered rather than written again.
    """
    with context.store.transaction() as tx:
        existing = tx.generations.find(FOUNDATION_ID)
    if existing is not None:
        return existing, False
    artifacts = context.artifacts
    artifacts.clean_temporaries()
    if FOUNDATION_ID not in artifacts.ids():
        from transformers.utils import logging as transformers_logging

        from selftune.learners.foundation import materialise  # torch: only when there is work to do

        transformers_logging.disable_progress_bar()
        artifacts.write(FOUNDATION_ID, lambda directory: materialise(source, directory),
                        {"parent": None, "branch": MAIN_BRANCH, "kind": "foundation"})
    manifest = artifacts.verify(FOUNDATION_ID)
    with context.store.transaction(write=True) as tx:
        tx.branches.create(MAIN_BRANCH)
        generation = tx.generations.add(
            id=FOUNDATION_ID, parent_id=None, branch=MAIN_BRANCH, status="promoted",
            path=str(artifacts.root / str(FOUNDATION_ID)), checksum=manifest["checksum"],
            params=manifest["params"], metrics={"foundation": source},
        )
        tx.branches.set_root(MAIN_BRANCH, FOUNDATION_ID)
        tx.aliases.set(MAIN_BRANCH, CHAMPION, FOUNDATION_ID)
    return generation, True
