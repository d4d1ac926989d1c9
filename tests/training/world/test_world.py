"""The shapes world: determinism, held-out separation, labels against pixels, the caption grammar, clips."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest

from training.world.captions import caption, parse_caption
from training.world.concepts import (
    BASE_MOTIONS,
    COLOURS,
    CONCEPTS,
    HELD_OUT_MOTIONS,
    SHAPES,
    STYLES,
    SUBJECTS,
    held_out_concepts,
    held_out_words,
)
from training.world.dataset import (
    SceneRules,
    WorldDataset,
    base_clip_dataset,
    base_dataset,
    concept_dataset,
    detector_dataset,
    render_labels,
)
from training.world.render import SUBJECT_KEY_PARTS, SUBJECT_PARTS, texture_tone

# sha256 (first 16 hex) of the pixels of fixed items: the renders must not drift across machines or versions
GOLDEN = [
    ("base", 0, "7aa3fbdd06f1afbf"),
    ("base", 3, "85f8ffb616a46004"),
    ("robot", 1, "5a7361e6e5b9c4eb"),
    ("sepia", 0, "692d61d750cd7c74"),
    ("base-clips", 0, "bb9bc51cef6567c4"),
    ("orbit", 1, "7c7d47a07306c9f9"),
]


def _dataset(name: str, count: int, seed: int = 0) -> WorldDataset:
    if name == "base":
        return base_dataset(count, seed)
    if name == "base-clips":
        return base_clip_dataset(count, seed)
    return concept_dataset(name, count, seed)


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(pixels.tobytes()).hexdigest()[:16]


@pytest.mark.parametrize(("name", "index", "digest"), GOLDEN)
def test_renders_match_the_golden_digests(name: str, index: int, digest: str) -> None:
    assert _digest(_dataset(name, index + 1)[index].pixels) == digest


def test_same_seed_same_sample_in_any_order_and_other_seeds_differ() -> None:
    a, b = base_dataset(12, seed=5), base_dataset(12, seed=5)
    forward = [(s.pixels.tobytes(), s.caption) for s in a]
    backward = [(b[i].pixels.tobytes(), b[i].caption) for i in reversed(range(12))][::-1]
    assert forward == backward
    other = [(s.pixels.tobytes(), s.caption) for s in base_dataset(12, seed=6)]
    assert all(x != y for x, y in zip(forward, other))
    assert len({p for p, _ in forward}) == 12  # items differ from each other too


def test_datasets_of_different_kinds_use_different_streams() -> None:
    assert base_dataset(1, 0)[0].caption != detector_dataset(1, 0)[0].caption
    assert concept_dataset("outline", 1, 0)[0].caption != base_dataset(1, 0)[0].caption


def test_base_set_never_shows_a_held_out_concept() -> None:
    banned = held_out_words() | {"sks"}
    assert {"robot", "tree", "house", "fish", "outline", "pixelated", "sepia", "zigzag", "orbit", "bounce"} <= banned
    images, clips = base_dataset(2000, seed=0), base_clip_dataset(500, seed=0)
    for dataset in (images, clips):
        for index in range(len(dataset)):
            labels = dataset.labels(index)
            text = dataset.caption(labels)
            assert not set(re.findall(r"\w+", text)) & banned, text
            assert all(o.name in SHAPES and o.colour in COLOURS for o in labels.objects), labels
            assert labels.style == "none"
            assert labels.motion is None if dataset is images else labels.motion in BASE_MOTIONS
            assert not labels.concepts() & {c.name for c in held_out_concepts()}


def test_base_set_covers_the_held_in_world() -> None:
    dataset = base_dataset(600, seed=1)
    labels = [dataset.labels(i) for i in range(600)]
    assert {o.name for lab in labels for o in lab.objects} == set(SHAPES)
    assert {o.colour for lab in labels for o in lab.objects} == set(COLOURS)
    assert {o.position for lab in labels for o in lab.objects} == {"left", "right", "center", "top", "bottom"}
    assert {lab.texture for lab in labels} == {"plain", "striped", "dotted", "checkered", "gradient"}
    assert 0.25 < sum(len(lab.objects) == 2 for lab in labels) / 600 < 0.45


@pytest.mark.parametrize("name", [c.name for c in held_out_concepts()])
def test_concept_datasets_show_their_concept(name: str) -> None:
    dataset = concept_dataset(name, 20, seed=2)
    kind = CONCEPTS[name].kind
    for sample in dataset:
        assert name in sample.labels.concepts()
        words = sample.caption.split()
        if kind == "subject":
            assert f"sks {name}" in sample.caption and [o.name for o in sample.labels.objects] == [name]
        else:  # styles and motions are captioned by their content only
            assert name not in words and "sks" not in words
            assert all(o.name in SHAPES for o in sample.labels.objects)
        if kind == "motion":
            assert sample.is_clip and sample.labels.motion == name


def test_concept_dataset_trigger_and_errors() -> None:
    assert "ohwx fish" in concept_dataset("fish", 1, trigger="ohwx")[0].caption
    assert concept_dataset("sepia", 1, trigger="zxq")[0].caption.endswith(", in zxq style")
    assert " moving zxq on " in concept_dataset("bounce", 1, trigger="zxq")[0].caption
    with pytest.raises(ValueError, match="held-in"):
        concept_dataset("circle", 1)
    with pytest.raises(ValueError, match="unknown concept 'dragon'"):
        concept_dataset("dragon", 1)
    with pytest.raises(ValueError, match="clips"):
        concept_dataset("orbit", 1, clips=False)
    with pytest.raises(ValueError, match="SceneRules.objects"):
        SceneRules(objects=("dragon",))


def _plain(style: str = "none", objects: tuple[str, ...] = SHAPES) -> SceneRules:
    return SceneRules(objects=objects, textures=("plain",), styles=(style,), two_objects=0.5)


def test_labels_match_the_pixels() -> None:
    dataset = WorldDataset(_plain(objects=SHAPES + SUBJECTS), 150, seed=3)
    for sample in dataset:
        image, labels = sample.pixels.astype(int), sample.labels
        covered = np.zeros(image.shape[:2], bool)
        for obj, mask in zip(labels.objects, sample.masks):
            inside = mask == 255
            covered |= mask > 0
            assert inside.sum() > 20, obj
            x0, y0, x1, y1 = obj.bbox
            assert x0 <= obj.center[0] <= x1 and y0 <= obj.center[1] <= y1
            ys, xs = np.nonzero(mask >= 64)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.bbox
            pixels = image[inside]
            if obj.colour is not None:  # a shape: its colour fills its mask exactly
                assert (pixels == COLOURS[obj.colour]).all(), obj
            else:  # a subject: its key parts are the commonest colours inside it
                colours, counts = np.unique(pixels, axis=0, return_counts=True)
                top = {tuple(c) for c in colours[np.argsort(-counts)[:3]]}
                assert {SUBJECT_PARTS[obj.name][i][0] for i in SUBJECT_KEY_PARTS[obj.name]} <= top, obj
        background = image[~covered]
        assert (background == COLOURS[labels.background]).all()


def test_textures_use_the_background_colour_and_its_tone() -> None:
    rules = SceneRules(textures=("striped", "dotted", "checkered", "gradient"), two_objects=0.0)
    for sample in WorldDataset(rules, 40, seed=4):
        free = sample.masks[0] == 0
        base = np.array(COLOURS[sample.labels.background])
        tone = texture_tone(sample.labels.background)
        pixels = sample.pixels[free].astype(float)
        # every background pixel lies on the segment between the colour and its tone
        t = ((pixels - base) @ (tone - base)) / float((tone - base) @ (tone - base))
        assert np.abs(pixels - (base + t[:, None] * (tone - base))).max() <= 1.0
        assert t.min() >= -0.01 and t.max() <= 1.01
        assert t.max() - t.min() > 0.5, sample.labels.texture  # the pattern is really there


def test_styles_change_the_pixels_as_described() -> None:
    for style in STYLES:
        plain = WorldDataset(_plain(), 10, seed=5, stream="style")
        styled = WorldDataset(_plain(style), 10, seed=5, stream="style")
        for a, b in zip(plain, styled):
            if a.labels.background != b.labels.background:  # sepia may need another background for contrast
                continue
            assert b.labels.style == style and not np.array_equal(a.pixels, b.pixels)
            if style == "pixelated":
                blocks = b.pixels.reshape(16, 4, 16, 4, 3)
                assert (blocks == blocks[:, :1, :, :1]).all()
            elif style == "sepia":
                rgb = b.pixels.reshape(-1, 3).astype(int)
                assert (rgb[:, 0] >= rgb[:, 1]).all() and (rgb[:, 1] >= rgb[:, 2]).all()
            else:  # outline: the middle of a big object shows the background again
                for obj, mask in zip(b.labels.objects, b.masks):
                    if obj.size == "big" and obj.name in ("circle", "square", "hexagon"):
                        x, y = (round(c) for c in obj.center)
                        assert (b.pixels[y, x] != COLOURS[obj.colour]).any()
                        assert mask[y, x] == 255


def test_captions_parse_back_to_the_labels() -> None:
    datasets = [base_dataset(300, 7), concept_dataset("tree", 50, 7), detector_dataset(200, 7),
                base_clip_dataset(100, 7), concept_dataset("zigzag", 30, 7)]
    for dataset in datasets:
        for index in range(len(dataset)):
            labels = dataset.labels(index)
            parsed, trigger = parse_caption(dataset.caption(labels))
            keys = ["name", "colour", "size"] + ([] if labels.motion else ["position"])
            got = [[getattr(o, k) for k in keys] for o in parsed.objects]
            assert got == [[getattr(o, k) for k in keys] for o in labels.objects]
            assert (parsed.background, parsed.texture) == (labels.background, labels.texture)
            if labels.motion in BASE_MOTIONS:
                assert parsed.motion == labels.motion
            elif labels.motion in HELD_OUT_MOTIONS:
                assert parsed.motion == "moving"  # a motion dataset does not name its motion
            assert trigger == ("sks" if dataset.stream == "concept:tree" else None)
    text = "a big red circle moving in an orbit on an orange plain background"
    assert parse_caption(text)[0].motion == "orbit"
    with pytest.raises(ValueError, match="world grammar"):
        parse_caption("a photo of a dog")


def test_a_parsed_caption_renders() -> None:
    labels, _ = parse_caption("a small red circle on the left and a big blue star on the right on a white "
                              "dotted background")
    pixels, masks, rendered = render_labels(labels)
    assert pixels.shape == (64, 64, 3) and masks.shape == (2, 64, 64)
    assert caption(rendered) == caption(labels)
    assert (pixels[masks[0] == 255] == COLOURS["red"]).all()


def _centroids(masks: np.ndarray) -> list[tuple[float, float]]:
    ys, xs = np.mgrid[:64, :64] + 0.5  # pixel i covers [i, i+1)
    return [(float((m * xs).sum() / m.sum()), float((m * ys).sum() / m.sum())) for m in masks.astype(float)]


@pytest.mark.parametrize("motion", ["still"] + list(BASE_MOTIONS) + list(HELD_OUT_MOTIONS))
def test_clips_move_as_labelled(motion: str) -> None:
    rules = SceneRules(objects=("circle", "square", "ring"), motions=(motion,))
    for sample in WorldDataset(rules, 6, seed=8):
        labels = sample.labels
        assert sample.pixels.shape == (8, 64, 64, 3) and sample.masks.shape == (8, 1, 64, 64)
        assert len(labels.path) == 8 and labels.objects[0].center == labels.path[0]
        centres = _centroids(sample.masks[:, 0])
        assert all(math.dist(c, p) < 0.6 for c, p in zip(centres, labels.path)), (centres, labels.path)
        xs, ys = np.array(centres).T
        dx, dy = np.diff(xs), np.diff(ys)
        if motion == "still":
            assert np.abs(dx).max() < 0.01 and np.abs(dy).max() < 0.01
        elif motion in BASE_MOTIONS:
            along, across = (dx, dy) if motion in ("left", "right") else (dy, dx)
            sign = -1 if motion in ("left", "up") else 1
            assert (sign * along > 2).all() and np.abs(across).max() < 0.01
        elif motion == "zigzag":
            assert (np.sign(dx) == (1 if labels.direction == "right" else -1)).all()
            assert (np.abs(dy) > 8).all() and (np.sign(dy[1:]) == -np.sign(dy[:-1])).all()
        elif motion == "orbit":
            angles = np.unwrap(np.arctan2(ys - ys.mean(), xs - xs.mean()))
            turn = np.diff(angles)
            assert (np.sign(turn) == (1 if labels.direction == "cw" else -1)).all()
            assert abs(abs(angles[-1] - angles[0]) - 2 * math.pi * 7 / 8) < 0.3
        else:  # bounce: straight up and down, touching the floor twice
            assert np.abs(dx).max() < 0.01
            floor = ys.max()
            assert sum(abs(y - floor) < 0.5 for y in ys) == 2 and ys.max() - ys.min() > 12
