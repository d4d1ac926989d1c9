"""Validate and decode clip uploads (MP4, WebM, animated GIF, and folders or zips of frame images) into clips of a
fixed number of frames at the model's size.

Each clip is judged on its own: a bad one becomes a :class:`~core.types.Rejection` naming it, the good clips of the
same upload are kept. Formats are decided from magic bytes, never from names (a ``.mp4`` that is a zip or a script is
refused). Before any frame is decoded, the file size, the container's duration, frame count and frame size, and the
number of clips are checked: MP4 and WebM from their headers and a demux of their packets (no decoding), GIFs by
walking their blocks. Containers are opened with the demuxer their magic bytes name, so FFmpeg never probes a file
as some other format (playlists, image sequences).

What an upload may hold:

* a video file (``.mp4``, ``.webm``/``.mkv``, animated ``.gif``): one clip, named after the file, captioned by a
  ``<name>.txt`` beside it;
* image files (PNG, JPEG, WebP) in one folder of a zip, or loose in the upload: the frames of one clip in natural name
  order (``2.png`` before ``10.png``), named after the folder (the zip's root: the zip's name; loose images:
  ``frames``), captioned by ``<folder>.txt`` beside the folder or ``caption.txt`` inside it;
* ``.zip`` archives of both (the zip checks of :mod:`storage.uploads` apply: traversal, links, bombs, nesting).

Every clip is resampled to ``frames`` frames evenly spaced in time (from the first frame's time to the last's,
nearest frame to each target time, using the container's timestamps or the GIF's delays; a clip with fewer frames
repeats some), and every frame is fitted to the model size: center-cropped to the target's aspect ratio, then resized
with a Lanczos filter. A note per clip states what was done. Pixel formats are converted by FFmpeg: gray, 10-bit and
4:4:4 video becomes 8-bit RGB, and transparent pixels are composited on white, as for images.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from core.builtin import IMAGE_SIZE, VIDEO_FRAMES
from core.types import Rejection
from storage.uploads import (
    _OPEN_LOCK,
    _PIL_FORMATS,
    CAPTION_EXTENSION,
    ZIP_EXTENSION,
    UploadError,
    UploadLimits,
    _Collector,
    _decode_image,
    _describe_non_image,
    _exc_text,
    _is_hidden,
    _label,
    _sniff,
    _split_suffix,
    _to_rgb,
    _too_big,
    _unique,
    _unsupported_format,
    collect_upload,
    sanitize_filename,
)

__all__ = [
    "CLIP_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "AcceptedClip",
    "ClipLimits",
    "ClipUploadResult",
    "decode_clip",
    "fit_frame",
    "read_clip_upload",
    "resample_indices",
]

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".gif")
FRAME_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
CLIP_EXTENSIONS: tuple[str, ...] = (*VIDEO_EXTENSIONS, *FRAME_EXTENSIONS, CAPTION_EXTENSION, ZIP_EXTENSION)
FOLDER_CAPTION = "caption"  # ``caption.txt`` inside a folder of frames captions that clip
LOOSE_FRAMES_NAME = "frames"

_DEMUXERS = {"MP4": "mp4", "WebM": "matroska", "Matroska": "matroska"}
_ISO_IMAGE_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif",
                               b"avis"})
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_GIF_MAGICS = (b"GIF87a", b"GIF89a")
_GIF_MIN_DELAY_CS = 2  # browsers play GIF delays under 20 ms as 100 ms; so does this reader
_GIF_DEFAULT_DELAY_CS = 10
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class ClipLimits:
    """Caps applied to one clip upload (per file, per clip and per upload)."""

    max_file_bytes: int = 200 * 2**20
    max_duration_s: float = 120.0
    max_source_frames: int = 3000  # frames in one video, or images in one folder
    max_pixels: int = 3840 * 2160  # per frame
    min_side: int = 8
    min_frames: int = 2
    max_clips: int = 200
    max_zip_total_bytes: int = 2 * 2**30
    max_zip_ratio: float = 200.0
    max_caption_chars: int = 1000  # stays under 4 KB in UTF-8, what a clip's caption file may hold

    def for_files(self) -> UploadLimits:
        """The per-file limits :mod:`storage.uploads` applies to frames, captions and zips."""
        return UploadLimits(max_file_bytes=self.max_file_bytes, max_pixels=self.max_pixels, min_side=self.min_side,
                            max_files=max(self.max_clips, self.max_source_frames),
                            max_zip_total_bytes=self.max_zip_total_bytes, max_zip_ratio=self.max_zip_ratio,
                            max_caption_chars=self.max_caption_chars)


@dataclass(frozen=True)
class AcceptedClip:
    """One clip that passed validation: ``frames`` is ``(F, H, W, 3)`` uint8 at the requested count and size."""

    name: str  # safe and unique within the upload (``sanitize_filename`` of the file or folder name, no suffix)
    frames: np.ndarray = field(repr=False)
    caption: str | None
    source: str  # the uploaded file or folder, as shown in messages
    source_sha256: str  # of the video file, or of the frame files' bytes in name order
    source_frames: int
    source_size: tuple[int, int]  # width, height of the (first) source frame
    duration_s: float | None  # first to last frame, when the source has timestamps


@dataclass(frozen=True)
class ClipUploadResult:
    """Everything learnt from one upload: kept clips, refused files and folders, and informational notes."""

    accepted: tuple[AcceptedClip, ...]
    rejected: tuple[Rejection, ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Decoded:
    frames: np.ndarray
    source_frames: int
    source_size: tuple[int, int]
    duration_s: float | None
    note: str


# --------------------------------------------------------------------------------------------------------------------
# geometry and timing


def _target(size: int | tuple[int, int]) -> tuple[int, int]:
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if width < 1 or height < 1:
        raise ValueError(f"the clip size must be positive, got {width}×{height}")
    return width, height


def _crop_box(width: int, height: int, target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centered box of ``target``'s aspect ratio inside a ``width``×``height`` frame."""
    tw, th = target
    if width * th > height * tw:  # wider than the target: crop the sides
        cw, ch = max(1, round(height * tw / th)), height
    else:
        cw, ch = width, max(1, round(width * th / tw))
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch


