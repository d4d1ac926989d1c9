"""Catalog queries and updates: datasets, adapters (tags, rename, trash) and generated images.

Every function takes a Session and never commits: the caller owns the transaction. Rows go out of ``storage``
only through the ``*_info`` converters, as frozen DTOs from ``core.types``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from core.types import CONCEPT_KINDS, AdapterInfo, AdapterWeight, DatasetInfo, ImageInfo, Rejection
from storage.db import utcnow
from storage.models import (
    AdapterPreviewRow,
    AdapterRow,
    DatasetImageRow,
    DatasetRow,
    GeneratedImageRow,
    TagRow,
    adapter_tags,
)

MAX_NAME_CHARS = 200
MAX_TAG_CHARS = 64


# datasets ---------------------------------------------------------------------------------------------------


def add_dataset(session: Session, name: str, *, id: str | None = None) -> DatasetRow:
    name = name.strip()
    if not name:
        raise ValueError("a dataset needs a name")
    row = DatasetRow(id=id, name=name)
    session.add(row)
    session.flush()
    return row


def add_dataset_image(
    session: Session,
    dataset_id: str,
    *,
    position: int,
    filename: str,
    path: str,
    width: int,
    height: int,
    sha256: str,
    caption: str | None = None,
    id: str | None = None,
) -> DatasetImageRow:
    dataset = get_dataset(session, dataset_id)
    row = DatasetImageRow(
        id=id,
        position=position,
        filename=filename,
        path=path,
        caption=caption,
        width=width,
        height=height,
        sha256=sha256,
    )
    dataset.images.append(row)
    session.flush()
    return row


def get_dataset(session: Session, dataset_id: str) -> DatasetRow:
    row = session.get(DatasetRow, dataset_id)
    if row is None:
        raise KeyError(f"no dataset with id {dataset_id!r}")
    return row


def list_datasets(session: Session) -> list[DatasetRow]:
    """Newest first, images loaded."""
    stmt = select(DatasetRow).options(selectinload(DatasetRow.images)).order_by(DatasetRow.created_at.desc())
    return list(session.scalars(stmt))


# adapters ---------------------------------------------------------------------------------------------------


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise ValueError("an adapter needs a name")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"adapter names are limited to {MAX_NAME_CHARS} characters")
    return name


def _check_name_free(session: Session, name: str, exclude_id: str | None = None) -> None:
    """Names are unique regardless of case, and a name in the trash is still taken."""
    stmt = select(AdapterRow).where(func.lower(AdapterRow.name) == name.lower())
    if exclude_id is not None:
        stmt = stmt.where(AdapterRow.id != exclude_id)
    with session.no_autoflush:
        other = session.scalars(stmt.limit(1)).first()
    if other is not None:
        where = " (it is in the trash: restore it or empty the trash first)" if other.deleted_at else ""
        raise ValueError(f"an adapter named {other.name!r} already exists{where}")


def add_adapter(
    session: Session,
    *,
    name: str,
    method: str,
    kind: str,
    base_model: str,
    sha256: str,
    file_size: int,
    file_path: str,
    base_model_hash: str = "",
    trigger_words: Sequence[str] = (),
    rank: int | None = None,
    training_config: Mapping[str, Any] | None = None,
    steps: int = 0,
    dataset_id: str | None = None,
    job_id: str | None = None,
    tags: Iterable[str] = (),
    previews: Sequence[str] = (),
    id: str | None = None,
    created_at: datetime | None = None,
) -> AdapterRow:
    """Add an adapter row. ``previews`` are relative image paths, in display order.

    ValueError if the name is taken (ignoring case) or ``kind`` is unknown.
    """
    name = _clean_name(name)
    if kind not in CONCEPT_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; expected one of {', '.join(CONCEPT_KINDS)}")
    _check_name_free(session, name)
    row = AdapterRow(
        id=id,
        name=name,
        method=method,
        kind=kind,
        base_model=base_model,
        base_model_hash=base_model_hash,
        trigger_words=[str(w) for w in trigger_words],
        rank=rank,
        training_config=dict(training_config or {}),
        steps=steps,
        sha256=sha256,
        file_size=file_size,
        file_path=file_path,
        dataset_id=dataset_id,
        job_id=job_id,
        previews=[AdapterPreviewRow(position=i, path=p) for i, p in enumerate(previews)],
    )
    if created_at is not None:
        row.created_at = row.updated_at = created_at
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        _check_name_free(session, name)  # a concurrent insert took the name: say so
        raise
    if tags:
        row.tags = [_get_or_create_tag(session, t) for t in sorted(normalize_tags(tags))]
        session.flush()
    return row


def find_adapter(session: Session, id_or_name: str, *, include_deleted: bool = True) -> AdapterRow | None:
    """By id, else by exact name, else by name ignoring case; None if nothing matches."""
    row = session.get(AdapterRow, id_or_name)
    if row is None:
        row = session.scalars(select(AdapterRow).where(AdapterRow.name == id_or_name)).first()
    if row is None:
        stmt = select(AdapterRow).where(func.lower(AdapterRow.name) == id_or_name.strip().lower())
        row = session.scalars(stmt).first()
    if row is not None and row.deleted_at is not None and not include_deleted:
        return None
    return row


def get_adapter(session: Session, id_or_name: str, *, include_deleted: bool = False) -> AdapterRow:
    """Like :func:`find_adapter`, but KeyError when nothing matches (adapters in the trash are skipped)."""
    row = find_adapter(session, id_or_name, include_deleted=include_deleted)
    if row is None:
        raise KeyError(f"no adapter with id or name {id_or_name!r}")
    return row


def list_adapters(
    session: Session, search: str | None = None, tag: str | None = None, include_deleted: bool = False
) -> list[AdapterRow]:
    """Newest first. ``search`` matches name, trigger words, method and tags as a case-insensitive substring
    (SQLite folds case for ASCII letters only); ``tag`` must match one tag exactly (after normalising)."""
    stmt = (
        select(AdapterRow)
        .options(selectinload(AdapterRow.tags), selectinload(AdapterRow.previews))
        .order_by(AdapterRow.created_at.desc(), AdapterRow.name)
    )
    if not include_deleted:
        stmt = stmt.where(AdapterRow.deleted_at.is_(None))
    needle = (search or "").strip().lower()
    if needle:
        stmt = stmt.where(
            or_(
                func.lower(AdapterRow.name).contains(needle, autoescape=True),
                func.lower(AdapterRow.method).contains(needle, autoescape=True),
                func.lower(cast(AdapterRow.trigger_words, String)).contains(needle, autoescape=True),
                AdapterRow.tags.any(TagRow.name.contains(needle, autoescape=True)),
            )
        )
    if tag is not None and tag.strip():
        stmt = stmt.where(AdapterRow.tags.any(TagRow.name == _normalize_tag(tag)))
    return list(session.scalars(stmt))


def rename_adapter(session: Session, id_or_name: str, new_name: str) -> AdapterRow:
    row = get_adapter(session, id_or_name)
    new_name = _clean_name(new_name)
    if new_name == row.name:
        return row
    _check_name_free(session, new_name, exclude_id=row.id)
    row.name = new_name
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        _check_name_free(session, new_name, exclude_id=row.id)
        raise
    return row


def _normalize_tag(tag: str) -> str:
    return " ".join(tag.split()).lower()


def normalize_tags(tags: Iterable[str]) -> list[str]:
    """Lowercase, trimmed (inner whitespace collapsed), empty ones dropped, duplicates removed, order kept."""
    out: list[str] = []
    for tag in tags:
        clean = _normalize_tag(tag)
        if not clean or clean in out:
            continue
        if len(clean) > MAX_TAG_CHARS:
            raise ValueError(f"tags are limited to {MAX_TAG_CHARS} characters: {clean[:MAX_TAG_CHARS]}...")
        out.append(clean)
    return out


def _get_or_create_tag(session: Session, name: str) -> TagRow:
    tag = session.scalars(select(TagRow).where(TagRow.name == name)).first()
    if tag is not None:
        return tag
    try:
        with session.begin_nested():
            tag = TagRow(name=name)
            session.add(tag)
    except IntegrityError:  # created by a concurrent transaction
        tag = session.scalars(select(TagRow).where(TagRow.name == name)).one()
    return tag


def set_tags(session: Session, adapter_id: str, tags: Iterable[str]) -> AdapterRow:
    """Replace the adapter's tags (normalised, see :func:`normalize_tags`)."""
    row = get_adapter(session, adapter_id)
    row.tags = [_get_or_create_tag(session, t) for t in sorted(normalize_tags(tags))]  # stored order: by name
    row.updated_at = utcnow()
    session.flush()
    return row


