"""Training clips: time resampling and square crops, and the clip-folder layout read for clip datasets (bad folders
refused with the file named)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.video import ClipDataset, frame_indices, load_clip_folder, resample_clip, write_clip_folder


def _clip(frames: int, h: int = 48, w: int = 80) -> np.ndarray:
    """Frame ``i`` is filled with the value ``i`` (so the chosen frames can be read back)."""
    return np.stack([np.full((h, w, 3), i, dtype=np.uint8) for i in range(frames)])


def test_frames_are_spaced_evenly_and_repeated_when_short() -> None:
    assert frame_indices(8, 4).tolist() == [0, 2, 5, 7]
    assert frame_indices(8, 8).tolist() == list(range(8))
    assert frame_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    clip = resample_clip(_clip(8), 4, 32)
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8
    assert clip[:, 0, 0, 0].tolist() == [0, 2, 5, 7]


def test_frames_are_center_cropped_squares() -> None:
    clip = _clip(2, h=40, w=80)
    clip[:, :, :20] = 255  # the left quarter is cut away by a center crop of the 80 px wide frame
    out = resample_clip(clip, 2, 40)
    assert out.shape == (2, 40, 40, 3) and out.max() <= 1


def test_dataset_checks_and_tensors() -> None:
    data = ClipDataset([_clip(8), _clip(5)], ["a  red   circle moving", ""], num_frames=4, resolution=32)
    assert len(data) == 2 and data.captions == ["a red circle moving", ""]
    pixels = data.pixels(0)
    assert pixels.shape == (4, 3, 32, 32) and float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    with pytest.raises(ValueError, match="no clips"):
        ClipDataset([], [], 4, 32)
    with pytest.raises(ValueError, match="uint8"):
        ClipDataset([_clip(4).astype(np.float32)], [""], 4, 32)
    with pytest.raises(ValueError, match="clip 0: has 1 frames"):
        ClipDataset([_clip(1)], [""], 4, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        ClipDataset([_clip(4)], [""], 4, 30)


def test_clip_folder_round_trip(tmp_path: Path) -> None:
    write_clip_folder(tmp_path, "b-clip", _clip(3), "second clip")
    write_clip_folder(tmp_path, "a-clip", _clip(4))
    (tmp_path / "clips.jsonl").write_text("{}\n")  # other files beside the clips are ignored
    loaded = load_clip_folder(tmp_path)
    assert [name for _, _, name in loaded] == ["a-clip", "b-clip"]
    assert [caption for _, caption, _ in loaded] == ["", "second clip"]
    np.testing.assert_array_equal(loaded[1][0], _clip(3))


def test_bad_clip_folders_are_refused_naming_the_file(tmp_path: Path) -> None:
    write_clip_folder(tmp_path / "gap", "clip", _clip(3))
    (tmp_path / "gap" / "clip" / "frame-001.png").unlink()
    with pytest.raises(ValueError, match="frame 1 is missing"):
        load_clip_folder(tmp_path / "gap")
    write_clip_folder(tmp_path / "sizes", "clip", _clip(2))
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(tmp_path / "sizes" / "clip" / "frame-002.png")
    with pytest.raises(ValueError, match="frames differ in size"):
        load_clip_folder(tmp_path / "sizes")
    write_clip_folder(tmp_path / "fake", "clip", _clip(2))
    (tmp_path / "fake" / "clip" / "frame-001.png").write_bytes(b"#!/bin/sh\necho not an image\n")
    with pytest.raises(ValueError, match="frame-001.png: not a readable PNG"):
        load_clip_folder(tmp_path / "fake")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no clip folders"):
        load_clip_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="clip name"):
        write_clip_folder(tmp_path, "../escape", _clip(2))
