"""A motion training job end to end: a clip dataset folder in the store, ``submit`` with kind ``motion`` and method
``motion_director``, the worker runs ``MotionTrainer``, the adapter is recorded like an image adapter and attaches to
the video base; mismatched kinds, methods and bases are refused at submit."""

from __future__ import annotations

import json

import pytest

from core.builtin import DEFAULT_VIDEO_BUILTIN
from core.io import load_safetensors
from core.pipelines import BaseModelSource
from services.container import build_services
from services.runtime import is_video_base
from tests.clip_media import gif_bytes
from training.artifact import load_adapter
from training.world.dataset import concept_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"rank": 4, "max_steps": 2, "num_frames": 4, "resolution": 32, "preview_every": 2, "preview_steps": 1,
        "checkpoint_every": 1}


@pytest.fixture()
def services(settings):
    built = build_services(settings)
    yield built
    built.close()


def _clip_dataset(services, tmp_path, count: int = 2) -> str:
    """A motion dataset made the way an upload makes it: GIF clips with ``.txt`` captions."""
    files = []
    for sample in concept_dataset("zigzag", count):
        gif = tmp_path / f"clip{sample.index}.gif"
        gif.write_bytes(gif_bytes(sample.pixels, durations=100))
        (tmp_path / f"clip{sample.index}.txt").write_text(sample.caption)
        files += [gif, tmp_path / f"clip{sample.index}.txt"]
    return services.datasets.create_clip_dataset("zigzags", files, frames=4, size=32).id


def test_motion_job_trains_records_and_attaches(services, tmp_path) -> None:
    dataset_id = _clip_dataset(services, tmp_path)
    default = services.training.check(name="zigzag", method="motion_director", kind="motion", config=FAST)
    assert default["base_model"] == f"builtin:{DEFAULT_VIDEO_BUILTIN}"  # a motion's default base: the video model
    job = services.training.submit(dataset_id=dataset_id, name="zigzag", method="motion_director", kind="motion",
                                   config=FAST, base_model="builtin:tiny-video")
    assert job.payload["config"]["num_frames"] == 4 and job.payload["config"]["rank"] == 4
    assert services.worker.run_once(job.id)
    done = services.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    adapter = services.catalog.get_adapter(done.result_ref)
    assert (adapter.method, adapter.kind, adapter.steps, adapter.rank) == ("motion_director", "motion", 2, 4)
    assert adapter.preview_paths
    tensors, metadata = load_safetensors(services.training._store.resolve(adapter.file_path))
    assert metadata["lorastudio.kind"] == "motion" and metadata["lorastudio.method"] == "motion_director"
    pipe = services.runtime.fresh_pipeline("builtin:tiny-video")
    attached = load_adapter(pipe, tensors, metadata, "zigzag")
    assert "zigzag" in pipe.unet.peft_config and attached.name == "zigzag"


def test_motion_submissions_are_checked(services, tmp_path) -> None:
    dataset_id = _clip_dataset(services, tmp_path, count=1)
    submit = services.training.submit
    with pytest.raises(ValueError, match="video method"):
        submit(dataset_id=dataset_id, name="a", method="lora", kind="motion", config={"max_steps": 1})
    with pytest.raises(ValueError, match="video method"):
        submit(dataset_id=dataset_id, name="b", method="motion_director", kind="style", config=FAST)
    with pytest.raises(ValueError, match="trains on a video base model; 'builtin:tiny-sd' is an image model"):
        submit(dataset_id=dataset_id, name="c", method="motion_director", kind="motion", config=FAST,
               base_model="builtin:tiny-sd")
    with pytest.raises(ValueError, match="trains on an image base model; 'builtin:tiny-video' is a video model"):
        submit(dataset_id=dataset_id, name="d", method="lora", kind="style", config={"max_steps": 1},
               base_model="builtin:tiny-video")
    with pytest.raises(ValueError, match="hflip_prob"):
        submit(dataset_id=dataset_id, name="e", method="motion_director", kind="motion", config={"flip": True})


@pytest.mark.parametrize(("index", "expected"), [
    ({"_class_name": "AnimateDiffPipeline"}, True),
    ({"_class_name": "TextToVideoSDPipeline"}, True),
    ({"_class_name": "StableDiffusionPipeline"}, False),
    (["AnimateDiffPipeline"], False),
    (None, None),  # no readable model_index.json: cannot tell without loading
])
def test_video_bases_are_told_from_the_model_index(tmp_path, index, expected) -> None:
    if index is not None:
        (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert is_video_base(BaseModelSource(str(tmp_path), "folder", str(tmp_path))) is expected
    for kind in ("hub", "single_file"):  # told only by loading
        assert is_video_base(BaseModelSource("someone/model", kind, "someone/model")) is None