def list_tags(session: Session) -> list[str]:
    """Tags used by at least one adapter that is not in the trash, sorted."""
    stmt = (
        select(TagRow.name)
        .join(adapter_tags, adapter_tags.c.tag_id == TagRow.id)
        .join(AdapterRow, AdapterRow.id == adapter_tags.c.adapter_id)
        .where(AdapterRow.deleted_at.is_(None))
        .distinct()
        .order_by(TagRow.name)
    )
    return list(session.scalars(stmt))


def soft_delete_adapter(session: Session, id_or_name: str) -> AdapterRow:
    """Move to the trash: hidden from lists and lookups, files kept, undone by :func:`restore_adapter`."""
    row = get_adapter(session, id_or_name, include_deleted=True)
    if row.deleted_at is None:
        row.deleted_at = utcnow()
        session.flush()
    return row


def restore_adapter(session: Session, id_or_name: str) -> AdapterRow:
    row = get_adapter(session, id_or_name, include_deleted=True)
    if row.deleted_at is not None:
        row.deleted_at = None
        session.flush()
    return row


def _adapter_files(row: AdapterRow) -> list[str]:
    folder = PurePosixPath(row.file_path).parent
    if folder == PurePosixPath("adapters", row.id):  # the store's own layout: the whole folder goes
        return [str(folder)]
    return [row.file_path, *(p.path for p in row.previews)]


