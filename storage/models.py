"""ORM rows. They stay inside ``storage``/``services``; other layers get the DTOs from ``core.types``."""

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, Column, ForeignKey, Index, String, Table, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.types import JOB_STATUSES
from storage.db import Base, created_ts, json_dict, json_list, str_pk, updated_ts

_id_ref = String(32)


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str_pk]
    name: Mapped[str]
    created_at: Mapped[created_ts]
    updated_at: Mapped[updated_ts]

    images: Mapped[list["DatasetImageRow"]] = relationship(
        back_populates="dataset",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="DatasetImageRow.position",
    )


class DatasetImageRow(Base):
    __tablename__ = "dataset_images"
    __table_args__ = (UniqueConstraint("dataset_id", "position"),)

    id: Mapped[str_pk]
    dataset_id: Mapped[str] = mapped_column(_id_ref, ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]
    filename: Mapped[str]  # the uploaded file's display name
    path: Mapped[str]  # relative to the artifact root
    caption: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int]
    height: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))

    dataset: Mapped[DatasetRow] = relationship(back_populates="images")


adapter_tags = Table(
    "adapter_tags",
    Base.metadata,
    Column("adapter_id", _id_ref, ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True, index=True),
)


class TagRow(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class AdapterRow(Base):
    __tablename__ = "adapters"

    id: Mapped[str_pk]
    name: Mapped[str] = mapped_column(String(200), unique=True)
    method: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # subject | style | motion
    base_model: Mapped[str]
    base_model_hash: Mapped[str] = mapped_column(default="")
    trigger_words: Mapped[json_list]
    rank: Mapped[int | None]
    training_config: Mapped[json_dict]
    steps: Mapped[int] = mapped_column(default=0)
    sha256: Mapped[str] = mapped_column(String(64))
    file_size: Mapped[int] = mapped_column(BigInteger)
    file_path: Mapped[str]  # relative to the artifact root
    dataset_id: Mapped[str | None] = mapped_column(_id_ref, ForeignKey("datasets.id", ondelete="SET NULL"))
    job_id: Mapped[str | None] = mapped_column(_id_ref, ForeignKey("jobs.id", ondelete="SET NULL"))
    deleted_at: Mapped[datetime | None]  # soft delete: set, the adapter is in the trash and can be restored
    created_at: Mapped[created_ts]
    updated_at: Mapped[updated_ts]

    previews: Mapped[list["AdapterPreviewRow"]] = relationship(
        back_populates="adapter",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="AdapterPreviewRow.position",
    )
    tags: Mapped[list[TagRow]] = relationship(secondary=adapter_tags, order_by=TagRow.name, passive_deletes=True)


class AdapterPreviewRow(Base):
    __tablename__ = "adapter_previews"
    __table_args__ = (UniqueConstraint("adapter_id", "position"),)

    id: Mapped[str_pk]
    adapter_id: Mapped[str] = mapped_column(_id_ref, ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]
    path: Mapped[str]

    adapter: Mapped[AdapterRow] = relationship(back_populates="previews")


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim_order", "status", "priority", "created_at"),
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in JOB_STATUSES)})", name="status"),
    )

    id: Mapped[str_pk]
    kind: Mapped[str] = mapped_column(String(32))  # train | generate
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    priority: Mapped[int] = mapped_column(default=0)
    title: Mapped[str] = mapped_column(default="")
    payload: Mapped[json_dict]
    step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int] = mapped_column(default=0)
    loss: Mapped[float | None]
    it_per_s: Mapped[float | None]
    eta_s: Mapped[float | None]
    preview_path: Mapped[str | None]
    message: Mapped[str] = mapped_column(Text, default="")
    losses: Mapped[json_list]
    error: Mapped[str | None] = mapped_column(Text)
    result_ref: Mapped[str | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(default=0)  # claims so far; a lost worker requeues until max_attempts
    max_attempts: Mapped[int] = mapped_column(default=3)
    save_now: Mapped[bool] = mapped_column(default=False)  # checkpoint requested by the user
    sample_now: Mapped[bool] = mapped_column(default=False)  # preview requested by the user
    min_memory_gb: Mapped[float | None]  # only devices with at least this much memory claim the job
    log: Mapped[json_list]  # [[iso time, text], ...]: progress messages, requeues, errors
    worker_id: Mapped[str | None]
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[created_ts] = mapped_column(index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class GeneratedImageRow(Base):
    __tablename__ = "generated_images"

    id: Mapped[str_pk]
    path: Mapped[str]
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int] = mapped_column(BigInteger)
    # [{"adapter": id, "name": str, "weight": float}, ...]; names survive the adapter being purged
    adapters: Mapped[json_list]
    composer: Mapped[str] = mapped_column(String(64))
    params: Mapped[json_dict]
    job_id: Mapped[str | None] = mapped_column(_id_ref, ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[created_ts] = mapped_column(index=True)


__all__ = [
    "AdapterPreviewRow",
    "AdapterRow",
    "DatasetImageRow",
    "DatasetRow",
    "GeneratedImageRow",
    "JobRow",
    "TagRow",
    "adapter_tags",
]
