"""DreamBooth class-prior preservation: class images from the base model, the prior loss term, exact resumption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.builtin import build_pipeline
from tests.training.conftest import Recorder, lora_config
from training.base import JobCancelled, TrainResult
from training.data import ImageCaptionDataset
from training.methods.lora import LoRA
from training.prior import CLASS_IMAGE_DIR, MANIFEST, class_image_seed, generate_class_images
from training.trainer import Trainer, checkpoint_dirs

RESOLUTION = 32
CLASS_PROMPT = "a photo of a dog"
PRIOR = {"prior_preservation": True, "class_prompt": CLASS_PROMPT, "num_class_images": 3, "class_image_steps": 2,
         "resolution": RESOLUTION}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(pipe, records, work_dir=None, callback=None, resume_from=None, keep_adapter=False,
           kind="subject", **overrides: Any) -> tuple[Trainer, TrainResult]:
    cfg = lora_config(**{"resolution": RESOLUTION, **overrides})
    trainer = Trainer(LoRA(cfg), pipe, ImageCaptionDataset(records, RESOLUTION), cfg, "sks",
                      callback or Recorder(), work_dir, kind=kind, keep_adapter=keep_adapter)
    return trainer, trainer.run(resume_from)


def _base_image(pipe, index: int, seed: int = 0) -> np.ndarray:
    generator = torch.Generator().manual_seed(class_image_seed(seed, index))
    image = pipe(CLASS_PROMPT, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, generator=generator)
    return np.asarray(image.images[0])


def _saved_class_images(work_dir: Path) -> list[np.ndarray]:
    folder = work_dir / CLASS_IMAGE_DIR
    count = json.loads((folder / MANIFEST).read_text())["count"]
    return [np.asarray(Image.open(folder / f"class-{i:05d}.png").convert("RGB")) for i in range(count)]


def test_class_images_are_deterministic_and_come_from_the_base(pipe, records, tmp_path: Path) -> None:
    pipe.set_progress_bar_config(disable=True)
    first = generate_class_images(pipe, CLASS_PROMPT, 2, 0, RESOLUTION, 2)
    again = generate_class_images(pipe, CLASS_PROMPT, 2, 0, RESOLUTION, 2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))  # each image has its own seed
    assert not np.array_equal(np.asarray(first[0]), np.asarray(generate_class_images(
        pipe, CLASS_PROMPT, 1, 1, RESOLUTION, 2)[0]))  # and they follow the run's seed
    base = [_base_image(pipe, i) for i in range(3)]

    method_trainer, _ = _train(pipe, records, tmp_path, keep_adapter=True, max_steps=3, learning_rate=5e-2,
                               **PRIOR)
    try:
        tuned = [_base_image(pipe, i) for i in range(3)]  # the same calls with the trained adapter active
    finally:
        method_trainer.method.remove()
    saved = _saved_class_images(tmp_path)
    assert len(saved) == 3 and all(s.shape == (RESOLUTION, RESOLUTION, 3) for s in saved)
    assert all(np.array_equal(s, b) for s, b in zip(saved, base, strict=True))
    assert any(not np.array_equal(s, t) for s, t in zip(saved, tuned, strict=True))  # the adapter would show


def _count_unet_samples(pipe) -> tuple[list[int], Any]:
    """Batch sizes of the training UNet calls (per-sample timesteps; sampling passes one timestep)."""
    sizes: list[int] = []

    def count(_module, args) -> None:
        if args[1].ndim == 1:
            sizes.append(int(args[0].shape[0]))

    return sizes, pipe.unet.register_forward_pre_hook(count)


def test_the_class_batch_joins_every_step_and_its_loss_is_weighted(pipe, records, tmp_path: Path) -> None:
    runs: dict[str, tuple[list[int], list[float]]] = {}
    settings = {"max_steps": 1, "batch_size": 2}
    for label, extra in [("off", {}), ("w0", {**PRIOR, "prior_loss_weight": 0.0}),
                         ("w1", {**PRIOR, "prior_loss_weight": 1.0}), ("w2", {**PRIOR, "prior_loss_weight": 2.0})]:
        sizes, handle = _count_unet_samples(pipe)
        try:
            _, result = _train(pipe, records, tmp_path / "work", **settings, **{"resolution": RESOLUTION, **extra})
        finally:
            handle.remove()
        runs[label] = (sizes, result.losses)
    assert runs["off"][0] == [2]
    assert runs["w0"][0] == runs["w1"][0] == [4]  # the subject batch plus as many class images
    off, w0, w1, w2 = (runs[k][1][0] for k in ("off", "w0", "w1", "w2"))
    assert w0 == pytest.approx(off, rel=1e-5)  # the subject half is the same draw as without prior preservation
    prior_term = w1 - w0
    assert prior_term > 1e-4
    assert w2 - w0 == pytest.approx(2 * prior_term, rel=1e-4)


def test_resume_with_prior_preservation_is_exact(pipe, records, tmp_path: Path) -> None:
    settings = {**PRIOR, "max_steps": 5, "flip": True, "learning_rate": 1e-3, "noise_offset": 0.05}
    _, full = _train(pipe, records, tmp_path / "a", **settings)

    work = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(pipe, records, work, Recorder(crash_at=3), checkpoint_every=1, **settings)
    folder = work / CLASS_IMAGE_DIR
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(stamps) == 4  # three PNGs and the manifest
    rec = Recorder()
    _, resumed = _train(pipe, records, work, rec, resume_from=checkpoint_dirs(work)[-1], checkpoint_every=1,
                        **settings)
    assert [s[0] for s in rec.steps] == [3, 4, 5]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # reused, not regenerated
    assert resumed.losses == full.losses
    assert resumed.tensors.keys() == full.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], full.tensors[k]) for k in full.tensors)


def test_changed_class_images_refuse_to_resume(pipe, records, tmp_path: Path) -> None:
    settings = {**PRIOR, "max_steps": 3}
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(pipe, records, tmp_path, Recorder(crash_at=2), checkpoint_every=1, **settings)
    png = tmp_path / CLASS_IMAGE_DIR / "class-00000.png"
    Image.new("RGB", (RESOLUTION, RESOLUTION), (255, 0, 0)).save(png)
    with pytest.raises(ValueError, match="class images .* differ"):
        _train(pipe, records, tmp_path, resume_from=checkpoint_dirs(tmp_path)[-1], **settings)


def test_lost_class_images_are_made_again_by_the_base(pipe, records, tmp_path: Path) -> None:
    """Resuming regenerates missing class images before the checkpoint's trained adapter is loaded, so they match."""
    settings = {**PRIOR, "max_steps": 3, "learning_rate": 5e-2}
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(pipe, records, tmp_path, Recorder(crash_at=3), checkpoint_every=1, **settings)
    before = _saved_class_images(tmp_path)
    shutil.rmtree(tmp_path / CLASS_IMAGE_DIR)
    _, resumed = _train(pipe, records, tmp_path, resume_from=checkpoint_dirs(tmp_path)[-1], **settings)
    assert resumed.steps_done == 3
    assert all(np.array_equal(b, a) for b, a in zip(before, _saved_class_images(tmp_path), strict=True))