def purge_deleted(session: Session, older_than: datetime | timedelta) -> list[str]:
    """Delete the rows of adapters trashed before ``older_than`` (a time, or an age); returns the relative paths
    to remove from the artifact store (``ArtifactStore.remove``): the ``adapters/<id>`` folder for adapters in the
    store's layout (its manifest must go too, or ``reindex`` would bring the adapter back), else the files."""
    cutoff = utcnow() - older_than if isinstance(older_than, timedelta) else older_than
    stmt = (
        select(AdapterRow)
        .options(selectinload(AdapterRow.previews))
        .where(AdapterRow.deleted_at.is_not(None), AdapterRow.deleted_at <= cutoff)
    )
    paths: list[str] = []
    for row in session.scalars(stmt).all():
        paths.extend(_adapter_files(row))
        session.delete(row)
    session.flush()
    return paths


# generated images -------------------------------------------------------------------------------------------


def _adapter_entry(item: Mapping[str, Any] | AdapterWeight) -> dict[str, Any]:
    if isinstance(item, AdapterWeight):
        entry = {"adapter": item.adapter, "name": item.adapter, "weight": float(item.weight)}
        return entry | ({"prompt": item.prompt} if item.prompt else {})
    if "adapter" not in item:
        raise ValueError(f"an image's adapter entry needs an 'adapter' id: {dict(item)!r}")
    adapter = str(item["adapter"])
    entry = {"adapter": adapter, "name": str(item.get("name") or adapter), "weight": float(item.get("weight", 1.0))}
    return entry | ({"prompt": str(item["prompt"])} if item.get("prompt") else {})


def add_image(
    session: Session,
    *,
    path: str,
    prompt: str,
    seed: int,
    sha256: str,
    negative_prompt: str = "",
    adapters: Iterable[Mapping[str, Any] | AdapterWeight] = (),
    composer: str = "merge",
    params: Mapping[str, Any] | None = None,
    job_id: str | None = None,
    id: str | None = None,
    created_at: datetime | None = None,
) -> GeneratedImageRow:
    """Record a generated image; ``adapters`` are ``{"adapter": id, "name": str, "weight": float}`` entries."""
    row = GeneratedImageRow(
        id=id,
        path=path,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=int(seed),
        adapters=[_adapter_entry(a) for a in adapters],
        composer=composer,
        params=dict(params or {}),
        job_id=job_id,
        sha256=sha256,
    )
    if created_at is not None:
        row.created_at = created_at
    session.add(row)
    session.flush()
    return row


def get_image(session: Session, image_id: str) -> GeneratedImageRow:
    row = session.get(GeneratedImageRow, image_id)
    if row is None:
        raise KeyError(f"no image with id {image_id!r}")
    return row


def list_images(session: Session, limit: int = 100, adapter_id: str | None = None) -> list[GeneratedImageRow]:
    """Newest first; with ``adapter_id``, only images made with that adapter."""
    stmt = select(GeneratedImageRow).order_by(GeneratedImageRow.created_at.desc(), GeneratedImageRow.id)
    if adapter_id is None:
        return list(session.scalars(stmt.limit(limit)))
    # Pre-filter on the JSON text in SQL, then check the parsed entries.
    stmt = stmt.where(cast(GeneratedImageRow.adapters, String).contains(adapter_id, autoescape=True))
    out: list[GeneratedImageRow] = []
    for row in session.scalars(stmt.execution_options(yield_per=200)):
        if any(entry.get("adapter") == adapter_id for entry in row.adapters):
            out.append(row)
            if len(out) >= limit:
                break
    return out


# DTOs -------------------------------------------------------------------------------------------------------


def dataset_info(row: DatasetRow, rejected: Iterable[Rejection] = ()) -> DatasetInfo:
    return DatasetInfo(
        id=row.id, name=row.name, image_count=len(row.images), created_at=row.created_at, rejected=tuple(rejected)
    )


def adapter_info(row: AdapterRow) -> AdapterInfo:
    return AdapterInfo(
        id=row.id,
        name=row.name,
        method=row.method,
        kind=row.kind,
        base_model=row.base_model,
        base_model_hash=row.base_model_hash,
        trigger_words=tuple(row.trigger_words or ()),
        rank=row.rank,
        steps=row.steps,
        sha256=row.sha256,
        file_size=row.file_size,
        file_path=row.file_path,
        preview_paths=tuple(p.path for p in row.previews),
        tags=tuple(t.name for t in row.tags),
        training_config=dict(row.training_config or {}),
        created_at=row.created_at,
        updated_at=row.updated_at,
        deleted_at=row.deleted_at,
    )


def image_info(row: GeneratedImageRow) -> ImageInfo:
    return ImageInfo(
        id=row.id,
        path=row.path,
        prompt=row.prompt,
        negative_prompt=row.negative_prompt,
        seed=row.seed,
        adapters=tuple(AdapterWeight(adapter=a["adapter"], weight=float(a.get("weight", 1.0)),
                                     prompt=str(a.get("prompt") or "")) for a in row.adapters),
        composer=row.composer,
        params=dict(row.params or {}),
        job_id=row.job_id,
        created_at=row.created_at,
    )
