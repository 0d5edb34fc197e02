"""The storage contract: one test body per behaviour, run on SQLite and on PostgreSQL (conftest.py)."""

from __future__ import annotations

import inspect
import threading
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, delete, func, select
from sqlalchemy import inspect as inspect_db
from sqlalchemy.exc import DBAPIError

from selftune.policies.errors import ConflictError, InvalidRecordError, NotFoundError
from selftune.policies.records import FeedbackIn, IngestResult, InteractionIn, Message, ReplayMember
from selftune.storage import Store, UnitOfWork, contracts, current_revision, head_revision, migrate
from selftune.storage import models as m

T0 = datetime(2025, 1, 1, tzinfo=UTC)  # the TickingClock's first reading (conftest.py)
TABLES = {
    "interactions",
    "feedback",
    "branches",
    "branch_domains",
    "generations",
    "aliases",
    "cycles",
    "cycle_events",
    "replay_members",
    "api_tokens",
    "alembic_version",
}


def chat(prompt: str, response: str = "ok", **kwargs: object) -> InteractionIn:
    messages = (Message("user", prompt), Message("assistant", response))
    return InteractionIn(messages=messages, **kwargs)  # type: ignore[arg-type]


def row_count(store: Store, table: object) -> int:
    with store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table)).scalar_one()  # type: ignore[arg-type]


def add_lineage(store: Store) -> None:
    """Branch main with generation 0 (the foundation) and two children of it."""
    with store.transaction(write=True) as uow:
        uow.branches.create("main")
        uow.generations.add("main", "gens/0", "sha-0", 135_000_000, status="promoted")
        uow.branches.set_root("main", 0)
        uow.generations.add("main", "gens/1", "sha-1", 120_000_000, parent_id=0)
        uow.generations.add("main", "gens/2", "sha-2", 110_000_000, parent_id=0, metrics={"loss": 1.5})


# --- migrations -------------------------------------------------------------------------------------


def test_migrate_reaches_head_and_is_idempotent(engine: Engine) -> None:
    assert current_revision(engine) is None
    assert migrate(engine) == head_revision()
    assert migrate(engine) == head_revision()  # a second run changes nothing and does not fail
    assert current_revision(engine) == head_revision()
    assert TABLES <= set(inspect_db(engine).get_table_names())


def test_migrations_create_exactly_the_models(engine: Engine) -> None:
    migrate(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), m.metadata)
    assert differences == []


# --- the contract ----------------------------------------------------------------------------------


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(f) for name, f in inspect.getmembers(cls, inspect.isfunction) if name[0] != "_"}


def same_signature(contract: inspect.Signature, implementation: inspect.Signature) -> bool:
    # Annotations are strings (postponed evaluation); a class body with a list() method spells the builtin
    # builtins.list, which is the same type.
    def plain(signature: inspect.Signature) -> str:
        return str(signature).replace("builtins.", "")

    return plain(contract) == plain(implementation)


def test_the_sql_unit_of_work_offers_exactly_the_contract(store: Store) -> None:
    repositories = {name: value for name, value in vars(UnitOfWork).items() if isinstance(value, property)}
    with store.transaction() as uow:
        offered = {name for name in vars(uow) if name != "connection"}
        assert offered == set(repositories)
        for name, attribute in repositories.items():
            contract = getattr(contracts, attribute.fget.__annotations__["return"])
            wanted, implemented = public_methods(contract), public_methods(type(getattr(uow, name)))
            assert set(implemented) == set(wanted), f"uow.{name}"
            for method, signature in wanted.items():
                assert same_signature(signature, implemented[method]), f"uow.{name}.{method}{implemented[method]}"


# --- interactions -----------------------------------------------------------------------------------