def test_checkpoints_from_before_prior_preservation_still_resume(pipe, records, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(pipe, records, tmp_path, Recorder(crash_at=2), checkpoint_every=1, max_steps=3)
    state = checkpoint_dirs(tmp_path)[-1] / "state.json"
    info = json.loads(state.read_text())
    new_fields = ("prior_preservation", "class_prompt", "num_class_images", "prior_loss_weight", "class_image_steps")
    info["config"] = {k: v for k, v in info["config"].items() if k not in new_fields}
    del info["class_images"]
    state.write_text(json.dumps(info))
    _, resumed = _train(pipe, records, tmp_path, resume_from=state.parent, max_steps=3)
    assert resumed.steps_done == 3
    with pytest.raises(ValueError, match="changed settings: .*class_prompt.*prior_preservation"):
        _train(pipe, records, tmp_path, resume_from=state.parent, max_steps=3, **PRIOR)


def test_other_class_settings_regenerate_the_images(pipe, records, tmp_path: Path) -> None:
    _train(pipe, records, tmp_path, max_steps=1, **PRIOR)
    before = _saved_class_images(tmp_path)
    _train(pipe, records, tmp_path, max_steps=1, **{**PRIOR, "class_prompt": "a photo of a cat"})
    after = _saved_class_images(tmp_path)
    assert json.loads((tmp_path / CLASS_IMAGE_DIR / MANIFEST).read_text())["prompt"] == "a photo of a cat"
    assert not any(np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def test_prior_preservation_on_sdxl(records) -> None:
    """SDXL's pooled text embeddings get the class prompt's row for the class half of the batch."""
    pipe = build_pipeline(arch="sdxl")
    pipe.set_progress_bar_config(disable=True)
    seen: list[torch.Tensor] = []

    def grab(_module, args, kwargs) -> None:
        if args[1].ndim == 1:  # training passes per-sample timesteps; sampling the class images passes one
            seen.append(kwargs["added_cond_kwargs"]["text_embeds"].detach().clone())

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _, result = _train(pipe, records, max_steps=1, batch_size=1, **{**PRIOR, "num_class_images": 1})
    finally:
        handle.remove()
    with torch.no_grad():
        pooled = pipe.encode_prompt(prompt=[CLASS_PROMPT], device="cpu", do_classifier_free_guidance=False)[2]
    assert len(seen) == 1 and seen[0].shape[0] == 2 and torch.isfinite(torch.tensor(result.losses)).all()
    assert torch.allclose(seen[0][1], pooled[0]) and not torch.allclose(seen[0][0], pooled[0])


def test_cancel_while_generating_class_images(pipe, records, tmp_path: Path) -> None:
    with pytest.raises(JobCancelled, match="class image 1 of 3"):
        _train(pipe, records, tmp_path, Recorder(stop_after=0), **PRIOR)
    assert not (tmp_path / CLASS_IMAGE_DIR).exists()  # an incomplete set is never saved


def test_prior_preservation_is_for_subjects_and_needs_a_class_prompt(pipe, records) -> None:
    with pytest.raises(ValueError, match="prior_preservation only applies to subjects"):
        _train(pipe, records, kind="style", **PRIOR)
    with pytest.raises(ValueError, match="class_prompt is required"):
        lora_config(prior_preservation=True)
    with pytest.raises(ValueError, match="prior_loss_weight must be >= 0"):
        lora_config(**PRIOR, prior_loss_weight=-1)
