"""Use case: turn an upload (files, zips, captions) into a stored, normalised dataset."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core.types import DatasetInfo
from storage import catalog
from storage.artifacts import ArtifactStore
from storage.db import writing
from storage.uploads import UploadLimits, read_upload


class UploadRejected(ValueError):
    """No usable image in an upload; the message lists every file and why it was refused."""


class DatasetService:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, limits: UploadLimits | None = None):
        self._sessions = sessions
        self._store = store
        self._limits = limits or UploadLimits()

    def create_dataset(self, name: str, files: Sequence[str | os.PathLike[str]],
                       display_names: Sequence[str] | None = None) -> DatasetInfo:
        """Validate and normalise every file; keep the good ones, report the rest by name."""
        name = name.strip()
        if not name:
            raise ValueError("give the dataset a name")
        if not files:
            raise ValueError("no files were uploaded")
        result = read_upload([Path(f) for f in files], self._limits, display_names=display_names)
        if not result.accepted:
            reasons = "; ".join(str(r) for r in result.rejected) or "no image files found"
            raise UploadRejected(f"no usable image in the upload: {reasons}")
        with writing(self._sessions) as session:
            row = catalog.add_dataset(session, name)
            records = []
            for position, item in enumerate(result.accepted):
                buffer = io.BytesIO()
                item.image.save(buffer, format="PNG")
                rel, sha = self._store.write_dataset_image(row.id, position, buffer.getvalue())
                catalog.add_dataset_image(session, dataset_id=row.id, position=position, filename=item.filename,
                                          path=rel, caption=item.caption, width=item.image.width,
                                          height=item.image.height, sha256=sha)
                records.append({"file": Path(rel).name, "filename": item.filename, "caption": item.caption})
            self._store.write_dataset_captions(row.id, records)
            session.flush()
            return catalog.dataset_info(row, rejected=result.rejected)

    def list_datasets(self) -> list[DatasetInfo]:
        with self._sessions.begin() as session:
            return [catalog.dataset_info(r) for r in catalog.list_datasets(session)]

    def training_records(self, dataset_id: str) -> list[tuple[Path, str]]:
        """(image file, caption) pairs of a dataset, for the trainer."""
        with self._sessions.begin() as session:
            row = catalog.get_dataset(session, dataset_id)
            return [(self._store.resolve(img.path), img.caption or "") for img in row.images]
