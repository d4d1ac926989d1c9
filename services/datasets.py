"""Use case: turn an upload (files, zips, captions) into a stored, normalised dataset.

Subjects and styles are image datasets (``datasets/<id>/<nnnn>.png`` plus ``captions.jsonl``). A motion dataset is
a folder of clips, decoded and resampled by :mod:`storage.clips` and written as one folder, all at once::

    datasets/<id>/<clip>/frame-000.png, frame-001.png, ...
    datasets/<id>/<clip>.txt        (the clip's caption, when it has one)
    datasets/<id>/clips.jsonl       (one record per clip: folder, uploaded name, caption, frames, size, source hash)

Its catalog rows are one per clip, whose ``path`` is the clip's folder.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from core.builtin import IMAGE_SIZE, VIDEO_FRAMES
from core.types import DatasetInfo
from storage import catalog
from storage.artifacts import ArtifactStore
from storage.clips import AcceptedClip, ClipLimits, read_clip_upload
from storage.db import writing
from storage.uploads import UploadLimits, read_upload

CLIP_KIND = "motion"
CLIP_MANIFEST = "clips.jsonl"
FRAME_FILE = "frame-{:03d}.png"
_SLUG = re.compile(r"[^A-Za-z0-9_-]+")


class UploadRejected(ValueError):
    """No usable image (or clip) in an upload; the message lists every file and why it was refused."""


def clip_folder_names(clips: Sequence[AcceptedClip]) -> list[str]:
    """One plain, unique ASCII folder name per clip (``walk``, ``walk-2``, ``clip`` for names with no ASCII)."""
    taken: set[str] = set()
    names = []
    for clip in clips:
        slug = _SLUG.sub("-", clip.name).strip("-_")[:60].rstrip("-_") or "clip"
        candidate, n = slug, 1
        while candidate.casefold() in taken or candidate.casefold() == Path(CLIP_MANIFEST).stem:
            n += 1
            candidate = f"{slug}-{n}"
        taken.add(candidate.casefold())
        names.append(candidate)
    return names


def _png(frame) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


class DatasetService:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, limits: UploadLimits | None = None,
                 clip_limits: ClipLimits | None = None):
        self._sessions = sessions
        self._store = store
        self._limits = limits or UploadLimits()
        self._clip_limits = clip_limits or ClipLimits()

    def create_dataset(self, name: str, files: Sequence[str | os.PathLike[str]],
                       display_names: Sequence[str] | None = None, kind: str = "subject",
                       frames: int | None = None, size: int | None = None) -> DatasetInfo:
        """Validate and normalise every file; keep the good ones, report the rest by name.

        ``kind`` ``motion`` reads clips (:meth:`create_clip_dataset`, with ``frames`` and ``size``); any other kind
        reads images."""
        if kind == CLIP_KIND:
            return self.create_clip_dataset(name, files, display_names, frames=frames, size=size)
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

    def create_clip_dataset(self, name: str, files: Sequence[str | os.PathLike[str]],
                            display_names: Sequence[str] | None = None, frames: int | None = None,
                            size: int | None = None) -> DatasetInfo:
        """A motion dataset: every clip resampled to ``frames`` frames of ``size``×``size`` pixels (defaults: the
        built-in video model's 8 frames of 64 pixels); bad files are reported by name, as for images.

        The folder is written whole and then the catalog rows committed; if either fails, neither stays."""
        name = name.strip()
        if not name:
            raise ValueError("give the dataset a name")
        if not files:
            raise ValueError("no files were uploaded")
        frames = int(frames or VIDEO_FRAMES)
        size = int(size or IMAGE_SIZE)
        result = read_clip_upload([Path(f) for f in files], frames=frames, size=size, limits=self._clip_limits,
                                  display_names=display_names)
        if not result.accepted:
            reasons = "; ".join(str(r) for r in result.rejected) or "no video files or frame images found"
            raise UploadRejected(f"no usable clip in the upload: {reasons}")
        folders = clip_folder_names(result.accepted)
        layout: dict[str, bytes] = {}
        records = []
        for folder, clip in zip(folders, result.accepted, strict=True):
            for index, frame in enumerate(clip.frames):
                layout[f"{folder}/{FRAME_FILE.format(index)}"] = _png(frame)
            if clip.caption:
                layout[f"{folder}.txt"] = clip.caption.encode("utf-8")
            records.append({"clip": folder, "filename": clip.source, "caption": clip.caption,
                            "frames": int(clip.frames.shape[0]), "width": int(clip.frames.shape[2]),
                            "height": int(clip.frames.shape[1]), "source_frames": clip.source_frames,
                            "source_size": list(clip.source_size), "duration_s": clip.duration_s,
                            "source_sha256": clip.source_sha256})
        layout[CLIP_MANIFEST] = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                        for r in records).encode("utf-8")
        written: str | None = None
        try:
            with writing(self._sessions) as session:
                row = catalog.add_dataset(session, name)
                self._store.write_dataset_folder(row.id, layout)
                written = f"datasets/{row.id}"
                for position, (folder, clip) in enumerate(zip(folders, result.accepted, strict=True)):
                    catalog.add_dataset_image(session, dataset_id=row.id, position=position, filename=clip.source,
                                              path=f"{written}/{folder}", caption=clip.caption,
                                              width=int(clip.frames.shape[2]), height=int(clip.frames.shape[1]),
                                              sha256=clip.source_sha256)
                session.flush()
                info = catalog.dataset_info(row, rejected=result.rejected)
        except BaseException:
            if written is not None:
                self._store.remove(written)  # never leave files the catalog does not know
            raise
        return info

    def list_datasets(self) -> list[DatasetInfo]:
        with self._sessions.begin() as session:
            return [catalog.dataset_info(r) for r in catalog.list_datasets(session)]

    def training_records(self, dataset_id: str) -> list[tuple[Path, str]]:
        """(image file, caption) pairs of a dataset, for the trainer; for a clip dataset, (clip folder, caption)."""
        with self._sessions.begin() as session:
            row = catalog.get_dataset(session, dataset_id)
            return [(self._store.resolve(img.path), img.caption or "") for img in row.images]

    def is_clip_dataset(self, dataset_id: str) -> bool:
        """Whether the dataset holds clips (a motion dataset: its rows name clip folders) rather than images."""
        with self._sessions.begin() as session:
            row = catalog.get_dataset(session, dataset_id)
            return bool(row.images) and all(PurePosixPath(img.path).suffix.lower() != ".png" for img in row.images)

    def clip_folder(self, dataset_id: str) -> Path:
        """The folder of a clip dataset (layout in the module docstring), fetched whole from a shared store when
        needed; ``ValueError`` when the dataset holds images."""
        if not self.is_clip_dataset(dataset_id):
            raise ValueError(f"dataset {dataset_id} holds images, not clips; upload videos with kind 'motion'")
        folder = self._store.resolve(f"datasets/{dataset_id}")
        if not (folder / CLIP_MANIFEST).is_file():
            raise ValueError(f"dataset {dataset_id}: its clip folder is incomplete ({CLIP_MANIFEST} is missing)")
        return folder

    def clip_records(self, dataset_id: str) -> list[tuple[Any, str]]:
        """A clip dataset's ((F, H, W, 3) uint8 frames, caption) pairs, fetched from a shared store when needed."""
        from training.video import load_clip_folder

        return [(frames, caption) for frames, caption, _ in load_clip_folder(self.clip_folder(dataset_id))]
