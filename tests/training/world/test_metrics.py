"""The benchmark's measures on rendered ground truth: the asked scene scores 1, another subject 0, copies no
diversity."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from training.world.captions import parse_caption
from training.world.dataset import render_labels
from training.world.detectors import detect
from training.world.metrics import (
    alignment_parts,
    all_concepts,
    composition_scores,
    concept_parts,
    layout,
    layout_diversity,
    pixel_diversity,
    prompt_alignment,
    rate,
    subject_fidelity,
    subject_scores,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a big sks robot on the left on a blue plain background"
PAIR = "a big sks robot on the left and a big ohwx tree on the right on a yellow plain background"


def render(text: str, style: str = "none") -> np.ndarray:
    return render_labels(replace(parse_caption(text)[0], style=style))[0]


def asked(text: str, style: str = "none"):
    return replace(parse_caption(text)[0], style=style)


def test_a_render_of_the_asked_scene_scores_one() -> None:
    pixels = render(PROMPT)
    seen = detect([pixels])[0]
    assert subject_fidelity(asked(PROMPT), seen)
    assert prompt_alignment(asked(PROMPT), seen)
    scores = subject_scores([asked(PROMPT)], [pixels[None]], [[seen]])
    assert scores["fidelity"] == scores["alignment"] == scores["background"] == scores["position"] == 1.0


def test_a_render_of_another_subject_scores_zero() -> None:
    pixels = render(PROMPT.replace("robot", "tree"))
    seen = detect([pixels])[0]
    assert not subject_fidelity(asked(PROMPT), seen)
    assert not prompt_alignment(asked(PROMPT), seen)
    assert alignment_parts(asked(PROMPT), seen) == {"background": True, "position": False, "aligned": False}
    scores = subject_scores([asked(PROMPT)], [pixels[None]], [[seen]])
    assert scores["fidelity"] == scores["alignment"] == 0.0


def test_the_subject_elsewhere_is_faithful_but_not_aligned() -> None:
    pixels = render("a big sks robot on the right on a red striped background")
    seen = detect([pixels])[0]
    assert subject_fidelity(asked(PROMPT), seen)
    assert alignment_parts(asked(PROMPT), seen) == {"background": False, "position": False, "aligned": False}


def test_shapes_must_also_have_the_asked_colour() -> None:
    text = "a small red star at the top on a white dotted background"
    seen = detect([render(text)])[0]
    assert prompt_alignment(asked(text), seen)
    other_colour = text.replace("red", "green")
    assert subject_fidelity(asked(other_colour), seen)  # the shape is there, by name
    assert not prompt_alignment(asked(other_colour), seen)


def test_identical_images_have_no_diversity() -> None:
    pixels = render(PROMPT)
    seen = detect([pixels])[0]
    assert pixel_diversity(np.stack([pixels] * 3)) == 0.0
    assert layout_diversity([seen] * 3) == 0.0
    scores = subject_scores([asked(PROMPT)], [np.stack([pixels] * 2)], [[seen, seen]])
    assert scores["pixel_diversity"] == scores["layout_diversity"] == 0.0


def test_different_images_are_diverse() -> None:
    black, white = np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)
    assert pixel_diversity([black, white]) == pytest.approx(1.0)
    assert pixel_diversity([black, white, black]) == pytest.approx(2 / 3)
    images = [render(PROMPT), render(PROMPT.replace("left", "right")), render(PROMPT.replace("blue", "red"))]
    seen = detect(images)
    assert len({layout(s) for s in seen}) == 3
    assert layout_diversity(seen) == 1.0
    assert layout_diversity(seen[:1]) == 0.0 and pixel_diversity(images[:1]) == 0.0


def test_all_concepts_needs_every_subject_the_style_and_the_background() -> None:
    want = asked(PAIR, style="pixelated")
    styled, plain = detect([render(PAIR, "pixelated"), render(PAIR)])
    assert all_concepts(want, styled)
    assert concept_parts(want, plain) == {"subjects": True, "style": False, "background": True}
    one_subject = detect([render(PAIR.replace(" and a big ohwx tree on the right", ""), "pixelated")])[0]
    assert concept_parts(want, one_subject)["subjects"] is False
    wrong_background = detect([render(PAIR.replace("yellow", "blue"), "pixelated")])[0]
    assert concept_parts(want, wrong_background) == {"subjects": True, "style": True, "background": False}
    assert all_concepts(asked(PAIR), plain)  # no style asked: none is required
    scores = composition_scores([want, want], [styled, plain])
    assert scores == {"all_concepts": 0.5, "subjects": 1.0, "style": 0.5, "background": 1.0}


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="N x H x W x 3"):
        pixel_diversity(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="one entry per prompt"):
        subject_scores([asked(PROMPT)], [], [])
    with pytest.raises(ValueError, match="one asked scene per image"):
        composition_scores([asked(PROMPT)], [])
    assert np.isnan(rate([]))