def test_add_batch_counts_accepted_and_duplicates_across_and_within_batches(store: Store) -> None:
    first = [chat("a"), chat("b"), chat("a"), chat("c", external_id="x1"), chat("other", external_id="x1")]
    with store.transaction(write=True) as uow:
        # "other" under the id of "c" is a conflict: counted and named, not a silent duplicate
        assert uow.interactions.add_batch(first) == IngestResult(accepted=3, duplicates=1, conflicts=1,
                                                                 conflict_ids=("x1",))
        assert uow.interactions.add_batch([]) == IngestResult()
    with store.transaction(write=True) as uow:
        result = uow.interactions.add_batch([chat("b"), chat("d"), chat("a", branch="fork")])
    # "b" is known to main; "a" is new to branch fork: dedupe is per branch.
    assert (result.accepted, result.duplicates) == (2, 1)
    assert row_count(store, m.interactions) == 5


def test_reingest_is_idempotent_by_external_id_and_by_content_hash(store: Store) -> None:
    rows = [chat(f"q{i}", external_id=f"id-{i}") for i in range(5)] + [chat(f"plain {i}") for i in range(5)]
    with store.transaction(write=True) as uow:
        assert uow.interactions.add_batch(rows).accepted == 10
    edited = [chat(f"edited {i}", external_id=f"id-{i}") for i in range(5)]  # same ids, new content
    with store.transaction(write=True) as uow:
        again = uow.interactions.add_batch(rows) + uow.interactions.add_batch(edited)
    assert (again.accepted, again.duplicates, again.conflicts) == (0, 10, 5)
    assert again.conflict_ids == tuple(f"id-{i}" for i in range(5))
    with store.transaction() as uow:
        found = uow.interactions.find_by_external_id("main", "id-3")
        assert found is not None and found.prompt == "q3"  # the first version stays
        assert uow.interactions.find_by_external_id("main", "nope") is None
        assert uow.interactions.count_after("main") == 10


def test_interactions_round_trip_every_field_with_utc_times(store: Store) -> None:
    row = InteractionIn(
        messages=(Message("system", "be brief"), Message("user", "héllo ✓"), Message("assistant", "hi")),
        branch="main",
        domain="greetings",
        tags=("t1", "t2"),
        external_id="e-1",
        source="file",
        metadata={"lang": "fr", "n": 3},
    )
    with store.transaction(write=True) as uow:
        uow.interactions.add_batch([row])
    with store.transaction() as uow:
        (got,) = uow.interactions.list()
        assert uow.interactions.get(got.id) == got
        with pytest.raises(NotFoundError, match="interaction 999 "):
            uow.interactions.get(999)
    assert got.messages == row.messages and got.tags == ("t1", "t2") and got.metadata == {"lang": "fr", "n": 3}
    assert (got.branch, got.domain, got.external_id, got.source) == ("main", "greetings", "e-1", "file")
    assert got.content_hash == row.content_hash and len(got.content_hash) == 64
    assert got.created_at == T0 and got.created_at.tzinfo is UTC


def test_list_paginates_by_id_and_filters(store: Store) -> None:
    rows = [chat(f"q{i}", branch="main" if i % 3 else "fork", domain="even" if i % 2 == 0 else None) for i in range(25)]
    with store.transaction(write=True) as uow:
        uow.interactions.add_batch(rows)
    with store.transaction() as uow:
        everything = uow.interactions.list(limit=1000)
        pages, after = [], None
        while page := uow.interactions.list(after_id=after, limit=10):
            pages.append(page)
            after = page[-1].id
        main = uow.interactions.list(branch="main", limit=1000)
        main_even = uow.interactions.list(branch="main", domain="even", limit=1000)
        since = list(uow.interactions.since("main", after_id=main[4].id, page=3))
        counts = uow.interactions.count_by_branch_domain()
        last = uow.interactions.max_id("fork")
    ids = [i.id for i in everything]
    assert len(ids) == 25 and ids == sorted(ids)
    assert [len(p) for p in pages] == [10, 10, 5] and [i.id for p in pages for i in p] == ids
    assert [i.prompt for i in main] == [f"q{i}" for i in range(25) if i % 3]
    assert {i.prompt for i in main_even} == {f"q{i}" for i in range(25) if i % 3 and i % 2 == 0}
    assert since == main[5:]
    assert counts == [("fork", None, 4), ("fork", "even", 5), ("main", None, 8), ("main", "even", 8)]
    assert last == max(i.id for i in everything if i.branch == "fork")


