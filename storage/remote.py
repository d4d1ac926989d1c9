"""An artifact store shared by several hosts through an fsspec URL (s3://, gcs://, az://, sftp://, file://, ...).

:class:`MirroredArtifactStore` keeps the layout of :class:`storage.artifacts.ArtifactStore` (see there) in two
places: the remote URL is the source of truth, the local folder under the data dir is a working cache. With the
database as the only coordination, an app on one host and workers on others share datasets, adapters, images and
training checkpoints through it (deployment: docs/deployment.md; URLs: https://filesystem-spec.readthedocs.io).

Writes. Every write first happens locally exactly as in the base store (atomic), then is *published*: uploaded to a
temp name next to the final one (``.<name>.<random>.tmp``), then moved into place. A folder (an adapter, a training
checkpoint) is uploaded whole under a temp folder name, closed with a ``.complete.json`` listing its files and
sizes, then moved. On a local or mounted filesystem the move is one rename (atomic); on object stores (S3, GCS,
Azure) it is copy + delete per file, so another host may briefly see a folder in the middle of its move (each file
itself is always whole). Correctness does not rest on that move: the catalog row is committed only after the
publish returned, so nothing half-uploaded is ever reachable through the catalog; ``reindex`` checks every
adapter's sha256 before adding a row; a checkpoint is resumed from only when its ``.complete.json`` is there and
the sizes match. A publish that fails undoes the local write and raises :class:`RemoteStoreError`.

Reads. :meth:`MirroredArtifactStore.resolve` returns the local path and first downloads the file (or folder) when
it is missing locally but present remotely (atomic local write), so every reader works unchanged on any host.
Remote listings are never trusted: names with ``..``, empty or hidden parts, or outside the URL's prefix are
skipped. :meth:`~MirroredArtifactStore.job_dir` pulls a job's newest complete remote checkpoint, so a job whose
worker died resumes on another host; :meth:`~MirroredArtifactStore.publish_checkpoint` uploads each new one and
prunes the remote ones the trainer pruned locally. Deletions delete remotely too. ``reindex`` pulls the remote
adapters and images that have no catalog row and indexes only what the remote holds.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.artifacts import MANIFEST_FILE, ArtifactStore, ReindexReport, StoredAdapter, _check_id
from storage.models import AdapterRow, GeneratedImageRow

if TYPE_CHECKING:
    import torch

COMPLETE_FILE = ".complete.json"  # closes an uploaded folder: {"files": {relative name: size in bytes}}
_CHECKPOINT = re.compile(r"step-(\d{6,})")  # the trainer's checkpoint folder names (training.trainer)
_TEMP_SUFFIXES = (".tmp", ".trash")
_CREDENTIALS = re.compile(r"(://)[^/@\s]*@")
_SECRET_QUERY = re.compile(r"([?&][^=&#\s]+=)[^&#\s]*")
T = TypeVar("T")


class RemoteStoreError(OSError):
    """The remote artifact store could not be reached or refused an operation (the message names the URL)."""


def redact_url(url: str) -> str:
    """``url`` with user/password and query values replaced by ``***``, for messages and logs."""
    return _SECRET_QUERY.sub(r"\1***", _CREDENTIALS.sub(r"\1***@", url))


def make_artifact_store(local_root: str | os.PathLike[str], url: str | None = None) -> ArtifactStore:
    """A plain local :class:`ArtifactStore` at ``local_root`` when ``url`` is empty, else a
    :class:`MirroredArtifactStore` caching ``url`` in ``local_root`` (a plain path of another folder counts too)."""
    if url is None or not str(url).strip():
        return ArtifactStore(local_root)
    return MirroredArtifactStore(local_root, str(url).strip())


def _temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(6)}.tmp"


def _safe_parts(rel: str) -> bool:
    return all(part not in ("", ".", "..") and not part.startswith(".") for part in rel.split("/"))


class MirroredArtifactStore(ArtifactStore):
    """The local folder ``root`` caches the store at ``url``; see the module docstring for the guarantees."""

    def __init__(self, root: str | os.PathLike[str], url: str) -> None:
        super().__init__(root)
        self.url = url.strip()
        self.shown_url = redact_url(self.url)
        if not self.url:
            raise ValueError("the artifact URL is empty")
        try:
            self.fs, path = url_to_fs(self.url)
        except (ImportError, ValueError, TypeError) as exc:
            raise ValueError(f"artifact URL {self.shown_url} cannot be opened: {self._clean(exc)} (install the "
                             "fsspec backend for its protocol, e.g. s3fs, gcsfs, adlfs or sshfs)") from None
        self.remote_root = path.rstrip("/")
        if not self.remote_root:
            raise ValueError(f"artifact URL {self.shown_url} names the root of its filesystem; give a folder")
        if isinstance(self.fs, LocalFileSystem):
            remote = Path(self.remote_root).resolve()
            if remote == self.root or remote in self.root.parents or self.root in remote.parents:
                raise ValueError(f"artifact URL {self.shown_url} overlaps the local cache {self.root}; "
                                 "give a folder outside the data dir")
        self._reindex_lock = threading.Lock()
        self._remote_ids: tuple[set[str], set[str]] | None = None  # (adapters, images) seen remotely by reindex
        self._op("reach the store", self.fs.exists, self.remote_root)

    def __repr__(self) -> str:
        return f"MirroredArtifactStore({str(self.root)!r}, {self.shown_url!r})"

    # remote primitives ------------------------------------------------------------------------------------

    def _clean(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        return redact_url(text.replace(self.url, self.shown_url))

    def _op(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the filesystem; FileNotFoundError passes through, anything else becomes a RemoteStoreError."""
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise RemoteStoreError(f"artifact store {self.shown_url}: {what} failed "
                                   f"({type(exc).__name__}: {self._clean(exc)})") from None

    def _remote(self, rel: str) -> str:
        return f"{self.remote_root}/{rel}"

    def _norm(self, relpath: str | os.PathLike[str]) -> str:
        """The checked, normalised store-relative form of ``relpath`` (ValueError for escapes)."""
        return self._path(relpath).relative_to(self.root).as_posix()

    def _rel_of(self, remote_path: str) -> str | None:
        """The store-relative path of a listed remote path, or None for anything outside, hidden or unsafe."""
        prefix = self.remote_root + "/"
        if not isinstance(remote_path, str) or not remote_path.startswith(prefix):
            return None
        rel = remote_path[len(prefix):].rstrip("/")
        if not rel or not _safe_parts(rel):
            return None
        try:
            return self._norm(rel)
        except ValueError:
            return None

    def _exists(self, rel: str) -> bool:
        return bool(self._op(f"look up {rel}", self.fs.exists, self._remote(rel)))

    def _find(self, rel: str) -> list[str]:
        """Store-relative paths of the (safe, non-temp) files under remote ``rel``."""
        try:
            found = self._op(f"list {rel}", self.fs.find, self._remote(rel))
        except FileNotFoundError:
            return []
        return sorted(r for r in map(self._rel_of, found) if r is not None)

    def _put(self, local: Path, remote: str, what: str) -> None:
        try:
            self._op(what, self.fs.put_file, os.fspath(local), remote)
        except FileNotFoundError:
            if not local.is_file():
                raise
            self._op(what, self.fs.makedirs, posixpath.dirname(remote), exist_ok=True)  # folders must exist
            self._op(what, self.fs.put_file, os.fspath(local), remote)

    def _move(self, src: str, dst: str, what: str) -> None:
        try:
            self._op(what, self.fs.mv, src, dst)
        except FileNotFoundError:
            self._op(what, self.fs.makedirs, posixpath.dirname(dst), exist_ok=True)
            self._op(what, self.fs.mv, src, dst)

    def _discard(self, remote: str) -> None:
        """Best-effort delete of a temp upload (what stays behind goes with :meth:`remove_remote_orphans`)."""
        try:
            self.fs.rm(remote, recursive=True)
        except Exception:  # noqa: BLE001 - cleanup after another error, which is the one to report
            pass

    def _remove_remote(self, rel: str) -> bool:
        if not self._exists(rel):
            return False
        try:
            self._op(f"delete {rel}", self.fs.rm, self._remote(rel), recursive=True)
        except FileNotFoundError:
            return False
        return True

    def _download(self, rel: str, local: Path | None = None) -> Path:
        """Copy remote ``rel`` to ``local`` (default: its place in the cache) through a temp file + rename."""
        target = local if local is not None else self._path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            self._op(f"download {rel}", self.fs.get_file, self._remote(rel), tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    # publishing -------------------------------------------------------------------------------------------

    def _publish_file(self, rel: str) -> None:
        final = self._remote(rel)
        tmp = posixpath.join(posixpath.dirname(final), _temp_name(posixpath.basename(final)))
        try:
            self._put(self._path(rel), tmp, f"upload {rel}")
            self._move(tmp, final, f"publish {rel}")
        except BaseException:
            self._discard(tmp)
            raise

    def _publish_files(self, rels: Iterable[str]) -> None:
        """Publish ``rels`` in order; on failure remove them locally and remotely again, then raise."""
        rels = list(rels)
        try:
            for rel in rels:
                self._publish_file(rel)
        except BaseException:
            for rel in rels:
                self._path(rel).unlink(missing_ok=True)
                self._discard(self._remote(rel))
            raise

    def _publish_tree(self, rel: str) -> None:
        """Upload folder ``rel`` under a temp name, close it with :data:`COMPLETE_FILE`, move it into place."""
        local = self._path(rel)
        names = sorted((p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()),
                       key=lambda name: (name == MANIFEST_FILE, name))  # the manifest arrives last
        names = [n for n in names if _safe_parts(n)]
        if not names:
            raise ValueError(f"{rel}: nothing to publish (empty folder)")
        final = self._remote(rel)
        tmp = posixpath.join(posixpath.dirname(final), _temp_name(posixpath.basename(final)))
        complete = json.dumps({"files": {n: (local / n).stat().st_size for n in names}}, sort_keys=True)
        try:
            for name in names:
                self._put(local / name, f"{tmp}/{name}", f"upload {rel}/{name}")
            self._op(f"upload {rel}", self.fs.pipe_file, f"{tmp}/{COMPLETE_FILE}", complete.encode())
            if self._exists(rel):  # replaced: a rerun, or a checkpoint saved twice at one step
                self._op(f"replace {rel}", self.fs.rm, final, recursive=True)
            if isinstance(self.fs, LocalFileSystem):  # one rename: atomic
                self._move(tmp, final, f"publish {rel}")
            else:  # copy + delete per file; the complete-file goes last
                for name in [*names, COMPLETE_FILE]:
                    self._move(f"{tmp}/{name}", f"{final}/{name}", f"publish {rel}/{name}")
                self._discard(tmp)
        except BaseException:
            self._discard(tmp)
            raise

    # reading ----------------------------------------------------------------------------------------------

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """The local path of ``relpath`` (checked like the base store), downloaded first when it is missing
        locally but present remotely (a folder: its missing files). A path present nowhere is returned as is."""
        path = self._path(relpath)
        if path == self.root or path.exists():
            return path
        rel = self._norm(relpath)
        try:
            info = self._op(f"look up {rel}", self.fs.info, self._remote(rel))
        except FileNotFoundError:
            return path
        if info.get("type") == "directory":
            for inner in self._find(rel):
                if not self._path(inner).exists():
                    self._download(inner)
        else:
            self._download(rel)
        return path

    # writes: local first, then published --------------------------------------------------------------------

    def write_dataset_image(self, dataset_id: str, position: int, png_bytes: bytes) -> tuple[str, str]:
        rel, sha = super().write_dataset_image(dataset_id, position, png_bytes)
        self._publish_files([rel])
        return rel, sha

    def write_dataset_captions(self, dataset_id: str, records: Iterable[Mapping[str, Any]]) -> str:
        rel = super().write_dataset_captions(dataset_id, records)
        self._publish_files([rel])
        return rel

    def write_dataset_folder(self, dataset_id: str, files: Mapping[str, bytes]) -> dict[str, str]:
        """As the base store, then the folder is published; FileExistsError when it exists remotely already."""
        rel = f"datasets/{_check_id(dataset_id, 'dataset id')}"
        if self._exists(rel):
            raise FileExistsError(f"dataset folder {rel} already exists in {self.shown_url}")
        digests = super().write_dataset_folder(dataset_id, files)
        try:
            self._publish_tree(rel)
        except BaseException:
            ArtifactStore.remove(self, rel)
            raise
        return digests

    def write_adapter(self, adapter_id: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      config: Mapping[str, Any], manifest: Mapping[str, Any]) -> StoredAdapter:
        """As the base store, then the folder is published; FileExistsError when it exists remotely already."""
        if self._exists(f"adapters/{_check_id(adapter_id, 'adapter id')}"):
            raise FileExistsError(f"adapter folder adapters/{adapter_id} already exists in {self.shown_url}")
        stored = super().write_adapter(adapter_id, tensors, metadata, config, manifest)
        try:
            self._publish_tree(stored.folder)
        except BaseException:
            super().remove_adapter(adapter_id)
            raise
        return stored

    def write_adapter_preview(self, adapter_id: str, position: int, png_bytes: bytes) -> str:
        self.resolve(f"adapters/{_check_id(adapter_id, 'adapter id')}/{MANIFEST_FILE}")  # written on another host
        rel = super().write_adapter_preview(adapter_id, position, png_bytes)
        self._publish_files([rel])
        return rel

    def write_image(self, image_id: str, png_bytes: bytes, record: Mapping[str, Any],
                    created_at: datetime | None = None) -> tuple[str, str]:
        """As the base store; the PNG is published first, then its sidecar (what ``reindex`` looks for)."""
        rel, sha = super().write_image(image_id, png_bytes, record, created_at)
        self._publish_files([rel, rel[: -len(".png")] + ".json"])
        return rel, sha

    def write_image_regions(self, image_rel: str, png_bytes: bytes) -> str:
        """As the base store, then published (the CLoRA region preview of a generated image)."""
        rel = super().write_image_regions(image_rel, png_bytes)
        self._publish_files([rel])
        return rel

    def write_image_media(self, image_rel: str, suffix: str, data: bytes) -> str:
        """As the base store, then published (the video of a generated clip)."""
        rel = super().write_image_media(image_rel, suffix, data)
        self._publish_files([rel])
        return rel

    # deletion ---------------------------------------------------------------------------------------------

    def remove_adapter(self, adapter_id: str) -> bool:
        local = super().remove_adapter(adapter_id)
        return self._remove_remote(f"adapters/{_check_id(adapter_id, 'adapter id')}") or local

    def remove(self, relpath: str) -> bool:
        if self._path(relpath) == self.root:
            raise ValueError("refusing to delete the whole artifact store")
        rel = self._norm(relpath)
        local = super().remove(rel)
        return self._remove_remote(rel) or local

    def remove_remote_orphans(self, min_age_s: float = 15 * 60) -> list[str]:
        """Delete remote temp uploads older than ``min_age_s`` (left by a host that died while publishing).

        Lists the whole remote store, so it is not run at start-up; returns the store-relative paths removed.
        """
        prefix = self.remote_root + "/"
        groups: dict[str, list[str]] = {}
        for path in self._op("list the store", self.fs.find, self.remote_root):
            parts = path[len(prefix):].split("/") if path.startswith(prefix) else []
            if any(p in ("", ".", "..") for p in parts):
                continue
            for i, part in enumerate(parts):
                if part.startswith(".") and part.endswith(_TEMP_SUFFIXES):
                    groups.setdefault("/".join(parts[: i + 1]), []).append(path)
                    break
        removed, now = [], time.time()
        for rel, files in sorted(groups.items()):
            try:
                ages = [now - self.fs.modified(f).timestamp() for f in files]
            except Exception:  # noqa: BLE001 - no modification time from this backend: leave it
                continue
            if min(ages) >= min_age_s:
                self._discard(self._remote(rel))
                removed.append(rel)
        return removed

    # training checkpoints ---------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """``jobs/<id>/`` as in the base store, plus the job's newest complete remote checkpoint when it is newer
        than every local one (its worker died on another host: the job resumes from there)."""
        folder = super().job_dir(job_id)
        local = folder / "checkpoints"
        newest_local = max((int(m.group(1)) for p in local.iterdir() if (m := _CHECKPOINT.fullmatch(p.name))),
                           default=-1)
        remote = self._remote_checkpoints(f"jobs/{job_id}/checkpoints")
        for name, step in sorted(remote.items(), key=lambda item: item[1], reverse=True):
            if step <= newest_local or self._pull_checkpoint(f"jobs/{job_id}/checkpoints/{name}", local / name):
                break
        return folder

    def _remote_checkpoints(self, rel: str) -> dict[str, int]:
        """``{folder name: step}`` of the remote checkpoint folders under ``rel`` (temp uploads excluded)."""
        try:
            listed = self._op(f"list {rel}", self.fs.ls, self._remote(rel), detail=False)
        except FileNotFoundError:
            return {}
        found = {}
        for path in listed:
            inner = self._rel_of(path)
            if inner is not None and posixpath.dirname(inner) == rel:
                name = posixpath.basename(inner)
                if m := _CHECKPOINT.fullmatch(name):
                    found[name] = int(m.group(1))
        return found

    def _pull_checkpoint(self, rel: str, target: Path) -> bool:
        """Download checkpoint folder ``rel`` into ``target`` (temp folder + rename) if it is complete."""
        try:
            listing = json.loads(self._op(f"download {rel}", self.fs.cat_file, self._remote(f"{rel}/{COMPLETE_FILE}")))
            files = {str(k): int(v) for k, v in listing["files"].items()}
        except FileNotFoundError:
            return False  # still being moved into place, or its host died meanwhile
        except (ValueError, TypeError, KeyError, AttributeError):
            return False
        if not files or not all(_safe_parts(name) for name in files):
            return False
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            for name, size in files.items():
                got = self._download(f"{rel}/{name}", tmp.joinpath(*name.split("/")))
                if got.stat().st_size != size:
                    raise RemoteStoreError(f"artifact store {self.shown_url}: {rel}/{name} has "
                                           f"{got.stat().st_size} bytes, its {COMPLETE_FILE} says {size}")
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def write_job_file(self, job_id: str, name: str, source: str | os.PathLike[str]) -> tuple[str, str]:
        """As the base store, then published so that a worker on another host can fetch it."""
        rel, sha = super().write_job_file(job_id, name, source)
        self._publish_files([rel])
        return rel, sha

    def publish_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Upload the finished checkpoint folder ``jobs/<id>/checkpoints/step-NNNNNN`` and delete the remote
        checkpoints of that job that the trainer already pruned locally (older ones only)."""
        rel = self.relative(path)
        parts = rel.split("/")
        if len(parts) != 4 or parts[0] != "jobs" or parts[2] != "checkpoints" or not _CHECKPOINT.fullmatch(parts[3]):
            raise ValueError(f"{os.fspath(path)!r} is not a checkpoint folder (jobs/<id>/checkpoints/step-NNNNNN)")
        _check_id(parts[1], "job id")
        self._publish_tree(rel)
        root = posixpath.dirname(rel)
        step = int(parts[3].split("-")[1])
        kept = {p.name for p in self._path(root).iterdir() if p.is_dir()}
        for name, other in self._remote_checkpoints(root).items():
            if other < step and name not in kept:
                self._remove_remote(f"{root}/{name}")
        try:  # temp uploads of this job's checkpoints: only this job's worker writes here, so they are dead
            listed = self._op(f"list {root}", self.fs.ls, self._remote(root), detail=False)
        except FileNotFoundError:
            return
        for path_ in listed:
            name = posixpath.basename(path_.rstrip("/"))
            if path_.startswith(self._remote(root) + "/") and name.startswith(".step-") and name.endswith(".tmp"):
                self._discard(path_)

    # rebuilding the index ---------------------------------------------------------------------------------

    def reindex(self, session: Session) -> ReindexReport:
        """Pull the remote adapters and images that have no catalog row, then index like the base store, but
        only what the remote holds (a local leftover that was deleted elsewhere is not brought back). What was
        pulled and then skipped (corrupt, or an unfinished save) is dropped from the local cache again."""
        with self._reindex_lock:
            adapters: dict[str, list[str]] = {}
            for rel in self._find("adapters"):
                parts = rel.split("/")
                if len(parts) >= 3:
                    adapters.setdefault(parts[1], []).append(rel)
            images: dict[str, list[str]] = {}
            for rel in self._find("images"):
                parts = rel.split("/")
                if len(parts) == 3 and rel.endswith((".png", ".json")):
                    images.setdefault(posixpath.splitext(parts[2])[0], []).append(rel)
            known_adapters = set(session.scalars(select(AdapterRow.id)))
            known_images = set(session.scalars(select(GeneratedImageRow.id)))
            pulled_adapters = [i for i, rels in adapters.items()
                               if i not in known_adapters and self._pull_missing([f"adapters/{i}"], rels)]
            pulled_images = {i: rels for i, rels in images.items()
                             if i not in known_images and self._pull_missing(rels, rels)}
            self._remote_ids = (set(adapters), set(images))
            try:
                report = super().reindex(session)
            finally:
                self._remote_ids = None
            for adapter_id in pulled_adapters:
                if adapter_id not in report.adapters:
                    super().remove_adapter(adapter_id)
            for image_id, rels in pulled_images.items():
                if image_id not in report.images:
                    for rel in rels:
                        self._path(rel).unlink(missing_ok=True)
            return report

    def _pull_missing(self, owned: list[str], rels: list[str]) -> bool:
        """Download those of ``rels`` missing from the cache; True when none of ``owned`` was cached before (then
        the cached copy is this pull's alone, and may be dropped again)."""
        fresh = not any(self._path(rel).exists() for rel in owned)
        for rel in rels:
            if not self._path(rel).exists():
                self._download(rel)
        return fresh

    def _adapter_folders(self) -> list[Path]:
        folders = super()._adapter_folders()
        if self._remote_ids is None:
            return folders
        return [f for f in folders if f.name in self._remote_ids[0]]

    def _image_sidecars(self) -> list[Path]:
        sidecars = super()._image_sidecars()
        if self._remote_ids is None:
            return sidecars
        return [s for s in sidecars if s.stem in self._remote_ids[1]]
