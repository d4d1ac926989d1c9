"""``app.main.build_ui`` assembles every tab from real services, without launching a server."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr
import pytest

from app.main import build_ui
from services.container import Services, build_services

TAB_IDS = {"train", "jobs", "gallery", "generate"}
ELEM_IDS = {
    "train-files", "train-name", "train-trigger", "train-kind", "train-method", "train-steps", "train-rank",
    "train-submit", "train-status", "jobs-table", "jobs-selected", "jobs-cancel", "jobs-retry", "jobs-top",
    "jobs-save-now", "jobs-sample-now", "jobs-log", "jobs-detail", "jobs-loss",
    "jobs-preview", "gallery-search", "gallery-refresh", "gallery-cards", "gallery-detail", "gallery-download",
    "gallery-delete", "gallery-confirm-delete", "gallery-restore", "gen-prompt", "gen-submit", "gen-result",
    "gen-status", "gen-history", "gen-base", "gen-frames", "gen-video", "gallery-preview",
    *(f"gen-adapter-{i}" for i in range(4)), *(f"gen-weight-{i}" for i in range(4)),
}
API_NAMES = {"train", "job_status", "job_log", "cancel_job", "retry_job", "move_job_to_top", "save_now", "sample_now",
             "list_adapters", "adapter_choices", "generate"}


@pytest.fixture()
def services(settings) -> Iterator[Services]:
    built = build_services(settings)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture()
def demo(services: Services) -> gr.Blocks:
    return build_ui(services)


def test_every_tab_is_present(demo: gr.Blocks) -> None:
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert {t.id for t in tabs} >= TAB_IDS
    assert [t.label for t in tabs if t.id in TAB_IDS] == ["Train", "Jobs", "Gallery", "Generate"]
    assert demo.title == "LoRA Studio"


def test_targetable_elements_exist(demo: gr.Blocks) -> None:
    present = {b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert ELEM_IDS <= present, f"missing elem_ids: {sorted(ELEM_IDS - present)}"


def test_train_form_offers_registered_methods(demo: gr.Blocks, services: Services) -> None:
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    method = by_id["train-method"]
    assert [value for _, value in method.choices] == services.training.list_methods()
    assert method.value == "lora"
    defaults = {f["name"]: f["default"] for f in services.training.describe_method("lora").fields}
    assert by_id["train-steps"].value == defaults["max_steps"]
    assert by_id["train-rank"].value == defaults["rank"]
    assert [value for _, value in by_id["gen-composer"].choices] == services.generation.list_composers()


def test_handlers_have_stable_api_names(demo: gr.Blocks) -> None:
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert API_NAMES <= names, f"missing api names: {sorted(API_NAMES - names)}"


def test_config_serialises(demo: gr.Blocks) -> None:
    config = demo.get_config_file()
    assert config["title"] == "LoRA Studio"
    assert len(config["components"]) > 40


def test_jobs_tab_operations(demo: gr.Blocks, services: Services) -> None:
    from core.types import GenerationRequest

    handlers = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name}
    first, second = (services.generation.submit(GenerationRequest(prompt="a disc", seed=s, steps=2)).id
                     for s in (1, 2))
    handlers["move_job_to_top"](first)
    assert services.jobs.get(first).priority > services.jobs.get(second).priority
    handlers["cancel_job"](second)
    handlers["retry_job"](second)
    assert services.jobs.get(second).status == "queued"
    log = handlers["job_log"](second)
    assert "cancelled before it started" in log and "queued again (retry)" in log
    for name in ("save_now", "sample_now", "retry_job"):
        with pytest.raises(gr.Error):
            handlers[name](first)  # queued, not running / not finished
    with pytest.raises(gr.Error, match="pick a job"):
        handlers["retry_job"](None)


def _clip_files(folder) -> list:
    """Two short MP4 clips of a bar moving right, encoded with PyAV, and a caption for one."""
    import av
    import numpy as np

    folder.mkdir()
    paths = []
    for name, colour in (("left.mp4", (200, 40, 40)), ("right.mp4", (40, 200, 40))):
        frames = np.full((6, 64, 64, 3), 30, np.uint8)
        for i in range(6):
            frames[i, :, i * 10:i * 10 + 6] = colour
        with av.open(str(folder / name), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width = stream.height = 64
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(str(folder / name))
    (folder / "left.txt").write_text("a red bar moving right")
    return [*paths, str(folder / "left.txt")]


def test_motion_kind_takes_clips_and_the_video_method(demo: gr.Blocks, services: Services, tmp_path) -> None:
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert [value for _, value in by_id["train-kind"].choices] == ["subject", "style", "motion"]
    assert ".mp4" in by_id["train-files"].file_types and ".gif" in by_id["train-files"].file_types
    handlers = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name}
    method, files = handlers["on_kind"]("motion", "lora")
    assert method["value"] == "motion_director" and files["label"].startswith("Clips (mp4, webm, animated gif)")
    method, files = handlers["on_kind"]("style", "motion_director")
    assert method["value"] == "lora" and files["label"].startswith("Images")
    with pytest.raises(gr.Error, match="upload at least one clip"):
        handlers["train"]([], "move", "", "motion", "motion_director", 2, 4, {})
    message = handlers["train"](_clip_files(tmp_path / "clips"), "bar-move", "", "motion", "motion_director", 2, 4,
                                {"preview_every": 0})
    assert "Queued **train bar-move (motion_director)**" in message and "with 2 clip(s)" in message
    (dataset,) = services.datasets.list_datasets()
    assert services.datasets.is_clip_dataset(dataset.id)
    folder = services.datasets.clip_folder(dataset.id)
    assert (folder / "left.txt").read_text() == "a red bar moving right"
    defaults = {f["name"]: f["default"] for f in services.training.describe_method("motion_director", "motion").fields}
    assert len(list((folder / "right").glob("frame-*.png"))) == defaults["num_frames"]  # the config's frame count


def test_a_video_base_plays_the_clip(demo: gr.Blocks, services: Services) -> None:
    import torch

    handlers = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name}
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert "builtin:tiny-video" in [value for _, value in by_id["gen-base"].choices]
    form = ["a bar moving right", "", 3, 2, 7.5, "merge", *[None] * 4, *[1.0] * 4, *[""] * 4]
    video_base = "builtin:tiny-video"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = handlers["generate"](*form, {}, video_base, 4)
        _, status, _, _ = next(run)
        assert status.startswith("queued job")
        job_id = services.jobs.list_jobs()[0].id
        assert services.worker.run_once(job_id)
        *_, (_, status, history, image_id) = run
    finally:
        torch.set_num_threads(threads)
    assert "seed 3" in status and len(history) == 1
    video, still = handlers["show_video"](image_id)
    assert video["visible"] and video["value"].endswith(".mp4") and still["visible"] is False
    assert handlers["show_video"](None)[0]["visible"] is False
    with pytest.raises(gr.Error, match="comparing composers is for image models"):
        next(handlers["compare"](*form, ["merge", "switch"], {}, video_base))