def test_count_after_counts_a_branchs_rows_above_an_id_and_a_time_up_to_a_cap(store: Store) -> None:
    with store.transaction(write=True) as uow:  # one clock reading per batch: created at T0, then T0 + 1 s
        uow.interactions.add_batch([chat(f"old {i}") for i in range(3)] + [chat("elsewhere", branch="fork")])
        uow.interactions.add_batch([chat(f"new {i}") for i in range(4)])
    with store.transaction() as uow:
        ids = [i.id for i in uow.interactions.list(branch="main")]
        count_after = uow.interactions.count_after
        assert (count_after("main"), count_after("fork"), count_after("nowhere")) == (7, 1, 0)
        assert count_after("main", ids[1]) == 5 and count_after("main", ids[-1]) == 0
        assert count_after("main", created_after=T0) == 4  # the second batch only
        assert count_after("main", ids[4], created_after=T0) == 2
        assert count_after("main", ids[1], created_after=T0, at_most=3) == 3  # the cap
        assert count_after("main", ids[1], at_most=10) == 5
        assert count_after("main", ids[1], created_after=T0, at_most=10) == 4


# --- feedback ---------------------------------------------------------------------------------------


def test_feedback_attaches_to_existing_interactions_only(store: Store) -> None:
    with store.transaction(write=True) as uow:
        uow.interactions.add_batch([chat("q")])
        (row,) = uow.interactions.list()
        added = uow.feedback.add(row.id, FeedbackIn("preference", chosen="good", rejected="bad"))
    with store.transaction() as uow:
        assert uow.feedback.for_interaction(row.id) == [added]
        assert uow.feedback.for_interactions([row.id, 12345]) == {row.id: [added]}
    with pytest.raises(NotFoundError, match="interaction 12345 "):
        with store.transaction(write=True) as uow:
            uow.feedback.add(12345, FeedbackIn("thumbs", thumbs_up=False))
    with pytest.raises(InvalidRecordError, match="'stars'"):
        with store.transaction(write=True) as uow:
            uow.feedback.add(row.id, FeedbackIn("stars", score=5))
    assert row_count(store, m.feedback) == 1


def test_a_row_reingested_under_its_id_brings_its_new_feedback_and_a_changed_row_is_a_conflict(store: Store) -> None:
    up, down = FeedbackIn("thumbs", thumbs_up=True), FeedbackIn("thumbs", thumbs_up=False)
    fixed = FeedbackIn("correction", corrected_response="better")
    with store.transaction(write=True) as uow:  # a new row repeated in its own batch brings its feedback too
        assert uow.interactions.add_batch([chat("q", external_id="e1", feedback=(up,)), chat("p", external_id="e2"),
                                           chat("p", external_id="e2", feedback=(down,))]) == IngestResult(
            accepted=2, duplicates=1, feedback=1)
    later = [chat("q", external_id="e1", feedback=(up, fixed)),  # up is there already: only the correction is new
             chat("p", external_id="e2", feedback=(down, FeedbackIn("score", score=0.3))),
             chat("p", external_id="e2", feedback=(FeedbackIn("score", score=0.3),)),
             chat("changed", external_id="e2", feedback=(up,))]  # new messages under a stored id
    with store.transaction(write=True) as uow:
        assert uow.interactions.add_batch(later) == IngestResult(duplicates=3, feedback=2, conflicts=1,
                                                                 conflict_ids=("e2",))
    with store.transaction(write=True) as uow:
        assert uow.interactions.add_batch(later).feedback == 0  # re-ingesting the same file adds nothing
        e1, e2 = (uow.interactions.find_by_external_id("main", e) for e in ("e1", "e2"))
        assert e1 is not None and e2 is not None and e2.prompt == "p"  # the stored row stays
        stored = uow.feedback.for_interactions([e1.id, e2.id])
    assert [(f.kind, f.thumbs_up, f.corrected_response) for f in stored[e1.id]] == [
        ("thumbs", True, None), ("correction", None, "better")]
    assert [(f.kind, f.thumbs_up, f.score) for f in stored[e2.id]] == [("thumbs", False, None), ("score", None, 0.3)]
    assert stored[e1.id][1].created_at > stored[e1.id][0].created_at  # later, so the latest judgement wins