def fit_frame(frame: np.ndarray | Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """Center-crop an RGB frame to the aspect ratio of ``size`` (an int: square; else width, height), then resize it
    with a Lanczos filter; returns ``(H, W, 3)`` uint8."""
    target = _target(size)
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    box = _crop_box(image.width, image.height, target)
    if box == (0, 0, image.width, image.height) and image.size == target:
        return np.asarray(image, dtype=np.uint8).copy()
    return np.asarray(image.resize(target, Image.Resampling.LANCZOS, box=box), dtype=np.uint8)


def resample_indices(times: Sequence[float], count: int) -> list[int]:
    """Indices of the frames (sorted ``times``) nearest to ``count`` target times evenly spaced from the first frame's
    time to the last's; with fewer frames than ``count`` some indices repeat."""
    if count < 1:
        raise ValueError(f"need at least one frame, got {count}")
    if not times:
        raise ValueError("no frames to resample")
    if len(times) == 1:
        return [0] * count
    values = np.asarray(times, dtype=np.float64)
    targets = np.linspace(values[0], values[-1], count)
    right = np.clip(np.searchsorted(values, targets), 1, len(values) - 1)
    left = right - 1
    nearer_left = (targets - values[left]) <= (values[right] - targets) + 1e-9
    return [int(i) for i in np.where(nearer_left, left, right)]


def _describe(label: str, source_frames: int, size: tuple[int, int], duration: float | None, count: int,
              target: tuple[int, int]) -> str:
    """The note saying how a clip was resampled and fitted."""
    w, h = size
    span = f", {duration:.2f} s" if duration is not None else ""
    parts = [f"{label}: {source_frames} frames ({w}×{h}{span}) resampled to {count} frames evenly spaced in time"]
    if source_frames < count:
        parts[0] += f" (some repeated: it has only {source_frames})"
    left, top, right, bottom = _crop_box(w, h, target)
    if (right - left, bottom - top) != (w, h):
        parts.append(f"center-cropped to {right - left}×{bottom - top}")
    if (right - left, bottom - top) != target:
        parts.append(f"resized to {target[0]}×{target[1]}")
    return ", ".join(parts)


def _natural_key(name: str) -> tuple[object, ...]:
    return tuple(int(p) if p.isdigit() else p.casefold() for p in _DIGITS.split(name))


# --------------------------------------------------------------------------------------------------------------------
# sniffing


def _sniff_video(data: bytes) -> str | None:
    """``MP4``, ``WebM``, ``Matroska`` or ``GIF`` from the magic bytes, else ``None``."""
    if data[4:8] == b"ftyp" and data[8:12] not in _ISO_IMAGE_BRANDS:
        return "MP4"
    if data.startswith(_EBML_MAGIC):
        return "WebM" if b"webm" in data[:64] else "Matroska"
    if data.startswith(_GIF_MAGICS):
        return "GIF"
    return None


def _unsupported_video(data: bytes) -> str | None:
    """The name of a recognised but refused video container."""
    if data[:4] == b"RIFF" and data[8:12] in (b"AVI ", b"AVIX"):
        return "AVI"
    if data.startswith(b"FLV\x01"):
        return "FLV"
    if data.startswith(b"OggS"):
        return "Ogg"
    if data.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"):
        return "ASF/WMV"
    if data.startswith(b"\x00\x00\x01\xba"):
        return "MPEG program stream"
    if len(data) > 376 and data[0] == 0x47 and data[188] == 0x47 and data[376] == 0x47:
        return "MPEG transport stream"
    return None


def _refusal_for(data: bytes, suffix: str) -> str:
    """Why bytes that are neither an accepted video nor a frame image are refused."""
    if not data:
        return "not a video (the file is empty)"
    other = _unsupported_video(data)
    if other:
        return f"unsupported video format {other}; use MP4, WebM or GIF"
    image = _unsupported_format(data)
    if image:
        return f"unsupported format {image}; use MP4, WebM or GIF clips, or PNG, JPEG or WebP frames"
    what = "video" if suffix in VIDEO_EXTENSIONS else "video or image"
    return f"not a {what} ({_describe_non_image(data)})"


# --------------------------------------------------------------------------------------------------------------------
# decoding one clip


def decode_clip(data: bytes, filename: str, frames: int = VIDEO_FRAMES, size: int | tuple[int, int] = IMAGE_SIZE,
                limits: ClipLimits = ClipLimits()) -> np.ndarray:
    """Validate one video file's bytes and return it as ``(frames, H, W, 3)`` uint8; raises :class:`UploadError`
    naming ``filename``."""
    return _decode_video_bytes(data, _label(filename), frames, _target(size), limits).frames


def _decode_video_bytes(data: bytes, label: str, count: int, target: tuple[int, int],
                        limits: ClipLimits) -> _Decoded:
    if not data:
        raise UploadError("not a video (the file is empty)", label)
    if len(data) > limits.max_file_bytes:
        raise UploadError(_too_big(len(data), limits.max_file_bytes), label)
    fmt = _sniff_video(data)
    if fmt is None:
        raise UploadError(_refusal_for(data, PurePosixPath(label.lower()).suffix), label)
    if fmt == "GIF":
        return _decode_gif(data, label, count, target, limits)
    return _decode_av(data, label, fmt, count, target, limits)


def _check_frame_size(width: int, height: int, label: str, limits: ClipLimits) -> None:
    if width * height > limits.max_pixels:
        raise UploadError(f"its {width}×{height}-pixel frames are over the {limits.max_pixels:,}-pixel limit", label)
    if min(width, height) < limits.min_side:
        raise UploadError(f"its {width}×{height}-pixel frames are too small (each side must be at least "
                          f"{limits.min_side} pixels)", label)


def _check_duration(seconds: float, label: str, limits: ClipLimits) -> None:
    if seconds > limits.max_duration_s:
        raise UploadError(f"it is {seconds:,.1f} s long, over the {limits.max_duration_s:g} s limit", label)


def _too_many_frames(n: int | str, label: str, limits: ClipLimits) -> UploadError:
    return UploadError(f"it has {n} frames, over the limit of {limits.max_source_frames:,} frames per clip", label)


def _too_few(n: int, label: str, limits: ClipLimits) -> UploadError:
    if n == 0:
        return UploadError("it has no video frames", label)
    return UploadError(f"it has a single frame; a clip needs at least {limits.min_frames} frames (upload still "
                       "images as a subject or style dataset)" if n == 1 else
                       f"it has only {n} frames; a clip needs at least {limits.min_frames}", label)


# -- MP4 / WebM through PyAV ------------------------------------------------------------------------------------------


def _av_text(exc: BaseException) -> str:
    """FFmpeg's own words for an error, without PyAV's errno and file-name decoration."""
    return " ".join(str(getattr(exc, "strerror", None) or "").split()) or _exc_text(exc)


def _open_av(data: bytes, fmt: str, label: str):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r", format=_DEMUXERS[fmt])
    except av.error.EOFError:
        raise UploadError(f"{fmt} video without frames (it ends before its first frame: empty or truncated)",
                          label) from None
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise UploadError(f"corrupt or truncated {fmt} video ({_av_text(exc)})", label) from None


def _frame_rgb(frame, label: str) -> np.ndarray:
    """A decoded frame as 8-bit RGB; transparent pixels composited on white."""
    fmt = frame.format
    try:
        if any(component.is_alpha for component in fmt.components):
            rgba = frame.to_ndarray(format="rgba").astype(np.float32)
            alpha = rgba[..., 3:] / 255.0
            return np.clip(np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)
        return frame.to_ndarray(format="rgb24")
    except Exception as exc:
        raise UploadError(f"unsupported pixel format {fmt.name} (it could not be converted to RGB: "
                          f"{_exc_text(exc)})", label) from None


def _decode_av(data: bytes, label: str, fmt: str, count: int, target: tuple[int, int],
               limits: ClipLimits) -> _Decoded:
    with _open_av(data, fmt, label) as container:
        streams = container.streams.video
        if not streams:
            extra = " (it holds audio only)" if container.streams.audio else ""
            raise UploadError(f"it has no video track{extra}", label)
        stream = streams[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise UploadError(f"corrupt {fmt} video (its video track has no frame size)", label)
        _check_frame_size(width, height, label, limits)
        time_base = stream.time_base or Fraction(1, 1000)
        if stream.duration:
            _check_duration(float(stream.duration * time_base), label, limits)
        elif container.duration:
            _check_duration(container.duration / 1_000_000, label, limits)
        if stream.frames and stream.frames > limits.max_source_frames:
            raise _too_many_frames(f"{stream.frames:,}", label, limits)
        stamps = _packet_times(container, stream, label, fmt, limits)
        listed = stream.frames
    if listed and len(stamps) < listed:
        raise UploadError(f"truncated {fmt} video (its header lists {listed:,} frames, only {len(stamps):,} are in "
                          "the file)", label)
    if len(stamps) < limits.min_frames:
        raise _too_few(len(stamps), label, limits)
    _check_duration(stamps[-1] - stamps[0], label, limits)
    picked, decoded_times = _decode_picked(data, label, fmt, resample_indices(stamps, count), target, limits)
    if len(decoded_times) != len(stamps):  # frames dropped by the decoder (edit lists, damage): pick again
        if len(decoded_times) < limits.min_frames:
            raise UploadError(f"corrupt or truncated {fmt} video (only {len(decoded_times)} of its "
                              f"{len(stamps)} frames could be decoded)", label)
        decoded_times = sorted(decoded_times)
        picked, _ = _decode_picked(data, label, fmt, resample_indices(decoded_times, count), target, limits)
        stamps = decoded_times
    duration = stamps[-1] - stamps[0]
    note = _describe(label, len(stamps), (width, height), duration, count, target)
    return _Decoded(picked, len(stamps), (width, height), duration, note)


def _packet_times(container, stream, label: str, fmt: str, limits: ClipLimits) -> list[float]:
    """Presentation times (seconds, sorted) of the video packets, read without decoding any."""
    time_base = stream.time_base or Fraction(1, 1000)
    times: list[float] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            times.append(float(pts * time_base) if pts is not None else float("nan"))
            if len(times) > limits.max_source_frames:
                raise _too_many_frames(f"more than {limits.max_source_frames:,}", label, limits)
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(f"corrupt or truncated {fmt} video ({_av_text(exc)})", label) from None
    if any(t != t for t in times):  # no timestamps: assume a constant rate
        rate = float(stream.average_rate or 25)
        times = [i / rate for i in range(len(times))]
    return sorted(times)


def _decode_picked(data: bytes, label: str, fmt: str, indices: list[int], target: tuple[int, int],
                   limits: ClipLimits) -> tuple[np.ndarray, list[float]]:
    """Decode every frame (presentation order) but convert only those at ``indices``; returns them fitted to
    ``target`` in the order of ``indices``, and the times of all decoded frames."""
    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    times: list[float] = []
    with _open_av(data, fmt, label) as container:
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                if frame.width * frame.height > limits.max_pixels or min(frame.width, frame.height) < limits.min_side:
                    _check_frame_size(frame.width, frame.height, label, limits)  # the size changed mid-stream
                index = len(times)
                times.append(float(frame.time) if frame.time is not None else float(index))
                if index in wanted:
                    kept[index] = fit_frame(_frame_rgb(frame, label), target)
                if len(times) > limits.max_source_frames:
                    raise _too_many_frames(f"more than {limits.max_source_frames:,}", label, limits)
        except UploadError:
            raise
        except Exception as exc:
            if not times:
                raise UploadError(f"corrupt or truncated {fmt} video ({_av_text(exc)})", label) from None
            raise UploadError(f"corrupt or truncated {fmt} video (decoding failed after frame {len(times)}: "
                              f"{_av_text(exc)})", label) from None
    if not times:
        raise UploadError(f"corrupt {fmt} video (none of its frames could be decoded)", label)
    if not wanted <= set(kept):
        return np.zeros((0, *target[::-1], 3), np.uint8), times
    return np.stack([kept[i] for i in indices]), times


# -- GIF through Pillow -----------------------------------------------------------------------------------------------


def _skip_sub_blocks(data: bytes, i: int) -> int:
    """Position after the data sub-blocks starting at ``i``; ``IndexError`` when the file ends inside them."""
    while True:
        size = data[i]
        i += 1 + size
        if size == 0:
            return i


def _gif_frames(data: bytes, label: str, limits: ClipLimits) -> tuple[tuple[int, int], list[int], bool]:
    """(screen size, delay of each frame in 1/100 s, truncated?) from the GIF's blocks, without decoding pixels."""
    if len(data) < 13:
        raise UploadError("corrupt or truncated GIF image (its header is incomplete)", label)
    width, height, packed = struct.unpack("<HHB", data[6:11])
    i = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    delays: list[int] = []
    delay = _GIF_DEFAULT_DELAY_CS
    try:
        while True:
            marker = data[i]
            if marker == 0x3B:  # trailer
                return (width, height), delays, False
            if marker == 0x21:  # extension
                if data[i + 1] == 0xF9 and data[i + 2] == 4:  # graphic control: this frame's delay
                    delay = struct.unpack("<H", data[i + 4 : i + 6])[0]
                i = _skip_sub_blocks(data, i + 2)
            elif marker == 0x2C:  # image descriptor
                local = data[i + 9]
                i += 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0)
                i = _skip_sub_blocks(data, i + 1)  # after the LZW code size byte
                delays.append(delay if delay >= _GIF_MIN_DELAY_CS else _GIF_DEFAULT_DELAY_CS)
                delay = _GIF_DEFAULT_DELAY_CS
                if len(delays) > limits.max_source_frames:
                    raise _too_many_frames(f"more than {limits.max_source_frames:,}", label, limits)
            else:
                raise UploadError(f"corrupt GIF image (unexpected block 0x{marker:02x} at byte {i:,})", label)
    except (IndexError, struct.error):
        return (width, height), delays, True  # ends early; complete frames before the cut still count


def _decode_gif(data: bytes, label: str, count: int, target: tuple[int, int], limits: ClipLimits) -> _Decoded:
    (width, height), delays, truncated = _gif_frames(data, label, limits)
    _check_frame_size(width, height, label, limits)
    if len(delays) < limits.min_frames:
        raise _too_few(len(delays), label, limits)
    starts = np.concatenate([[0], np.cumsum(delays[:-1])]) / 100.0
    _check_duration(float(sum(delays)) / 100.0, label, limits)
    indices = resample_indices(list(starts), count)
    kept: dict[int, np.ndarray] = {}
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["GIF"])
        with image:
            for index in sorted(set(indices)):
                image.seek(index)
                kept[index] = fit_frame(_to_rgb(image), target)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError("its pixel count is over Pillow's decompression-bomb limit", label) from None
    except UploadError as exc:
        raise UploadError(exc.reason, label) from None
    except Exception as exc:
        raise UploadError(f"corrupt or truncated GIF image ({_exc_text(exc)})", label) from None
    duration = float(starts[-1])
    note = _describe(label, len(delays), (width, height), duration, count, target)
    if truncated:
        note += f" (the file ends early; its {len(delays)} complete frames were used)"
    return _Decoded(np.stack([kept[i] for i in indices]), len(delays), (width, height), duration, note)


