"""The files behind the catalog, under one root folder.

Layout::

    datasets/<id>/<nnnn>.png, captions.jsonl
    datasets/<id>/<clip>/frame-000.png, <clip>.txt, clips.jsonl      (a clip dataset, written as one folder)
    adapters/<id>/adapter.safetensors, adapter_config.json, manifest.json, previews/<n>.png
    images/<YYYY-MM-DD>/<id>.png, <id>.json          (the .json sidecar is the image's catalog record)
    images/<YYYY-MM-DD>/media/<id>.mp4               (the video of a generated clip)
    jobs/<id>/checkpoints/, previews/, and the job's input files (import.safetensors)

Files are the source of truth and the database is an index: :meth:`ArtifactStore.reindex` rebuilds missing
adapter and image rows from the manifests and sidecars. Every write is atomic (temp file + rename); an adapter
folder is assembled under a temp name and renamed into place, so a crash never leaves half an adapter visible.
Temp names start with "." and end with ``.tmp`` (or ``.trash`` for folders being deleted).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.io import atomic_write_bytes, atomic_write_json, atomic_writer, fsync_dir, save_safetensors, sha256_file
from storage import catalog
from storage.db import utcnow
from storage.models import AdapterRow, DatasetRow, GeneratedImageRow, JobRow

if TYPE_CHECKING:
    import torch

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_TEMP_SUFFIXES = (".tmp", ".trash")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # one plain file name (no folders, not hidden)


@dataclass(frozen=True)
class StoredAdapter:
    """Where :meth:`ArtifactStore.write_adapter` put the weights (paths relative to the store root)."""

    path: str
    sha256: str
    size: int
    folder: str


@dataclass
class ReindexReport:
    """Ids of the rows :meth:`ArtifactStore.reindex` added, and one ``"<path>: <reason>"`` line per file skipped."""

    adapters: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _check_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"invalid {what} {value!r}: expected letters, digits, '_' or '-'")
    return value


def _check_png(data: bytes) -> None:
    if not data.startswith(_PNG_MAGIC):
        raise ValueError("expected PNG bytes")



_MEDIA_MAGIC = {".mp4": lambda data: data[4:8] == b"ftyp", ".gif": lambda data: data[:6] in (b"GIF87a", b"GIF89a")}


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # paths ------------------------------------------------------------------------------------------------

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """The absolute path of ``relpath``; ValueError for absolute paths, ``..``, or symlinks leading out.

        This is how readers reach a file; a mirrored store (``storage.remote``) fetches it here when missing."""
        return self._path(relpath)

    def _path(self, relpath: str | os.PathLike[str]) -> Path:
        """:meth:`resolve` without any fetching: the local path, checked to stay inside the store."""
        raw = os.fspath(relpath)
        pure = PurePosixPath(raw.replace("\\", "/"))
        if not raw or "\x00" in raw or pure.is_absolute() or PureWindowsPath(raw).drive or ".." in pure.parts:
            raise ValueError(f"{raw!r} is not a relative path inside the artifact store")
        candidate = self.root.joinpath(*pure.parts)
        real = candidate.resolve()
        if real != self.root and self.root not in real.parents:
            raise ValueError(f"{raw!r} leads outside the artifact store")
        return candidate

    def relative(self, path: str | os.PathLike[str]) -> str:
        """The store-relative POSIX path of an absolute ``path`` inside the store (ValueError otherwise)."""
        absolute = Path(path).resolve()
        if absolute != self.root and self.root not in absolute.parents:
            raise ValueError(f"{os.fspath(path)!r} is not inside the artifact store")
        return absolute.relative_to(self.root).as_posix()

    # datasets ---------------------------------------------------------------------------------------------

    def write_dataset_image(self, dataset_id: str, position: int, png_bytes: bytes) -> tuple[str, str]:
        """Write ``datasets/<id>/<nnnn>.png``; returns (relative path, sha256)."""
        _check_id(dataset_id, "dataset id")
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        _check_png(png_bytes)
        rel = f"datasets/{dataset_id}/{position:04d}.png"
        return rel, atomic_write_bytes(self._path(rel), png_bytes)

    def write_dataset_captions(self, dataset_id: str, records: Iterable[Mapping[str, Any]]) -> str:
        """Write ``datasets/<id>/captions.jsonl`` (one JSON object per line); returns its relative path."""
        _check_id(dataset_id, "dataset id")
        rel = f"datasets/{dataset_id}/captions.jsonl"
        lines = [json.dumps(dict(r), ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in records]
        atomic_write_bytes(self._path(rel), "".join(lines).encode("utf-8"))
        return rel

    def write_dataset_folder(self, dataset_id: str, files: Mapping[str, bytes]) -> dict[str, str]:
        """Write the whole folder ``datasets/<id>/`` at once (assembled under a temp name, then renamed into place,
        so nobody sees part of it). ``files`` maps relative POSIX paths (each part a plain file name) to bytes;
        returns path -> sha256. FileExistsError when the folder exists already."""
        final = self.dataset_dir(dataset_id)
        bad = [name for name in files if not all(_FILE_NAME.match(part) for part in name.split("/"))]
        if bad or not files:
            raise ValueError(f"invalid dataset file names: {bad[:3]}" if bad else "a dataset folder needs files")
        if final.exists():
            raise FileExistsError(f"dataset folder datasets/{dataset_id} already exists")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dataset_id}.", suffix=".tmp", dir=final.parent))
        try:
            digests = {name: atomic_write_bytes(tmp.joinpath(*name.split("/")), data) for name, data in files.items()}
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        return digests

    def dataset_dir(self, dataset_id: str) -> Path:
        return self._path(f"datasets/{_check_id(dataset_id, 'dataset id')}")

    # adapters ---------------------------------------------------------------------------------------------

    def adapter_dir(self, adapter_id: str) -> Path:
        return self._path(f"adapters/{_check_id(adapter_id, 'adapter id')}")

    def write_adapter(
        self,
        adapter_id: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        config: Mapping[str, Any],
        manifest: Mapping[str, Any],
    ) -> StoredAdapter:
        """Write ``adapters/<id>/`` (weights with ``metadata`` in the header, config, manifest) all at once.

        The manifest gets ``id``, ``sha256``, ``file_size``, ``file_path``, ``created_at`` (if absent) and
        ``manifest_version`` added; :meth:`reindex` rebuilds the catalog row from it. FileExistsError if the
        adapter folder already exists.
        """
        final = self.adapter_dir(adapter_id)
        if manifest.get("id", adapter_id) != adapter_id:
            raise ValueError(f"manifest id {manifest['id']!r} does not match adapter id {adapter_id!r}")
        if final.exists():
            raise FileExistsError(f"adapter folder adapters/{adapter_id} already exists")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_id}.", suffix=".tmp", dir=final.parent))
        rel_folder = f"adapters/{adapter_id}"
        rel_weights = f"{rel_folder}/{ADAPTER_FILE}"
        try:
            sha = save_safetensors(tmp / ADAPTER_FILE, dict(tensors), dict(metadata))
            size = (tmp / ADAPTER_FILE).stat().st_size
            atomic_write_json(tmp / CONFIG_FILE, dict(config))
            record = {"created_at": utcnow().isoformat(), **manifest}
            record.update(
                id=adapter_id, sha256=sha, file_size=size, file_path=rel_weights, manifest_version=MANIFEST_VERSION
            )
            atomic_write_json(tmp / MANIFEST_FILE, record)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        return StoredAdapter(path=rel_weights, sha256=sha, size=size, folder=rel_folder)

    def write_adapter_preview(self, adapter_id: str, position: int, png_bytes: bytes) -> str:
        """Write ``adapters/<id>/previews/<n>.png`` into an existing adapter folder; returns the relative path."""
        folder = self.adapter_dir(adapter_id)
        if not (folder / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"adapter {adapter_id} has no folder yet: write the adapter first")
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        _check_png(png_bytes)
        rel = f"adapters/{adapter_id}/previews/{position}.png"
        atomic_write_bytes(self._path(rel), png_bytes)
        return rel

    def remove_adapter(self, adapter_id: str) -> bool:
        """Delete ``adapters/<id>/`` (renamed away first, so it disappears at once); False if it was absent."""
        return self._remove_tree(self.adapter_dir(adapter_id))

    # generated images -------------------------------------------------------------------------------------

    def write_image(
        self, image_id: str, png_bytes: bytes, record: Mapping[str, Any], created_at: datetime | None = None
    ) -> tuple[str, str]:
        """Write ``images/<YYYY-MM-DD>/<id>.png`` and its ``<id>.json`` sidecar; returns (relative path, sha256).

        The sidecar is ``record`` plus ``id``, ``path``, ``sha256`` and ``created_at``; it is written last, and
        the PNG is removed again if writing it fails.
        """
        _check_id(image_id, "image id")
        _check_png(png_bytes)
        when = (created_at or _parse_time(record.get("created_at")) or utcnow()).astimezone(timezone.utc)
        rel = f"images/{when.date().isoformat()}/{image_id}.png"
        png = self._path(rel)
        sha = atomic_write_bytes(png, png_bytes)
        sidecar = {**record, "id": image_id, "path": rel, "sha256": sha, "created_at": when.isoformat()}
        try:
            atomic_write_json(png.with_suffix(".json"), sidecar)
        except BaseException:
            png.unlink(missing_ok=True)
            raise
        return rel, sha

    def write_image_regions(self, image_rel: str, png_bytes: bytes) -> str:
        """Write the region preview of generated image ``images/<date>/<id>.png`` as ``images/<date>/regions/<id>.png``
        (atomically; outside the ``*/*.json`` pattern :meth:`reindex` reads); returns its relative path."""
        parts = PurePosixPath(image_rel).parts
        if len(parts) != 3 or parts[0] != "images" or not parts[2].endswith(".png"):
            raise ValueError(f"not a generated image path: {image_rel!r}")
        image_id = _check_id(parts[2][: -len(".png")], "image id")
        day = _check_id(parts[1], "image folder")
        _check_png(png_bytes)
        rel = f"images/{day}/regions/{image_id}.png"
        atomic_write_bytes(self._path(rel), png_bytes)
        return rel

    def write_image_media(self, image_rel: str, suffix: str, data: bytes) -> str:
        """Write the video (``.mp4``) or animation (``.gif``) of generated image ``images/<date>/<id>.png`` as
        ``images/<date>/media/<id><suffix>`` (atomically; outside what :meth:`reindex` reads); returns its path."""
        parts = PurePosixPath(image_rel).parts
        if len(parts) != 3 or parts[0] != "images" or not parts[2].endswith(".png"):
            raise ValueError(f"not a generated image path: {image_rel!r}")
        image_id = _check_id(parts[2][: -len(".png")], "image id")
        day = _check_id(parts[1], "image folder")
        magic = _MEDIA_MAGIC.get(suffix)
        if magic is None:
            raise ValueError(f"unsupported media suffix {suffix!r}; expected one of {', '.join(_MEDIA_MAGIC)}")
        if not magic(data):
            raise ValueError(f"expected {suffix} bytes")
        rel = f"images/{day}/media/{image_id}{suffix}"
        atomic_write_bytes(self._path(rel), data)
        return rel

    # jobs -------------------------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """``jobs/<id>/`` with ``checkpoints/`` and ``previews/`` created."""
        folder = self._path(f"jobs/{_check_id(job_id, 'job id')}")
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
        (folder / "previews").mkdir(parents=True, exist_ok=True)
        return folder

    def write_job_file(self, job_id: str, name: str, source: str | os.PathLike[str]) -> tuple[str, str]:
        """Copy ``source`` (streamed, atomically) to ``jobs/<id>/<name>``, a job's input; (relative path, sha256)."""
        if not _FILE_NAME.match(name):
            raise ValueError(f"invalid job file name {name!r}")
        rel = f"jobs/{_check_id(job_id, 'job id')}/{name}"
        digest = hashlib.sha256()
        with open(source, "rb") as src, atomic_writer(self._path(rel)) as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        return rel, digest.hexdigest()

    def publish_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Share a finished training checkpoint folder with other hosts; nothing to do for a local store."""

    # deletion and cleanup ---------------------------------------------------------------------------------

    def remove(self, relpath: str) -> bool:
        """Delete a file or folder tree inside the store (e.g. what ``catalog.purge_deleted`` returns)."""
        path = self._path(relpath)
        if path == self.root:
            raise ValueError("refusing to delete the whole artifact store")
        if path.is_dir() and not path.is_symlink():
            return self._remove_tree(path)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _remove_tree(self, folder: Path) -> bool:
        if not folder.exists():
            return False
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".trash", dir=folder.parent))
        os.rename(folder, trash / folder.name)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def remove_orphans(self, min_age_s: float = 0.0) -> list[str]:
        """Delete temp files and folders left by interrupted writes; returns their relative paths.

        Only entries older than ``min_age_s`` go: pass a few minutes when another process may be writing.
        """
        removed: list[str] = []
        now = time.time()
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            for name in [*dirnames, *filenames]:
                if not (name.startswith(".") and name.endswith(_TEMP_SUFFIXES)):
                    continue
                path = here / name
                try:
                    if now - path.lstat().st_mtime < min_age_s:
                        continue
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(path.relative_to(self.root).as_posix())
                if name in dirnames:
                    dirnames.remove(name)
        return sorted(removed)

    # rebuilding the index ---------------------------------------------------------------------------------

    def reindex(self, session: Session) -> ReindexReport:
        """Add catalog rows for adapters and images that have files but no row; existing rows are left alone.

        An adapter whose ``adapter.safetensors`` no longer matches the sha256 in its manifest is skipped and
        reported, as is anything unreadable or incomplete. Tags and trash state are not in the files and so
        are not restored.
        """
        report = ReindexReport()
        self._reindex_adapters(session, report)
        self._reindex_images(session, report)
        return report

    def _adapter_folders(self) -> list[Path]:
        """The adapter folders :meth:`reindex` considers (a mirrored store keeps only those the remote has)."""
        base = self.root / "adapters"
        if not base.is_dir():
            return []
        return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _image_sidecars(self) -> list[Path]:
        """The image records (``images/<date>/<id>.json``) :meth:`reindex` considers."""
        base = self.root / "images"
        return sorted(base.glob("*/*.json")) if base.is_dir() else []

    def _existing(self, session: Session, model: type[Any], ids: Iterable[str | None]) -> set[str]:
        wanted = {i for i in ids if i}
        if not wanted:
            return set()
        return set(session.scalars(select(model.id).where(model.id.in_(wanted))))

    def _reindex_adapters(self, session: Session, report: ReindexReport) -> None:
        known = set(session.scalars(select(AdapterRow.id)))
        for folder in self._adapter_folders():
            rel = f"adapters/{folder.name}"
            if folder.name in known:
                continue
            try:
                manifest = json.loads((folder / MANIFEST_FILE).read_text("utf-8"))
                if not isinstance(manifest, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                report.skipped.append(f"{rel}: unreadable {MANIFEST_FILE} ({exc})")
                continue
            if manifest.get("id") != folder.name:
                report.skipped.append(f"{rel}: {MANIFEST_FILE} names another adapter id ({manifest.get('id')!r})")
                continue
            weights = folder / ADAPTER_FILE
            if not weights.is_file():
                report.skipped.append(f"{rel}: {ADAPTER_FILE} is missing")
                continue
            if sha256_file(weights) != manifest.get("sha256"):
                report.skipped.append(
                    f"{rel}: {ADAPTER_FILE} does not match the sha256 in {MANIFEST_FILE} (modified or corrupted)"
                )
                continue
            previews = sorted(
                (p for p in (folder / "previews").glob("*.png") if p.stem.isdigit()), key=lambda p: int(p.stem)
            )
            dataset_ids = self._existing(session, DatasetRow, [manifest.get("dataset_id")])
            job_ids = self._existing(session, JobRow, [manifest.get("job_id")])
            if manifest.get("job_id") in job_ids:
                status = session.scalar(select(JobRow.status).where(JobRow.id == manifest["job_id"]))
                if status != "succeeded":
                    report.skipped.append(f"{rel}: left by job {manifest['job_id']} whose save did not finish "
                                          f"(job is {status}); its rerun replaces it")
                    continue
            try:
                with session.begin_nested():
                    catalog.add_adapter(
                        session,
                        id=folder.name,
                        name=manifest["name"],
                        method=manifest["method"],
                        kind=manifest["kind"],
                        base_model=manifest["base_model"],
                        base_model_hash=manifest.get("base_model_hash") or "",
                        trigger_words=manifest.get("trigger_words") or [],
                        rank=manifest.get("rank"),
                        training_config=manifest.get("training_config") or {},
                        steps=int(manifest.get("steps") or 0),
                        sha256=manifest["sha256"],
                        file_size=weights.stat().st_size,
                        file_path=f"{rel}/{ADAPTER_FILE}",
                        dataset_id=manifest.get("dataset_id") if manifest.get("dataset_id") in dataset_ids else None,
                        job_id=manifest.get("job_id") if manifest.get("job_id") in job_ids else None,
                        previews=[f"{rel}/previews/{p.name}" for p in previews],
                        created_at=_parse_time(manifest.get("created_at")),
                    )
            except KeyError as exc:
                report.skipped.append(f"{rel}: {MANIFEST_FILE} lacks {exc}")
                continue
            except (ValueError, TypeError) as exc:
                report.skipped.append(f"{rel}: {exc}")
                continue
            report.adapters.append(folder.name)

    def _reindex_images(self, session: Session, report: ReindexReport) -> None:
        known = set(session.scalars(select(GeneratedImageRow.id)))
        for sidecar in self._image_sidecars():
            if sidecar.name.startswith(".") or sidecar.stem in known:
                continue
            rel = sidecar.relative_to(self.root).as_posix()
            try:
                record = json.loads(sidecar.read_text("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                report.skipped.append(f"{rel}: unreadable ({exc})")
                continue
            png_rel = sidecar.with_suffix(".png").relative_to(self.root).as_posix()
            if record.get("id") != sidecar.stem or record.get("path") != png_rel:
                report.skipped.append(f"{rel}: the record names another image")
                continue
            png = self.root / png_rel
            if not png.is_file():
                report.skipped.append(f"{rel}: {png.name} is missing")
                continue
            if sha256_file(png) != record.get("sha256"):
                report.skipped.append(f"{rel}: {png.name} does not match the sha256 in its record")
                continue
            job_ids = self._existing(session, JobRow, [record.get("job_id")])
            try:
                with session.begin_nested():
                    catalog.add_image(
                        session,
                        id=sidecar.stem,
                        path=png_rel,
                        prompt=record["prompt"],
                        negative_prompt=record.get("negative_prompt") or "",
                        seed=int(record["seed"]),
                        adapters=record.get("adapters") or [],
                        composer=record.get("composer") or "merge",
                        params=record.get("params") or {},
                        job_id=record.get("job_id") if record.get("job_id") in job_ids else None,
                        sha256=record["sha256"],
                        created_at=_parse_time(record.get("created_at")),
                    )
            except KeyError as exc:
                report.skipped.append(f"{rel}: the record lacks {exc}")
                continue
            except (ValueError, TypeError) as exc:
                report.skipped.append(f"{rel}: {exc}")
                continue
            report.images.append(sidecar.stem)