def test_batch_feedback_is_stored_for_accepted_rows_only_and_cascades(store: Store) -> None:
    liked = chat("q1", feedback=(FeedbackIn("thumbs", thumbs_up=True), FeedbackIn("score", score=0.5)))
    again = chat("q1", feedback=(FeedbackIn("thumbs", thumbs_up=False),))  # a duplicate: its feedback is dropped
    with store.transaction(write=True) as uow:
        uow.interactions.add_batch([liked, again, chat("q2")])
        uow.interactions.add_batch([again])
        (first, _) = uow.interactions.list()
        kinds = [(f.kind, f.thumbs_up, f.score) for f in uow.feedback.for_interaction(first.id)]
    assert kinds == [("thumbs", True, None), ("score", None, 0.5)]
    # Foreign keys are enforced (SQLite needs PRAGMA foreign_keys=ON for this): feedback goes with its row.
    with store.engine.begin() as connection:
        connection.execute(delete(m.interactions).where(m.interactions.c.id == first.id))
    assert row_count(store, m.feedback) == 0


# --- branches, generations, aliases ----------------------------------------------------------------


def test_generations_form_a_tree(store: Store) -> None:
    add_lineage(store)
    with store.transaction(write=True) as uow:
        assert [(g.id, g.parent_id) for g in uow.generations.list()] == [(0, None), (1, 0), (2, 0)]
        assert uow.generations.get(2).metrics == {"loss": 1.5}
        assert uow.generations.set_status(1, "rejected").status == "rejected"
        assert uow.branches.get("main").root_generation_id == 0
        uow.branches.create("legal", root_generation_id=2, domains=["law"])
        child = uow.generations.add("legal", "gens/3", "sha-3", 90_000_000, parent_id=2, cycle_id=None)
        assert (child.id, child.branch, child.parent_id) == (3, "legal", 2)
        assert [g.id for g in uow.generations.list(branch="legal")] == [3]
        assert [g.id for g in uow.generations.list()] == [0, 1, 2, 3]
        assert [b.name for b in uow.branches.list()] == ["legal", "main"]
    with store.transaction(write=True) as uow:
        with pytest.raises(NotFoundError, match="parent generation 42 "):
            uow.generations.add("main", "p", "c", 1, parent_id=42)
        with pytest.raises(NotFoundError, match="'nowhere'"):
            uow.generations.add("nowhere", "p", "c", 1)
        with pytest.raises(ConflictError, match="generation 1 exists"):
            uow.generations.add("main", "p", "c", 1, id=1)
        with pytest.raises(InvalidRecordError, match="'shipped'"):
            uow.generations.set_status(1, "shipped")
        with pytest.raises(ConflictError, match="'main' exists"):
            uow.branches.create("main")
        with pytest.raises(NotFoundError, match="generation 77 "):
            uow.generations.get(77)


