"""The mirrored artifact store on real fsspec filesystems: a ``file://`` folder standing in for the shared store
(and ``memory://`` for the quick cases). Two stores with separate local caches and one URL are two hosts."""

from __future__ import annotations

import json
import shutil
import struct
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.io import sha256_file
from storage import catalog, jobs
from storage.artifacts import ArtifactStore
from storage.models import AdapterRow, GeneratedImageRow
from storage.remote import COMPLETE_FILE, MirroredArtifactStore, RemoteStoreError, make_artifact_store, redact_url

WHEN = datetime(2026, 3, 4, 12, 0, tzinfo=timezone.utc)


def _png(seed: int = 0) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes([0, seed, 0, 0]))) \
        + chunk(b"IEND", b"")


def _write_adapter(store: ArtifactStore, adapter_id: str, **manifest):
    tensors = {"unet.x.lora_A.weight": torch.arange(8.0).reshape(4, 2), "unet.x.lora_B.weight": torch.ones(2, 4)}
    fields = {"name": f"n-{adapter_id}", "method": "lora", "kind": "subject", "base_model": "tiny",
              "base_model_hash": "b" * 64, "trigger_words": ["sks"], "rank": 4, "training_config": {"rank": 4},
              "steps": 10} | manifest
    return store.write_adapter(adapter_id, tensors, {"lorastudio.method": "lora"}, {"r": 4}, fields)


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _temps(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if p.name.endswith((".tmp", ".trash"))]


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    return tmp_path / "shared"


@pytest.fixture
def host_a(tmp_path: Path, remote: Path) -> MirroredArtifactStore:
    store = make_artifact_store(tmp_path / "a" / "artifacts", f"file://{remote}")
    assert isinstance(store, MirroredArtifactStore)
    return store


@pytest.fixture
def host_b(tmp_path: Path, remote: Path) -> MirroredArtifactStore:
    return MirroredArtifactStore(tmp_path / "b" / "artifacts", str(remote))  # a plain path is a remote too


def _write_everything(store: ArtifactStore) -> dict[str, str]:
    """One of each kind of write; returns the relative paths written."""
    image_rel, _ = store.write_dataset_image("d1", 0, _png(1))
    captions = store.write_dataset_captions("d1", [{"file": "0000.png", "caption": "a disc"}])
    stored = _write_adapter(store, "a1")
    preview = store.write_adapter_preview("a1", 0, _png(2))
    generated, _ = store.write_image("i1", _png(3), {"prompt": "sks disc", "seed": 3}, created_at=WHEN)
    return {"dataset": image_rel, "captions": captions, "weights": stored.path, "preview": preview,
            "image": generated, "sidecar": generated.replace(".png", ".json")}


def test_factory_and_redaction(tmp_path: Path) -> None:
    plain = make_artifact_store(tmp_path / "local", "")
    assert type(plain) is ArtifactStore and type(make_artifact_store(tmp_path / "l2", None)) is ArtifactStore
    with pytest.raises(ValueError, match="overlaps the local cache"):
        MirroredArtifactStore(tmp_path / "local", f"file://{tmp_path / 'local'}")
    with pytest.raises(ValueError) as err:
        make_artifact_store(tmp_path / "l3", "nosuchproto://alice:hunter2@host/bucket")
    assert "nosuchproto://***@host/bucket" in str(err.value) and "hunter2" not in str(err.value)
    assert redact_url("s3://key:secret@b/x?token=abc&region=eu") == "s3://***@b/x?token=***&region=***"
    assert redact_url("sftp://h/data") == "sftp://h/data"


def test_every_write_lands_remotely_with_the_same_bytes(host_a: MirroredArtifactStore, remote: Path) -> None:
    written = _write_everything(host_a)
    local, shared = _files(host_a.root), _files(remote)
    for rel in written.values():
        assert shared[rel] == local[rel], rel
    for name in ("adapter.safetensors", "adapter_config.json", "manifest.json"):
        assert shared[f"adapters/a1/{name}"] == local[f"adapters/a1/{name}"]
    complete = json.loads((remote / "adapters" / "a1" / COMPLETE_FILE).read_text())
    assert complete["files"]["adapter.safetensors"] == (host_a.root / written["weights"]).stat().st_size
    assert set(shared) - set(local) == {f"adapters/a1/{COMPLETE_FILE}"}  # nothing else only remote
    assert _temps(remote) == [] and _temps(host_a.root) == []


def test_a_second_host_reads_everything_from_the_remote(host_a, host_b) -> None:
    written = _write_everything(host_a)
    assert not any((host_b.root / rel).exists() for rel in written.values())
    for rel in written.values():
        path = host_b.resolve(rel)
        assert path == host_b.root / rel and path.is_file()
        assert sha256_file(path) == sha256_file(host_a.root / rel), rel
    sidecar = json.loads(host_b.resolve(written["sidecar"]).read_text())
    assert sidecar["prompt"] == "sks disc" and sidecar["sha256"] == sha256_file(host_b.root / written["image"])
    assert host_b.resolve("adapters/nope/adapter.safetensors") == host_b.root / "adapters/nope/adapter.safetensors"
    assert not (host_b.root / "adapters" / "nope").exists()  # absent everywhere: nothing created
    assert _temps(host_b.root) == []


