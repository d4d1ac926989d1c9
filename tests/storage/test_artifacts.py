from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core.io import sha256_file
from core.types import AdapterInfo
from storage import artifacts, catalog, jobs
from storage.artifacts import ArtifactStore
from storage.db import utcnow
from storage.models import AdapterRow, GeneratedImageRow


def _png(seed: int = 0) -> bytes:
    """A valid 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(bytes([0, seed % 256, 0, 0]))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def _listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _write_adapter(store: ArtifactStore, adapter_id: str, name: str = "Corgi", **manifest):
    tensors = {"unet.lora_A.weight": torch.ones(4, 2), "unet.lora_B.weight": torch.zeros(2, 4)}
    fields = dict(
        name=name,
        method="lora",
        kind="subject",
        base_model="tiny-sd",
        base_model_hash="b" * 64,
        trigger_words=["sks"],
        rank=4,
        training_config={"rank": 4},
        steps=10,
    )
    fields.update(manifest)
    return store.write_adapter(adapter_id, tensors, {"lorastudio.method": "lora"}, {"r": 4}, fields)


# paths ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "/etc/passwd", "../outside", "adapters/../../outside", "a/../../b", "..", "C:\\x", "a\x00b"]
)
def test_resolve_refuses_escapes(store: ArtifactStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.resolve(bad)


def test_resolve_follows_symlinks_only_inside(store: ArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "images").mkdir()
    (store.root / "images" / "escape").symlink_to(outside)
    (store.root / "images" / "inside").symlink_to(store.root / "adapters")
    with pytest.raises(ValueError, match="outside the artifact store"):
        store.resolve("images/escape/x.png")
    assert store.resolve("images/inside/x") == store.root / "images" / "inside" / "x"
    assert store.resolve("datasets/a/0000.png") == store.root / "datasets" / "a" / "0000.png"
    assert store.relative(store.root / "jobs" / "j" / "previews" / "1.png") == "jobs/j/previews/1.png"
    with pytest.raises(ValueError):
        store.relative(outside)


def test_ids_cannot_smuggle_paths(store: ArtifactStore) -> None:
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="invalid"):
            store.remove_adapter(bad)
        with pytest.raises(ValueError, match="invalid"):
            store.job_dir(bad)


# writes -----------------------------------------------------------------------------------------------------


def test_dataset_files(store: ArtifactStore) -> None:
    rel, sha = store.write_dataset_image("d1", 3, _png())
    assert rel == "datasets/d1/0003.png" and sha == sha256_file(store.resolve(rel))
    captions = store.write_dataset_captions("d1", [{"file": "0003.png", "caption": "un chien"}])
    lines = store.resolve(captions).read_text("utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"caption": "un chien", "file": "0003.png"}]
    with pytest.raises(ValueError, match="PNG"):
        store.write_dataset_image("d1", 4, b"GIF89a")
    assert _listing(store.root) == ["datasets", "datasets/d1", "datasets/d1/0003.png", "datasets/d1/captions.jsonl"]


def test_write_adapter(store: ArtifactStore) -> None:
    stored = _write_adapter(store, "a1")
    assert stored.path == "adapters/a1/adapter.safetensors" and stored.folder == "adapters/a1"
    weights = store.resolve(stored.path)
    assert stored.sha256 == sha256_file(weights) and stored.size == weights.stat().st_size
    with safe_open(str(weights), framework="pt") as fh:
        assert fh.metadata() == {"lorastudio.method": "lora"}
        assert sorted(fh.keys()) == ["unet.lora_A.weight", "unet.lora_B.weight"]
    manifest = json.loads(store.resolve("adapters/a1/manifest.json").read_text())
    assert manifest["id"] == "a1" and manifest["sha256"] == stored.sha256 and manifest["name"] == "Corgi"
    assert json.loads(store.resolve("adapters/a1/adapter_config.json").read_text()) == {"r": 4}
    assert store.write_adapter_preview("a1", 0, _png()) == "adapters/a1/previews/0.png"
    with pytest.raises(FileExistsError):
        _write_adapter(store, "a1")
    with pytest.raises(FileNotFoundError, match="write the adapter first"):
        store.write_adapter_preview("a2", 0, _png())
    assert not [p for p in _listing(store.root) if Path(p).name.startswith(".")]


def test_failed_adapter_write_leaves_nothing(store: ArtifactStore, monkeypatch) -> None:
    real = artifacts.atomic_write_json

    def crash_on_manifest(path, obj):
        if Path(path).name == "manifest.json":
            raise OSError("disk full")
        return real(path, obj)

    monkeypatch.setattr(artifacts, "atomic_write_json", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        _write_adapter(store, "a1")
    assert _listing(store.root) == ["adapters"]  # no adapter folder, no temp folder


def test_crashed_adapter_write_is_invisible_and_cleaned(store: ArtifactStore, sessions) -> None:
    _write_adapter(store, "a1")
    # what a killed process leaves behind: a half-built temp folder and a temp file
    half = store.root / "adapters" / ".a2.k3j4.tmp"
    half.mkdir()
    (half / "adapter.safetensors").write_bytes(b"partial")
    (store.root / "adapters" / "a1" / ".manifest.json.x1.tmp").write_bytes(b"{")
    with sessions.begin() as session:
        assert store.reindex(session).adapters == ["a1"]
    assert store.remove_orphans(min_age_s=3600) == []  # too fresh: could belong to a live writer
    assert store.remove_orphans() == ["adapters/.a2.k3j4.tmp", "adapters/a1/.manifest.json.x1.tmp"]
    assert _listing(store.root / "adapters") == [
        "a1",
        "a1/adapter.safetensors",
        "a1/adapter_config.json",
        "a1/manifest.json",
    ]


def test_write_image(store: ArtifactStore, monkeypatch) -> None:
    from datetime import datetime, timezone

    when = datetime(2026, 3, 4, 23, 30, tzinfo=timezone.utc)
    rel, sha = store.write_image("i1", _png(), {"prompt": "a corgi", "seed": 7}, created_at=when)
    assert rel == "images/2026-03-04/i1.png" and sha == sha256_file(store.resolve(rel))
    sidecar = json.loads(store.resolve("images/2026-03-04/i1.json").read_text())
    assert sidecar == {
        "prompt": "a corgi",
        "seed": 7,
        "id": "i1",
        "path": rel,
        "sha256": sha,
        "created_at": "2026-03-04T23:30:00+00:00",
    }

    def crash(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "atomic_write_json", crash)
    with pytest.raises(OSError):
        store.write_image("i2", _png(), {"prompt": "x", "seed": 1}, created_at=when)
    assert _listing(store.root / "images") == ["2026-03-04", "2026-03-04/i1.json", "2026-03-04/i1.png"]


def test_job_dir_and_remove(store: ArtifactStore) -> None:
    folder = store.job_dir("j1")
    assert (folder / "checkpoints").is_dir() and (folder / "previews").is_dir()
    _write_adapter(store, "a1")
    assert store.remove_adapter("a1") is True and store.remove_adapter("a1") is False
    store.write_dataset_image("d1", 0, _png())
    assert store.remove("datasets/d1/0000.png") is True
    assert store.remove("jobs/j1") is True and store.remove("jobs/j1") is False
    with pytest.raises(ValueError):
        store.remove(".")
    assert _listing(store.root) == ["adapters", "datasets", "datasets/d1", "jobs"]


# reindex ----------------------------------------------------------------------------------------------------


def _catalog_adapter(session: Session, store: ArtifactStore, adapter_id: str, name: str) -> None:
    stored = _write_adapter(store, adapter_id, name=name)
    preview = store.write_adapter_preview(adapter_id, 0, _png())
    manifest = json.loads(store.resolve(f"{stored.folder}/manifest.json").read_text())
    catalog.add_adapter(
        session,
        id=adapter_id,
        name=name,
        method="lora",
        kind="subject",
        base_model="tiny-sd",
        base_model_hash="b" * 64,
        trigger_words=["sks"],
        rank=4,
        training_config={"rank": 4},
        steps=10,
        sha256=stored.sha256,
        file_size=stored.size,
        file_path=stored.path,
        previews=[preview],
        job_id=manifest.get("job_id"),
    )


def _timeless(info: AdapterInfo) -> AdapterInfo:
    """Row timestamps are not compared: the rebuilt row takes its time from the manifest."""
    return dataclasses.replace(info, created_at=None, updated_at=None)


def test_reindex_rebuilds_deleted_rows(store: ArtifactStore, sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        job = jobs.enqueue(session, "generate", {}, "g")
        _catalog_adapter(session, store, "a1", "Corgi")
        _catalog_adapter(session, store, "a2", "Watercolor")
        record = {
            "prompt": "a corgi",
            "negative_prompt": "blurry",
            "seed": 42,
            "composer": "merge",
            "adapters": [{"adapter": "a1", "name": "Corgi", "weight": 0.7}],
            "params": {"steps": 4},
            "job_id": job.id,
        }
        when = utcnow()
        rel, sha = store.write_image("i1", _png(), record, created_at=when)
        catalog.add_image(session, id="i1", path=rel, sha256=sha, created_at=when, **record)
        before_adapters = [catalog.adapter_info(r) for r in catalog.list_adapters(session)]
        before_image = catalog.image_info(catalog.get_image(session, "i1"))
    with sessions.begin() as session:
        session.execute(delete(AdapterRow))
        session.execute(delete(GeneratedImageRow))
    with sessions.begin() as session:
        report = store.reindex(session)
    assert (sorted(report.adapters), report.images, report.skipped) == (["a1", "a2"], ["i1"], [])
    with sessions() as session:
        after_adapters = [catalog.adapter_info(r) for r in catalog.list_adapters(session)]
        after_image = catalog.image_info(catalog.get_image(session, "i1"))
    assert sorted(map(_timeless, after_adapters), key=str) == sorted(map(_timeless, before_adapters), key=str)
    assert after_image == before_image
    with sessions.begin() as session:  # nothing more to do the second time
        again = store.reindex(session)
    assert (again.adapters, again.images, again.skipped) == ([], [], [])


def test_reindex_refuses_tampered_files(store: ArtifactStore, sessions: sessionmaker[Session]) -> None:
    _write_adapter(store, "good", name="Good")
    _write_adapter(store, "bad", name="Bad")
    weights = store.resolve("adapters/bad/adapter.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    store.resolve("adapters/junk").mkdir()
    (store.root / "adapters" / "junk" / "manifest.json").write_text("{not json")
    rel, _ = store.write_image("img", _png(1), {"prompt": "p", "seed": 1})
    store.resolve(rel).write_bytes(_png(2))
    with sessions.begin() as session:
        report = store.reindex(session)
        assert [r.id for r in session.scalars(select(AdapterRow))] == ["good"]
        assert catalog.list_images(session) == []
    assert report.adapters == ["good"] and report.images == []
    assert any(s.startswith("adapters/bad: adapter.safetensors does not match the sha256") for s in report.skipped)
    assert any(s.startswith("adapters/junk: unreadable manifest.json") for s in report.skipped)
    assert any(s.startswith(f"{rel[:-4]}.json: img.png does not match the sha256") for s in report.skipped)


def test_reindex_drops_links_to_missing_rows(store: ArtifactStore, sessions: sessionmaker[Session]) -> None:
    _write_adapter(store, "a1", dataset_id="gone", job_id="gone-too")
    with sessions.begin() as session:
        assert store.reindex(session).adapters == ["a1"]
        row = catalog.get_adapter(session, "a1")
        assert row.dataset_id is None and row.job_id is None


def test_reindex_reports_name_clash(store: ArtifactStore, sessions: sessionmaker[Session]) -> None:
    _write_adapter(store, "a1", name="Corgi")
    with sessions.begin() as session:
        catalog.add_adapter(
            session,
            name="corgi",
            method="lora",
            kind="subject",
            base_model="x",
            sha256="0",
            file_size=1,
            file_path="elsewhere.safetensors",
        )
    with sessions.begin() as session:
        report = store.reindex(session)
    assert report.adapters == [] and report.skipped == ["adapters/a1: an adapter named 'corgi' already exists"]


def test_store_root_is_created(tmp_path: Path) -> None:
    root = tmp_path / "x" / "y"
    ArtifactStore(root)
    assert root.is_dir()
    assert os.access(root, os.W_OK)