# --------------------------------------------------------------------------------------------------------------------
# upload assembly


@dataclass
class _Video:
    label: str
    group: tuple[object, ...]
    stem: str
    decoded: _Decoded
    sha256: str


@dataclass
class _Frame:
    name: str
    label: str
    pixels: np.ndarray
    size: tuple[int, int]
    data_sha: bytes


@dataclass
class _Folder:
    label: str
    name: str
    parent: tuple[object, ...] | None  # where a ``<name>.txt`` caption would sit; None for loose images
    frames: list[_Frame] = field(default_factory=list)
    problem: str | None = None


@dataclass
class _ClipCollector(_Collector):
    """The image collector of :mod:`storage.uploads` with its zip and caption handling, routing files to clips."""

    clip_limits: ClipLimits = field(default_factory=ClipLimits)
    count: int = VIDEO_FRAMES
    target: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
    videos: list[_Video] = field(default_factory=list)
    folders: dict[tuple[object, ...], _Folder] = field(default_factory=dict)
    order: list[tuple[str, object]] = field(default_factory=list)
    zip_labels: dict[int, str] = field(default_factory=dict)
    clips: int = 0

    def add_zip(self, path: str | os.PathLike[str], label: str) -> None:
        self.zip_labels[self.zips + 1] = label
        super().add_zip(path, label)

    def add_top_level(self, path: str | os.PathLike[str], raw_name: str) -> None:
        """One uploaded file; folders in its display name (a folder upload) group frames into clips."""
        parts = [p for p in str(raw_name).replace("\\", "/").split("/") if p not in ("", ".", "..")]
        base = parts[-1] if parts else str(raw_name)
        folders = [sanitize_filename(p) for p in parts[:-1] if not _is_hidden(p)]
        if base.lower().endswith(ZIP_EXTENSION) or not folders:
            self.add_path(path, base)
            return
        label = _label("/".join([*folders, base]))
        size = self.regular_file_size(path, label)
        data = self.read_file(path, label, size) if size is not None else None
        if data is not None:
            self.add_bytes(data, label, base, ("", "/".join(folders)))

    def add_bytes(self, data: bytes, label: str, base: str, group: tuple[object, ...]) -> None:
        """Route one file (top-level or zip member) to caption, video or frame handling."""
        stem, suffix = _split_suffix(base)
        suffix = suffix.lower()
        try:
            if suffix == CAPTION_EXTENSION:
                self.add_caption(data, label, stem, group)
                return
            if _sniff_video(data) is not None:
                self._add_video(data, label, stem, group)
                return
            image_format = _sniff(data)
            if image_format in _PIL_FORMATS:
                if suffix in VIDEO_EXTENSIONS:
                    raise UploadError(f"not a video (it is a {_PIL_FORMATS[image_format]} image named {suffix})",
                                      label)
                self._add_frame(data, label, base, group)
                return
            raise UploadError(_refusal_for(data, suffix), label)
        except UploadError as exc:
            self.reject(exc.filename or label, exc.reason)

    def _next_clip(self, label: str) -> None:
        if self.clips >= self.clip_limits.max_clips:
            raise UploadError(f"over the limit of {self.clip_limits.max_clips:,} clips per upload; not read", label)
        self.clips += 1

    def _add_video(self, data: bytes, label: str, stem: str, group: tuple[object, ...]) -> None:
        self._next_clip(label)
        decoded = _decode_video_bytes(data, label, self.count, self.target, self.clip_limits)
        self.videos.append(_Video(label, group, stem, decoded, hashlib.sha256(data).hexdigest()))
        self.order.append(("video", len(self.videos) - 1))

    def _folder(self, group: tuple[object, ...]) -> _Folder:
        folder = self.folders.get(group)
        if folder is not None:
            return folder
        where, path = group[0], str(group[1]) if len(group) > 1 else ""
        dirs = [p for p in path.split("/") if p]
        if dirs:
            name = dirs[-1]
            above = "/".join(dirs[:-1])
            parent: tuple[object, ...] | None = (where, above) if isinstance(where, int) or above else ("",)
            prefix = self.zip_labels.get(where, "") if isinstance(where, int) else ""
            label = "/".join(p for p in (prefix, _label(path)) if p)
        elif isinstance(where, int):  # frames at the root of a zip
            zip_label = self.zip_labels.get(where, "archive.zip")
            name, parent, label = _split_suffix(zip_label)[0], ("",), zip_label
        else:
            name, parent, label = LOOSE_FRAMES_NAME, None, "(loose frame images)"
        folder = _Folder(label, name, parent)
        try:
            self._next_clip(label)
        except UploadError as exc:
            folder.problem = exc.reason
        self.folders[group] = folder
        self.order.append(("folder", group))
        return folder

    def _add_frame(self, data: bytes, label: str, base: str, group: tuple[object, ...]) -> None:
        folder = self._folder(group)
        if folder.problem:
            return
        if len(folder.frames) >= self.clip_limits.max_source_frames:
            folder.problem = (f"it holds more than {self.clip_limits.max_source_frames:,} frame images, the limit "
                              "per clip")
            folder.frames.clear()
            return
        try:
            image, notes = _decode_image(data, label, self.limits)
        except UploadError as exc:
            folder.problem = f"its frame {_label(base)} was refused: {exc.reason}"
            folder.frames.clear()
            return
        self.notes.extend(notes)
        folder.frames.append(_Frame(base, label, fit_frame(image, self.target), image.size,
                                    hashlib.sha256(data).digest()))

    def _folder_clip(self, folder: _Folder) -> tuple[_Decoded, str]:
        if folder.problem:
            raise UploadError(folder.problem, folder.label)
        frames = sorted(folder.frames, key=lambda f: _natural_key(f.name))
        if len(frames) < self.clip_limits.min_frames:
            what = "a single frame image" if len(frames) == 1 else f"only {len(frames)} frame images"
            raise UploadError(f"it holds {what}; a clip needs at least {self.clip_limits.min_frames} frames",
                              folder.label)
        indices = resample_indices(list(range(len(frames))), self.count)
        size = frames[0].size
        note = _describe(folder.label, len(frames), size, None, self.count, self.target)
        if any(f.size != size for f in frames):
            note += " (its frames differ in size; each was cropped and resized on its own)"
        digest = hashlib.sha256(b"".join(f.data_sha for f in frames)).hexdigest()
        return _Decoded(np.stack([frames[i].pixels for i in indices]), len(frames), size, None, note), digest

    def finish_clips(self) -> ClipUploadResult:
        taken: set[str] = set()
        accepted: list[AcceptedClip] = []
        for kind, key in self.order:
            if kind == "video":
                video = self.videos[key]  # type: ignore[index]
                decoded, digest, label, name = video.decoded, video.sha256, video.label, video.stem
                caption = self.captions.get((video.group, video.stem))
            else:
                folder = self.folders[key]  # type: ignore[index]
                try:
                    decoded, digest = self._folder_clip(folder)
                except UploadError as exc:
                    self.reject(exc.filename, exc.reason)
                    continue
                label, name = folder.label, folder.name
                caption = self.captions.get((key, FOLDER_CAPTION))  # type: ignore[arg-type]
                if caption is None and folder.parent is not None:
                    caption = self.captions.get((folder.parent, folder.name))
            if caption is not None:
                caption.used = True
            self.notes.append(decoded.note)
            clip_name = _unique(sanitize_filename(name), taken)
            accepted.append(AcceptedClip(clip_name, decoded.frames, caption.text if caption else None, label,
                                         digest, decoded.source_frames, decoded.source_size, decoded.duration_s))
        self.notes.extend(f"caption {c.label} has no matching clip; ignored" for c in self.captions.values()
                          if not c.used)
        return ClipUploadResult(tuple(accepted), tuple(self.rejected), tuple(self.notes))


def read_clip_upload(
    paths: Sequence[str | os.PathLike[str]],
    frames: int = VIDEO_FRAMES,
    size: int | tuple[int, int] = IMAGE_SIZE,
    limits: ClipLimits = ClipLimits(),
    display_names: Sequence[str] | None = None,
) -> ClipUploadResult:
    """Validate uploaded clip files on disk; bad files are rejected one by one, good clips decoded and kept.

    ``frames``: frames per clip; ``size``: frame size (an int: square; else width, height). ``display_names`` (same
    length as ``paths``) overrides the names taken from the paths' basenames; folders in them group frame images.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    collector = _ClipCollector(limits.for_files(), clip_limits=limits, count=int(frames), target=_target(size))
    collect_upload(collector, paths, display_names)
    return collector.finish_clips()

