"""Clips from the built-in ModelScope/ZeroScope-style model (``builtin:tiny-video3d``, a ``TextToVideoSDPipeline``):
the asked number of frames, and a MotionDirector adapter of that model applied through the runtime by its weight
(0 = the plain model); plus the normalising of the frame layouts video pipelines return."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.devices import DevicePlacement
from core.types import AdapterWeight
from services.adapter_records import NewAdapter, record_adapter
from services.generation import GenerationService, clip_frames
from services.runtime import ModelRuntime
from storage.artifacts import ArtifactStore
from storage.db import open_database
from training.artifact import adapter_file_metadata
from training.methods.motion_director import MotionDirector, MotionDirectorConfig

BASE = "builtin:tiny-video3d"
CPU = DevicePlacement(torch.device("cpu"), torch.float32)
PROMPT = "a red circle moving right"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A generation service with one motion adapter of ``tiny-video3d`` (random LoRA weights) in its catalog."""
    root = tmp_path_factory.mktemp("video3d")
    _, sessions = open_database(f"sqlite:///{root / 'catalog.db'}")
    store = ArtifactStore(root / "artifacts")
    runtime = ModelRuntime(models_dir, CPU)
    pipe = runtime.fresh_pipeline(BASE)
    config = MotionDirectorConfig.from_dict({"rank": 4, "num_frames": 4})
    method = MotionDirector(config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in method.inject(pipe.unet):
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    tensors = method.adapter_state_dict()
    metadata = adapter_file_metadata("motion_director", config, BASE, runtime.base_hash(BASE), [], "motion", 1,
                                     method_metadata=method.adapter_metadata())
    method.remove()
    spec = NewAdapter(name="wiggle", method="motion_director", kind="motion", base_model=BASE,
                      base_model_hash=runtime.base_hash(BASE), trigger_words=[], rank=4,
                      training_config=config.to_dict(), steps=1)
    adapter = record_adapter(sessions, store, "wiggle-id", spec, tensors, metadata)
    service = GenerationService(sessions, store, runtime, "builtin:tiny-sd")
    yield {"service": service, "runtime": runtime, "adapter": adapter.id}
    runtime.release()


def _clip(world: dict, frames: int, weight: float | None = None):
    adapters = () if weight is None else (AdapterWeight(world["adapter"], weight),)
    return world["service"].generate_video(PROMPT, steps=2, seed=3, frames=frames, adapters=adapters,
                                           base_model=BASE)


def test_a_text_to_video_model_makes_the_asked_frames(world: dict) -> None:
    service: GenerationService = world["service"]
    assert service.is_video_base(BASE) and BASE in service.base_choices()
    for frames in (5, 3):
        result = _clip(world, frames)
        assert result.frames.shape == (frames, 64, 64, 3) and result.frames.dtype == np.uint8
        assert result.image.params["video"]["frames"] == frames and result.image.params["base_model"] == BASE
    assert type(world["runtime"].pipeline(BASE)).__name__ == "TextToVideoSDPipeline"


def test_a_motion_adapter_acts_by_its_weight(world: dict) -> None:
    plain = _clip(world, 4)
    off = _clip(world, 4, weight=0.0)
    on = _clip(world, 4, weight=1.0)
    np.testing.assert_array_equal(off.frames, plain.frames)
    assert np.abs(on.frames.astype(int) - plain.frames.astype(int)).mean() > 0.5
    np.testing.assert_array_equal(_clip(world, 4).frames, plain.frames)  # switched off again
    unet = world["runtime"].pipeline(BASE).unet
    assert world["adapter"] in unet.peft_config
    lora_paths = {name.rsplit(".lora_A", 1)[0] for name, _ in unet.named_modules() if ".lora_A." in name}
    assert lora_paths and all(p.startswith("transformer_in.") or ".temp_attentions." in p for p in lora_paths)


def test_frame_layouts_are_normalised() -> None:
    rng = np.random.default_rng(0)
    floats = rng.random((1, 3, 8, 8, 3)).astype(np.float32)  # a batch of clips in [0, 1] (diffusers' "np")
    expected = np.clip(np.rint(floats[0] * 255.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(clip_frames(floats), expected)
    np.testing.assert_array_equal(clip_frames(floats[0]), expected)  # one clip
    np.testing.assert_array_equal(clip_frames(list(expected)), expected)  # a list of uint8 frames (older diffusers)
    np.testing.assert_array_equal(clip_frames(torch.from_numpy(floats)), expected)
    with pytest.raises(ValueError, match="expected \\(F, H, W, 3\\)"):
        clip_frames(np.zeros((3, 8, 8)))
