"""The caption grammar of the shapes world, and its parser.

    caption  := objects [motion] " on a(n) " COLOUR " " TEXTURE " background" [", in " STYLE " style"]
    objects  := object " " PLACE | object " " PLACE " and " object " " PLACE | object   (clips: no PLACE)
    object   := "a " SIZE " " COLOUR " " SHAPE | "a " SIZE " " [TRIGGER " "] SUBJECT
    PLACE    := "on the left" | "on the right" | "in the center" | "at the top" | "at the bottom"
    motion   := " moving left|right|up|down" | " moving in a zigzag|in an orbit|with a bounce" | " moving [TRIGGER]"

e.g. "a small red circle on the left and a big green square on the right on a white plain background",
"a big sks robot at the top on a blue striped background", "a small red star moving up on a black dotted background".
"""

from __future__ import annotations

import re

from training.world.concepts import (
    BASE_MOTIONS,
    COLOUR_NAMES,
    HELD_OUT_MOTIONS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZE_NAMES,
    SUBJECTS,
    TEXTURES,
    Labels,
    ObjectLabel,
)

MOTION_PHRASES = {**{m: f"moving {m}" for m in BASE_MOTIONS},
                  "zigzag": "moving in a zigzag", "orbit": "moving in an orbit", "bounce": "moving with a bounce"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: ObjectLabel, trigger: str | None = None) -> str:
    """``a small red circle`` or ``a big sks robot`` (the trigger word only for a subject)."""
    if obj.kind == "subject":
        words = [obj.size, trigger, obj.name] if trigger else [obj.size, obj.name]
    else:
        words = [obj.size, obj.colour, obj.name]
    return "a " + " ".join(words)


def caption(labels: Labels, trigger: str | None = None, name_motion: bool = True,
            style_word: str | None = None) -> str:
    """The caption of ``labels``.

    ``trigger`` goes before a subject's name; for a clip whose motion is held out, ``name_motion`` says the motion
    in words and, when it is False, the motion is written ``moving`` followed by ``trigger`` (if any).
    ``style_word`` adds ", in WORD style" (styles are otherwise left out, as in a style dataset).
    """
    if labels.motion is None:
        parts = [f"{object_phrase(o, trigger)} {POSITION_PHRASES[o.position]}" for o in labels.objects]
        text = " and ".join(parts)
    else:
        text = " and ".join(object_phrase(o, trigger) for o in labels.objects)
        if labels.motion in HELD_OUT_MOTIONS and not name_motion:
            text += " moving" + (f" {trigger}" if trigger else "")
        elif labels.motion != "still":
            text += " " + MOTION_PHRASES[labels.motion]
    text += f" on {article(labels.background)} {labels.background} {labels.texture} background"
    if style_word:
        text += f", in {style_word} style"
    return text


_PLACE = {phrase: name for name, phrase in POSITION_PHRASES.items()}
_OBJECT = re.compile(
    r"a (?P<size>{sizes}) (?:(?P<colour>{colours}) (?P<shape>{shapes})|(?:(?P<trigger>\S+) )?(?P<subject>{subjects}))"
    r"(?: (?P<place>{places}))?".format(
        sizes="|".join(SIZE_NAMES), colours="|".join(COLOUR_NAMES), shapes="|".join(SHAPES),
        subjects="|".join(SUBJECTS), places="|".join(map(re.escape, _PLACE))))
_TAIL = re.compile(
    r"(?: (?P<motion>{motions}|moving(?: \S+)?))? on an? (?P<bg>{colours}) (?P<texture>{textures}) background"
    r"(?:, in (?P<style>\S+) style)?$".format(
        motions="|".join(map(re.escape, MOTION_PHRASES.values())), colours="|".join(COLOUR_NAMES),
        textures="|".join(TEXTURES)))


def parse_caption(text: str) -> tuple[Labels, str | None]:
    """Parse a caption of this grammar back to labels (nominal centres, no boxes) and its trigger word.

    An object without a place (as in a clip) parses as ``center``; a held-out motion written only as
    ``moving [TRIGGER]`` parses as motion ``"moving"``. Raises ``ValueError``
    naming the caption when it does not follow the grammar.
    """
    objects, trigger, pos = [], None, 0
    while True:
        match = _OBJECT.match(text, pos)
        if not match:
            raise ValueError(f"caption does not follow the world grammar: {text!r}")
        name = match["shape"] or match["subject"]
        place = _PLACE[match["place"]] if match["place"] else "center"
        trigger = trigger or match["trigger"]
        objects.append(ObjectLabel(name=name, colour=match["colour"], size=match["size"], position=place,
                                   center=POSITIONS[place]))
        pos = match.end()
        if text.startswith(" and ", pos):
            pos += len(" and ")
            continue
        break
    tail = _TAIL.match(text, pos)
    if not tail:
        raise ValueError(f"caption does not follow the world grammar: {text!r}")
    motion = direction = None
    if tail["motion"]:
        by_phrase = {phrase: m for m, phrase in MOTION_PHRASES.items()}
        motion = by_phrase.get(tail["motion"], "moving")
        if motion == "moving" and tail["motion"] != "moving":
            trigger = trigger or tail["motion"].split(" ", 1)[1]
        direction = motion if motion in BASE_MOTIONS else None
    style = tail["style"] or "none"  # a style named by a trigger word is kept as written
    return Labels(objects=tuple(objects), background=tail["bg"], texture=tail["texture"], style=style,
                  motion=motion, direction=direction), trigger
