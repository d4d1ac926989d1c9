"""Upload validation: every fixture is generated on the fly with Pillow, zipfile, zlib and struct."""

from __future__ import annotations

import hashlib
import io
import stat
import struct
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.types import Rejection
from storage.uploads import (
    AcceptedImage,
    UploadError,
    UploadLimits,
    UploadResult,
    normalize_image,
    read_upload,
    sanitize_filename,
)

# --------------------------------------------------------------------------------------------------------------------
# fixture builders


def image_bytes(
    fmt: str = "PNG",
    size: tuple[int, int] = (16, 12),
    color: object = (200, 100, 50),
    mode: str = "RGB",
    **save: object,
) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def pixel_bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width``×``height`` (the IDAT holds a single row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + bytes(3 * 64), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zip_bytes(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def patch_member(data: bytes, name: str, *, flag_or: int = 0, file_size: int | None = None) -> bytes:
    """Rewrite one member's general-purpose flags and/or declared size in both its local and central headers."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        local = zf.getinfo(name).header_offset
    assert buf[local : local + 4] == b"PK\x03\x04"
    central = buf.find(b"PK\x01\x02")
    while central >= 0:
        name_len = struct.unpack_from("<H", buf, central + 28)[0]
        if buf[central + 46 : central + 46 + name_len] == name.encode():
            break
        central = buf.find(b"PK\x01\x02", central + 4)
    assert central >= 0
    for flags_at, size_at in ((local + 6, local + 22), (central + 8, central + 24)):
        struct.pack_into("<H", buf, flags_at, struct.unpack_from("<H", buf, flags_at)[0] | flag_or)
        if file_size is not None:
            struct.pack_into("<I", buf, size_at, file_size)
    return bytes(buf)


def upload(tmp_path: Path, files: list[tuple[str, bytes]], limits: UploadLimits | None = None) -> UploadResult:
    """Write each file under a neutral temp name and upload it under its (possibly hostile) display name."""
    paths = []
    for i, (_, data) in enumerate(files):
        path = tmp_path / f"upload-{i}"
        path.write_bytes(data)
        paths.append(path)
    names = [name for name, _ in files]
    return read_upload(paths, limits or UploadLimits(), display_names=names)


def by_name(result: UploadResult) -> dict[str, AcceptedImage]:
    return {a.filename: a for a in result.accepted}


def reasons(result: UploadResult) -> dict[str, str]:
    return {r.filename: r.reason for r in result.rejected}


@pytest.fixture(scope="module")
def zeros_zip_200mb() -> bytes:
    """200 MiB of zeros streamed into one deflated member (about 200 KB on disk)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("zeros.png", "w") as fh:
            chunk = bytes(1 << 20)
            for _ in range(200):
                fh.write(chunk)
        zf.writestr("good.png", image_bytes())
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# happy paths


def test_good_png_jpg_webp_are_kept(tmp_path: Path) -> None:
    files = [
        ("a.png", image_bytes("PNG")),
        ("b.jpg", image_bytes("JPEG")),
        ("c.jpeg", image_bytes("JPEG", size=(20, 10))),
        ("d.webp", image_bytes("WEBP")),
        ("e.png", image_bytes("JPEG")),  # misnamed: the content decides
    ]
    result = upload(tmp_path, files)
    assert result.rejected == ()
    kept = by_name(result)
    assert list(kept) == ["a.png", "b.jpg", "c.jpeg", "d.webp", "e.png"]
    for name, data in files:
        img = kept[name].image
        assert img.mode == "RGB"
        assert kept[name].source_sha256 == hashlib.sha256(data).hexdigest()
        assert kept[name].caption is None
    assert kept["c.jpeg"].image.size == (20, 10)
    assert kept["a.png"].image.getpixel((0, 0)) == (200, 100, 50)


def test_paths_basename_is_the_display_name(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(image_bytes())
    (tmp_path / "cat.txt").write_text("a cat", encoding="utf-8")
    result = read_upload([tmp_path / "cat.png", str(tmp_path / "cat.txt")])
    assert [(a.filename, a.caption) for a in result.accepted] == [("cat.png", "a cat")]


def test_display_names_must_match_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        read_upload([tmp_path / "x.png"], display_names=["a", "b"])


def test_captions_are_paired_cleaned_and_orphans_noted(tmp_path: Path) -> None:
    result = upload(
        tmp_path,
        [
            ("a.png", image_bytes()),
            ("a.txt", "\ufeff  a photo of\n\tsks   dog \r\n".encode()),
            ("c.jpg", image_bytes("JPEG")),
            ("c.txt", "caf\xe9 cr\xe8me".encode("latin-1")),
            ("d.webp", image_bytes("WEBP")),
            ("d.txt", b"<script>alert(1)</script> $(rm -rf /) {{7*7}}"),
            ("b.txt", b"orphan"),
        ],
    )
    kept = by_name(result)
    assert kept["a.png"].caption == "a photo of sks dog"
    assert kept["c.jpg"].caption == "café crème"
    assert kept["d.webp"].caption == "<script>alert(1)</script> $(rm -rf /) {{7*7}}"
    assert "caption b.txt has no matching image; ignored" in result.notes
    assert result.rejected == ()


def test_long_caption_is_truncated_with_a_note(tmp_path: Path) -> None:
    limits = UploadLimits(max_caption_chars=50)
    words = " ".join(f"word{i}" for i in range(40))
    result = upload(tmp_path, [("a.png", image_bytes()), ("a.txt", words.encode())], limits)
    caption = result.accepted[0].caption
    assert caption is not None and 0 < len(caption) <= 50
    assert words.startswith(caption) and not caption.endswith(" ")
    assert any("a.txt" in n and "truncated" in n and "50-character limit" in n for n in result.notes)


def test_binary_caption_is_rejected(tmp_path: Path) -> None:
    result = upload(tmp_path, [("a.png", image_bytes()), ("a.txt", b"ab\x00cd"), ("z.txt", image_bytes())])
    assert "binary data" in reasons(result)["a.txt"]
    assert "PNG image named .txt" in reasons(result)["z.txt"]
    assert by_name(result)["a.png"].caption is None


def test_zip_captions_pair_within_the_same_folder(tmp_path: Path) -> None:
    archive = zip_bytes(
        [
            ("set/x/a.png", image_bytes(color=(255, 0, 0))),
            ("set/x/a.txt", b"red"),
            ("set/y/a.png", image_bytes(color=(0, 0, 255))),
            ("set/y/b.txt", b"orphan"),
        ]
    )
    result = upload(tmp_path, [("photos.zip", archive), ("a.txt", b"top level caption")])
    assert result.rejected == ()
    assert [(a.filename, a.caption) for a in result.accepted] == [("a.png", "red"), ("a-2.png", None)]
    assert "caption photos.zip/set/y/b.txt has no matching image; ignored" in result.notes
    assert "caption a.txt has no matching image; ignored" in result.notes


# --------------------------------------------------------------------------------------------------------------------
# normalisation


def test_exif_rotated_jpeg_comes_out_rotated(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = read_upload_one(tmp_path, "rotated.jpg", buf.getvalue())
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def read_upload_one(tmp_path: Path, name: str, data: bytes) -> Image.Image:
    result = upload(tmp_path, [(name, data)])
    assert result.rejected == (), result.rejected
    return result.accepted[0].image


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    out = read_upload_one(tmp_path, "alpha.png", buf.getvalue())
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 0)))
    assert out.getpixel((5, 5)) == (255, 0, 0)


def test_palette_with_transparency_and_grayscale_alpha_become_white(tmp_path: Path) -> None:
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    out = read_upload_one(tmp_path, "pal.png", buf.getvalue())
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((5, 5)) == (0, 255, 0)

    la = image_bytes("PNG", size=(10, 10), mode="LA", color=(0, 0))
    assert read_upload_one(tmp_path, "la.png", la).getpixel((3, 3)) == (255, 255, 255)


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (8, 1))
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = np.asarray(read_upload_one(tmp_path, "depth.png", buf.getvalue()))
    assert out.dtype == np.uint8 and out.shape == (8, 16, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, -1].tolist() == [255, 255, 255]
    assert abs(int(out[0, 8, 0]) - round(ramp[0, 8] / 257)) <= 1
    assert len(np.unique(out[..., 0])) == 16  # not clipped to a couple of values


