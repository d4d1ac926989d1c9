"""Clips from the built-in AnimateDiff model (``builtin:tiny-video``): shapes, seeds, the stored MP4 and animated PNG,
and an image LoRA of ``builtin:tiny-sd`` attached to the motion UNet through the runtime with its one weight."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from core.animation import decode_animation
from core.devices import DevicePlacement
from core.types import AdapterWeight, GenerationRequest
from services.adapter_records import NewAdapter, record_adapter
from services.generation import GenerationService, video_file
from services.runtime import ModelRuntime
from services.worker import Worker
from storage.artifacts import ArtifactStore
from storage.db import open_database
from tests.training.conftest import lora_config
from training.artifact import adapter_file_metadata
from training.methods.lora import LoRA

IMAGE_BASE, VIDEO_BASE = "builtin:tiny-sd", "builtin:tiny-video"
CPU = DevicePlacement(torch.device("cpu"), torch.float32)
PROMPT = "a red square moving right"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A generation service on SQLite and a local store, with one random image LoRA of ``tiny-sd`` in its catalog."""
    root = tmp_path_factory.mktemp("video")
    _, sessions = open_database(f"sqlite:///{root / 'catalog.db'}")
    store = ArtifactStore(root / "artifacts")
    runtime = ModelRuntime(models_dir, CPU)
    image_pipe = runtime.fresh_pipeline(IMAGE_BASE)
    config = lora_config(rank=4)
    lora = LoRA(config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in lora.inject(image_pipe.unet):
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    tensors = {k: v.clone() for k, v in lora.adapter_state_dict().items()}
    metadata = adapter_file_metadata("lora", config, IMAGE_BASE, runtime.base_hash(IMAGE_BASE), [], "style", 1,
                                     method_metadata=lora.adapter_metadata())
    spec = NewAdapter(name="red-style", method="lora", kind="style", base_model=IMAGE_BASE,
                      base_model_hash=runtime.base_hash(IMAGE_BASE), trigger_words=[], rank=4,
                      training_config=config.to_dict(), steps=1)
    adapter = record_adapter(sessions, store, "red-style-id", spec, tensors, metadata)
    on_video = NewAdapter(**{**spec.__dict__, "name": "red-on-video", "base_model": VIDEO_BASE,
                             "base_model_hash": runtime.base_hash(VIDEO_BASE)})
    record_adapter(sessions, store, "red-on-video-id", on_video, tensors, metadata)  # catalogued on the video base
    del image_pipe, lora
    service = GenerationService(sessions, store, runtime, IMAGE_BASE)
    yield {"service": service, "store": store, "runtime": runtime, "sessions": sessions, "adapter": adapter.id}
    runtime.release()


def _clip(world: dict, seed: int = 3, weight: float | None = None, frames: int = 8):
    adapters = () if weight is None else (AdapterWeight(world["adapter"], weight),)
    return world["service"].generate_video(PROMPT, steps=2, guidance_scale=7.5, seed=seed, frames=frames,
                                           adapters=adapters, base_model=VIDEO_BASE)


def test_a_clip_is_frames_an_animated_png_and_an_mp4(world: dict) -> None:
    result = _clip(world)
    assert result.frames.shape == (8, 64, 64, 3) and result.frames.dtype == np.uint8
    assert result.frames.std() > 0 and not np.array_equal(result.frames[0], result.frames[-1])
    image = result.image
    store: ArtifactStore = world["store"]
    assert image.path.endswith(".png") and image.params["base_model"] == VIDEO_BASE
    assert image.params["video"]["frames"] == 8 and image.params["video"]["fps"] == 8
    np.testing.assert_array_equal(decode_animation(store.resolve(image.path).read_bytes()), result.frames)
    mp4 = store.resolve(video_file(image))
    assert mp4.suffix == ".mp4" and mp4.parent.name == "media"
    with av.open(io.BytesIO(mp4.read_bytes())) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (8, 64, 64, 3)
    blocks = [clip.astype(float).reshape(8, 8, 8, 8, 8, 3).mean(axis=(2, 4)) for clip in (decoded, result.frames)]
    assert np.abs(blocks[0] - blocks[1]).mean() < 4  # H.264 loses the fine noise, 8×8 block colours stay
    assert world["service"].get_image(image.id).params["video"]["mp4"] == video_file(image)


def test_the_seed_decides_the_clip(world: dict) -> None:
    first, again, other = _clip(world, seed=11), _clip(world, seed=11), _clip(world, seed=12)
    np.testing.assert_array_equal(first.frames, again.frames)
    assert not np.array_equal(first.frames, other.frames)
    assert _clip(world, seed=11, frames=4).frames.shape == (4, 64, 64, 3)


def test_an_image_lora_acts_on_the_motion_unet_and_weight_zero_is_no_adapter(world: dict) -> None:
    plain = _clip(world, seed=5)
    off = _clip(world, seed=5, weight=0.0)
    on = _clip(world, seed=5, weight=1.0)
    np.testing.assert_array_equal(off.frames, plain.frames)
    assert np.abs(on.frames.astype(int) - plain.frames.astype(int)).mean() > 1.0
    np.testing.assert_array_equal(_clip(world, seed=5, weight=1.0).frames, on.frames)  # resident, same result
    np.testing.assert_array_equal(_clip(world, seed=5).frames, plain.frames)  # switched off again
    unet = world["runtime"].pipeline(VIDEO_BASE).unet
    assert type(unet).__name__ == "UNetMotionModel" and world["adapter"] in unet.peft_config
    lora_paths = {name.rsplit(".lora_A", 1)[0] for name, _ in unet.named_modules() if ".lora_A." in name}
    assert lora_paths and all(".attentions." in p and "motion_modules" not in p for p in lora_paths)
    assert "red-style was trained on builtin:tiny-sd" in on.image.notes[0]
    assert on.image.adapters[0].weight == 1.0


def test_video_requests_go_through_the_queue(world: dict) -> None:
    service: GenerationService = world["service"]
    request = GenerationRequest(prompt=PROMPT, seed=3, steps=2, composer="switch",
                                adapters=(AdapterWeight("red-style", 0.5),))
    job = service.submit(request, base_model=VIDEO_BASE, frames=4, fps=4)
    assert job.payload["video"] == {"frames": 4, "fps": 4.0} and job.title.startswith("video: ")
    assert any("switch composer is for images" in w for w in job.payload["warnings"])
    worker = Worker(world["sessions"], {"generate": service.run_generate_job}, "video-test-worker")
    assert worker.run_once(job.id)
    image = service.get_image(service.history(limit=1)[0].id)
    assert image.job_id == job.id and image.params["video"]["frames"] == 4 and image.params["video"]["fps"] == 4
    assert decode_animation(world["store"].resolve(image.path).read_bytes()).shape == (4, 64, 64, 3)
    image_job = service.submit(GenerationRequest(prompt=PROMPT, steps=2, adapters=(AdapterWeight("red-style"),)))
    assert "video" not in image_job.payload and image_job.payload["base_model"] == IMAGE_BASE


def test_bad_video_requests_are_refused(world: dict) -> None:
    service: GenerationService = world["service"]
    with pytest.raises(ValueError, match="builtin:tiny-sd is not a video model"):
        service.generate_video(PROMPT, steps=2, base_model=IMAGE_BASE)
    with pytest.raises(ValueError, match="frames must be between 2 and 64, got 1"):
        service.generate_video(PROMPT, steps=2, frames=1, base_model=VIDEO_BASE)
    with pytest.raises(ValueError, match="at most 32 frames"):
        service.generate_video(PROMPT, steps=1, frames=40, base_model=VIDEO_BASE)
    with pytest.raises(ValueError, match="the prompt is empty"):
        service.generate_video("  ", steps=2, base_model=VIDEO_BASE)
    video_adapter = (AdapterWeight("red-on-video", 1.0),)
    with pytest.raises(ValueError, match="comparing composers is for image models"):
        service.compare(GenerationRequest(prompt=PROMPT, adapters=video_adapter), ["merge", "switch"])
    automatic = service.submit(GenerationRequest(prompt=PROMPT, steps=2, adapters=video_adapter))
    assert automatic.payload["base_model"] == VIDEO_BASE and automatic.payload["video"]["frames"] == 8
    assert automatic.payload["warnings"] == []  # trained on the base it runs on
    with pytest.raises(ValueError, match="trained on builtin:tiny-video, not on builtin:tiny-sd"):
        service.submit(GenerationRequest(prompt=PROMPT, adapters=video_adapter), base_model=IMAGE_BASE)
    choices = service.base_choices()  # the default, the built-ins, the adapters' bases, each once
    assert choices[0] == IMAGE_BASE and VIDEO_BASE in choices and len(set(choices)) == len(choices)
    assert service.is_video_base(VIDEO_BASE) and not service.is_video_base(IMAGE_BASE)
    assert not service.is_video_base("/no/such/folder")
