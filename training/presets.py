"""Starting settings per method and kind of concept, shown in the Train tab and used by ``--preset`` in the CLI.

A preset is a partial config: it only names the settings that differ from the method's own defaults for that kind
of concept. Subjects keep flips off (subjects can be asymmetric) and learn from a trigger word; styles are captioned
without a trigger, flip freely and favour a larger update. Values follow ``../shared/reference/methods.md`` where
the reference gives them, scaled to the step counts that suit small datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from training.base import METHODS


@dataclass(frozen=True)
class Preset:
    method: str
    kind: str
    summary: str
    settings: dict[str, Any] = field(default_factory=dict)


_PRESETS: dict[tuple[str, str], Preset] = {}


def _add(method: str, kind: str, summary: str, **settings: Any) -> None:
    _PRESETS[(method, kind)] = Preset(method, kind, summary, settings)


_add("lora", "subject", "Subject: rank 8, no flips, 400 steps", rank=8, max_steps=400, flip=False)
_add("lora", "style", "Style: rank 16, flips on, 600 steps", rank=16, max_steps=600, flip=True)
_add("tlora", "subject", "Single-image subject: full rank on clean steps, half rank on noisy ones, so the one "
     "image's layout does not leak into every prompt; batch 1, 400 steps",
     rank=8, min_rank=4, max_steps=400, batch_size=1, flip=False)
_add("tlora", "style", "Style: rank 16 shrinking to 8 on noisy steps, flips on, 600 steps",
     rank=16, min_rank=8, max_steps=600, flip=True)
_add("orthogonal", "subject", "Subject that merges with other orthogonal concepts: rank 4 on its own basis slice, "
     "400 steps", rank=4, max_steps=400, flip=False)
_add("orthogonal", "style", "Style that merges with other orthogonal concepts: rank 4, flips on, 600 steps",
     rank=4, max_steps=600, flip=True)
_add("scedit", "subject", "Subject: full-width skip tuners, 400 steps", down_ratio=1.0, max_steps=400, flip=False)
_add("scedit", "style", "Style (SCEdit's home ground): full-width skip tuners, flips on, 600 steps",
     down_ratio=1.0, max_steps=600, flip=True)
_add("motion_director", "motion", "Motion on the built-in tiny video model: rank 8, 8-frame clips, 300 steps",
     rank=8, num_frames=8, max_steps=300, flip=False)


def preset_for(method: str, kind: str) -> Preset:
    """The preset of ``method`` for ``kind``; the method's plain defaults when none is defined."""
    METHODS.get(method)  # unknown method: KeyError naming the known ones
    return _PRESETS.get((method, kind), Preset(method, kind, "Method defaults"))


def preset_config(method: str, kind: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full, validated config of ``method`` for ``kind``: defaults, then the preset, then ``overrides``."""
    cls = METHODS.get(method).config_cls
    settings = {**preset_for(method, kind).settings, **(overrides or {})}
    return cls.from_dict(settings).to_dict()


def presets() -> list[Preset]:
    """Every defined preset whose method is registered."""
    return [p for key, p in sorted(_PRESETS.items()) if key[0] in METHODS]
