"""Initial schema: datasets, adapters (+ previews, tags), jobs, generated images.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


def _id(name: str = "id", *, nullable: bool = False, primary_key: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length=32), nullable=nullable, primary_key=primary_key)


def _ts(name: str, *, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "datasets",
        _id(),
        sa.Column("name", sa.String(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
    )
    op.create_table(
        "jobs",
        _id(),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.Column("it_per_s", sa.Double(), nullable=True),
        sa.Column("eta_s", sa.Double(), nullable=True),
        sa.Column("preview_path", sa.String(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("losses", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result_ref", sa.String(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=True),
        _ts("heartbeat_at", nullable=True),
        _ts("created_at"),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.CheckConstraint(f"status IN ({', '.join(repr(s) for s in _JOB_STATUSES)})", name=op.f("ck_jobs_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index("ix_jobs_claim_order", "jobs", ["status", "priority", "created_at"])
    op.create_index(op.f("ix_jobs_created_at"), "jobs", ["created_at"])
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])

    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tags")),
        sa.UniqueConstraint("name", name=op.f("uq_tags_name")),
    )
    op.create_table(
        "adapters",
        _id(),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("base_model", sa.String(), nullable=False),
        sa.Column("base_model_hash", sa.String(), nullable=False),
        sa.Column("trigger_words", sa.JSON(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("training_config", sa.JSON(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("file_size", sa.BigInteger(), nullable=False),
        sa.Column("file_path", sa.String(), nullable=False),
        _id("dataset_id", nullable=True),
        _id("job_id", nullable=True),
        _ts("deleted_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_adapters_dataset_id_datasets"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_adapters_job_id_jobs"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
        sa.UniqueConstraint("name", name=op.f("uq_adapters_name")),
    )
    op.create_table(
        "dataset_images",
        _id(),
        _id("dataset_id"),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("caption", sa.Text(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_dataset_images_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_images")),
        sa.UniqueConstraint("dataset_id", "position", name=op.f("uq_dataset_images_dataset_id_position")),
    )
    op.create_index(op.f("ix_dataset_images_dataset_id"), "dataset_images", ["dataset_id"])

    op.create_table(
        "generated_images",
        _id(),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("adapters", sa.JSON(), nullable=False),
        sa.Column("composer", sa.String(length=64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        _id("job_id", nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_generated_images_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generated_images")),
    )
    op.create_index(op.f("ix_generated_images_created_at"), "generated_images", ["created_at"])
    op.create_index(op.f("ix_generated_images_job_id"), "generated_images", ["job_id"])

    op.create_table(
        "adapter_previews",
        _id(),
        _id("adapter_id"),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_adapter_previews_adapter_id_adapters"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_previews")),
        sa.UniqueConstraint("adapter_id", "position", name=op.f("uq_adapter_previews_adapter_id_position")),
    )
    op.create_index(op.f("ix_adapter_previews_adapter_id"), "adapter_previews", ["adapter_id"])

    op.create_table(
        "adapter_tags",
        _id("adapter_id"),
        sa.Column("tag_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name=op.f("fk_adapter_tags_adapter_id_adapters"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["tag_id"], ["tags.id"], name=op.f("fk_adapter_tags_tag_id_tags"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("adapter_id", "tag_id", name=op.f("pk_adapter_tags")),
    )
    op.create_index(op.f("ix_adapter_tags_tag_id"), "adapter_tags", ["tag_id"])


def downgrade() -> None:
    for table in ("adapter_tags", "adapter_previews", "generated_images", "dataset_images", "adapters", "tags"):
        op.drop_table(table)
    op.drop_index(op.f("ix_jobs_status"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_created_at"), table_name="jobs")
    op.drop_index("ix_jobs_claim_order", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("datasets")