def test_cmyk_jpeg_converts_to_rgb(tmp_path: Path) -> None:
    data = image_bytes("JPEG", size=(16, 16), mode="CMYK", color=(0, 255, 255, 0), quality=95)
    out = read_upload_one(tmp_path, "print.jpg", data)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 220 and g < 40 and b < 40


def test_one_bit_and_grayscale_become_rgb(tmp_path: Path) -> None:
    assert read_upload_one(tmp_path, "bw.png", image_bytes(mode="1", color=1)).getpixel((0, 0)) == (255, 255, 255)
    assert read_upload_one(tmp_path, "g.jpg", image_bytes("JPEG", mode="L", color=90)).getpixel((0, 0))[0] in range(
        88, 93
    )


def test_animated_images_keep_the_first_frame_with_a_note(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    files = []
    for fmt, name in (("PNG", "anim.png"), ("WEBP", "anim.webp")):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
        files.append((name, buf.getvalue()))
    result = upload(tmp_path, files)
    assert result.rejected == ()
    for a in result.accepted:
        assert a.image.getpixel((8, 8)) == (255, 0, 0)
        assert any(a.filename in n and "first frame" in n for n in result.notes)


def test_normalize_image_direct() -> None:
    img = normalize_image(image_bytes("WEBP", lossless=True), "x.webp")
    assert img.mode == "RGB" and img.size == (16, 12)
    with pytest.raises(UploadError) as err:
        normalize_image(b"", "empty.png")
    assert str(err.value) == "empty.png: not an image (the file is empty)"
    assert err.value.as_rejection() == Rejection("empty.png", "not an image (the file is empty)")


# --------------------------------------------------------------------------------------------------------------------
# rejections


def truncated_jpeg() -> bytes:
    data = image_bytes("JPEG", size=(64, 64), color=(10, 200, 30))
    return data[: len(data) // 2]


BAD_FILES: list[tuple[str, bytes, str]] = [
    ("empty.png", b"", "not an image (the file is empty)"),
    ("page.png", b"<!DOCTYPE html><html><body>hi</body></html>", "not an image (it looks like an HTML page)"),
    ("setup.jpg", b"MZ\x90\x00" + bytes(200), "not an image (it looks like a Windows program)"),
    ("notes.webp", b"just some words\n", "not an image (it looks like a text file)"),
    ("doc.png", b"%PDF-1.7\n" + bytes(50), "not an image (it looks like a PDF document)"),
    ("logo.svg", image_bytes(), "SVG files are not accepted (vector images can carry scripts); export it as PNG"),
    (
        "sneaky.png",
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "SVG files are not accepted",
    ),
    ("anim.gif", image_bytes("GIF"), "unsupported format GIF; use PNG, JPEG or WebP"),
    ("old.bmp", image_bytes("BMP"), "unsupported format BMP; use PNG, JPEG or WebP"),
    ("scan.tiff", image_bytes("TIFF"), "unsupported format TIFF; use PNG, JPEG or WebP"),
    ("cut.jpg", truncated_jpeg(), "corrupt or truncated JPEG image"),
    ("garbage.png", image_bytes()[:33] + bytes(range(256)) * 4, "corrupt"),
    ("tiny.png", image_bytes(size=(4, 4)), "4×4 pixels is too small (each side must be at least 8 pixels)"),
    ("big.png", image_bytes(size=(300, 300), color=None) + bytes(3000), "per-file limit"),
    ("archive.png", zip_bytes([("a.png", image_bytes())]), "zip-based file"),
]


def test_each_bad_file_is_rejected_by_name_and_good_files_survive(tmp_path: Path) -> None:
    limits = UploadLimits(max_file_bytes=2000)
    files = (
        [("good.png", image_bytes())]
        + [(name, data) for name, data, _ in BAD_FILES]
        + [("good2.jpg", image_bytes("JPEG"))]
    )
    result = upload(tmp_path, files, limits)
    assert [a.filename for a in result.accepted] == ["good.png", "good2.jpg"]
    got = reasons(result)
    assert set(got) == {name for name, _, _ in BAD_FILES}
    for name, _, expected in BAD_FILES:
        assert expected in got[name], (name, got[name])
    for rejection in result.rejected:
        assert str(rejection).startswith(f"{rejection.filename}: ")


def test_oversized_file_is_refused_from_its_size(tmp_path: Path) -> None:
    result = upload(tmp_path, [("huge.png", image_bytes(size=(64, 64)))], UploadLimits(max_file_bytes=100))
    assert result.accepted == ()
    assert "huge.png" in str(result.rejected[0]) and "over the 100 bytes per-file limit" in result.rejected[0].reason


def test_pixel_bomb_is_refused_from_the_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pixel_bomb_png(50_000, 50_000)
    assert len(data) < 200

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("the image must not be opened")

    monkeypatch.setattr(Image, "open", no_decode)
    start = time.perf_counter()
    result = upload(tmp_path, [("bomb.png", data)])
    assert time.perf_counter() - start < 1.0
    assert [str(r) for r in result.rejected] == ["bomb.png: 50000×50000 pixels is over the 40,000,000-pixel limit"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_pixel_limit_is_read_from_each_format_header(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = image_bytes(fmt, size=(30, 20))
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded before the header check"))
    result = upload(tmp_path, [("x.img", data)], UploadLimits(max_pixels=500))
    assert result.rejected[0].reason == "30×20 pixels is over the 500-pixel limit"


def test_pillow_bomb_guard_is_an_error_and_global_state_is_untouched(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    lenient = UploadLimits(max_pixels=10**12)  # our own header check lets it through; Pillow's guard must not warn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        filters = list(warnings.filters)
        result = upload(tmp_path, [("huge.png", pixel_bomb_png(12_000, 12_000)), ("ok.png", image_bytes())], lenient)
        assert warnings.filters == filters
    assert [a.filename for a in result.accepted] == ["ok.png"]
    assert "decompression-bomb limit" in reasons(result)["huge.png"]
    assert Image.MAX_IMAGE_PIXELS == before


def test_too_many_images_are_rejected_individually(tmp_path: Path) -> None:
    files = [(f"{i}.png", image_bytes()) for i in range(3)]
    result = upload(tmp_path, files, UploadLimits(max_files=2))
    assert [a.filename for a in result.accepted] == ["0.png", "1.png"]
    assert "over the limit of 2 images per upload" in reasons(result)["2.png"]


# --------------------------------------------------------------------------------------------------------------------
# zips


def test_hostile_zip_members_are_rejected_and_good_members_kept(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = zip_bytes(
        [
            ("good/a.png", image_bytes()),
            ("good/a.txt", b"kept caption"),
            ("../../etc/passwd", b"root:x:0:0"),
            ("/abs/evil.png", image_bytes()),
            ("..\\..\\win.png", image_bytes()),
            ("inner.zip", zip_bytes([("x.png", image_bytes())])),
            (link, b"/etc/passwd"),
            ("secret.png", image_bytes()),
            ("__MACOSX/good/._a.png", b"\x00\x05\x16\x07junk"),
            ("good/.DS_Store", b"\x00\x00\x00\x01Bud1"),
            ("logo.svg", b"<svg/>"),
        ]
    )
    archive = patch_member(archive, "secret.png", flag_or=0x1)
    result = upload(tmp_path, [("photos.zip", archive), ("loose.png", image_bytes())])
    assert [(a.filename, a.caption) for a in result.accepted] == [("a.png", "kept caption"), ("loose.png", None)]
    got = reasons(result)
    assert got["photos.zip/../../etc/passwd"] == "unsafe path inside the zip"
    assert got["photos.zip//abs/evil.png"] == "unsafe path inside the zip"
    assert got["photos.zip/..\\..\\win.png"] == "unsafe path inside the zip"
    assert "nested archives are not accepted" in got["photos.zip/inner.zip"]
    assert "symbolic links" in got["photos.zip/link.png"]
    assert "encrypted" in got["photos.zip/secret.png"]
    assert "SVG" in got["photos.zip/logo.svg"]
    assert len(got) == 7
    skipped = [n for n in result.notes if "hidden/system" in n]
    assert len(skipped) == 1 and "__MACOSX/good/._a.png" in skipped[0] and "skipped 2" in skipped[0]


def test_zip_bomb_declared_total_rejects_the_whole_zip(tmp_path: Path, zeros_zip_200mb: bytes) -> None:
    assert len(zeros_zip_200mb) < 2 * 2**20
    limits = UploadLimits(max_zip_total_bytes=100 * 2**20)
    result = upload(tmp_path, [("bomb.zip", zeros_zip_200mb), ("ok.png", image_bytes())], limits)
    assert [a.filename for a in result.accepted] == ["ok.png"]
    assert "would unpack to 200 MB" in reasons(result)["bomb.zip"]
    assert "zip bomb" in reasons(result)["bomb.zip"]


def test_zip_member_over_the_file_limit_is_rejected_without_reading(tmp_path: Path, zeros_zip_200mb: bytes) -> None:
    start = time.perf_counter()
    result = upload(tmp_path, [("bomb.zip", zeros_zip_200mb)])
    assert time.perf_counter() - start < 1.0
    assert [a.filename for a in result.accepted] == ["good.png"]
    assert reasons(result) == {"bomb.zip/zeros.png": "200 MB is over the 50 MB per-file limit"}


def test_zip_member_over_the_ratio_is_a_bomb(tmp_path: Path) -> None:
    archive = zip_bytes([("zeros.png", bytes(10 * 2**20)), ("fine.png", image_bytes())])
    result = upload(tmp_path, [("z.zip", archive)])
    assert [a.filename for a in result.accepted] == ["fine.png"]
    reason = reasons(result)["z.zip/zeros.png"]
    assert "compression ratio" in reason and "200:1 limit" in reason


def test_zip_member_lying_about_its_size_is_caught_while_reading(tmp_path: Path) -> None:
    archive = zip_bytes([("liar.png", image_bytes(size=(64, 64)) + bytes(5000)), ("fine.png", image_bytes())])
    archive = patch_member(archive, "liar.png", file_size=100)
    result = upload(tmp_path, [("z.zip", archive)])
    assert [a.filename for a in result.accepted] == ["fine.png"]
    assert "could not be extracted" in reasons(result)["z.zip/liar.png"]


def test_zip_with_too_many_members_is_rejected(tmp_path: Path) -> None:
    archive = zip_bytes([(f"{i}.txt", b"x") for i in range(5)])
    result = upload(tmp_path, [("many.zip", archive)], UploadLimits(max_files=1))
    assert "at most 4 are accepted" in reasons(result)["many.zip"]


def test_not_a_zip_is_rejected(tmp_path: Path) -> None:
    result = upload(tmp_path, [("fake.zip", b"<html>nope</html>"), ("empty.zip", b"")])
    got = reasons(result)
    assert got["fake.zip"] == "not a valid zip archive (it looks like an HTML page)"
    assert got["empty.zip"] == "not a valid zip archive (the file is empty)"


# --------------------------------------------------------------------------------------------------------------------
# names


def test_duplicate_names_are_made_unique(tmp_path: Path) -> None:
    archive = zip_bytes([("d1/a.png", image_bytes()), ("d2/a.png", image_bytes()), ("a-2.png", image_bytes())])
    result = upload(tmp_path, [("a.png", image_bytes()), ("photos.zip", archive), ("A.PNG", image_bytes())])
    assert [a.filename for a in result.accepted] == ["a.png", "a-2.png", "a-3.png", "a-2-2.png", "A-4.PNG"]


def test_hostile_upload_names_are_sanitised_and_dotfiles_skipped(tmp_path: Path) -> None:
    long_name = "x" * 400 + ".png"
    files = [
        ("../../evil.png", image_bytes()),
        ("C:\\Users\\me\\win.png", image_bytes()),
        ("nul\x00byte.png", image_bytes()),
        ("rtl\u202egnp.exe.png", image_bytes()),
        (long_name, image_bytes()),
        ("._hidden.png", image_bytes()),
        (".DS_Store", b"\x00\x00\x00\x01Bud1"),
    ]
    result = upload(tmp_path, files)
    names = [a.filename for a in result.accepted]
    assert names[:4] == ["evil.png", "win.png", "nulbyte.png", "rtlgnp.exe.png"]
    assert names[4].endswith(".png") and names[4].startswith("xxx") and len(names[4].encode()) <= 150
    assert len(names) == 5
    assert any("skipped 2 hidden/system files" in n and "._hidden.png" in n for n in result.notes)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cat.png", "cat.png"),
        ("../../etc/passwd", "passwd"),
        ("/abs/path/x.jpg", "x.jpg"),
        ("dir\\sub\\y.webp", "y.webp"),
        ("a\x00b\x1f.png", "ab.png"),
        ("..", "unnamed"),
        ("", "unnamed"),
        ("  .hidden.png ", "hidden.png"),
        ('a<b>c:"d|e?f*.png', "a_b_c__d_e_f_.png"),
        ("CON.png", "_CON.png"),
        ("trailing. . .", "trailing"),
        ("tab\tand  spaces.png", "tab and spaces.png"),
    ],
)
def test_sanitize_filename(raw: str, expected: str) -> None:
    assert sanitize_filename(raw) == expected


def test_sanitize_filename_caps_length_and_keeps_the_extension() -> None:
    name = sanitize_filename("é" * 300 + ".jpeg")
    assert name.endswith(".jpeg") and len(name.encode()) <= 150
    name.encode().decode("utf-8")


# --------------------------------------------------------------------------------------------------------------------
# every rejection names its file


def test_every_rejection_message_names_the_offending_file(tmp_path: Path) -> None:
    archive = zip_bytes([("../up.png", image_bytes()), ("in/bad.jpg", b"nope"), ("in/ok.png", image_bytes())])
    files = [(name, data) for name, data, _ in BAD_FILES] + [
        ("photos.zip", archive),
        ("bomb.png", pixel_bomb_png(50_000, 50_000)),
        ("ok.png", image_bytes()),
    ]
    result = upload(tmp_path, files, UploadLimits(max_file_bytes=2000))
    assert [a.filename for a in result.accepted] == ["ok.png", "ok-2.png"]
    expected = {name for name, _, _ in BAD_FILES} | {"photos.zip/../up.png", "photos.zip/in/bad.jpg", "bomb.png"}
    assert {r.filename for r in result.rejected} == expected
    for rejection in result.rejected:
        message = str(rejection)
        assert message.startswith(rejection.filename + ": ")
        assert rejection.reason and rejection.filename not in ("", "(unnamed)")
