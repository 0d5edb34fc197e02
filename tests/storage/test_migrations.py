"""Upgrading a database that holds data: each migration keeps it, on SQLite and on PostgreSQL."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Engine, text

from selftune.storage import Store, current_revision, head_revision, migrate
from selftune.storage.db import alembic_config

T0 = "2025-01-01 00:00:00"


def to_revision(engine: Engine, revision: str, *, down: bool = False) -> None:
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def test_0002_moves_each_branchs_domain_into_its_scope_and_keeps_the_rest(engine: Engine) -> None:
    to_revision(engine, "0001")
    with engine.begin() as connection:
        for name, domain in (("main", None), ("chem", "chemistry"), ("jargon", "hacker_jargon"), ("blank", "")):
            connection.execute(text("INSERT INTO branches (name, created_at, root_generation_id, domain) "
                                    "VALUES (:name, :t, NULL, :domain)"), {"name": name, "t": T0, "domain": domain})
        connection.execute(text("INSERT INTO generations (id, branch, status, path, checksum, params, metrics, "
                                "created_at) VALUES (0, 'main', 'promoted', 'g/0', 'sha', 7, '{}', :t)"), {"t": T0})
        connection.execute(text("UPDATE branches SET root_generation_id = 0 WHERE name = 'chem'"))
        connection.execute(text("INSERT INTO aliases (branch, name, generation_id, updated_at) "
                                "VALUES ('chem', 'champion', 0, :t)"), {"t": T0})

    assert migrate(engine) == head_revision()

    with Store(engine).transaction() as tx:
        branches = {b.name: b for b in tx.branches.list()}
        assert {name: b.domains for name, b in branches.items()} == {
            "blank": (), "chem": ("chemistry",), "jargon": ("hacker_jargon",), "main": ()}
        assert all(b.settings == {} for b in branches.values())
        assert branches["chem"].root_generation_id == 0 and branches["chem"].is_specialist
        assert tx.aliases.get("chem", "champion").generation_id == 0  # the rows that refer to branches survive
        assert tx.generations.get(0).path == "g/0"


def test_0002_downgrades_to_one_domain_per_branch(engine: Engine) -> None:
    migrate(engine)
    with Store(engine).transaction(write=True) as tx:
        tx.branches.create("main")
        tx.branches.create("chem", domains=["chemistry", "elements"], settings={"train.steps": 5})
    to_revision(engine, "0001", down=True)
    assert current_revision(engine) == "0001"
    with engine.connect() as connection:
        rows = dict(connection.execute(text("SELECT name, domain FROM branches")).all())
    assert rows == {"main": None, "chem": "chemistry"}
    migrate(engine)  # and up again
    with Store(engine).transaction() as tx:
        assert tx.branches.get("chem").domains == ("chemistry",)
