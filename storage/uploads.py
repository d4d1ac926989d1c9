"""Validate and normalise user uploads (images, kohya-style ``.txt`` captions and ``.zip`` archives of both).

Every file is judged on its own: a bad file becomes a :class:`~core.types.Rejection` naming it, the good files of the
same upload are kept. Formats are decided from magic bytes; sizes and pixel counts are checked before any decoding.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import stat
import struct
import threading
import unicodedata
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import ModuleType

import numpy as np
from PIL import Image, ImageOps

from core.types import Rejection

ImageCms: ModuleType | None
try:
    from PIL import ImageCms
except ImportError:  # Pillow built without littlecms
    ImageCms = None

__all__ = [
    "ACCEPTED_EXTENSIONS",
    "AcceptedImage",
    "UploadError",
    "UploadLimits",
    "UploadResult",
    "collect_upload",
    "normalize_image",
    "read_upload",
    "sanitize_filename",
]

ACCEPTED_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".txt", ".zip")  # for file pickers
CAPTION_EXTENSION = ".txt"
ZIP_EXTENSION = ".zip"

_PIL_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_ARCHIVE_MAGICS = (b"\x1f\x8b", b"Rar!\x1a\x07", b"7z\xbc\xaf\x27\x1c", b"BZh", b"\xfd7zXZ\x00")
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
)
_MAX_NAME_BYTES = 150
_MAX_LABEL_CHARS = 200
_RATIO_MIN_BYTES = 1 << 20  # members smaller than this are never called zip bombs for their ratio alone
_WHITE = (255, 255, 255)
_OPEN_LOCK = threading.Lock()


@dataclass(frozen=True)
class UploadLimits:
    """Caps applied to one upload."""

    max_file_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000
    min_side: int = 8
    max_files: int = 1000
    max_zip_total_bytes: int = 1 * 2**30
    max_zip_ratio: float = 200.0
    max_caption_chars: int = 2000


@dataclass(frozen=True)
class AcceptedImage:
    """One image that passed validation, normalised to 8-bit RGB."""

    filename: str
    image: Image.Image
    caption: str | None
    source_sha256: str


@dataclass(frozen=True)
class UploadResult:
    """Everything learnt from one upload: kept images, refused files and informational notes."""

    accepted: tuple[AcceptedImage, ...]
    rejected: tuple[Rejection, ...]
    notes: tuple[str, ...]


class UploadError(ValueError):
    """One file refused; ``str(err)`` is the user-facing message and names the file."""

    def __init__(self, reason: str, filename: str = "") -> None:
        super().__init__(f"{filename}: {reason}" if filename else reason)
        self.reason = reason
        self.filename = filename

    def as_rejection(self) -> Rejection:
        """The same refusal as a :class:`Rejection` DTO."""
        return Rejection(self.filename, self.reason)


# --------------------------------------------------------------------------------------------------------------------
# names


def sanitize_filename(name: str) -> str:
    """A safe basename: no directories, control/bidi characters, reserved names, leading dots or excess length."""
    name = unicodedata.normalize("NFC", str(name)).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C" or ch in "\t\n\r")
    name = "".join("_" if ch in '<>:"|?*' else ch for ch in name)
    name = " ".join(name.split()).strip(" .")
    if not name:
        return "unnamed"
    stem, suffix = _split_suffix(name)
    if stem.upper() in _WINDOWS_RESERVED:
        stem = f"_{stem}"
    if len(suffix.encode()) > 16:
        stem, suffix = stem + suffix, ""
    budget = _MAX_NAME_BYTES - len(suffix.encode())
    stem = stem.encode()[:budget].decode("utf-8", errors="ignore").rstrip(" .") or "unnamed"
    return stem + suffix


def _split_suffix(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:]


def _label(name: str) -> str:
    """A printable rendering of a (possibly hostile) name, used in messages."""
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else "?" for ch in str(name))
    if len(text) > _MAX_LABEL_CHARS:
        text = text[: _MAX_LABEL_CHARS - 21] + "…" + text[-20:]
    return text or "(unnamed)"


def _is_hidden(part: str) -> bool:
    return part.startswith(".") or part.lower() in _SYSTEM_FILES


def _unique(name: str, taken: set[str]) -> str:
    stem, suffix = _split_suffix(name)
    candidate, n = name, 1
    while candidate.casefold() in taken:
        n += 1
        candidate = f"{stem}-{n}{suffix}"
    taken.add(candidate.casefold())
    return candidate


def _too_big(size: int, limit: int, kind: str = "per-file") -> str:
    return f"{_fmt_size(size)} is over the {_fmt_size(limit)} {kind} limit"


def _fmt_size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------------------------------------
# sniffing


def _sniff(data: bytes) -> str | None:
    """``PNG``/``JPEG``/``WEBP`` for accepted formats, ``ZIP``, or ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(_ZIP_MAGICS):
        return "ZIP"
    return None