def test_a_branchs_scope_is_its_own_and_its_settings_round_trip(store: Store) -> None:
    add_lineage(store)
    with store.transaction(write=True) as uow:
        chem = uow.branches.create("chem", root_generation_id=0, domains=["elements", "chemistry", "elements"])
        assert (chem.domains, chem.settings, chem.is_specialist) == (("chemistry", "elements"), {}, True)
        assert not uow.branches.get("main").is_specialist
    with store.transaction(write=True) as uow:
        with pytest.raises(ConflictError, match="domain 'elements' is routed to branch 'chem'"):
            uow.branches.create("rival", root_generation_id=0, domains=["physics", "elements"])
        with pytest.raises(InvalidRecordError, match="pass a list"):
            uow.branches.create("typo", domains="chemistry")  # type: ignore[arg-type]
        with pytest.raises(InvalidRecordError, match="non-empty"):
            uow.branches.create("blank", domains=[" "])
    with store.transaction(write=True) as uow:
        assert uow.branches.find("rival") is None  # the refused create wrote nothing
        settings = {"gates.max_params_ratio": 0.8, "pruning.enabled": True, "train.target_modules": ["q_proj"]}
        assert uow.branches.set_settings("chem", settings).settings == settings
        with pytest.raises(NotFoundError, match="'nope'"):
            uow.branches.set_settings("nope", {})
    with store.transaction() as uow:
        assert uow.branches.get("chem").settings == settings
        assert [(b.name, b.domains) for b in uow.branches.list()] == [("chem", ("chemistry", "elements")), ("main", ())]


def test_alias_moves_atomically_and_keeps_its_place_on_failure(store: Store) -> None:
    add_lineage(store)
    with store.transaction(write=True) as uow:
        first = uow.aliases.set("main", "champion", 0)
    with store.transaction(write=True) as uow:
        moved = uow.aliases.set("main", "champion", 2)
        uow.aliases.set("main", "challenger", 1)
    with store.transaction() as uow:
        assert uow.aliases.get("main", "champion") == moved
        assert moved.generation_id == 2 and moved.updated_at > first.updated_at
        assert [(a.name, a.generation_id) for a in uow.aliases.list()] == [("challenger", 1), ("champion", 2)]
        assert uow.aliases.get("main", "nothing") is None
    with pytest.raises(NotFoundError, match="generation 99 "):
        with store.transaction(write=True) as uow:
            uow.aliases.set("main", "champion", 99)
    with store.transaction(write=True) as uow:
        assert uow.aliases.get("main", "champion") == moved
        assert uow.aliases.remove("main", "challenger") and not uow.aliases.remove("main", "challenger")


# --- cycles and replay ------------------------------------------------------------------------------


def test_cycles_record_state_and_events(store: Store) -> None:
    add_lineage(store)
    with store.transaction(write=True) as uow:
        cycle = uow.cycles.create("main", "select", parent_generation_id=0)
        uow.cycles.set_state(cycle.id, "train")
        started = uow.cycles.add_event(cycle.id, "select", "running")
        uow.cycles.finish_event(started.id, "ok", detail={"rows": 120})
        uow.cycles.add_event(cycle.id, "train", "ok", started_at=T0, finished_at=T0, detail={"loss": 2.0})
        assert [c.id for c in uow.cycles.list(unfinished_only=True)] == [cycle.id]
        uow.cycles.set_generation(cycle.id, 2)
        done = uow.cycles.finish(cycle.id, "promoted", state="done")
    with store.transaction() as uow:
        assert uow.cycles.get(cycle.id) == done
        events = uow.cycles.events(cycle.id)
        assert uow.cycles.list(unfinished_only=True) == []
    assert (done.state, done.outcome, done.generation_id, done.error) == ("done", "promoted", 2, None)
    assert done.finished_at is not None and done.finished_at > done.created_at
    steps = [(e.step, e.outcome, e.detail) for e in events]
    assert steps == [("select", "ok", {"rows": 120}), ("train", "ok", {"loss": 2.0})]
    assert events[0].finished_at is not None and events[0].finished_at > events[0].started_at
    with pytest.raises(ConflictError, match=f"cycle {cycle.id} is finished"):
        with store.transaction(write=True) as uow:
            uow.cycles.finish(cycle.id, "failed")
    with pytest.raises(NotFoundError, match="cycle 404 "):
        with store.transaction(write=True) as uow:
            uow.cycles.add_event(404, "select", "ok")


