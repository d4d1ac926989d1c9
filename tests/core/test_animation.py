"""GIF, animated PNG and MP4 from frames, read back with Pillow and PyAV."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from core.animation import as_frames, decode_animation, encode_apng, encode_gif, encode_mp4, is_animated, mp4_codec


def frames(n: int = 6, height: int = 32, width: int = 48) -> np.ndarray:
    out = np.zeros((n, height, width, 3), np.uint8)
    out[:] = (20, 120, 220)
    for i in range(n):
        out[i, :, i * 6:i * 6 + 6] = (250, 250, 30)
    return out


def test_apng_is_a_lossless_png_that_plays() -> None:
    clip = frames()
    data = encode_apng(clip, fps=8)
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and is_animated(data)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.n_frames == 6 and image.info["duration"] == 125
        assert np.array_equal(np.asarray(image.convert("RGB")), clip[0])  # what a plain PNG reader sees
    np.testing.assert_array_equal(decode_animation(data), clip)
    single = encode_apng(clip[:1])
    assert not is_animated(single) and decode_animation(single).shape == (1, 32, 48, 3)


def test_gif_loops_with_the_frame_rate() -> None:
    clip = frames()
    data = encode_gif(clip, fps=4)
    assert data.startswith(b"GIF89a") and is_animated(data)
    with Image.open(io.BytesIO(data)) as image:
        assert image.n_frames == 6 and image.info["duration"] == 250 and image.info["loop"] == 0
    assert np.abs(decode_animation(data).astype(int) - clip.astype(int)).max() <= 8  # a palette per frame


def test_mp4_plays_back_with_every_frame() -> None:
    assert mp4_codec() == "libx264"
    clip = frames(8, 31, 45)  # odd sizes are padded to even ones
    data = encode_mp4(clip, fps=8)
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")  # faststart: the index first
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert decoded.shape == (8, 32, 46, 3)
    assert np.abs(decoded[:, :31, :45].astype(int) - clip.astype(int)).mean() < 6


def test_bad_frames_are_refused() -> None:
    with pytest.raises(ValueError, match=r"expected frames of shape \(F, H, W, 3\), got \(4, 4, 3\)"):
        as_frames(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="expected uint8 frames, got float32"):
        encode_gif(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="fps must be in"):
        encode_apng(frames(), fps=0)
    assert as_frames([frames()[0], frames()[1]]).shape == (2, 32, 48, 3)
