"""Use case: render shapes-world datasets to folders, and list the world's concepts (``lorastudio world``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from training.world.concepts import COLOUR_NAMES, CONCEPTS, POSITION_NAMES, SIZE_NAMES, STYLE_CLASSES, TEXTURES
from training.world.dataset import WorldDataset, base_clip_dataset, base_dataset, concept_dataset

GIF_FRAME_MS = 125


@dataclass(frozen=True)
class RenderSummary:
    out: Path
    count: int
    dataset: str  # "base", "base-clips" or "concept:NAME[:clips]"
    clips: bool


def list_concepts() -> list[dict[str, object]]:
    """Every concept of the world: name, kind (shape/subject/style/motion), held_out, description."""
    return [{"name": c.name, "kind": c.kind, "held_out": c.held_out, "description": c.description}
            for c in CONCEPTS.values()]


def world_attributes() -> dict[str, list[str]]:
    """The held-in attributes every scene draws from (captions use these words)."""
    return {"colours": list(COLOUR_NAMES), "sizes": list(SIZE_NAMES), "positions": list(POSITION_NAMES),
            "textures": list(TEXTURES), "styles": list(STYLE_CLASSES)}


def world_dataset(count: int, seed: int = 0, concept: str | None = None, clips: bool = False,
                  trigger: str | None = None) -> WorldDataset:
    """The base set (held-in only) when ``concept`` is None, else the dataset of held-out ``concept``."""
    if concept is None:
        if trigger:
            raise ValueError("--trigger needs --concept: the base set has no held-out concept to name")
        return base_clip_dataset(count, seed) if clips else base_dataset(count, seed)
    return concept_dataset(concept, count, seed, trigger=trigger, clips=clips or None)


def render_world(out: str | os.PathLike[str], count: int, seed: int = 0, concept: str | None = None,
                 clips: bool = False, trigger: str | None = None) -> RenderSummary:
    """Write ``count`` renders to ``out``: ``00000.png`` (``.gif`` for a clip) with a kohya-style ``00000.txt``
    caption each, and ``labels.jsonl`` (one line per render: file, caption, index, seed, labels)."""
    if count < 1:
        raise ValueError(f"--count must be >= 1, got {count}")
    dataset = world_dataset(count, seed, concept, clips, trigger)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "labels.jsonl", "w", encoding="utf-8") as lines:
        for sample in dataset:
            stem = f"{sample.index:05d}"
            if sample.is_clip:
                name = f"{stem}.gif"
                first, *rest = sample.frames
                first.save(folder / name, save_all=True, append_images=rest, duration=GIF_FRAME_MS, loop=0)
            else:
                name = f"{stem}.png"
                sample.image.save(folder / name)
            (folder / f"{stem}.txt").write_text(sample.caption + "\n", encoding="utf-8")
            record = {"file": name, "caption": sample.caption, "index": sample.index, "seed": seed,
                      "dataset": dataset.stream, "labels": sample.labels.to_dict()}
            lines.write(json.dumps(record) + "\n")
    return RenderSummary(out=folder, count=count, dataset=dataset.stream, clips=dataset.rules.clips)
