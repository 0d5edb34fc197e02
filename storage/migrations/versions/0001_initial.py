"""The initial schema: interactions, feedback, branches, generations, aliases, cycles, replay, tokens.

Revision ID: 0001
Revises:
Create Date: 2025-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types at this revision (models.py may change later; this file must not).
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "interactions",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("external_id", sa.Text(), nullable=True),
        sa.Column("branch", sa.Text(), nullable=False),
        sa.Column("domain", sa.Text(), nullable=True),
        sa.Column("tags", JSON_DOC, nullable=False),
        sa.Column("messages", JSON_DOC, nullable=False),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("dedupe_key", sa.Text(), nullable=False),
        sa.Column("metadata", JSON_DOC, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_interactions"),
        sa.UniqueConstraint("branch", "dedupe_key", name="uq_interactions_branch_dedupe_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_interactions_branch_id", "interactions", ["branch", "id"])
    op.create_index("ix_interactions_domain", "interactions", ["domain"])

    op.create_table(
        "feedback",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True),
        sa.Column("interaction_id", BIG_ID, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("thumbs_up", sa.Boolean(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("corrected_response", sa.Text(), nullable=True),
        sa.Column("chosen", sa.Text(), nullable=True),
        sa.Column("rejected", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
        sa.ForeignKeyConstraint(
            ["interaction_id"],
            ["interactions.id"],
            name="fk_feedback_interaction_id_interactions",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_feedback_interaction_id", "feedback", ["interaction_id"])

    # branches <-> generations refer to each other: branches first, its root FK once generations exists.
    op.create_table(
        "branches",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.Column("root_generation_id", sa.Integer(), nullable=True),
        sa.Column("domain", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_branches"),
    )
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("branch", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("checksum", sa.Text(), nullable=False),
        sa.Column("params", sa.BigInteger(), nullable=False),
        sa.Column("metrics", JSON_DOC, nullable=False),
        sa.Column("cycle_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_generations"),
        sa.ForeignKeyConstraint(["parent_id"], ["generations.id"], name="fk_generations_parent_id_generations"),
        sa.ForeignKeyConstraint(["branch"], ["branches.name"], name="fk_generations_branch_branches"),
    )
    op.create_index("ix_generations_parent_id", "generations", ["parent_id"])
    op.create_index("ix_generations_branch", "generations", ["branch"])
    with op.batch_alter_table("branches") as batch:
        batch.create_foreign_key(
            "fk_branches_root_generation_id_generations", "generations", ["root_generation_id"], ["id"]
        )

    op.create_table(
        "aliases",
        sa.Column("branch", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTC_TS, nullable=False),
        sa.PrimaryKeyConstraint("branch", "name", name="pk_aliases"),
        sa.ForeignKeyConstraint(["branch"], ["branches.name"], name="fk_aliases_branch_branches"),
        sa.ForeignKeyConstraint(["generation_id"], ["generations.id"], name="fk_aliases_generation_id_generations"),
    )
    op.create_index("ix_aliases_generation_id", "aliases", ["generation_id"])

    op.create_table(
        "cycles",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("branch", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("parent_generation_id", sa.Integer(), nullable=True),
        sa.Column("generation_id", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.Column("finished_at", UTC_TS, nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_cycles"),
        sa.ForeignKeyConstraint(["branch"], ["branches.name"], name="fk_cycles_branch_branches"),
        sa.ForeignKeyConstraint(
            ["parent_generation_id"], ["generations.id"], name="fk_cycles_parent_generation_id_generations"
        ),
        sa.ForeignKeyConstraint(["generation_id"], ["generations.id"], name="fk_cycles_generation_id_generations"),
    )
    op.create_index("ix_cycles_branch", "cycles", ["branch"])

    op.create_table(
        "cycle_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("cycle_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("started_at", UTC_TS, nullable=False),
        sa.Column("finished_at", UTC_TS, nullable=True),
        sa.Column("detail", JSON_DOC, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cycle_events"),
        sa.ForeignKeyConstraint(
            ["cycle_id"], ["cycles.id"], name="fk_cycle_events_cycle_id_cycles", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_cycle_events_cycle_id", "cycle_events", ["cycle_id"])

    op.create_table(
        "replay_members",
        sa.Column("branch", sa.Text(), nullable=False),
        sa.Column("interaction_id", BIG_ID, nullable=False),
        sa.Column("experience", sa.Integer(), nullable=False),
        sa.Column("priority", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("branch", "interaction_id", name="pk_replay_members"),
        sa.ForeignKeyConstraint(
            ["interaction_id"],
            ["interactions.id"],
            name="fk_replay_members_interaction_id_interactions",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_replay_members_interaction_id", "replay_members", ["interaction_id"])

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTC_TS, nullable=False),
        sa.Column("revoked_at", UTC_TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )


def downgrade() -> None:
    for table in ("api_tokens", "replay_members", "cycle_events", "cycles", "aliases"):
        op.drop_table(table)
    with op.batch_alter_table("branches") as batch:
        batch.drop_constraint("fk_branches_root_generation_id_generations", type_="foreignkey")
    for table in ("generations", "branches", "feedback", "interactions"):
        op.drop_table(table)
