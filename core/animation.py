"""Animations from frames: GIF and animated PNG through Pillow, MP4 (H.264) through PyAV when it can.

Frames are one ``(F, H, W, 3)`` uint8 array, or a sequence of ``(H, W, 3)`` uint8 arrays. An animated PNG (APNG) is a
valid PNG whose first frame is what any PNG reader sees, so it goes wherever a PNG goes (adapter previews, job
previews, generated-image records, all checked for PNG bytes), while browsers play all of its frames.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
from PIL import Image

DEFAULT_FPS = 8
MAX_FPS = 60
_MP4_CODECS = ("libx264", "h264", "mpeg4")  # first one PyAV can encode with; libx264 plays in every browser


def as_frames(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """``frames`` as one contiguous ``(F, H, W, 3)`` uint8 array; ``ValueError`` for any other shape or type."""
    array = np.stack([np.asarray(f) for f in frames]) if not isinstance(frames, np.ndarray) else frames
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1 or min(array.shape[1:3]) < 1:
        raise ValueError(f"expected frames of shape (F, H, W, 3), got {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {array.dtype}")
    return np.ascontiguousarray(array)


def _frame_ms(fps: float) -> int:
    if not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be in (0, {MAX_FPS}], got {fps}")
    return max(10, round(1000 / fps))  # browsers treat GIF delays under 20 ms as 100 ms; 10 ms is the GIF unit


def encode_gif(frames: np.ndarray | Sequence[np.ndarray], fps: float = DEFAULT_FPS) -> bytes:
    """An endlessly looping GIF (one adaptive 256-colour palette per frame)."""
    array = as_frames(frames)
    images = [Image.fromarray(f) for f in array]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=_frame_ms(fps), loop=0,
                   disposal=1, optimize=False)
    return buffer.getvalue()


def encode_apng(frames: np.ndarray | Sequence[np.ndarray], fps: float = DEFAULT_FPS) -> bytes:
    """An endlessly looping animated PNG (lossless); a single frame gives a plain PNG."""
    array = as_frames(frames)
    images = [Image.fromarray(f) for f in array]
    buffer = io.BytesIO()
    if len(images) == 1:
        images[0].save(buffer, format="PNG")
    else:
        images[0].save(buffer, format="PNG", save_all=True, append_images=images[1:], duration=_frame_ms(fps),
                       loop=0, default_image=False)
    return buffer.getvalue()


def mp4_codec() -> str | None:
    """The video encoder :func:`encode_mp4` uses, or ``None`` when PyAV or every candidate encoder is missing."""
    try:
        import av
    except ImportError:
        return None
    for name in _MP4_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # UnknownCodecError, or a build without that encoder
            continue
        return name
    return None


def encode_mp4(frames: np.ndarray | Sequence[np.ndarray], fps: float = DEFAULT_FPS) -> bytes | None:
    """An MP4 (H.264 where available, yuv420p, ``faststart`` so browsers play it while it loads); ``None`` when PyAV
    cannot encode one here. Odd widths/heights are padded by one edge pixel (4:2:0 needs even sizes)."""
    array = as_frames(frames)
    codec = mp4_codec()
    if codec is None:
        return None
    _frame_ms(fps)  # range check
    f, h, w, _ = array.shape
    if h % 2 or w % 2:
        array = np.pad(array, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    rate = round(fps) if float(fps).is_integer() else Fraction(fps).limit_denominator(1001)
    with tempfile.TemporaryDirectory(prefix="lorastudio-mp4-") as folder:  # faststart rewrites the file by name
        path = os.path.join(folder, "video.mp4")
        _write_mp4(path, array, codec, rate)
        with open(path, "rb") as fh:
            return fh.read()


def _write_mp4(path: str, array: np.ndarray, codec: str, rate: int | Fraction) -> None:
    import av

    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = array.shape[2], array.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_animation(data: bytes) -> np.ndarray:
    """Every frame of a GIF or (animated) PNG as ``(F, H, W, 3)`` uint8 (transparency composited on white)."""
    frames = []
    with Image.open(io.BytesIO(data), formats=["PNG", "GIF"]) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            frames.append(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    return np.stack(frames)


def is_animated(data: bytes) -> bool:
    """Whether PNG or GIF bytes hold more than one frame."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "GIF"]) as image:
            return bool(getattr(image, "is_animated", False))
    except Exception:
        return False