def test_resolving_a_folder_fetches_its_files(host_a, host_b) -> None:
    _write_adapter(host_a, "a1")
    host_a.write_adapter_preview("a1", 0, _png())
    folder = host_b.resolve("adapters/a1")
    assert _files(folder) == _files(host_a.root / "adapters" / "a1")  # the complete-file stays remote


def test_removals_reach_the_remote(host_a, host_b, remote: Path) -> None:
    written = _write_everything(host_a)
    assert host_b.resolve(written["image"]).is_file()
    assert host_b.remove(written["image"]) is True
    assert not (remote / written["image"]).exists() and not (host_b.root / written["image"]).exists()
    assert host_a.remove(written["image"]) is True  # still in host A's cache; remote already gone
    assert host_a.remove(written["image"]) is False
    assert host_b.remove_adapter("a1") is True  # host B never cached it: only the remote copy goes
    assert not (remote / "adapters" / "a1").exists()
    assert host_b.remove_adapter("a1") is False
    assert not host_b.resolve(written["weights"]).exists()
    with pytest.raises(ValueError, match="whole artifact store"):
        host_b.remove(".")


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../outside", "adapters/../../x", "..", "C:\\x", "a\x00b"])
def test_path_escapes_are_refused(host_b: MirroredArtifactStore, bad: str) -> None:
    with pytest.raises(ValueError):
        host_b.resolve(bad)
    with pytest.raises(ValueError):
        host_b.remove(bad)


