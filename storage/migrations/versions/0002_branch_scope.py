"""Specialist branches: a branch's scope is a list of domains (``branch_domains``), and it has settings.

The single ``branches.domain`` moves into ``branch_domains`` (one row per domain; the domain is the
primary key, so it belongs to at most one branch). Revision 0001 did not enforce that: if two branches
claimed one domain, the one ingest routed it to keeps it (the last by name, as the old routing table
was built). ``branches.settings`` is a JSON document, ``{}`` for the existing branches.

Downgrade puts one domain back per branch (the first by name, if a branch has several) and drops
the settings: a branch's other domains and its settings are lost.

Revision ID: 0002
Revises: 0001
Create Date: 2026-01-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A frozen copy of the type at this revision (models.py may change later; this file must not).
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "branch_domains",
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("branch", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("domain", name="pk_branch_domains"),
        sa.ForeignKeyConstraint(["branch"], ["branches.name"], name="fk_branch_domains_branch_branches"),
    )
    op.create_index("ix_branch_domains_branch", "branch_domains", ["branch"])
    op.execute(
        "INSERT INTO branch_domains (domain, branch) SELECT domain, MAX(name) FROM branches "
        "WHERE domain IS NOT NULL AND domain <> '' GROUP BY domain"
    )
    op.add_column("branches", sa.Column("settings", JSON_DOC, nullable=False, server_default=sa.text("'{}'")))
    # A plain column: SQLite (3.35+) drops it in place. A batch rebuild of `branches` would have to drop
    # the table, which its foreign keys (generations, aliases, cycles) forbid inside the transaction.
    op.drop_column("branches", "domain")


def downgrade() -> None:
    op.add_column("branches", sa.Column("domain", sa.Text(), nullable=True))
    op.execute(
        "UPDATE branches SET domain = (SELECT MIN(d.domain) FROM branch_domains d WHERE d.branch = branches.name)"
    )
    op.drop_column("branches", "settings")
    op.drop_index("ix_branch_domains_branch", table_name="branch_domains")
    op.drop_table("branch_domains")
