"""``lorastudio world render`` and ``lorastudio world list``, in-process through ``app.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import cli
from training.world.dataset import base_dataset, concept_dataset


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_render_writes_images_captions_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["world", "render", "--out", str(tmp_path / "a"), "--count", "4", "--seed", "3"], capsys)
    assert code == 0 and "wrote 4 images of base (seed 3)" in out
    records = [json.loads(line) for line in (tmp_path / "a" / "labels.jsonl").read_text().splitlines()]
    expected = base_dataset(4, seed=3)
    assert [r["file"] for r in records] == [f"{i:05d}.png" for i in range(4)]
    for record, sample in zip(records, expected):
        assert (tmp_path / "a" / f"{record['index']:05d}.txt").read_text().strip() == sample.caption
        assert record["caption"] == sample.caption and record["labels"]["background"] == sample.labels.background
        with Image.open(tmp_path / "a" / record["file"]) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), sample.pixels)
    run(["world", "render", "--out", str(tmp_path / "b"), "--count", "4", "--seed", "3"], capsys)
    for name in ("00000.png", "00003.png", "labels.jsonl"):  # same seed, same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_render_a_concept_and_clips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["world", "render", "--out", str(tmp_path / "robot"), "--count", "2", "--concept", "robot",
                        "--trigger", "ohwx"], capsys)
    assert code == 0 and "concept:robot" in out
    expected = concept_dataset("robot", 2, trigger="ohwx")[1].caption
    assert (tmp_path / "robot" / "00001.txt").read_text().strip() == expected
    assert "ohwx robot" in (tmp_path / "robot" / "00000.txt").read_text()
    code, out, _ = run(["world", "render", "--out", str(tmp_path / "zz"), "--count", "2", "--concept", "zigzag"],
                       capsys)
    assert code == 0 and "2 clips" in out
    with Image.open(tmp_path / "zz" / "00000.gif") as gif:
        assert gif.n_frames == 8 and gif.size == (64, 64)
    record = json.loads((tmp_path / "zz" / "labels.jsonl").read_text().splitlines()[0])
    assert record["labels"]["motion"] == "zigzag" and len(record["labels"]["path"]) == 8
    code, out, _ = run(["world", "render", "--out", str(tmp_path / "c"), "--count", "1", "--clips"], capsys)
    assert code == 0 and (tmp_path / "c" / "00000.gif").is_file()


def test_render_refuses_bad_requests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["world", "render", "--out", str(tmp_path), "--concept", "dragon"], capsys)
    assert code == 2 and "unknown concept 'dragon'" in err
    code, _, err = run(["world", "render", "--out", str(tmp_path), "--concept", "circle"], capsys)
    assert code == 2 and "held-in" in err
    code, _, err = run(["world", "render", "--out", str(tmp_path), "--count", "0"], capsys)
    assert code == 2 and "--count" in err
    code, _, err = run(["world", "render", "--out", str(tmp_path), "--trigger", "sks"], capsys)
    assert code == 2 and "--concept" in err


def test_list_prints_held_in_and_held_out(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["world", "list"], capsys)
    assert code == 0
    held_in, held_out = out.split("held-out")
    assert "circle" in held_in and "robot" not in held_in
    for name in ("robot", "tree", "house", "fish", "outline", "pixelated", "sepia", "zigzag", "orbit", "bounce"):
        assert name in held_out
    assert "textures: plain, striped, dotted, checkered, gradient" in out