def _unsupported_format(data: bytes) -> str | None:
    """The name of a recognised but refused image format."""
    head = data[:32]
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM") and int.from_bytes(data[14:18], "little") in {12, 40, 52, 56, 64, 108, 124}:
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}:
            return "HEIC"
        if brand in {b"avif", b"avis"}:
            return "AVIF"
    if head.startswith(b"\x00\x00\x01\x00") and len(data) > 6:
        return "ICO"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    return None


def _text_head(data: bytes) -> str:
    return data[:4096].decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n").lower()


def _looks_like_svg(data: bytes) -> bool:
    return "<svg" in _text_head(data)


def _describe_non_image(data: bytes) -> str:
    """Why bytes that are no accepted/refused image format are not an image."""
    head = _text_head(data)
    if head.startswith(("<!doctype html", "<html", "<head", "<body", "<script")) or "<html" in head[:1024]:
        return "it looks like an HTML page"
    if data.startswith(b"MZ"):
        return "it looks like a Windows program"
    if data.startswith(b"\x7fELF"):
        return "it looks like a Linux program"
    if data.startswith(b"%PDF"):
        return "it looks like a PDF document"
    if data.startswith(_ZIP_MAGICS):
        return "it is a zip-based file; to upload an archive, give it a .zip name"
    if data.startswith(_ARCHIVE_MAGICS):
        return "it looks like a compressed archive"
    if data[4:8] == b"ftyp":
        return "it looks like a video"
    sample = data[:4096]
    if b"\x00" not in sample:
        try:
            sample.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(sample) - 4:
                return "the file format was not recognised"
        return "it looks like a text file"
    return "the file format was not recognised"


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height read from the file header without decoding, or ``None`` when not found."""
    try:
        if fmt == "PNG" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return w, h
        if fmt == "JPEG":
            return _jpeg_size(data)
        if fmt == "WEBP":
            chunk = data[12:16]
            if chunk == b"VP8X":
                return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
            if chunk == b"VP8L" and data[20:21] == b"\x2f":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
    except struct.error:
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            return None
        (seglen,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + seglen
    return None


# --------------------------------------------------------------------------------------------------------------------
# images


def normalize_image(data: bytes, filename: str, limits: UploadLimits = UploadLimits()) -> Image.Image:
    """Validate image bytes and return them decoded as 8-bit RGB; raises :class:`UploadError` naming ``filename``."""
    return _decode_image(data, filename, limits)[0]


def _decode_image(data: bytes, label: str, limits: UploadLimits) -> tuple[Image.Image, list[str]]:
    """Checks and full decode; returns the normalised image and notes (e.g. for animations)."""

    def refuse(reason: str) -> UploadError:
        return UploadError(reason, label)

    if not data:
        raise refuse("not an image (the file is empty)")
    if len(data) > limits.max_file_bytes:
        raise refuse(_too_big(len(data), limits.max_file_bytes))
    if PurePosixPath(label.lower()).suffix in (".svg", ".svgz"):
        raise refuse("SVG files are not accepted (vector images can carry scripts); export it as PNG")
    fmt = _sniff(data)
    if fmt not in _PIL_FORMATS:
        other = _unsupported_format(data)
        if other:
            raise refuse(f"unsupported format {other}; use PNG, JPEG or WebP")
        reason = _describe_non_image(data)
        if reason != "it looks like an HTML page" and _looks_like_svg(data):
            raise refuse("SVG files are not accepted (vector images can carry scripts); export it as PNG")
        raise refuse(f"not an image ({reason})")
    pretty = _PIL_FORMATS[fmt]

    size = _header_size(data, fmt)
    if size is not None:
        _check_size(size, label, limits)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS or 0
        raise refuse(f"its pixel count is over Pillow's decompression-bomb limit of {limit:,} pixels") from None
    except Image.UnidentifiedImageError:
        raise refuse(f"corrupt {pretty} image (its header could not be read)") from None
    except Exception as exc:
        raise refuse(f"corrupt or truncated {pretty} image ({_exc_text(exc)})") from None
    _check_size(img.size, label, limits)

    notes: list[str] = []
    try:
        frames = getattr(img, "n_frames", 1) if getattr(img, "is_animated", False) else 1
        if frames > 1:
            img.seek(0)
            notes.append(f"{label}: animated image with {frames} frames; only the first frame was used")
        img.load()
    except Exception as exc:
        raise refuse(f"corrupt or truncated {pretty} image ({_exc_text(exc)})") from None

    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:
        oriented = img
        notes.append(f"{label}: its EXIF orientation could not be read; the image was used as stored")
    try:
        out = _to_rgb(oriented)
    except UploadError as exc:
        raise refuse(exc.reason) from None
    except Exception as exc:
        raise refuse(f"could not convert its colours ({_exc_text(exc)})") from None
    finally:
        img.close()
    return out, notes


def _check_size(size: tuple[int, int], label: str, limits: UploadLimits) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise UploadError(f"{w}×{h} pixels is over the {limits.max_pixels:,}-pixel limit", label)
    if min(w, h) < limits.min_side:
        raise UploadError(f"{w}×{h} pixels is too small (each side must be at least {limits.min_side} pixels)", label)


def _exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:120]


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited on white, high bit depths rescaled, CMYK through its ICC profile when possible."""
    mode = img.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode.startswith("F"):
        return Image.fromarray(_scale_to_uint8(img)).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode in ("RGB", "RGBX", "L", "1", "P", "YCbCr"):
        return img.convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise UploadError(f"unsupported colour mode {mode}; save it as 8-bit RGB") from None


