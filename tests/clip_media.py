"""Test clips written in the tests themselves: frames with a moving bar, encoded as MP4/WebM with PyAV and as GIF,
PNG and zip with Pillow and the standard library."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import av
import numpy as np
from PIL import Image

SIZE = 64
BAR = 4
BACKGROUND = (40, 80, 160)


def bar_x_for(i: int, n: int, width: int = SIZE) -> int:
    """The left column of the bar in frame ``i`` of ``n`` bar frames ``width`` pixels wide."""
    return round(i * (width - BAR) / max(n - 1, 1))


def bar_frames(n: int, width: int = SIZE, height: int = SIZE) -> np.ndarray:
    """``n`` frames of a plain background with a white vertical bar whose position tells the frame's index."""
    frames = np.empty((n, height, width, 3), np.uint8)
    frames[:] = BACKGROUND
    for i in range(n):
        x = bar_x_for(i, n, width)
        frames[i, :, x:x + BAR] = 255
    return frames


def video_bytes(frames: np.ndarray, fmt: str = "mp4", codec: str = "libx264", pix_fmt: str = "yuv420p",
                fps: int = 8, src_format: str = "rgb24") -> bytes:
    """``frames`` ``(F, H, W, 3 or 4)`` uint8 encoded in memory (MP4 with H.264 unless told otherwise)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.thread_count = 1
        for frame in frames:
            image = av.VideoFrame.from_ndarray(frame, format=src_format).reformat(format=pix_fmt)
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def faststart_mp4(frames: np.ndarray, tmp_path: Path) -> bytes:
    """An MP4 with its index (moov) before the frame data, as streaming sites serve them."""
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def gif_bytes(frames: np.ndarray, durations: int | list[int] = 125) -> bytes:
    """An animated GIF of ``frames``, each shown ``durations`` milliseconds (one value, or one per frame)."""
    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return buffer.getvalue()


def png_bytes(frame: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A deflated zip of ``(name, data)`` members, in order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buffer.getvalue()
