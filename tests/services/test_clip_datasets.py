"""Motion datasets: clip uploads (PyAV-encoded MP4, Pillow GIFs, zips of frames) stored as one clip folder that the
motion trainer's reader loads; real SQLite, real files, and a ``file://`` shared store for the two-host case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from services.datasets import CLIP_MANIFEST, DatasetService, UploadRejected
from storage.artifacts import ArtifactStore
from storage.db import open_database
from storage.models import DatasetRow
from storage.remote import make_artifact_store
from tests.clip_media import bar_frames, gif_bytes, png_bytes, video_bytes, zip_bytes
from tests.conftest import write_images
from training.video import load_clip_folder


@pytest.fixture()
def uploads(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "uploads"
    folder.mkdir()
    frames = bar_frames(12, width=80)
    files = {
        "walk.mp4": video_bytes(frames),
        "walk.txt": b"a blue square walking right",
        "hop.gif": gif_bytes(bar_frames(5), durations=100),
        "broken.mp4": video_bytes(frames)[:300],
        "notes.mp4": b"#!/bin/sh\necho not a video\n",
        "more.zip": zip_bytes([*((f"spin/{i:02d}.png", png_bytes(frames[i * 2])) for i in range(6)),
                               ("spin/caption.txt", b"a blue square spinning")]),
    }
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def service(tmp_path: Path, store: ArtifactStore | None = None, db: str = "catalog.db") -> DatasetService:
    _, sessions = open_database(f"sqlite:///{tmp_path / db}")
    return DatasetService(sessions, store or ArtifactStore(tmp_path / "artifacts"))


def test_motion_upload_becomes_a_clip_folder_the_trainer_reads(tmp_path: Path, uploads: list[Path]) -> None:
    datasets = service(tmp_path)
    info = datasets.create_dataset("moves", uploads, kind="motion", frames=6, size=32)
    assert info.image_count == 3
    assert {(r.filename, r.reason.split(" (")[0]) for r in info.rejected} == {
        ("broken.mp4", "corrupt or truncated MP4 video"), ("notes.mp4", "not a video")}
    folder = datasets.clip_folder(info.id)
    assert folder == tmp_path / "artifacts" / "datasets" / info.id
    names = sorted(p.name for p in folder.iterdir())
    assert names == [CLIP_MANIFEST, "hop", "spin", "spin.txt", "walk", "walk.txt"]
    assert sorted(p.name for p in (folder / "walk").iterdir()) == [f"frame-{i:03d}.png" for i in range(6)]
    assert (folder / "walk.txt").read_text() == "a blue square walking right"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    loaded = {name: (clip, caption) for clip, caption, name in load_clip_folder(folder)}
    assert set(loaded) == {"walk", "hop", "spin"}
    assert all(clip.shape == (6, 32, 32, 3) and clip.dtype == np.uint8 for clip, _ in loaded.values())
    assert loaded["spin"][1] == "a blue square spinning" and loaded["hop"][1] == ""
    bar = [int(frame.sum(axis=(0, 2)).argmax()) for frame in loaded["walk"][0][1:5]]
    assert bar == sorted(bar) and bar[0] < bar[-1]  # the bar moves right, frame after frame

    records = datasets.training_records(info.id)
    assert [(p.name, c) for p, c in records] == [("walk", "a blue square walking right"), ("hop", ""),
                                                 ("spin", "a blue square spinning")]
    manifest = [json.loads(line) for line in (folder / CLIP_MANIFEST).read_text().splitlines()]
    assert [(m["clip"], m["filename"], m["frames"], m["source_frames"], m["source_size"]) for m in manifest] == [
        ("walk", "walk.mp4", 6, 12, [80, 64]), ("hop", "hop.gif", 6, 5, [64, 64]), ("spin", "more.zip/spin", 6, 6,
                                                                                  [80, 64])]
    assert datasets.is_clip_dataset(info.id)


def test_image_datasets_are_unchanged(tmp_path: Path) -> None:
    datasets = service(tmp_path)
    images = write_images(tmp_path / "images", 2)
    info = datasets.create_dataset("discs", [*images, *(p.with_suffix(".txt") for p in images)])
    assert info.image_count == 2 and info.rejected == ()
    assert [p.name for p, _ in datasets.training_records(info.id)] == ["0000.png", "0001.png"]
    assert not datasets.is_clip_dataset(info.id)
    with pytest.raises(ValueError, match="holds images, not clips"):
        datasets.clip_folder(info.id)
    video = tmp_path / "x.mp4"
    video.write_bytes(video_bytes(bar_frames(3, width=80)))
    with pytest.raises(UploadRejected, match=r"no usable image in the upload: x\.mp4: not an image \(it looks like "
                                             r"a video\)"):
        datasets.create_dataset("clips-as-images", [video])  # a subject upload still takes images only


def test_an_upload_without_a_usable_clip_stores_nothing(tmp_path: Path, uploads: list[Path]) -> None:
    datasets = service(tmp_path)
    bad = [p for p in uploads if p.name in ("broken.mp4", "notes.mp4")]
    with pytest.raises(UploadRejected, match=r"no usable clip in the upload: broken\.mp4: corrupt .*; notes\.mp4: "
                                             r"not a video \(it looks like a text file\)"):
        datasets.create_dataset("nothing", bad, kind="motion")
    with pytest.raises(ValueError, match="give the dataset a name"):
        datasets.create_dataset("  ", uploads, kind="motion")
    with datasets._sessions.begin() as session:
        assert session.scalars(select(DatasetRow)).all() == []
    assert not (tmp_path / "artifacts" / "datasets").exists()


def test_a_shared_store_publishes_the_clip_folder_for_other_hosts(tmp_path: Path, uploads: list[Path]) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    host_a = service(tmp_path, make_artifact_store(tmp_path / "a", remote.as_uri()))
    info = host_a.create_dataset("moves", uploads, kind="motion", frames=4, size=16)
    shared = remote / "datasets" / info.id
    published = sorted(p.relative_to(shared).as_posix() for p in shared.rglob("*") if p.is_file())
    assert "walk/frame-003.png" in published and "spin.txt" in published and CLIP_MANIFEST in published
    host_b = DatasetService(host_a._sessions, make_artifact_store(tmp_path / "b", remote.as_uri()))
    folder = host_b.clip_folder(info.id)
    assert folder == tmp_path / "b" / "datasets" / info.id
    assert [name for _, _, name in load_clip_folder(folder)] == ["hop", "spin", "walk"]