def test_replay_membership(store: Store) -> None:
    with store.transaction(write=True) as uow:
        uow.interactions.add_batch([chat(f"q{i}") for i in range(4)])
        ids = [i.id for i in uow.interactions.list()]
        uow.replay.add_many([ReplayMember("main", i, experience=1, priority=0.1) for i in ids[:3]])
        uow.replay.add_many([ReplayMember("main", ids[0], experience=2, priority=0.9), ReplayMember("fork", ids[3], 2)])
        assert uow.replay.remove("main", [ids[1], 12345]) == 1
    with store.transaction() as uow:
        members = uow.replay.members("main")
        assert members == [ReplayMember("main", ids[0], 2, 0.9), ReplayMember("main", ids[2], 1, 0.1)]
        assert uow.replay.members("fork") == [ReplayMember("fork", ids[3], 2)]
    with pytest.raises(NotFoundError, match="12345"):
        with store.transaction(write=True) as uow:
            uow.replay.add_many([ReplayMember("main", 12345, 1)])


# --- tokens -----------------------------------------------------------------------------------------


def test_tokens_are_stored_hashed_verify_and_revoke(store: Store) -> None:
    with store.transaction(write=True) as uow:
        token, secret = uow.tokens.create("ci", "ingest")
        other, other_secret = uow.tokens.create("ops", "admin")
    assert secret != other_secret and len(secret) > 40
    with store.engine.connect() as connection:
        stored = [tuple(str(v) for v in row) for row in connection.execute(select(m.api_tokens))]
    assert not any(secret in value or other_secret in value for row in stored for value in row)
    with store.transaction(write=True) as uow:
        assert uow.tokens.verify(secret) == token
        assert uow.tokens.verify(secret + "x") is None and uow.tokens.verify("") is None
        revoked = uow.tokens.revoke(token.id)
        assert revoked.revoked_at is not None
        assert uow.tokens.verify(secret) is None
        assert uow.tokens.verify(other_secret) == other
        assert uow.tokens.revoke(token.id) == revoked  # again: no-op
        assert [t.name for t in uow.tokens.list()] == ["ci", "ops"]
        with pytest.raises(NotFoundError, match="API token 999 "):
            uow.tokens.revoke(999)
        with pytest.raises(InvalidRecordError, match="'root'"):
            uow.tokens.create("x", "root")


# --- transactions -----------------------------------------------------------------------------------


def test_a_failing_transaction_writes_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction(write=True) as uow:
            uow.branches.create("main")
            uow.interactions.add_batch([chat("q", feedback=(FeedbackIn("thumbs", thumbs_up=True),))])
            uow.tokens.create("ci", "ingest")
            raise RuntimeError("boom")
    for table in (m.branches, m.interactions, m.feedback, m.api_tokens):
        assert row_count(store, table) == 0, table.name


def test_a_read_transaction_refuses_writes(store: Store) -> None:
    # SQLite: "attempt to write a readonly database" (query_only); PostgreSQL: "... in a read-only transaction".
    with pytest.raises(DBAPIError, match=r"read-?only"):
        with store.transaction() as uow:
            assert uow.branches.list() == []  # reading is fine
            uow.branches.create("main")
    with pytest.raises(DBAPIError, match=r"read-?only"):
        with store.transaction() as uow:
            uow.interactions.add_batch([chat("q")])
    assert row_count(store, m.branches) == row_count(store, m.interactions) == 0
    with store.transaction(write=True) as uow:  # the same connections write when asked to
        uow.branches.create("main")
    assert row_count(store, m.branches) == 1


def test_ping_answers_when_the_database_does(store: Store) -> None:
    assert store.ping() is None


def test_concurrent_ingests_of_the_same_rows_count_each_row_once(store: Store) -> None:
    rows = [chat(f"q{i}") for i in range(200)]
    results: list[IngestResult] = []

    def ingest() -> None:
        for start in range(0, len(rows), 50):
            with store.transaction(write=True) as uow:
                results.append(uow.interactions.add_batch(rows[start : start + 50]))

    workers = [threading.Thread(target=ingest) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    total = sum(results, IngestResult())
    assert len(results) == 12 and (total.accepted, total.duplicates) == (200, 400)
    with store.transaction() as uow:
        ids = [i.id for i in uow.interactions.since("main")]
    assert len(ids) == 200 and ids == sorted(ids)