def _scale_to_uint8(img: Image.Image) -> np.ndarray:
    """Map 16-bit, 32-bit integer and float pixels onto 0..255 without clipping the range."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float32) / 257.0
    else:
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = values * 255.0
        elif img.mode != "F" and lo >= 0 and hi <= 65535:
            scaled = values / (257.0 if hi > 255 else 1.0)
        elif hi > lo:
            scaled = (values - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc and ImageCms is not None:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------------------------------
# captions


def _decode_caption(data: bytes, label: str, limits: UploadLimits) -> tuple[str, list[str]]:
    """Caption text, cleaned and length-capped; raises :class:`UploadError` for binary or oversized files."""
    if len(data) > limits.max_file_bytes:
        raise UploadError(_too_big(len(data), limits.max_file_bytes), label)
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            raise UploadError("not a readable text caption (broken UTF-16)", label) from None
    else:
        fmt = _sniff(data)
        if fmt in _PIL_FORMATS:
            raise UploadError(f"not a text caption (it is a {_PIL_FORMATS[fmt]} image named .txt)", label)
        if b"\x00" in data:
            raise UploadError("not a text caption (it contains binary data)", label)
        data = data.removeprefix(codecs.BOM_UTF8)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    text = " ".join(text.split())
    notes: list[str] = []
    limit = limits.max_caption_chars
    if len(text) > limit:
        cut = text[: limit + 1].rsplit(" ", 1)[0] if " " in text[limit // 2 : limit + 1] else text[:limit]
        cut = cut[:limit].rstrip()
        notes.append(
            f"caption {label} is {len(text):,} characters, over the {limit:,}-character limit; "
            f"truncated to {len(cut):,}"
        )
        text = cut
    return text, notes


# --------------------------------------------------------------------------------------------------------------------
# upload assembly


@dataclass
class _Pending:
    label: str
    name: str
    group: tuple[object, ...]
    stem: str
    image: Image.Image
    sha256: str


@dataclass
class _Caption:
    label: str
    text: str
    used: bool = False


@dataclass
class _Collector:
    limits: UploadLimits
    images: list[_Pending] = field(default_factory=list)
    captions: dict[tuple[tuple[object, ...], str], _Caption] = field(default_factory=dict)
    rejected: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    zips: int = 0

    def reject(self, label: str, reason: str) -> None:
        self.rejected.append(Rejection(label, reason))

    def skipped_note(self, where: str, names: list[str]) -> None:
        if names:
            shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
            plural = "file" if len(names) == 1 else "files"
            self.notes.append(f"{where}skipped {len(names)} hidden/system {plural} ({shown})")

    def add_top_level(self, path: str | os.PathLike[str], raw_name: str) -> None:
        """One uploaded file under its display name (what :func:`collect_upload` calls for each path)."""
        self.add_path(path, raw_name)

    def add_path(self, path: str | os.PathLike[str], raw_name: str) -> None:
        limits = self.limits
        base = str(raw_name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        label = _label(base)
        size = self.regular_file_size(path, label)
        if size is None:
            return
        if base.lower().endswith(ZIP_EXTENSION):
            if size > limits.max_zip_total_bytes:
                self.reject(label, _too_big(size, limits.max_zip_total_bytes, "zip"))
                return
            self.add_zip(path, label)
            return
        data = self.read_file(path, label, size)
        if data is not None:
            self.add_bytes(data, label, base, ("",))

    def regular_file_size(self, path: str | os.PathLike[str], label: str) -> int | None:
        """The size of uploaded file ``path``; ``None`` (and a rejection) when it is missing or not a regular file."""
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError("not a regular file")
        except OSError:
            self.reject(label, "could not be read (the uploaded file is missing)")
            return None
        return st.st_size

    def read_file(self, path: str | os.PathLike[str], label: str, size: int) -> bytes | None:
        """The bytes of a (non-zip) uploaded file of ``size`` bytes; ``None`` (and a rejection) when it is over the
        per-file limit or cannot be read."""
        if size > self.limits.max_file_bytes:
            self.reject(label, _too_big(size, self.limits.max_file_bytes))
            return None
        try:
            with open(path, "rb") as fh:
                return fh.read(self.limits.max_file_bytes + 1)
        except OSError:
            self.reject(label, "could not be read")
            return None

    def add_caption(self, data: bytes, label: str, stem: str, group: tuple[object, ...]) -> None:
        """Keep a ``.txt`` caption for the image or clip ``stem`` of ``group``; raises :class:`UploadError`."""
        text, notes = _decode_caption(data, label, self.limits)
        self.notes.extend(notes)
        key = (group, stem)
        if key in self.captions:
            self.notes.append(f"caption {label} duplicates {self.captions[key].label}; ignored")
        else:
            self.captions[key] = _Caption(label, text)

    def add_bytes(self, data: bytes, label: str, base: str, group: tuple[object, ...]) -> None:
        """Route one file (top-level or zip member) to caption or image handling."""
        stem, suffix = _split_suffix(base)
        try:
            if suffix.lower() == CAPTION_EXTENSION:
                self.add_caption(data, label, stem, group)
                return
            if len(self.images) >= self.limits.max_files:
                raise UploadError(f"over the limit of {self.limits.max_files:,} images per upload; not read", label)
            image, notes = _decode_image(data, label, self.limits)
        except UploadError as exc:
            self.reject(exc.filename or label, exc.reason)
            return
        self.notes.extend(notes)
        digest = hashlib.sha256(data).hexdigest()
        self.images.append(_Pending(label, base, group, stem, image, digest))

    def add_zip(self, path: str | os.PathLike[str], label: str) -> None:
        limits = self.limits
        try:
            with open(path, "rb") as fh:
                head = fh.read(4096)
            if not head.startswith(_ZIP_MAGICS):
                why = _describe_non_image(head) if head else "the file is empty"
                self.reject(label, f"not a valid zip archive ({why})")
                return
            zf = zipfile.ZipFile(path)
        except Exception as exc:  # BadZipFile, OSError, struct/Unicode errors from a malformed central directory
            self.reject(label, f"not a valid zip archive ({_exc_text(exc)})")
            return
        self.zips += 1
        zip_id = self.zips
        with zf:
            infos = zf.infolist()
            files = [info for info in infos if not info.is_dir()]
            max_entries = 4 * limits.max_files
            if len(files) > max_entries:
                self.reject(label, f"it holds {len(files):,} files; at most {max_entries:,} are accepted in one zip")
                return
            declared = sum(info.file_size for info in infos)
            if declared > limits.max_zip_total_bytes:
                self.reject(
                    label,
                    f"its contents would unpack to {_fmt_size(declared)}, over the "
                    f"{_fmt_size(limits.max_zip_total_bytes)} limit (possible zip bomb)",
                )
                return
            skipped: list[str] = []
            budget = limits.max_zip_total_bytes
            for info in infos:
                member = info.filename
                member_label = f"{label}/{_label(member)}"
                parts = member.replace("\\", "/").split("/")
                if (
                    member.startswith(("/", "\\"))
                    or (len(member) > 1 and member[1] == ":")
                    or any(p == ".." for p in parts)
                ):
                    self.reject(member_label, "unsafe path inside the zip")
                    continue
                if info.is_dir():
                    continue
                parts = [p for p in parts if p not in ("", ".")]
                if not parts:
                    continue
                if any(_is_hidden(p) for p in parts):
                    skipped.append(_label(member))
                    continue
                reason = self._member_problem(info)
                if reason:
                    self.reject(member_label, reason)
                    continue
                try:
                    with zf.open(info) as fh:
                        data = fh.read(min(limits.max_file_bytes, budget) + 1)
                except Exception as exc:  # BadZipFile (bad CRC), zlib/lzma/bz2 errors, unsupported methods
                    self.reject(member_label, f"could not be extracted ({_exc_text(exc)})")
                    continue
                if len(data) > limits.max_file_bytes:
                    self.reject(member_label, f"it unpacks to more than the {_fmt_size(limits.max_file_bytes)} limit")
                    continue
                if len(data) > budget:
                    self.reject(member_label, f"the zip unpacks to more than {_fmt_size(limits.max_zip_total_bytes)}")
                    continue
                budget -= len(data)
                if data.startswith(_ZIP_MAGICS + _ARCHIVE_MAGICS):
                    self.reject(member_label, "nested archives are not accepted; unpack it or upload it separately")
                    continue
                self.add_bytes(data, member_label, parts[-1], (zip_id, "/".join(parts[:-1])))
            self.skipped_note(f"{label}: ", skipped)

    def _member_problem(self, info: zipfile.ZipInfo) -> str | None:
        """Refusal reason decided from a member's headers alone."""
        limits = self.limits
        mode = info.external_attr >> 16
        if mode and stat.S_ISLNK(mode):
            return "symbolic links inside the zip are not accepted"
        if info.flag_bits & 0x1:
            return "encrypted (password-protected) zip members are not supported"
        if info.file_size > limits.max_file_bytes:
            return _too_big(info.file_size, limits.max_file_bytes)
        if info.file_size > _RATIO_MIN_BYTES:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_zip_ratio:
                return (
                    f"compression ratio {ratio:,.0f}:1 is over the {limits.max_zip_ratio:,.0f}:1 limit "
                    "(possible zip bomb)"
                )
        return None

    def finish(self) -> UploadResult:
        taken: set[str] = set()
        accepted: list[AcceptedImage] = []
        for item in self.images:
            caption = self.captions.get((item.group, item.stem))
            if caption is not None:
                caption.used = True
            name = _unique(sanitize_filename(item.name), taken)
            accepted.append(AcceptedImage(name, item.image, caption.text if caption else None, item.sha256))
        notes = list(self.notes)
        notes.extend(f"caption {c.label} has no matching image; ignored" for c in self.captions.values() if not c.used)
        return UploadResult(tuple(accepted), tuple(self.rejected), tuple(notes))


def read_upload(
    paths: Sequence[str | os.PathLike[str]],
    limits: UploadLimits = UploadLimits(),
    display_names: Sequence[str] | None = None,
) -> UploadResult:
    """Validate uploaded files on disk; bad files are rejected one by one, good ones normalised and kept.

    ``display_names`` (same length as ``paths``) overrides the names taken from the paths' basenames.
    """
    collector = _Collector(limits)
    collect_upload(collector, paths, display_names)
    return collector.finish()


def collect_upload(
    collector: _Collector,
    paths: Sequence[str | os.PathLike[str]],
    display_names: Sequence[str] | None = None,
) -> None:
    """Feed every uploaded file to ``collector.add_top_level`` under its display name (``display_names[i]``, else
    the path's basename); hidden and system files are skipped with one note."""
    if display_names is not None and len(display_names) != len(paths):
        raise ValueError("display_names must have one entry per path")
    skipped: list[str] = []
    for i, path in enumerate(paths):
        raw = display_names[i] if display_names is not None else os.path.basename(os.fspath(path))
        base = str(raw).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        if _is_hidden(base):
            skipped.append(_label(base))
            continue
        collector.add_top_level(path, str(raw))
    collector.skipped_note("", skipped)
