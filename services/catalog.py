"""Use cases of the gallery: browse, search, tag, rename, delete (undo-safe), download, rebuild the index."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core.types import AdapterInfo, ImageInfo
from storage import catalog
from storage.artifacts import ArtifactStore
from storage.db import writing

TRASH_RETENTION = timedelta(days=7)


class CatalogService:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore) -> None:
        self._sessions = sessions
        self._store = store

    def list_adapters(self, search: str | None = None, tag: str | None = None,
                      include_deleted: bool = False) -> list[AdapterInfo]:
        with self._sessions.begin() as session:
            rows = catalog.list_adapters(session, search=search or None, tag=tag or None,
                                         include_deleted=include_deleted)
            return [self._info(r) for r in rows]

    def get_adapter(self, id_or_name: str) -> AdapterInfo:
        with self._sessions.begin() as session:
            return self._info(catalog.get_adapter(session, id_or_name))

    def rename(self, adapter_id: str, new_name: str) -> AdapterInfo:
        new_name = new_name.strip()
        if not new_name:
            raise ValueError("the new name is empty")
        with writing(self._sessions) as session:
            return self._info(catalog.rename_adapter(session, adapter_id, new_name))

    def set_tags(self, adapter_id: str, tags: list[str] | str) -> AdapterInfo:
        if isinstance(tags, str):
            tags = [t for t in tags.split(",")]
        with writing(self._sessions) as session:
            return self._info(catalog.set_tags(session, adapter_id, tags))

    def delete(self, adapter_id: str) -> AdapterInfo:
        """Move to the trash; files stay until the trash is emptied, so ``restore`` undoes it."""
        with writing(self._sessions) as session:
            return self._info(catalog.soft_delete_adapter(session, adapter_id))

    def restore(self, adapter_id: str) -> AdapterInfo:
        with writing(self._sessions) as session:
            return self._info(catalog.restore_adapter(session, adapter_id))

    def empty_trash(self, older_than: timedelta = TRASH_RETENTION) -> int:
        cutoff = datetime.now(timezone.utc) - older_than
        with writing(self._sessions) as session:
            removed = catalog.purge_deleted(session, older_than=cutoff)
        for relpath in removed:
            self._store.remove(relpath)
        return len(removed)

    def artifact_path(self, relpath: str) -> Path:
        """The local file of a catalog path (preview, image), fetched first when the store is shared."""
        return self._store.resolve(relpath)

    def adapter_file(self, adapter_id: str) -> Path:
        """The adapter's ``.safetensors`` file, for download."""
        with self._sessions.begin() as session:
            row = catalog.get_adapter(session, adapter_id)
            return self._store.resolve(row.file_path)

    def images(self, limit: int = 50, adapter_id: str | None = None) -> list[ImageInfo]:
        with self._sessions.begin() as session:
            return [catalog.image_info(r) for r in catalog.list_images(session, limit=limit, adapter_id=adapter_id)]

    def reindex(self) -> dict[str, list[str]]:
        """Rebuild missing catalog rows from the files; returns what was added and what was skipped."""
        with writing(self._sessions) as session:
            return asdict(self._store.reindex(session))

    @staticmethod
    def _info(row) -> AdapterInfo:
        return catalog.adapter_info(row)
