"""Class images for DreamBooth class-prior preservation (Ruiz et al., 2023, https://arxiv.org/abs/2208.12242, §3.3).

Before the adapter exists, the frozen base model draws ``count`` images of the class prompt (e.g. "a photo of a
dog"). Training then adds, at every step, a batch of these images under the class prompt to the subject batch, so
the adapter learns the subject without drifting the whole class towards it (the prior-preservation loss).

Each image has its own generator seed, derived from the run's seed and the image's index, so the set is the same
whatever the count or batching. With a work folder the images are kept there as PNGs (written to a temp folder and
renamed into place) together with what they were made from, so a resumed run trains on the very same pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLASS_IMAGE_DIR = "class_images"
MANIFEST = "manifest.json"
_FORMAT = 1


def class_image_seed(seed: int, index: int) -> int:
    """The generator seed of class image ``index`` of a run seeded ``seed``: independent streams per image."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0])


def generate_class_images(pipe: Any, prompt: str, count: int, seed: int, resolution: int, steps: int,
                          progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """``count`` images of ``prompt`` from ``pipe`` as it is now (call it before an adapter is added).

    Image ``i`` is ``pipe(prompt, ...)`` with a CPU generator seeded ``class_image_seed(seed, i)``, so the result
    depends only on the base model and these arguments. ``progress(done, count)`` is called after each image.
    """
    if count < 1:
        raise ValueError(f"num_class_images must be >= 1, got {count}")
    if not prompt.strip():
        raise ValueError("class_prompt is empty; name the subject's class, e.g. 'a photo of a dog'")
    images = []
    for i in range(count):
        generator = torch.Generator().manual_seed(class_image_seed(seed, i))
        with torch.inference_mode():
            out = pipe(prompt, num_inference_steps=steps, height=resolution, width=resolution, generator=generator)
        images.append(out.images[0].convert("RGB"))
        if progress is not None:
            progress(i + 1, count)
    return images


def base_fingerprint(pipe: Any) -> str:
    """A cheap identity of the base model: pipeline class, UNet config and the UNet's first and last weights."""
    unet = pipe.unet
    digest = hashlib.sha256(type(pipe).__name__.encode())
    digest.update(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    params = list(unet.parameters())
    for p in (params[0], params[-1]):
        digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def images_digest(images: Sequence[Image.Image]) -> str:
    """A hash of the images' pixels, to tell whether a resumed run sees the same class images."""
    digest = hashlib.sha256()
    for image in images:
        array = np.asarray(image.convert("RGB"))
        digest.update(f"{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _file_name(index: int) -> str:
    return f"class-{index:05d}.png"


def _load(folder: Path, spec: dict[str, Any]) -> list[Image.Image] | None:
    """The cached images if ``folder`` holds a complete set made from exactly ``spec``, else None."""
    try:
        if json.loads((folder / MANIFEST).read_text()) != spec:
            return None
        images = []
        for i in range(spec["count"]):
            with Image.open(folder / _file_name(i)) as img:
                images.append(img.convert("RGB"))
    except (OSError, ValueError):
        return None
    size = (spec["resolution"], spec["resolution"])
    return images if all(img.size == size for img in images) else None


def _save(folder: Path, spec: dict[str, Any], images: Sequence[Image.Image]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for i, image in enumerate(images):
            image.save(tmp / _file_name(i), format="PNG")
        (tmp / MANIFEST).write_text(json.dumps(spec, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_class_images(pipe: Any, prompt: str, count: int, seed: int, resolution: int, steps: int,
                 work_dir: str | os.PathLike[str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
    """The class images of a run: read from ``work_dir/class_images`` when made from the same settings and base
    model, else generated (see ``generate_class_images``) and, with a ``work_dir``, saved there."""
    spec = {"format": _FORMAT, "prompt": prompt, "count": int(count), "seed": int(seed),
            "resolution": int(resolution), "steps": int(steps), "base": base_fingerprint(pipe)}
    folder = Path(work_dir) / CLASS_IMAGE_DIR if work_dir is not None else None
    if folder is not None:
        cached = _load(folder, spec)
        if cached is not None:
            return cached
    images = generate_class_images(pipe, prompt, count, seed, resolution, steps, progress)
    if folder is not None:
        _save(folder, spec, images)
    return images