def test_hostile_remote_names_are_ignored(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    url = f"memory://lorastudio-{uuid.uuid4().hex}"
    writer = make_artifact_store(tmp_path / "w", url)
    _write_adapter(writer, "a1")
    fs, root = fsspec.core.url_to_fs(url)
    for name in ("adapters/../../evil.txt", "adapters/a2/../../../evil2.txt", "images/d/../../../evil3.json",
                 "adapters/.a3.x.tmp/manifest.json"):
        fs.pipe_file(f"{root}/{name}", b"{}")
    reader = make_artifact_store(tmp_path / "deep" / "r", url)
    with sessions.begin() as session:
        report = reader.reindex(session)
    assert report.adapters == ["a1"] and report.images == [] and report.skipped == []
    assert sorted(p.name for p in tmp_path.rglob("evil*")) == []
    assert not (reader.root / "adapters" / ".a3.x.tmp").exists()
    assert reader.resolve("adapters/a1/adapter.safetensors").is_file()


def test_memory_url_round_trip(tmp_path: Path) -> None:
    url = f"memory://lorastudio-{uuid.uuid4().hex}/store"
    first, second = make_artifact_store(tmp_path / "1", url), make_artifact_store(tmp_path / "2", url)
    rel, sha = first.write_image("i1", _png(9), {"prompt": "p", "seed": 1}, created_at=WHEN)
    assert sha256_file(second.resolve(rel)) == sha
    fs, root = fsspec.core.url_to_fs(url)
    assert sorted(p[len(root) + 1:] for p in fs.find(root)) == [rel.replace(".png", ".json"), rel]
    assert second.remove(rel) and not fs.exists(f"{root}/{rel}")


def test_a_failed_publish_undoes_the_local_write(host_a: MirroredArtifactStore, remote: Path) -> None:
    remote.mkdir(parents=True)
    (remote / "adapters").write_text("a file where the adapters folder should be")
    (remote / "images").write_text("likewise")
    with pytest.raises(RemoteStoreError, match=f"artifact store file://{remote}: upload") as err:
        _write_adapter(host_a, "a1")
    assert "adapters/a1" in str(err.value)
    assert not (host_a.root / "adapters" / "a1").exists() and _temps(host_a.root) == []
    with pytest.raises(RemoteStoreError):
        host_a.write_image("i1", _png(), {"prompt": "p", "seed": 1}, created_at=WHEN)
    assert list((host_a.root / "images").rglob("*.*")) == []
    assert _temps(remote) == []


def test_adapter_ids_are_unique_across_hosts(host_a, host_b) -> None:
    _write_adapter(host_a, "a1")
    with pytest.raises(FileExistsError, match="already exists"):
        _write_adapter(host_b, "a1")
    assert not (host_b.root / "adapters" / "a1").exists()


def test_remote_temp_uploads_are_swept(host_a: MirroredArtifactStore, remote: Path) -> None:
    _write_adapter(host_a, "a1")
    dead = remote / "adapters" / ".a2.0badc0ffee0.tmp"
    dead.mkdir()
    (dead / "adapter.safetensors").write_bytes(b"partial")
    (remote / "images" / "2026-01-01").mkdir(parents=True)
    (remote / "images" / "2026-01-01" / ".i9.png.0badc0ffee0.tmp").write_bytes(b"partial")
    assert host_a.remove_remote_orphans(min_age_s=3600) == []  # could be a live upload
    assert host_a.remove_remote_orphans(min_age_s=0) == ["adapters/.a2.0badc0ffee0.tmp",
                                                        "images/2026-01-01/.i9.png.0badc0ffee0.tmp"]
    assert _temps(remote) == [] and (remote / "adapters" / "a1" / "adapter.safetensors").is_file()


# checkpoints ------------------------------------------------------------------------------------------------


def _checkpoint(store: ArtifactStore, job_id: str, step: int) -> Path:
    folder = store.job_dir(job_id) / "checkpoints" / f"step-{step:06d}"
    folder.mkdir()
    for name in ("adapter.safetensors", "state.safetensors", "state.json"):
        (folder / name).write_bytes(f"{name} at step {step}".encode() * (step + 1))
    return folder


def test_checkpoints_travel_to_the_host_that_resumes(host_a, host_b, remote: Path) -> None:
    for step in (2, 4):
        host_a.publish_checkpoint(_checkpoint(host_a, "j1", step))
    assert sorted(p.name for p in (remote / "jobs/j1/checkpoints").iterdir()) == ["step-000002", "step-000004"]
    folder = host_b.job_dir("j1")
    pulled = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert pulled == ["step-000004"]  # only the newest: enough to resume
    assert _files(folder / "checkpoints") == {k: v for k, v in _files(host_a.root / "jobs/j1/checkpoints").items()
                                              if k.startswith("step-000004/")}
    # host B trains on: step 6 written, step 4 pruned locally by the trainer -> pruned remotely too, 2 as well
    six = _checkpoint(host_b, "j1", 6)
    host_b.publish_checkpoint(six)
    assert sorted(p.name for p in (remote / "jobs/j1/checkpoints").iterdir()) == ["step-000004", "step-000006"]
    shutil.rmtree(folder / "checkpoints" / "step-000004")
    host_b.publish_checkpoint(_checkpoint(host_b, "j1", 8))
    assert sorted(p.name for p in (remote / "jobs/j1/checkpoints").iterdir()) == ["step-000006", "step-000008"]
    # back on host A: its own step 4 is older than the remote's newest, so step 8 comes down
    host_a.job_dir("j1")
    assert (host_a.root / "jobs/j1/checkpoints/step-000008/state.json").read_bytes() == \
        (six.parent / "step-000008" / "state.json").read_bytes()
    assert _temps(host_a.root) == [] and _temps(remote) == []


def test_incomplete_remote_checkpoint_is_not_resumed_from(host_a, host_b, remote: Path) -> None:
    host_a.publish_checkpoint(_checkpoint(host_a, "j1", 2))
    half = remote / "jobs/j1/checkpoints/step-000004"  # a move from a temp name cut short: no complete-file
    half.mkdir()
    (half / "state.json").write_text("{}")
    folder = host_b.job_dir("j1")
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-000002"]
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        host_a.publish_checkpoint(host_a.root / "jobs" / "j1")


def test_plain_store_checkpoint_publish_is_a_no_op(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "plain")
    folder = _checkpoint(store, "j1", 2)
    store.publish_checkpoint(folder)
    assert store.job_dir("j1") == folder.parent.parent and folder.is_dir()


# reindex ----------------------------------------------------------------------------------------------------


def test_reindex_on_a_fresh_host_rebuilds_rows_from_the_remote(host_a, host_b,
                                                               sessions: sessionmaker[Session]) -> None:
    written = _write_everything(host_a)
    _write_adapter(host_a, "a2")
    with sessions.begin() as session:  # the job whose save left "a3" never finished: skipped, not cached
        job = jobs.enqueue(session, "train", {}, title="unfinished")
        session.flush()
        _write_adapter(host_a, "a3", job_id=job.id)
    _write_adapter(ArtifactStore(host_b.root), "local-only")  # in host B's cache, gone from the remote
    with sessions.begin() as session:
        report = host_b.reindex(session)
    assert report.adapters == ["a1", "a2"] and report.images == ["i1"]
    assert len(report.skipped) == 1 and report.skipped[0].startswith("adapters/a3:")
    assert not (host_b.root / "adapters" / "a3").exists()
    with sessions.begin() as session:
        assert set(session.scalars(select(AdapterRow.id))) == {"a1", "a2"}
        row = catalog.get_adapter(session, "a1")
        assert row.sha256 == sha256_file(host_a.root / written["weights"])
        assert [p.path for p in row.previews] == [written["preview"]]
        image = session.get(GeneratedImageRow, "i1")
        assert image.path == written["image"] and image.prompt == "sks disc"
    assert sha256_file(host_b.root / written["weights"]) == row.sha256
    with sessions.begin() as session:
        again = host_b.reindex(session)  # nothing more to add; the unfinished save is still left alone
    assert again.adapters == [] and again.images == [] and again.skipped == report.skipped
    assert not (host_b.root / "adapters" / "a3").exists()
