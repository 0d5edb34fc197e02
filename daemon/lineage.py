"""The lineage: generation 0 (the foundation, its root), then aliases and branches: promote, roll back, fork.

Each change is one database transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selftune.policies.branches import effective_config, parse_value, with_setting, without_setting
from selftune.policies.config import BRANCH_NAME, Config
from selftune.policies.errors import ConflictError, InvalidRecordError, NotFoundError
from selftune.policies.records import (
    AUTO_MODEL, CHALLENGER, CHAMPION, FOUNDATION_ID, MAIN_BRANCH, Branch, Generation, ReplayMember,
)
from selftune.storage.contracts import UnitOfWork

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
        from transformers.utils import logging as transformers_logging  # heavy: only when there is work to do

        from selftune.learners.foundation import materialise  # torch: only when there is work to do

        from selftune.daemon.reports.render import MODEL_CARD, foundation_model_card

        def fill(directory: Path) -> dict[str, Any]:
            facts = {**materialise(source, directory), "card": foundation_card(source)}
            card = foundation_model_card({**facts, "branch": MAIN_BRANCH})
            (directory / MODEL_CARD).write_text(card, encoding="utf-8")
            return facts

        transformers_logging.disable_progress_bar()
        artifacts.write(FOUNDATION_ID, fill, {"parent": None, "branch": MAIN_BRANCH, "kind": "foundation"})
    manifest = artifacts.verify(FOUNDATION_ID)
    with context.store.transaction(write=True) as tx:
        tx.branches.create(MAIN_BRANCH)
        generation = tx.generations.add(
            id=FOUNDATION_ID, parent_id=None, branch=MAIN_BRANCH, status="promoted",
            path=str(artifacts.path(FOUNDATION_ID)), checksum=manifest["checksum"],
            params=manifest["params"], metrics={"foundation": source},
        )
        tx.branches.set_root(MAIN_BRANCH, FOUNDATION_ID)
        tx.aliases.set(MAIN_BRANCH, CHAMPION, FOUNDATION_ID)
    return generation, True


def foundation_card(source: str) -> dict[str, Any]:
    """What model cards say of the foundation ``source``: ``base_model`` (its Hub id, known for the embedded
    model), ``license`` and ``language`` (a directory's: from its own README.md card, if it has one)."""
    from huggingface_hub import ModelCard

    from selftune.learners.foundation import EMBEDDED, EMBEDDED_CARD

    if source == EMBEDDED:
        return dict(EMBEDDED_CARD)
    readme = Path(source) / "README.md"
    if not readme.is_file():
        return {}
    data = ModelCard.load(readme, ignore_metadata_errors=True).data
    return {key: value for key in ("license", "language") if (value := getattr(data, key, None))}


def lineage_card(context: Context) -> dict[str, Any]:
    """The foundation's card facts as generation 0 recorded them: each generation's card repeats them."""
    manifest = context.artifacts.verify(FOUNDATION_ID, deep=False)
    if "card" in manifest:
        return dict(manifest["card"])
    source = manifest.get("source")  # a generation 0 written before it recorded them
    return foundation_card(source) if source else {}


def make_champion(tx: UnitOfWork, branch: str, generation_id: int, replay_buffer: list[int]) -> None:
    """Inside a transaction: the generation becomes the branch's champion, and the replay buffer its trainer
    left (earlier members and this cycle's rows, as the replay policy chose) becomes the branch's."""
    tx.generations.set_status(generation_id, "promoted")
    tx.aliases.set(branch, CHAMPION, generation_id)
    challenger = tx.aliases.get(branch, CHALLENGER)
    if challenger is not None and challenger.generation_id == generation_id:
        tx.aliases.remove(branch, CHALLENGER)
    tx.replay.remove(branch, [m.interaction_id for m in tx.replay.members(branch)])
    tx.replay.add_many([ReplayMember(branch, i, generation_id) for i in replay_buffer])


def promote(context: Context, generation_id: int) -> Generation:
    """Make a candidate (or an earlier champion) the champion of its branch."""
    with context.store.transaction(write=True) as tx:
        generation = tx.generations.get(generation_id)
        if generation.status in ("rejected", "failed"):
            raise ConflictError(f"generation {generation_id} was {generation.status} by its gates: "
                                "see its report; only a candidate or an earlier champion can be promoted")
        manifest = context.artifacts.verify(generation_id, deep=False)
        make_champion(tx, generation.branch, generation_id, manifest.get("data", {}).get("replay_buffer", []))
        return tx.generations.get(generation_id)


def rollback(context: Context, branch: str) -> Generation:
    """Move the branch's champion back to the champion's parent."""
    with context.store.transaction(write=True) as tx:
        current = tx.aliases.get(branch, CHAMPION)
        if current is None:
            raise NotFoundError(f"branch {branch!r} has no champion to roll back")
        generation = tx.generations.get(current.generation_id)
        root = tx.branches.get(branch).root_generation_id
        if generation.parent_id is None or generation.id == root:
            raise ConflictError(f"generation {generation.id} is where branch {branch!r} starts: nothing to roll back to")
        tx.aliases.set(branch, CHAMPION, generation.parent_id)
        return tx.generations.get(generation.parent_id)


def create_branch(context: Context, name: str, from_generation: int, domains: Sequence[str] = ()) -> Branch:
    """Fork a line at a generation: its champion starts there and it inherits the replay buffer.

    With ``domains`` it is a specialist: ingest routes those domains' interactions to it, and it runs with
    the specialist defaults (``policies.branches``). A domain another branch has is refused, naming it."""
    if not BRANCH_NAME.match(name):
        raise InvalidRecordError(f"branch name {name!r}: use lowercase letters, digits, '-' and '_' (at most 63)")
    if name == AUTO_MODEL:
        raise InvalidRecordError(f"branch name {name!r} is the model name that routes each request: choose another")
    effective_config(context.config, name, domains)  # its [branches.NAME] table must hold for it as it will be
    with context.store.transaction(write=True) as tx:
        source = tx.generations.get(from_generation)
        if source.status in ("rejected", "failed"):
            raise ConflictError(f"generation {from_generation} is {source.status}: fork from a promoted one")
        branch = tx.branches.create(name, root_generation_id=from_generation, domains=domains)
        tx.aliases.set(name, CHAMPION, from_generation)
        inherited = tx.replay.members(source.branch)
        tx.replay.add_many([ReplayMember(name, m.interaction_id, m.experience, m.priority) for m in inherited])
        return branch


def branch_config(config: Config, branch: Branch) -> Config:
    """The configuration ``branch``'s cycles run with: global, specialist defaults, its table, its own settings."""
    return effective_config(config, branch.name, branch.domains, branch.settings)


def set_branch_setting(context: Context, name: str, key: str, value: str | None) -> Branch:
    """Store ``key = value`` (the text a user typed) with the branch, or with None drop its stored ``key``.

    The value is parsed with the setting's type and the branch's whole effective configuration checked
    before anything is written: a bad key or value raises ``ConfigError`` and changes nothing."""
    with context.store.transaction(write=True) as tx:
        branch = tx.branches.get(name)
        if value is None:
            stored = without_setting(branch.settings, key)
        else:
            stored = with_setting(branch.settings, key, parse_value(key, value))
        effective_config(context.config, name, branch.domains, stored)
        return tx.branches.set_settings(name, stored)


def domain_routes(context: Context) -> dict[str, str]:
    """Which branch each domain of a scope goes to (rows of other domains go to the default branch)."""
    with context.store.transaction() as tx:
        return {domain: b.name for b in tx.branches.list() for domain in b.domains}
